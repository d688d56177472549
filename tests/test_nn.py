"""moelink.nn: the expert-parallel MoE layer against the same layer in one process (outputs and
gradients, 2 and 4 ranks), the training example's core at small size, the routing fallback (both
branches, whether or not moelink.routing is installed), and negative tests."""

from __future__ import annotations

import importlib
import os
import sys
import types
import warnings

import pytest
import torch

import moelink
import moelink.nn as mnn
from multiproc import rank_group_fixture

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import train_moe  # noqa: E402  (examples/train_moe.py)

group = rank_group_fixture(2, 4, case_timeout=240)


def _buffer(ctx, hidden: int = 64) -> moelink.Buffer:
    buffer = ctx.state.get("nn_buffer")
    if buffer is None or buffer._unusable:
        configs = (moelink.Buffer.get_dispatch_config(ctx.world_size), moelink.Buffer.get_combine_config(ctx.world_size))
        size = max(c.get_nvl_buffer_size_hint(128 * 4, ctx.world_size) for c in configs)
        buffer = ctx.state["nn_buffer"] = moelink.Buffer(ctx.group, size)
    return buffer


def _close(name, got, want, rank, rel=2e-2):
    scale = max(float(want.abs().max()), 1e-4) if want.numel() else 1.0
    err = float((got.double() - want.double()).abs().max()) if want.numel() else 0.0
    assert err <= rel * scale, f"{name} on rank {rank}: max error {err:.3g}, scale {scale:.3g}"


def _grad(leaf: torch.Tensor) -> torch.Tensor:
    return leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)


def _layer_matches_dense(ctx, seed, case):
    world, rank = ctx.world_size, ctx.rank
    buffer = _buffer(ctx)
    hidden, experts = case.get("hidden", 64), case.get("experts_per_rank", 2) * world
    options = dict(score_func=case.get("score_func", "softmax"), normalize=case.get("normalize", True),
                   scaling_factor=case.get("scaling_factor", 1.0))
    dense = mnn.MoE(hidden, 96, experts, case.get("topk", 2), generator=torch.Generator().manual_seed(seed), **options)
    # Built both ways: from the dense layer, and from the same seed.
    layer = mnn.ExpertParallelMoE.from_dense(dense, buffer)
    again = mnn.ExpertParallelMoE(buffer, hidden, 96, experts, case.get("topk", 2),
                                  generator=torch.Generator().manual_seed(seed), **options)
    assert torch.equal(again.w1, layer.w1) and torch.equal(again.router.weight, layer.router.weight)
    gen = torch.Generator().manual_seed(seed + 7)
    tokens = [int(torch.randint(0, 40, (1,), generator=gen)) for _ in range(world)]
    xs = [torch.randn(n, hidden, generator=gen) for n in tokens]
    gs = [torch.randn(n, hidden, generator=gen) for n in tokens]
    x = xs[rank].clone().requires_grad_()
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    (y * gs[rank]).sum().backward()
    layer.all_reduce_router_grads()
    dense_x = [t.clone().requires_grad_() for t in xs]
    dense_y = [dense(t) for t in dense_x]
    sum((yy * g).sum() for yy, g in zip(dense_y, gs)).backward()
    _close("output", y.detach(), dense_y[rank].detach(), rank)
    # A rank may draw 0 tokens: autograd then leaves .grad None (nothing reached x), i.e. zeros.
    _close("x.grad", _grad(x), _grad(dense_x[rank]), rank)
    epr = experts // world
    _close("w1.grad", layer.w1.grad, dense.w1.grad[rank * epr:(rank + 1) * epr], rank)
    _close("w2.grad", layer.w2.grad, dense.w2.grad[rank * epr:(rank + 1) * epr], rank)
    _close("router.grad", layer.router.weight.grad, dense.router.weight.grad, rank, rel=3e-2)
    return True


@pytest.mark.parametrize("case", [
    dict(),
    dict(score_func="sigmoid", topk=3, experts_per_rank=3, scaling_factor=2.5),
    dict(topk=1, experts_per_rank=1, normalize=False),
], ids=["softmax-top2", "sigmoid-top3-scaled", "top1-unnormalised"])
def test_layer_matches_single_process_layer(group, seed, case):
    assert group.run(_layer_matches_dense, seed, case) == [True] * group.world_size


def _example_core(ctx, seed):
    results = train_moe.train(ctx.group, steps=3, tokens_per_rank=16, hidden=32, ffn_hidden=48,
                              num_experts=2 * ctx.world_size, num_topk=2, lr=0.5, seed=seed % 1000)
    assert len(results) == 3
    for ep, sp in results:
        assert abs(ep - sp) <= 2e-2 * abs(sp), results
    return results


def test_training_example_core_matches_single_process(group, seed):
    per_rank = group.run(_example_core, seed)
    assert all(r == per_rank[0] for r in per_rank)  # the loss is all-reduced: identical everywhere
    assert per_rank[0][-1][1] < per_rank[0][0][1] * 1.5  # training, not diverging


# ---- routing: node-limited when moelink.routing exists, an obvious fallback otherwise ----------

@pytest.fixture
def routing_module():
    """Yields a function that reloads moelink.nn with moelink.routing absent (None) or replaced by a
    module; restores the real state afterwards."""
    saved = sys.modules.get("moelink.routing", "missing")

    def load(module):
        sys.modules["moelink.routing"] = module
        return importlib.reload(mnn)

    yield load
    if saved == "missing":
        sys.modules.pop("moelink.routing", None)
    else:
        sys.modules["moelink.routing"] = saved
    importlib.reload(mnn)


def test_routing_falls_back_to_plain_topk_when_the_module_is_absent(routing_module, seed):
    nn_module = routing_module(None)  # `import moelink.routing` now fails
    assert nn_module.NODE_LIMITED_ROUTING is False
    with pytest.warns(nn_module.RoutingFallbackWarning, match="moelink.routing is not installed: using plain top-k"):
        layer = nn_module.MoE(32, 16, 8, 2, num_groups=4, max_groups=2)
    assert layer.routing.startswith("plain top-k (fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no group limit asked for: no warning
        assert nn_module.MoE(32, 16, 8, 2).routing == "plain top-k"
    scores = torch.rand(50, 8, generator=torch.Generator().manual_seed(seed))
    idx, weights = nn_module.route(scores, 2, 4, 2)
    want = scores.topk(2, dim=-1)
    assert torch.equal(idx, want.indices)
    assert torch.allclose(weights, want.values / want.values.sum(-1, keepdim=True))


def test_routing_uses_node_limited_topk_when_present(routing_module, seed):
    calls = []

    def node_limited_topk(scores, num_topk, num_groups, max_groups, *, bias=None, normalize=True, scaling_factor=1.0):
        calls.append((tuple(scores.shape), num_topk, num_groups, max_groups, bias, normalize, scaling_factor))
        idx = torch.arange(num_topk).expand(scores.shape[0], num_topk).to(torch.int32)
        return idx, torch.full((scores.shape[0], num_topk), 0.5, dtype=torch.float64)

    fake = types.ModuleType("moelink.routing")
    fake.node_limited_topk = node_limited_topk
    nn_module = routing_module(fake)
    assert nn_module.NODE_LIMITED_ROUTING is True
    layer = nn_module.MoE(32, 16, 8, 3, num_groups=4, max_groups=2, scaling_factor=2.0)
    assert layer.routing.startswith("node-limited")
    idx, weights = layer.router(torch.randn(5, 32))
    assert calls == [((5, 8), 3, 4, 2, None, True, 2.0)]
    assert idx.dtype == torch.int64 and weights.dtype == torch.float32 and torch.equal(idx[0], torch.arange(3))
    # without a group limit the plain top-k is used, and says so
    assert nn_module.MoE(32, 16, 8, 3).routing == "plain top-k"


def test_a_routing_module_that_fails_inside_is_not_hidden(routing_module):
    broken = types.ModuleType("moelink.routing")  # has no node_limited_topk: ImportError, not a fallback
    with pytest.raises(ImportError):
        routing_module(broken)


# ---- negative tests ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,text", [
    (dict(num_topk=9), "num_topk: expected at most num_experts = 8, got 9"),
    (dict(num_topk=0), "num_topk: expected an int >= 1, got 0"),
    (dict(score_func="relu"), "score_func: expected 'softmax' or 'sigmoid'"),
    (dict(num_groups=4), "max_groups: expected given together with num_groups"),
    (dict(num_groups=3, max_groups=1), "num_groups: expected a divisor of num_experts = 8"),
    (dict(num_groups=4, max_groups=5), "num_groups: expected a divisor of num_experts = 8, with 1 <= max_groups"),
    (dict(hidden=0), "hidden: expected an int >= 1, got 0"),
])
def test_invalid_layer_arguments(kwargs, text):
    args = dict(hidden=32, ffn_hidden=16, num_experts=8, num_topk=2)
    args.update(kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mnn.RoutingFallbackWarning)
        with pytest.raises(moelink.errors.InvalidArgument) as info:
            mnn.MoE(**args)
    assert text in str(info.value)


def _experts_not_divisible(ctx):
    buffer = _buffer(ctx)
    dense = mnn.MoE(32, 16, ctx.world_size + 1, 1)
    with pytest.raises(moelink.errors.InvalidArgument, match=f"num_experts: expected a multiple of the {ctx.world_size} ranks"):
        mnn.ExpertParallelMoE.from_dense(dense, buffer)
    return True


def test_experts_must_divide_over_ranks(group):
    assert group.run(_experts_not_divisible) == [True] * group.world_size
