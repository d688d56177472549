"""moelink._pool.OutputPool: outputs reused once the caller dropped them, never while anything still
holds them (views, slices, NumPy arrays, DLPack capsules, tensors autograd saved), bounded, and
correct without torch's private use count; and a Buffer's steady-state dispatch and combine take
no page faults for their outputs (measured with getrusage on real rank processes, against the same
calls without the pool)."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

import moelink
from moelink import _pool
from moelink._pool import OutputPool
from multiproc import rank_group_fixture

MB = 1 << 20


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_the_private_use_count_behaves_as_the_pool_assumes():
    assert _pool.use_count_supported(), "this torch's storage use count no longer reads as the pool expects"


def test_a_dropped_output_is_reused_and_looks_like_a_fresh_tensor():
    pool = OutputPool()
    a = pool.empty((1024, 1024), torch.float32)
    address = _storage(a)
    assert a.shape == (1024, 1024) and a.is_contiguous() and a._base is None
    del a
    b = pool.empty((1000, 1024), torch.float32)  # a little smaller: fits the same storage
    assert _storage(b) == address and pool.reuses == 1 and pool.allocations == 1
    b.requires_grad_()  # not a view of the pool's base: autograd treats it as a leaf of its own
    assert b.is_leaf


@pytest.mark.parametrize("holder", ["tensor", "view", "slice", "numpy", "capsule", "from_dlpack", "numpy_dlpack",
                                    "saved_for_backward"])
def test_memory_the_caller_still_holds_is_never_handed_out(holder):
    pool = OutputPool()
    a = pool.empty((512, 1024), torch.float32)
    a.fill_(7.0)
    address = _storage(a)
    keep = {
        "tensor": lambda t: t,
        "view": lambda t: t.view(-1),
        "slice": lambda t: t[100:101],
        "numpy": lambda t: t.numpy(),
        "capsule": lambda t: t.__dlpack__(),
        "from_dlpack": lambda t: torch.from_dlpack(t),
        "numpy_dlpack": lambda t: np.from_dlpack(t),
        "saved_for_backward": lambda t: (t.requires_grad_() * 2.0).sum().grad_fn,
    }[holder](a)
    del a
    b = pool.empty((512, 1024), torch.float32)
    assert _storage(b) != address, f"memory held through a {holder} was handed out again"
    b.fill_(1.0)
    if holder in ("tensor", "view", "slice", "numpy", "from_dlpack", "numpy_dlpack"):
        assert float(np.asarray(torch.as_tensor(keep) if holder == "numpy_dlpack" else keep).reshape(-1)[0]) == 7.0
    del keep
    c = pool.empty((512, 1024), torch.float32)
    assert _storage(c) == address, "once the holder is gone the storage is reused"


def test_without_the_private_use_count_nothing_is_reused(monkeypatch):
    monkeypatch.setattr(_pool, "_USE_COUNT", None)
    assert not _pool.use_count_supported()
    pool = OutputPool()
    a = pool.empty((256, 1024), torch.float32)
    a.fill_(3.0)
    b = pool.empty((256, 1024), torch.float32)
    assert _storage(a) != _storage(b) and bool((a == 3.0).all())
    assert pool.stats()["bases"] == 0 and not pool.stats()["use_count_supported"]


def test_a_probe_that_counts_differently_disables_reuse(monkeypatch):
    monkeypatch.setattr(torch._C, "_storage_Use_Count", lambda cdata: 1, raising=False)
    assert _pool._probe_use_count() is None


def test_small_requests_are_not_pooled():
    pool = OutputPool()
    pool.empty((16,), torch.int32)
    assert pool.stats()["bases"] == 0


def test_memory_is_bounded():
    pool = OutputPool(min_retained_bytes=8 * MB, max_bases=6)
    held = [pool.empty((MB // 4,), torch.float32) for _ in range(10)]  # 10 x 1 MiB held
    assert pool.stats()["bases"] <= 6  # forgotten ones stay the caller's
    del held
    pool.empty((MB // 4,), torch.float32)
    assert pool.free_bytes() <= pool.retain_limit and pool.stats()["bases"] <= 6
    big = pool.empty((64 * MB // 4,), torch.float32)  # the limit follows the largest request
    assert pool.retain_limit == 4 * 64 * MB
    del big
    for _ in range(3):  # a small request never pins the big storage
        assert pool.empty((MB // 4,), torch.float32).untyped_storage().nbytes() < 2 * MB + 4096
    pool.clear()
    assert pool.nbytes == 0


def test_shapes_that_grow_a_little_still_fit():
    pool = OutputPool()
    a = pool.empty((1000, 1024), torch.uint8)
    address = _storage(a)
    del a
    b = pool.empty((1100, 1024), torch.uint8)  # within the 1/8 headroom
    assert _storage(b) == address


# ---- a Buffer's steady state, on rank processes ----------------------------------------------

group = rank_group_fixture(2, case_timeout=240)


def _faults_per_call(ctx, use_pool: bool):
    """Minor page faults of this process per steady-state dispatch + combine of outputs above
    glibc's largest mmap threshold (32 MiB), and how many storages the pool allocated meanwhile."""
    if not use_pool:
        _pool._USE_COUNT = None
    try:
        world, hidden, n = ctx.world_size, 4096, 2600
        topk = torch.stack([torch.arange(n) % 2 + 2 * r for r in range(world)], 1)  # every token to every rank
        x = torch.randn(n, hidden).to(torch.bfloat16)
        config = moelink.Config(4, 6, 64)
        with moelink.Buffer(ctx.group, config.get_nvl_buffer_size_hint(hidden * 2, world, num_topk=world)) as buffer:
            _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * world)

            expected = (x.float() * world).to(torch.bfloat16)

            def step(check):
                recv, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk, is_token_in_rank=in_rank,
                                                           num_tokens_per_expert=per_expert, config=config)
                combined = buffer.combine(recv, handle, config=config)[0]
                if check:  # outside the measured calls: the check allocates
                    assert recv.nbytes > 32 * MB and torch.equal(combined, expected)

            for _ in range(2):
                step(True)  # warm-up: the pool (and the runtime's stacks) fill here
            before, allocations = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, buffer._pool.allocations
            calls = 3
            for _ in range(calls):
                step(False)
            faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
            return faults, buffer._pool.allocations - allocations
    finally:
        _pool._USE_COUNT = _pool._probe_use_count()


def test_a_steady_state_call_takes_no_page_faults(group):
    pooled = group.run(_faults_per_call, True)
    fresh = group.run(_faults_per_call, False)
    pages = 2 * 2600 * 4096 * 2 // 4096  # pages of one rank's recv_x
    for (faults, allocations), (fresh_faults, _) in zip(pooled, fresh):
        assert allocations == 0, "a steady-state call allocated pooled storage"
        assert faults < pages / 20, f"{faults} page faults per call with the pool (recv_x alone is {pages} pages)"
        # (without the pool glibc maps recv_x afresh per call; how many of its pages fault varies with
        # what the allocator and the kernel reuse, but always many times what the pool's calls take)
        assert fresh_faults > 5 * max(faults, 100), f"the check cannot fail: {fresh_faults} faults without the pool"


def _ll_pool_use_per_call(ctx):
    """For a steady-state low-latency dispatch + combine (bf16; recv_x [local experts, ranks * T,
    hidden], above glibc's largest mmap threshold): (minor page faults per call, pooled storages
    allocated meanwhile, requests the pool served from free storage per call, pages of recv_x)."""
    world, hidden, t_max, experts = ctx.world_size, 4096, 1536, 2 * ctx.world_size
    n = 256
    topk = torch.stack([torch.arange(n) % 2 + 2 * r for r in range(world)], 1)  # every token to every rank
    x = torch.randn(n, hidden).to(torch.bfloat16)
    weights = torch.full(topk.shape, 0.5)
    nbytes = moelink.Buffer.get_low_latency_rdma_size_hint(t_max, hidden, world, experts)
    with moelink.Buffer(ctx.group, 0, nbytes, low_latency_mode=True) as buffer:
        def step(check):
            recv, count, handle, _, _ = buffer.low_latency_dispatch(x, topk, t_max, experts, use_fp8=False)
            combined = buffer.low_latency_combine(recv, topk, weights, handle)[0]
            if check:
                want = (x.float() * 0.5 * world).to(torch.bfloat16)
                assert recv.nbytes > 32 * MB, recv.shape
                assert torch.equal(combined, want), float((combined.float() - want.float()).abs().max())

        for _ in range(2):
            step(True)
        pool = buffer._pool
        before, allocations, reuses = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, pool.allocations, pool.reuses
        calls = 3
        for _ in range(calls):
            step(False)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls
        pages = 2 * world * t_max * hidden * 2 // 4096
        return faults, pool.allocations - allocations, (pool.reuses - reuses) / calls, pages


def test_a_steady_state_low_latency_call_takes_no_page_faults(group):
    """recv_x and the combined output come from the Buffer's pool (served from free storage on every
    call: a fresh mapping per call is what the pool avoids; how many of its pages fault without the
    pool varies with what glibc and the kernel reuse, so the pool's own counters are the check)."""
    for faults, allocations, reused, pages in group.run(_ll_pool_use_per_call):
        assert allocations == 0, "a steady-state low-latency call allocated pooled storage"
        assert reused >= 2, f"{reused} pooled outputs per call (recv_x and the combined output expected)"
        assert faults < pages / 20, f"{faults} page faults per call with the pool (recv_x alone is {pages} pages)"
