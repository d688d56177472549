"""Properties of moelink.reference.dispatch: the plain-torch semantics every intranode dispatch and
combine kernel is tested against (conservation, receive order, local expert ids, alignment,
round trips, bias, padding, FP8 pass-through, the combine tolerance) and its input checks."""

from __future__ import annotations

import pytest
import torch

from moelink import errors
from moelink.reference.dispatch import (
    assert_combine_close,
    combine_tolerance,
    intranode_combine,
    intranode_dispatch,
)


def random_routing(gen, num_ranks, num_experts, num_topk, max_tokens=40, hidden=32, p_none=0.15, distinct=True):
    """Per-rank x (bf16), topk_idx (int64, some -1) and topk_weights (float32)."""
    xs, idxs, ws = [], [], []
    for _ in range(num_ranks):
        n = int(torch.randint(0, max_tokens + 1, (1,), generator=gen))
        if distinct:
            idx = torch.stack([torch.randperm(num_experts, generator=gen)[:num_topk] for _ in range(n)]) if n else \
                torch.empty(0, num_topk, dtype=torch.int64)
        else:
            idx = torch.randint(0, num_experts, (n, num_topk), generator=gen)
        idx = idx.masked_fill(torch.rand(n, num_topk, generator=gen) < p_none, -1)
        xs.append(torch.randn(n, hidden, generator=gen).to(torch.bfloat16))
        idxs.append(idx)
        ws.append(torch.rand(n, num_topk, generator=gen))
    return xs, idxs, ws


def ranks_of(idx, num_experts, num_ranks):
    per = num_experts // num_ranks
    return [sorted({int(e) // per for e in row if e >= 0}) for row in idx]


@pytest.mark.parametrize("num_ranks,num_experts,num_topk", [(2, 8, 2), (4, 16, 4), (3, 12, 8), (8, 64, 8), (4, 4, 1)])
def test_dispatch_properties(seed, num_ranks, num_experts, num_topk):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = random_routing(gen, num_ranks, num_experts, num_topk)
    out = intranode_dispatch(xs, idxs, num_experts, ws)
    per = num_experts // num_ranks
    expected_pairs = {(s, t, r) for s in range(num_ranks) for t, rs in enumerate(ranks_of(idxs[s], num_experts, num_ranks))
                      for r in rs}
    got_pairs = set()
    for r, d in enumerate(out):
        m = d.num_recv_tokens
        keys = list(zip(d.recv_src_rank.tolist(), d.recv_src_idx.tolist()))
        assert keys == sorted(keys) and len(set(keys)) == m  # by source rank, then token; once each
        got_pairs |= {(s, t, r) for s, t in keys}
        for row, (s, t) in enumerate(keys):
            assert torch.equal(d.recv_x[row], xs[s][t])  # the payload is copied bit for bit
            local = (idxs[s][t] >= r * per) & (idxs[s][t] < (r + 1) * per)
            assert torch.equal(d.recv_topk_idx[row], torch.where(local, idxs[s][t] - r * per, -1))
            assert torch.equal(d.recv_topk_weights[row], torch.where(local, ws[s][t], 0.0))
        assert len(d.num_recv_tokens_per_expert_list) == per
        assert d.num_recv_tokens_per_expert_list == torch.bincount(
            d.recv_topk_idx[d.recv_topk_idx >= 0], minlength=per).tolist()
    assert got_pairs == expected_pairs  # conservation: each (token, destination rank) exactly once


@pytest.mark.parametrize("alignment", [1, 3, 128])
def test_expert_alignment(seed, alignment):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = random_routing(gen, 4, 16, 4, max_tokens=80)
    plain = intranode_dispatch(xs, idxs, 16, ws)
    aligned = intranode_dispatch(xs, idxs, 16, ws, expert_alignment=alignment)
    for p, a in zip(plain, aligned):
        for c, ca in zip(p.num_recv_tokens_per_expert_list, a.num_recv_tokens_per_expert_list):
            assert ca % alignment == 0 and c <= ca < c + alignment
        assert torch.equal(p.recv_x, a.recv_x)  # alignment changes counts only


def test_duplicate_experts_count_twice_but_send_once():
    x = [torch.arange(8.0).view(2, 4)]
    idx = [torch.tensor([[1, 1], [0, -1]])]
    (d,) = intranode_dispatch(x, idx, 2)
    assert d.num_recv_tokens == 2 and d.num_recv_tokens_per_expert_list == [1, 2]
    assert d.recv_topk_weights is None


def test_routed_nowhere_zero_tokens_and_one_rank_takes_all(seed):
    gen = torch.Generator().manual_seed(seed)
    num_experts, hidden = 8, 16
    xs = [torch.randn(n, hidden, generator=gen) for n in (5, 0, 3, 4)]
    idxs = [torch.full((5, 2), -1), torch.empty(0, 2, dtype=torch.int64),
            torch.tensor([[6, 7], [7, -1], [6, 6]]), torch.tensor([[7, -1], [-1, 6], [6, 7], [7, 6]])]
    out = intranode_dispatch(xs, idxs, num_experts)
    assert [d.num_recv_tokens for d in out] == [0, 0, 0, 7]  # rank 3 owns experts 6, 7
    assert out[3].recv_src_rank.tolist() == [2] * 3 + [3] * 4
    back = intranode_combine([d.recv_x for d in out], out, [5, 0, 3, 4])
    assert torch.equal(back[0].combined_x, torch.zeros(5, hidden, dtype=torch.float64))  # went nowhere
    assert back[1].combined_x.shape == (0, hidden)
    assert torch.equal(back[2].combined_x, xs[2].double())


@pytest.mark.parametrize("num_ranks,num_experts,num_topk", [(2, 8, 2), (4, 32, 8), (5, 10, 3)])
def test_round_trip_counts_ranks_reached(seed, num_ranks, num_experts, num_topk):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = random_routing(gen, num_ranks, num_experts, num_topk, distinct=False)
    out = intranode_dispatch(xs, idxs, num_experts, ws)
    back = intranode_combine([d.recv_x for d in out], out, [x.shape[0] for x in xs],
                             topk_weights=[d.recv_topk_weights for d in out])
    for s in range(num_ranks):
        reached = torch.tensor([len(rs) for rs in ranks_of(idxs[s], num_experts, num_ranks)], dtype=torch.float64)
        assert torch.equal(back[s].combined_x, xs[s].double() * reached.unsqueeze(1))  # exact in float64
        assert torch.equal(back[s].num_terms, reached.long())
        # Returning the received weights gives back the original weights (0 where the slot was -1).
        assert torch.allclose(back[s].combined_topk_weights, torch.where(idxs[s] >= 0, ws[s], 0.0).double())


def test_combine_bias_tensor_and_pair(seed):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, _ = random_routing(gen, 3, 6, 2, hidden=8)
    out = intranode_dispatch(xs, idxs, 6)
    n = [x.shape[0] for x in xs]
    b0 = [torch.randn(k, 8, generator=gen).to(torch.bfloat16) for k in n]
    b1 = [torch.randn(k, 8, generator=gen).to(torch.bfloat16) for k in n]
    plain = intranode_combine([d.recv_x for d in out], out, n)
    single = intranode_combine([d.recv_x for d in out], out, n, bias=b0)
    pair = intranode_combine([d.recv_x for d in out], out, n, bias=[(a, b) for a, b in zip(b0, b1)])
    mixed = intranode_combine([d.recv_x for d in out], out, n, bias=[b0[0], None, (b0[2], b1[2])])
    for s in range(3):
        assert torch.equal(single[s].combined_x, plain[s].combined_x + b0[s].double())
        assert torch.equal(pair[s].combined_x, plain[s].combined_x + b0[s].double() + b1[s].double())
        assert torch.equal(pair[s].num_terms, plain[s].num_terms + 2)
    assert torch.equal(mixed[1].combined_x, plain[1].combined_x)
    assert torch.equal(mixed[2].combined_x, pair[2].combined_x)


def test_num_worst_tokens_pads(seed):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = random_routing(gen, 2, 4, 2, max_tokens=10)
    plain = intranode_dispatch(xs, idxs, 4, ws)
    worst = sum(x.shape[0] for x in xs)
    padded = intranode_dispatch(xs, idxs, 4, ws, num_worst_tokens=worst)
    for p, d in zip(plain, padded):
        m = p.num_recv_tokens
        assert d.num_recv_tokens == m and d.recv_x.shape[0] == worst and d.num_recv_tokens_per_expert_list == []
        assert torch.equal(d.recv_x[:m], p.recv_x) and torch.equal(d.recv_topk_idx[:m], p.recv_topk_idx)
        assert (d.recv_topk_idx[m:] == -1).all() and (d.recv_topk_weights[m:] == 0).all()
        assert (d.recv_src_rank[m:] == -1).all()
    back = intranode_combine([d.recv_x for d in padded], padded, [x.shape[0] for x in xs])  # padding ignored
    ref = intranode_combine([d.recv_x for d in plain], plain, [x.shape[0] for x in xs])
    assert all(torch.equal(a.combined_x, b.combined_x) for a, b in zip(back, ref))
    too_few = max(p.num_recv_tokens for p in plain) - 1
    if too_few >= 1:
        with pytest.raises(errors.InvalidArgument, match="num_worst_tokens"):
            intranode_dispatch(xs, idxs, 4, ws, num_worst_tokens=too_few)


def test_fp8_pair_travels_as_is(seed):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, _ = random_routing(gen, 2, 4, 2, hidden=256)
    fp8 = [(x.float().to(torch.float8_e4m3fn), torch.rand(x.shape[0], 2, generator=gen)) for x in xs]
    out = intranode_dispatch(fp8, idxs, 4)
    for d in out:
        q, scales = d.recv_x
        assert q.dtype == torch.float8_e4m3fn and scales.shape == (d.num_recv_tokens, 2)
        for row, (s, t) in enumerate(zip(d.recv_src_rank.tolist(), d.recv_src_idx.tolist())):
            assert torch.equal(q[row].view(torch.uint8), fp8[s][0][t].view(torch.uint8))
            assert torch.equal(scales[row], fp8[s][1][t])


def test_combine_tolerance_accepts_fp32_accumulation_and_rejects_errors(seed):
    gen = torch.Generator().manual_seed(seed)
    xs, idxs, ws = random_routing(gen, 4, 16, 8, max_tokens=30, hidden=64, p_none=0.0, distinct=False)
    out = intranode_dispatch(xs, idxs, 16, ws)
    n = [x.shape[0] for x in xs]
    bias = [torch.randn(k, 64, generator=gen).to(torch.bfloat16) for k in n]
    ref = intranode_combine([d.recv_x for d in out], out, n, [d.recv_topk_weights for d in out], bias=bias)
    for s in range(4):
        # What a kernel does: float32 sums in arbitrary order, one rounding to bf16.
        acc = bias[s].float().clone()
        accw = torch.zeros(n[s], 8)
        for r in reversed(range(4)):
            d = out[r]
            sel = (d.recv_src_rank == s).nonzero().flatten()
            acc.index_add_(0, d.recv_src_idx[sel], d.recv_x[sel].float())
            accw.index_add_(0, d.recv_src_idx[sel], d.recv_topk_weights[sel])
        assert_combine_close(acc.to(torch.bfloat16), accw, ref[s], context=f"rank {s}")
        if n[s]:
            assert (combine_tolerance(ref[s], torch.bfloat16) > 0).all()
            wrong = acc.to(torch.bfloat16)
            wrong[0, 0] += 0.25 + 0.05 * wrong[0, 0].abs()
            with pytest.raises(AssertionError, match=r"combined_x\[0, 0\]"):
                assert_combine_close(wrong, accw, ref[s])
            with pytest.raises(AssertionError, match="combined_topk_weights"):
                assert_combine_close(acc.to(torch.bfloat16), accw + 1e-3, ref[s])


def test_input_checks():
    x = [torch.zeros(2, 4), torch.zeros(1, 4)]
    idx = [torch.zeros(2, 2, dtype=torch.int64), torch.zeros(1, 2, dtype=torch.int64)]
    with pytest.raises(errors.InvalidArgument, match="topk_idx: expected one entry per rank"):
        intranode_dispatch(x, idx[:1], 4)
    with pytest.raises(errors.InvalidArgument, match="num_experts: expected a positive multiple"):
        intranode_dispatch(x, idx, 3)
    with pytest.raises(errors.InvalidArgument, match="expert_alignment"):
        intranode_dispatch(x, idx, 4, expert_alignment=0)
    with pytest.raises(errors.InvalidArgument, match="num_worst_tokens"):
        intranode_dispatch(x, idx, 4, num_worst_tokens=-1)
    with pytest.raises(errors.InvalidArgument, match=r"topk_idx\[1\]: expected expert ids in \[-1, 4\)"):
        intranode_dispatch(x, [idx[0], torch.tensor([[4, 0]])], 4)
    with pytest.raises(errors.InvalidShape, match=r"topk_idx\[0\]"):
        intranode_dispatch(x, [torch.zeros(3, 2, dtype=torch.int64), idx[1]], 4)
    with pytest.raises(errors.InvalidShape, match=r"topk_weights\[0\]"):
        intranode_dispatch(x, idx, 4, [torch.zeros(2, 3), torch.zeros(1, 2)])
    out = intranode_dispatch(x, idx, 4)
    with pytest.raises(errors.InvalidShape, match=r"x\[0\]"):
        intranode_combine([torch.zeros(0, 4), out[1].recv_x], out, [2, 1])
    with pytest.raises(errors.InvalidShape, match=r"bias\[1\]"):
        intranode_combine([d.recv_x for d in out], out, [2, 1], bias=[None, torch.zeros(2, 4)])
