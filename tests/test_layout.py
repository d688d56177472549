"""The dispatch layout kernel against moelink.reference on fresh random routings, edge cases and
schedule seeds, plus every input validation."""

from __future__ import annotations

import pytest
import torch

import moelink
from moelink import errors, reference, runtime


def _assert_layout_equal(topk_idx, num_experts, num_ranks, ranks_per_node, context=""):
    got = moelink.get_dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node)
    want = reference.dispatch_layout(topk_idx, num_experts, num_ranks, ranks_per_node)
    for name, g, w in zip(want._fields, got, want):
        if w is None:
            assert g is None, f"{name} should be None for a single node {context}"
            continue
        assert g.dtype == w.dtype and g.shape == w.shape, f"{name}: {g.dtype}{tuple(g.shape)} {context}"
        assert torch.equal(g, w), f"{name} differs {context}"


def _random_case(gen: torch.Generator):
    def pick(*choices):
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    num_ranks = pick(1, 2, 3, 4, 6, 8, 16, 32, 48, 64)
    num_experts = num_ranks * pick(1, 2, 3, 4, 8)
    divisors = [d for d in range(1, num_ranks + 1) if num_ranks % d == 0]
    ranks_per_node = pick(*divisors)
    num_tokens = pick(0, 1, 7, 64, 129, int(torch.randint(1, 600, (1,), generator=gen)))
    num_topk = pick(1, 2, 6, 8, 9, 16)
    dtype = pick(torch.int64, torch.int32)
    topk_idx = torch.randint(-1, num_experts, (num_tokens, num_topk), generator=gen, dtype=torch.int64)
    if pick(True, False):  # sparser rows: many slots routed nowhere
        topk_idx[torch.rand(topk_idx.shape, generator=gen) < 0.5] = -1
    return topk_idx.to(dtype), num_experts, num_ranks, ranks_per_node


@pytest.mark.parametrize("schedule", ["deterministic", "random:11", "random:12:0.5", "random:13:1.0"])
def test_random_routings_match_reference(seed, schedule):
    gen = torch.Generator().manual_seed(seed)
    with runtime.scheduled(schedule):
        for case in range(300):
            topk_idx, num_experts, num_ranks, ranks_per_node = _random_case(gen)
            _assert_layout_equal(
                topk_idx, num_experts, num_ranks, ranks_per_node,
                f"(case {case}: tokens {topk_idx.shape[0]}, topk {topk_idx.shape[1]}, experts {num_experts}, "
                f"ranks {num_ranks}, ranks/node {ranks_per_node}, {topk_idx.dtype})",
            )


@pytest.mark.parametrize(
    "num_tokens,num_topk,num_experts,num_ranks,ranks_per_node",
    [
        (0, 8, 256, 8, None),  # no tokens at all
        (5, 0, 16, 4, 2),  # no top-k slots
        (300, 1, 1, 1, None),  # a single expert
        (1000, 8, 512, 64, 8),  # many experts, many nodes
        (257, 16, 512, 16, 4),  # top-16
        (100, 32, 64, 8, 1),  # top-32, every rank its own node
    ],
)
def test_edge_shapes(seed, num_tokens, num_topk, num_experts, num_ranks, ranks_per_node):
    gen = torch.Generator().manual_seed(seed)
    topk_idx = torch.randint(-1, num_experts, (num_tokens, num_topk), generator=gen)
    _assert_layout_equal(topk_idx, num_experts, num_ranks, ranks_per_node)


def test_routed_nowhere_everything_to_one_rank_and_duplicates(seed):
    gen = torch.Generator().manual_seed(seed)
    nowhere = torch.full((64, 8), -1, dtype=torch.int64)
    layout = moelink.get_dispatch_layout(nowhere, 64, 8, 4)
    assert int(layout.num_tokens_per_rank.sum()) == 0 and not layout.is_token_in_rank.any()
    _assert_layout_equal(nowhere, 64, 8, 4)

    one_rank = torch.randint(40, 48, (500, 8), generator=gen)  # rank 5 of 8 owns experts 40..47
    layout = moelink.get_dispatch_layout(one_rank, 64, 8, 2)
    assert layout.num_tokens_per_rank.tolist() == [0, 0, 0, 0, 0, 500, 0, 0]
    assert layout.num_tokens_per_node.tolist() == [0, 0, 500, 0]
    _assert_layout_equal(one_rank, 64, 8, 2)

    duplicates = torch.tensor([[3, 3, 3, -1], [3, 4, 3, 4]])  # experts 3 and 4 live on rank 0 of 4
    layout = moelink.get_dispatch_layout(duplicates, 32, 4)
    assert layout.num_tokens_per_expert[3] == 5 and layout.num_tokens_per_expert[4] == 2
    assert layout.num_tokens_per_rank.tolist() == [2, 0, 0, 0]
    _assert_layout_equal(duplicates, 32, 4, None)


# ---- validation ------------------------------------------------------------------------------

GOOD = torch.zeros((4, 2), dtype=torch.int64)


@pytest.mark.parametrize(
    "kwargs,error,text",
    [
        (dict(topk_idx=[[0, 1]]), errors.InvalidType, "topk_idx: expected a torch.Tensor, got list"),
        (dict(topk_idx=GOOD.float()), errors.InvalidDType, "topk_idx: expected dtype torch.int64 or torch.int32, got torch.float32"),
        (dict(topk_idx=GOOD.to(torch.int16)), errors.InvalidDType, "got torch.int16"),
        (dict(topk_idx=GOOD[:, 0]), errors.InvalidShape, "topk_idx: expected a 2-D tensor [num_tokens, num_topk], got shape (4,)"),
        (dict(topk_idx=torch.zeros((2, 4), dtype=torch.int64).t()), errors.InvalidShape, "topk_idx: expected a contiguous tensor"),
        (dict(topk_idx=torch.tensor([[0, 16]])), errors.InvalidArgument, "expert ids in [-1, num_experts = 16), got 16 at [0, 1]"),
        (dict(topk_idx=torch.tensor([[0, 1], [-2, 1]])), errors.InvalidArgument, "got -2 at [1, 0]"),
        (dict(num_experts=15), errors.InvalidArgument, "num_experts: expected a multiple of num_ranks = 4, got 15"),
        (dict(num_experts=0), errors.InvalidArgument, "num_experts: expected an int >= 1, got 0"),
        (dict(num_experts=16.0), errors.InvalidType, "num_experts: expected an int, got float"),
        (dict(num_ranks=True), errors.InvalidType, "num_ranks: expected an int, got bool"),
        (dict(ranks_per_node=3), errors.InvalidArgument, "num_ranks: expected a multiple of ranks_per_node = 3, got 4"),
        (dict(ranks_per_node=0), errors.InvalidArgument, "ranks_per_node: expected an int >= 1, got 0"),
        (dict(topk_idx=GOOD.to("meta")), errors.InvalidDevice, "topk_idx: expected a tensor on 'cpu'"),
    ],
)
def test_invalid_input_is_rejected_with_a_typed_error(kwargs, error, text):
    args = dict(topk_idx=GOOD, num_experts=16, num_ranks=4, ranks_per_node=2)
    args.update(kwargs)
    with pytest.raises(error) as info:
        moelink.get_dispatch_layout(**args)
    assert text in str(info.value)
    assert isinstance(info.value, (ValueError, TypeError))
