"""The all_to_all_single baseline (moelink.bench.baseline) does the same job as the reference
dispatch and combine: same rows, in the documented receive order, on 2 rank processes."""

from __future__ import annotations

import pytest
import torch

from moelink import errors
from moelink.bench.baseline import baseline_combine, baseline_dispatch, memcpy_bandwidth
from moelink.reference.dispatch import assert_combine_close, intranode_combine, intranode_dispatch
from multiproc import rank_group_fixture

group = rank_group_fixture(2)


def _inputs(seed, num_ranks, num_experts, num_topk, hidden, tokens, fp8):
    """Every rank's inputs, built identically in every rank from the seed."""
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws, biases = [], [], [], []
    for n in tokens:
        idx = torch.randint(0, num_experts, (n, num_topk), generator=gen)
        idx = idx.masked_fill(torch.rand(n, num_topk, generator=gen) < 0.2, -1)
        x = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
        if fp8:
            x = (x.float().to(torch.float8_e4m3fn), torch.rand(n, hidden // 128, generator=gen))
        xs.append(x)
        idxs.append(idx)
        ws.append(torch.rand(n, num_topk, generator=gen))
        biases.append((torch.randn(n, hidden, generator=gen).to(torch.bfloat16),
                       torch.randn(n, hidden, generator=gen).to(torch.bfloat16)))
    return xs, idxs, ws, biases


def _bits(t):
    return t.contiguous().view(torch.uint8)


def _compare(ctx, seed, num_experts, num_topk, hidden, tokens, fp8, alignment):
    r = ctx.rank
    xs, idxs, ws, biases = _inputs(seed, ctx.world_size, num_experts, num_topk, hidden, tokens, fp8)
    recv_x, recv_idx, recv_w, counts, handle = baseline_dispatch(xs[r], idxs[r], num_experts, ws[r],
                                                                 expert_alignment=alignment)
    ref = intranode_dispatch(xs, idxs, num_experts, ws, expert_alignment=alignment)[r]
    if fp8:
        assert torch.equal(_bits(recv_x[0]), _bits(ref.recv_x[0])) and torch.equal(recv_x[1], ref.recv_x[1])
    else:
        assert torch.equal(_bits(recv_x), _bits(ref.recv_x))  # same rows, same order, bit for bit
    assert torch.equal(recv_idx, ref.recv_topk_idx) and torch.equal(recv_w, ref.recv_topk_weights)
    assert counts == ref.num_recv_tokens_per_expert_list

    # Combine what every rank received (as if the experts were the identity), with weights and bias.
    all_recv = intranode_dispatch([x[0].float().to(torch.bfloat16) if fp8 else x for x in xs], idxs, num_experts, ws)
    expert_out = all_recv[r].recv_x
    combined, combined_w = baseline_combine(expert_out, handle, recv_w, bias=biases[r])
    expected = intranode_combine([d.recv_x for d in all_recv], all_recv, tokens,
                                 [d.recv_topk_weights for d in all_recv], bias=biases)[r]
    assert_combine_close(combined, combined_w, expected, context=f"rank {r}")
    plain, no_w = baseline_combine(expert_out, handle)
    assert no_w is None
    assert_combine_close(plain, None, intranode_combine([d.recv_x for d in all_recv], all_recv, tokens)[r])
    return recv_x[0].shape[0] if fp8 else recv_x.shape[0]


@pytest.mark.parametrize("tokens,num_experts,num_topk,hidden,fp8,alignment", [
    ((37, 21), 8, 4, 64, False, 1),
    ((0, 12), 4, 2, 128, False, 4),      # a rank with no tokens
    ((16, 16), 16, 8, 256, True, 1),     # FP8 pair
    ((50, 3), 2, 1, 32, False, 128),     # top-1, one expert per rank
])
def test_baseline_matches_reference(group, seed, tokens, num_experts, num_topk, hidden, fp8, alignment):
    received = group.run(_compare, seed, num_experts, num_topk, hidden, tokens, fp8, alignment)
    assert len(received) == 2


def test_memcpy_bandwidth():
    rate = memcpy_bandwidth(1 << 20, iters=3, warmup=1)
    assert 1e6 < rate < 1e13  # bytes/s, finite and plausible
    with pytest.raises(errors.InvalidArgument, match="num_bytes"):
        memcpy_bandwidth(0)
