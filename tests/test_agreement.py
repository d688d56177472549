"""Ranks agree or fail together (docs/semantics.md, "Trust"): every intranode operation sends its
parameter words beside its node-barrier store (moelink._agreement); a rank that disagrees on any
of them makes every rank raise RankMismatch naming the ranks and the field, before anything is
exchanged. Real rank processes, 2 and 4 ranks; in every case the last rank deviates."""

from __future__ import annotations

import pytest
import torch

import moelink
from moelink import errors
from multiproc import rank_group_fixture

group = rank_group_fixture(2, 4, case_timeout=120, env={"MOELINK_TIMEOUT_S": "20"})

_WINDOW = 4 << 20


def _layout(buffer, n, num_topk, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    topk = torch.stack([torch.randperm(num_experts, generator=g)[:num_topk] for _ in range(n)])
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, num_experts)
    return dict(topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def _case(ctx, field, deviant):
    world, rank = ctx.world_size, ctx.rank
    odd = rank == world - 1
    hidden, num_topk, experts, num_sms, scales = 16, 2, 2 * world, 2, 0
    if odd and field == "hidden":
        hidden = 32
    if odd and field == "num_topk":
        num_topk = 1
    if odd and field == "num_experts":
        experts = 4 * world
    if odd and field == "config.num_sms":
        num_sms = 4
    if field == "num_scales (FP8 scales per token)":
        scales = 2 if odd else 1
    config = moelink.Config(num_sms, 4, 32)
    buffer = moelink.Buffer(ctx.group, _WINDOW)
    try:
        n = 5 + rank
        layout = _layout(buffer, n, num_topk, experts, seed=rank)
        if scales:
            x = (torch.randint(0, 100, (n, hidden), dtype=torch.uint8), torch.ones(n, scales))
        else:
            x = torch.randn(n, hidden).to(torch.bfloat16)
        if field.startswith("handle"):
            recv, _, _, _, first, _ = buffer.dispatch(x, config=config, **layout)
            recv2, _, _, _, second, _ = buffer.dispatch(x, config=config, **layout)
            # Same shapes, so every local check passes: only the handles' dispatches differ.
            with pytest.raises(errors.RankMismatch) as info:
                buffer.combine(recv, first if odd else second, config=config)
        elif field == "operation":
            recv, _, _, _, handle, _ = buffer.dispatch(x, config=config, **layout)
            with pytest.raises(errors.RankMismatch) as info:
                if odd:  # a cached dispatch where the others combine
                    buffer.dispatch(x, handle=handle, config=config)
                else:
                    buffer.combine(recv, handle, config=config)
        else:
            with pytest.raises(errors.RankMismatch) as info:
                buffer.dispatch(x, config=config, **layout)
        exc = info.value
        assert exc.field == field, (exc.field, str(exc))
        assert rank in exc.ranks and (world - 1 in exc.ranks), (exc.ranks, str(exc))
        assert field in str(exc) and isinstance(exc, errors.DeviceAssert)
        with pytest.raises(errors.BufferUnusable):
            buffer.dispatch(x, config=config, **layout)
    finally:
        buffer.destroy()
    # Everyone agreeing again works on a fresh Buffer.
    with moelink.Buffer(ctx.group, _WINDOW) as fresh:
        layout = _layout(fresh, 3, 2, 2 * world, seed=rank + 10)
        x = torch.randn(3, 16).to(torch.bfloat16)
        recv, _, _, _, handle, _ = fresh.dispatch(x, config=moelink.Config(2, 4, 32), **layout)
        combined = fresh.combine(recv, handle, config=moelink.Config(2, 4, 32))[0]
        assert combined.shape == x.shape
    return True


@pytest.mark.parametrize("field", ["hidden", "num_topk", "num_experts", "config.num_sms",
                                   "num_scales (FP8 scales per token)", "handle (the dispatch it came from)",
                                   "operation"])
def test_a_rank_that_disagrees_fails_every_rank(group, field):
    assert group.run(_case, field, group.world_size - 1) == [True] * group.world_size


def test_translation_names_fields():
    from moelink import _agreement
    words = _agreement.words("combine", hidden=8, x_dtype=torch.bfloat16, config=moelink.Config(2, 4, 32))
    assert len(words) == len(_agreement.FIELDS) <= moelink._host.intranode.AGREEMENT_WORDS
    exc = errors.DeviceAssert("MOELINK_DEVICE_CHECK(x) failed: moelink agreement: rank 0 and rank 3 disagree on word "
                              "2 (1 here, 3 there)")
    mismatch = _agreement.translate("dispatch", exc)
    assert isinstance(mismatch, errors.RankMismatch) and mismatch.ranks == (0, 3) and mismatch.field == "x dtype"
    assert "torch.bfloat16" in str(mismatch) and "torch.float32" in str(mismatch)
    other = errors.DeviceAssert("something else")
    assert _agreement.translate("dispatch", other) is other
