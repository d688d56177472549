"""moelink.routing.node_limited_topk against a straightforward per-token loop (numpy float32
scalars, Python sorting), its node-limit property, edge cases and every validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moelink import errors
from moelink.routing import node_limited_topk


def loop_reference(scores, num_topk, num_groups, max_groups, bias=None, normalize=True, scaling_factor=1.0):
    """One token at a time, the rules of the docstring spelled out with float32 scalars."""
    s = scores.to(torch.float32).numpy()
    b = None if bias is None else bias.to(torch.float32).numpy()
    num_tokens, num_experts = s.shape
    size = num_experts // num_groups
    idx = np.zeros((num_tokens, num_topk), dtype=np.int64)
    w = np.zeros((num_tokens, num_topk), dtype=np.float32)
    for t in range(num_tokens):
        choice = [np.float32(s[t, e]) if b is None else np.float32(np.float32(s[t, e]) + np.float32(b[e]))
                  for e in range(num_experts)]
        group_score = []
        for g in range(num_groups):
            members = sorted(choice[g * size:(g + 1) * size], reverse=True)
            group_score.append(np.float32(members[0]) + np.float32(members[1]))
        groups = sorted(range(num_groups), key=lambda g: (-group_score[g], g))[:max_groups]
        candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda e: (-choice[e], e))[:num_topk]
        weights = [np.float32(s[t, e]) for e in chosen]
        if normalize:
            total = np.float32(0.0)
            for v in weights:
                total = np.float32(total + v)
            weights = [np.float32(v / total) for v in weights]
        weights = [np.float32(v * np.float32(scaling_factor)) for v in weights]
        idx[t] = chosen
        w[t] = weights
    return torch.from_numpy(idx), torch.from_numpy(w)


def check(scores, k, g, m, **kw):
    got_idx, got_w = node_limited_topk(scores, k, g, m, **kw)
    want_idx, want_w = loop_reference(scores, k, g, m, **kw)
    assert got_idx.dtype == torch.int64 and got_w.dtype == torch.float32
    assert got_idx.shape == (scores.shape[0], k) and got_w.shape == (scores.shape[0], k)
    assert torch.equal(got_idx, want_idx)
    # The row sum may be accumulated in another order: one or two ulps.
    torch.testing.assert_close(got_w, want_w, rtol=2e-6, atol=0)
    return got_idx, got_w


def groups_reached(topk_idx, num_experts, num_groups):
    size = num_experts // num_groups
    return [len(set((row // size).tolist())) for row in topk_idx]


SHAPES = [  # (num_experts, num_groups, max_groups, num_topk)
    (256, 8, 4, 8),  # DeepSeek-V3
    (64, 4, 2, 6),
    (32, 2, 1, 4),
    (16, 8, 3, 5),
    (12, 3, 3, 12),
    (6, 3, 1, 2),
]


@pytest.mark.parametrize("experts,groups,max_groups,topk", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_loop_reference_on_random_scores(seed, experts, groups, max_groups, topk, dtype):
    gen = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 40, (1,), generator=gen))
    scores = torch.sigmoid(torch.randn(tokens, experts, generator=gen) * 2).to(dtype)
    bias = (torch.randn(experts, generator=gen) * 0.1).to(dtype)
    idx, _ = check(scores, topk, groups, max_groups, bias=bias, scaling_factor=2.5)
    assert max(groups_reached(idx, experts, groups)) <= max_groups
    check(scores, topk, groups, max_groups)  # no bias
    check(scores, topk, groups, max_groups, bias=bias, normalize=False)


def test_node_limit_property_with_groups_as_nodes(seed):
    """8 nodes x 4 ranks x 8 experts per rank; each token reaches at most M nodes, all chosen
    experts lie in kept groups, and the weights (normalised) sum to the scaling factor."""
    gen = torch.Generator().manual_seed(seed)
    nodes, ranks_per_node, experts_per_rank = 8, 4, 8
    experts = nodes * ranks_per_node * experts_per_rank
    scores = torch.sigmoid(torch.randn(500, experts, generator=gen))
    bias = torch.randn(experts, generator=gen) * 0.5
    for m in range(1, nodes + 1):
        idx, w = node_limited_topk(scores, 8, nodes, m, bias=bias, scaling_factor=2.5)
        node_of = idx // (ranks_per_node * experts_per_rank)
        assert max(len(set(r.tolist())) for r in node_of) <= m
        torch.testing.assert_close(w.sum(1), torch.full((500,), 2.5), rtol=1e-5, atol=0)
        assert all(len(set(r.tolist())) == 8 for r in idx)  # distinct experts


def test_bias_changes_choice_not_weights():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2]])
    bias = torch.tensor([0.0, 0.0, 5.0, 5.0])
    idx, w = node_limited_topk(scores, 2, 2, 1, bias=bias, normalize=False)
    assert idx.tolist() == [[3, 2]]  # choice 5.2 > 5.1
    assert torch.equal(w, torch.tensor([[0.2, 0.1]]))


def test_group_score_is_the_sum_of_the_top_two():
    # group 0: one big expert (0.99 + 0.0); group 1: two good ones (0.6 + 0.6) wins.
    scores = torch.tensor([[0.99, 0.0, 0.0, 0.6, 0.6, 0.0]])
    idx, _ = node_limited_topk(scores, 2, 2, 1)
    assert idx.tolist() == [[3, 4]]


def test_zero_tokens():
    idx, w = node_limited_topk(torch.zeros(0, 16), 4, 4, 2)
    assert idx.shape == (0, 4) and w.shape == (0, 4) and idx.dtype == torch.int64 and w.dtype == torch.float32


def test_all_groups_kept_is_plain_topk(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(50, 32, generator=gen)
    idx, w = check(scores, 7, 4, 4)
    plain = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :7]
    assert torch.equal(idx, plain)


def test_k_equals_one(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(30, 24, generator=gen)
    idx, w = check(scores, 1, 6, 2)
    assert torch.equal(w, torch.ones(30, 1))


def test_k_fills_the_kept_groups():
    scores = torch.rand(10, 16)
    idx, _ = check(scores, 8, 4, 2)  # exactly the 8 experts of the 2 kept groups
    assert max(groups_reached(idx, 16, 4)) == 2


def test_ties_are_deterministic():
    # All equal: groups 0..M-1 kept, experts in index order.
    idx, w = node_limited_topk(torch.full((3, 16), 0.5), 5, 4, 2)
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 3
    assert torch.equal(w, torch.full((3, 5), 0.2))
    # Equal group scores: lower group index; equal expert scores inside: lower expert index.
    scores = torch.tensor([[0.1, 0.2, 0.9, 0.8, 0.8, 0.9, 0.5, 0.5]])
    idx, _ = node_limited_topk(scores, 3, 4, 2)
    assert idx.tolist() == [[2, 5, 3]]
    check(scores, 3, 4, 2)
    # Random ties: scores drawn from a few values.
    gen = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, 4, (64, 32), generator=gen).float() / 4
    check(coarse, 6, 8, 3)


def test_dropped_groups_never_win_against_kept_minus_inf():
    scores = torch.tensor([[1.0, float("-inf"), 0.0, 0.0]])  # group 0 (1 + -inf) loses... to group 1
    idx, _ = node_limited_topk(scores, 2, 2, 1, normalize=False)
    assert idx.tolist() == [[2, 3]]
    bias = torch.tensor([10.0, float("-inf"), 0.0, 0.0])  # group 0 -inf: group 1 kept
    idx, _ = node_limited_topk(torch.tensor([[0.5, 0.5, 0.1, 0.2]]), 2, 2, 1, bias=bias, normalize=False)
    assert idx.tolist() == [[3, 2]]
    # A kept group holding a -inf expert: it is chosen rather than any expert of a dropped group.
    scores = torch.tensor([[5.0, 5.0, float("-inf"), 1.0, 1.0, 1.0]])
    idx, _ = node_limited_topk(scores, 3, 2, 1, normalize=False)
    assert idx.tolist() == [[0, 1, 2]]


def test_float64_and_float16_scores(seed):
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float64, torch.float16):
        scores = torch.rand(20, 32, generator=gen).to(dtype)
        check(scores, 4, 4, 2, bias=torch.rand(32, generator=gen).to(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(seed):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(100, 256, generator=gen)
    bias = torch.randn(256, generator=gen) * 0.1
    want = node_limited_topk(scores, 8, 8, 4, bias=bias)
    got = node_limited_topk(scores.cuda(), 8, 8, 4, bias=bias.cuda())
    assert torch.equal(got[0].cpu(), want[0])
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=2e-6, atol=0)


# ---- validation -----------------------------------------------------------------------------------

S = torch.rand(4, 16)


@pytest.mark.parametrize("call,error,text", [
    (lambda: node_limited_topk([[0.5]], 1, 1, 1), errors.InvalidType, "scores"),
    (lambda: node_limited_topk(S.int(), 2, 4, 2), errors.InvalidDType, "scores"),
    (lambda: node_limited_topk(S[0], 2, 4, 2), errors.InvalidShape, "scores"),
    (lambda: node_limited_topk(S.view(4, 4, 4), 2, 4, 2), errors.InvalidShape, "scores"),
    (lambda: node_limited_topk(S.to("meta"), 2, 4, 2), errors.InvalidDevice, "scores"),
    (lambda: node_limited_topk(S, 0, 4, 2), errors.InvalidArgument, "num_topk"),
    (lambda: node_limited_topk(S, 2.0, 4, 2), errors.InvalidType, "num_topk"),
    (lambda: node_limited_topk(S, True, 4, 2), errors.InvalidType, "num_topk"),
    (lambda: node_limited_topk(S, 2, 0, 1), errors.InvalidArgument, "num_groups"),
    (lambda: node_limited_topk(S, 2, "4", 2), errors.InvalidType, "num_groups"),
    (lambda: node_limited_topk(S, 2, 3, 2), errors.InvalidShape, "multiple of num_groups = 3"),
    (lambda: node_limited_topk(S, 2, 16, 2), errors.InvalidShape, "two best experts"),
    (lambda: node_limited_topk(torch.rand(2, 1), 1, 1, 1), errors.InvalidShape, "two best experts"),
    (lambda: node_limited_topk(S, 2, 4, 0), errors.InvalidArgument, "max_groups"),
    (lambda: node_limited_topk(S, 2, 4, 5), errors.InvalidArgument, "num_groups = 4"),
    (lambda: node_limited_topk(S, 2, 4, None), errors.InvalidType, "max_groups"),
    (lambda: node_limited_topk(S, 9, 4, 2), errors.InvalidArgument, "2 * 4 = 8"),
    (lambda: node_limited_topk(S, 2, 4, 2, bias=[0.0] * 16), errors.InvalidType, "bias"),
    (lambda: node_limited_topk(S, 2, 4, 2, bias=torch.zeros(15)), errors.InvalidShape, "bias"),
    (lambda: node_limited_topk(S, 2, 4, 2, bias=torch.zeros(1, 16)), errors.InvalidShape, "bias"),
    (lambda: node_limited_topk(S, 2, 4, 2, bias=torch.zeros(16, dtype=torch.int64)), errors.InvalidDType, "bias"),
    (lambda: node_limited_topk(S, 2, 4, 2, bias=torch.zeros(16, device="meta")), errors.InvalidDevice, "bias"),
    (lambda: node_limited_topk(S, 2, 4, 2, normalize=1), errors.InvalidType, "normalize"),
    (lambda: node_limited_topk(S, 2, 4, 2, scaling_factor=float("inf")), errors.InvalidArgument, "scaling_factor"),
    (lambda: node_limited_topk(S, 2, 4, 2, scaling_factor=float("nan")), errors.InvalidArgument, "scaling_factor"),
    (lambda: node_limited_topk(S, 2, 4, 2, scaling_factor="2"), errors.InvalidType, "scaling_factor"),
    (lambda: node_limited_topk(S, 2, 4, 2, scaling_factor=True), errors.InvalidType, "scaling_factor"),
])
def test_validation(call, error, text):
    with pytest.raises(error) as info:
        call()
    assert text in str(info.value)
