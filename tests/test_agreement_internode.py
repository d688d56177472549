"""Ranks agree or fail together across nodes (docs/semantics.md, "Trust"): every internode
operation's global barrier carries its parameter words to every rank (an NVL store for the ranks
of the node, the put that carries the barrier signal for the ranks of other nodes; moelink._agreement
names the words); a rank that disagrees on any of them makes every rank raise RankMismatch naming
the ranks and the field, before anything is exchanged, and poisons the Buffer (as intranode).

Real rank processes posing as nodes: 2 ranks as 2x1 and 4 ranks as 2x2 (ranks_per_node < the group
size, as tests/test_internode.py). In every case the last rank deviates: in 2x2 rank 2 sees it
through the NVL window and ranks 0 and 1 through the scale-out window."""

from __future__ import annotations

import pytest
import torch

import moelink
from moelink import errors
from multiproc import rank_group_fixture

group = rank_group_fixture(2, 4, case_timeout=120, env={"MOELINK_TIMEOUT_S": "20"})

_CONFIGS = [moelink.Config(2, 4, 32, 4, 32), moelink.Config(4, 4, 32, 4, 32), moelink.Config(2, 4, 32, 4, 48)]


def _ranks_per_node(world: int) -> int:
    return max(1, world // 2)  # 2 -> 2x1, 4 -> 2x2


def _buffer(ctx) -> moelink.Buffer:
    """One Buffer large enough for every deviating shape of this file."""
    world, rpn = ctx.world_size, _ranks_per_node(ctx.world_size)
    nvl = max(c.get_nvl_buffer_size_hint(64, world, ranks_per_node=rpn, num_topk=2) for c in _CONFIGS)
    rdma = max(c.get_rdma_buffer_size_hint(64, world, ranks_per_node=rpn, num_topk=2) for c in _CONFIGS)
    return moelink.Buffer(ctx.group, nvl, rdma, ranks_per_node=rpn)


def _layout(buffer, n, num_topk, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    topk = torch.stack([torch.randperm(num_experts, generator=g)[:num_topk] for _ in range(n)])
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, num_experts)
    return dict(topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def _case(ctx, field, cached=False):
    world, rank = ctx.world_size, ctx.rank
    odd = rank == world - 1
    hidden, num_topk, experts, config, scales = 16, 2, 2 * world, _CONFIGS[0], 0
    if odd and field == "hidden":
        hidden = 32
    if odd and field == "num_topk":
        num_topk = 1
    if odd and field == "num_experts":
        experts = 4 * world
    if odd and field == "config.num_sms":
        config = _CONFIGS[1]
    if odd and field == "config.num_max_rdma_chunked_recv_tokens":
        config = _CONFIGS[2]
    if field == "num_scales (FP8 scales per token)":
        scales = 2 if odd else 1
    buffer = _buffer(ctx)
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
                if cached:
                    buffer.dispatch(x, handle=first if odd else second, config=config)
                else:
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
        # As intranode: the Buffer is poisoned (peers may be mid-operation), a new one works.
        with pytest.raises(errors.BufferUnusable):
            buffer.dispatch(x, config=config, **layout)
    finally:
        buffer.destroy()
    _agreeing_calls(ctx)
    return True


def _agreeing_calls(ctx, rounds: int = 3):
    """Everyone agreeing works on a fresh Buffer: dispatches, cached dispatches and combines in a
    row (both parities of the agreement slots, several times), with exact results."""
    world, rank = ctx.world_size, ctx.rank
    config = _CONFIGS[0]
    with _buffer(ctx) as fresh:
        for i in range(rounds):
            layout = _layout(fresh, 3 + i, 2, 2 * world, seed=100 * i + rank)
            x = torch.randn(3 + i, 16).to(torch.bfloat16)
            recv, _, _, _, handle, _ = fresh.dispatch(x, config=config, **layout)
            cached, _, _, _, _, _ = fresh.dispatch(x, handle=handle, config=config)
            assert torch.equal(cached, recv)
            combined = fresh.combine(recv, handle, config=config)[0]
            # Identity experts: each token comes back once per rank it went to (x * 1 or x * 2: exact).
            copies = layout["is_token_in_rank"].sum(dim=1, keepdim=True).to(torch.bfloat16)
            assert torch.equal(combined, x * copies), f"round {i}"


_FIELDS = ["hidden", "num_topk", "num_experts", "config.num_sms", "config.num_max_rdma_chunked_recv_tokens",
           "num_scales (FP8 scales per token)", "handle (the dispatch it came from)", "operation"]


@pytest.mark.parametrize("field", _FIELDS)
def test_a_rank_that_disagrees_fails_every_rank(group, field):
    assert group.run(_case, field) == [True] * group.world_size


def test_cached_dispatches_with_different_handles_fail_every_rank(group):
    assert group.run(_case, "handle (the dispatch it came from)", cached=True) == [True] * group.world_size


def test_agreeing_ranks_pass(group):
    assert group.run(_agreeing_calls, 4) == [None] * group.world_size


def test_internode_words_compare_the_rdma_queue_only_across_nodes():
    from moelink import _agreement
    config = moelink.Config(2, 4, 32, 4, 48)
    one_node = _agreement.words("dispatch", hidden=8, x_dtype=torch.bfloat16, config=config)
    across = _agreement.words("dispatch", hidden=8, x_dtype=torch.bfloat16, config=config, internode=True)
    word = _agreement.FIELDS.index("config.num_max_rdma_chunked_recv_tokens")
    assert one_node[word] == 0 and across[word] == 48 and one_node[:word] == across[:word]
    assert len(across) <= moelink._host.intranode.AGREEMENT_WORDS
