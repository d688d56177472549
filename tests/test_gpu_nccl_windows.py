"""NCCL windows on a real GPU (marker ``gpu``; skipped without one): the bootstrap, the zeroed
window and control page, that the LSA table reaches the same memory as the allocation, byte
counters, peers' windows across GPUs (2 ranks, 2 GPUs), a missed deadline, an injected failure
on one rank, and teardown. Nothing here has run yet: no GPU was available when it was written."""

from __future__ import annotations

import ctypes

import pytest

from moelink import _backend, errors
from multiproc import rank_group_fixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _backend.cuda_available(), reason="needs a CUDA GPU"),
]

one = rank_group_fixture(1, name="one")
two = rank_group_fixture(2, name="two")


def _copy_out(address: int, nbytes: int) -> bytes:
    from moelink import _cuda
    host = ctypes.create_string_buffer(nbytes)
    _cuda.nccl._memcpy(ctypes.addressof(host), address, nbytes)
    return host.raw


def _copy_in(address: int, data: bytes) -> None:
    from moelink import _cuda
    host = ctypes.create_string_buffer(data, len(data))
    _cuda.nccl._memcpy(address, ctypes.addressof(host), len(data))


def _single_rank_lifecycle(ctx):
    from moelink import _cuda
    from moelink._nccl_windows import bootstrap_nccl_windows
    w = bootstrap_nccl_windows(ctx.group, (1 << 20) + 5, device=0)
    try:
        assert (w.rank, w.num_ranks, w.lsa_size, w.ranks_per_node, w.node, w.local_rank) == (0, 1, 1, 1, 0, 0)
        assert w.data_bytes == (1 << 20) + 4096  # rounded up to 4096
        (base,) = w.node_window_ptrs()
        assert base % _cuda.nccl.WINDOW_ALIGNMENT == 0 and w.local_ptr % 4096 == 0
        control = _cuda.nccl.CONTROL_BYTES
        assert _copy_out(base, w.data_bytes + control) == bytes(w.data_bytes + control)  # zeroed
        pattern = bytes(range(256)) * 16
        _copy_in(w.local_ptr + 8192, pattern)           # through the allocation ...
        assert _copy_out(base + 8192, len(pattern)) == pattern  # ... seen through the LSA table
        assert w.peer_ptr(0, 8192, 16) == base + 8192
        with pytest.raises(errors.InvalidArgument, match="peer"):
            w.peer_ptr(1)
        assert w.counters() == {"nvl": 0, "rdma": 0}
        _copy_in(w.counter_ptr("rdma"), (12345).to_bytes(8, "little"))
        assert w.counters() == {"nvl": 0, "rdma": 12345}
        assert w.counter_ptr("rdma") == base + w.data_bytes + 128
        w.reset_counters()
        assert w.counters() == {"nvl": 0, "rdma": 0}
        props = w.properties()
        assert props["device_api_support"] is True and props["num_ranks"] == 1
    finally:
        w.close()
    assert w.closed
    w.close()  # idempotent
    with pytest.raises(errors.InvalidArgument, match="closed"):
        w.node_window_ptrs()
    return True


def test_single_rank_lifecycle(one):
    assert one.run(_single_rank_lifecycle) == [True]


def _missed_deadline(ctx):
    from moelink._nccl_windows import bootstrap_nccl_windows
    with pytest.raises(errors.CommTimeout, match="did not complete within 1e-06 s; the communicator was aborted"):
        bootstrap_nccl_windows(ctx.group, 1 << 16, device=0, timeout_s=1e-6)
    # Nothing is left behind: a fresh bootstrap works.
    with bootstrap_nccl_windows(ctx.group, 1 << 16, device=0) as w:
        return len(w.node_window_ptrs())


def test_missed_deadline_aborts_and_recovers(one):
    assert one.run(_missed_deadline) == [1]


def _bad_node_size(ctx):
    from moelink._nccl_windows import bootstrap_nccl_windows
    with pytest.raises(errors.InvalidArgument, match="ranks_per_node: expected a divisor of NCCL's LSA team size 1"):
        bootstrap_nccl_windows(ctx.group, 1 << 16, device=0, ranks_per_node=2)
    return True


def test_node_size_must_divide_the_lsa_team(one):
    assert one.run(_bad_node_size) == [True]


def _needs_two_gpus():
    from moelink import _cuda
    if _cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")


def _peers_see_each_other(ctx):
    import torch.distributed as dist
    from moelink._nccl_windows import bootstrap_nccl_windows
    with bootstrap_nccl_windows(ctx.group, 1 << 20, device=ctx.rank) as w:
        ptrs = w.node_window_ptrs()
        if w.lsa_size != 2:
            return ("lsa", w.lsa_size)  # GPUs without P2P: one rank per LSA team
        mine = bytes([0x40 + ctx.rank]) * 4096
        _copy_in(w.local_ptr, mine)
        dist.barrier(group=ctx.group)
        other = 1 - ctx.rank
        seen = _copy_out(ptrs[other], 4096)
        dist.barrier(group=ctx.group)
        return seen == bytes([0x40 + other]) * 4096


def test_two_ranks_reach_each_others_windows(two):
    _needs_two_gpus()
    assert two.run(_peers_see_each_other) == [True, True]


def _injected_failure(ctx):
    from moelink._nccl_windows import bootstrap_nccl_windows

    def fault(step):
        if ctx.rank == 1 and step == "communicator":
            raise errors.NcclError("injected failure after the communicator was created")

    with pytest.raises(errors.NcclError, match="communicator failed on 1 of 2 ranks: rank 1: NcclError: injected"):
        bootstrap_nccl_windows(ctx.group, 1 << 16, device=ctx.rank, _fault=fault)
    with bootstrap_nccl_windows(ctx.group, 1 << 16, device=ctx.rank) as w:  # both ranks aborted cleanly
        return len(w.node_window_ptrs()) >= 1


def test_failure_on_one_rank_aborts_every_rank(two):
    _needs_two_gpus()
    assert two.run(_injected_failure) == [True, True]
