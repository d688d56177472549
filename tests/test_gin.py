"""The GIN binding's host side without a GPU (csrc/transport/nccl/gin_*.h, moelink._gin): the NCCL
symbols it needs resolve from the wheel's libnccl.so.2 through dlopen, the plan (connection type,
queue depth) and its argument errors, the credit arithmetic, a GIN handle refused on the host
target, and a bootstrap that fails on every rank with a typed error instead of hanging. What needs
a GPU and two nodes (the device communicator, the pump) is marked gpu and skips here."""

from __future__ import annotations

import ctypes
import os

import pytest
import torch

from moelink import _backend, _host, errors
from multiproc import rank_group_fixture

cuda = _backend._load_cuda()
pytestmark = pytest.mark.skipif(cuda is None, reason="moelink._cuda was not built (no nvcc or MOELINK_CUDA=0)")
nccl = cuda.nccl if cuda is not None else None
needs_headers = pytest.mark.skipif(nccl is None or not nccl.AVAILABLE, reason="built without NCCL headers")

group = rank_group_fixture(2)


@needs_headers
def test_device_communicator_symbols_resolve_from_the_wheel(monkeypatch):
    from moelink import _nccl_windows as nw
    monkeypatch.delenv("MOELINK_NCCL_LIBRARY", raising=False)
    names = nccl.symbol_names()
    assert "ncclDevCommCreate" in names and "ncclDevCommDestroy" in names
    path = next((c for c in nw.library_candidates() if os.path.isabs(c)), None)
    if path is None:
        pytest.skip("no nvidia-nccl wheel on sys.path")
    lib = nw.load_library()  # refuses a library lacking any of them (tests/test_nccl_windows.py)
    assert lib.version >= nccl.HEADER_VERSION
    raw = ctypes.CDLL(path, mode=os.RTLD_LOCAL)
    for name in ("ncclDevCommCreate", "ncclDevCommDestroy"):
        assert getattr(raw, name) is not None


@pytest.mark.parametrize("ranks, lsa, rpn, all_to_all, connection", [
    (16, 8, 8, True, "full"),    # the internode kernels signal every rank of other nodes
    (16, 8, 8, False, "rail"),   # once-per-node traffic only
    (8, 8, 4, False, "full"),    # posing as smaller nodes inside one LSA team
    (4, 1, 1, False, "rail"),
])
def test_plan_chooses_the_connection(ranks, lsa, rpn, all_to_all, connection):
    plan = nccl.plan_gin(num_ranks=ranks, lsa_size=lsa, ranks_per_node=rpn, all_to_all=all_to_all)
    assert plan["connection"] == connection and plan["why"]
    assert plan["queue_depth"] == nccl.GIN_DEFAULT_QUEUE_DEPTH and plan["context_count"] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_ranks=1, lsa_size=1, ranks_per_node=1), r"num_ranks: expected at least 2 .* got 1"),
    (dict(num_ranks=12, lsa_size=8, ranks_per_node=4), r"lsa_size: expected a divisor of num_ranks = 12 .* got 8"),
    (dict(num_ranks=16, lsa_size=8, ranks_per_node=3), r"ranks_per_node: expected a divisor of the LSA team size 8"),
    (dict(num_ranks=8, lsa_size=8, ranks_per_node=8), r"ranks_per_node: expected at most num_ranks / 2 = 4"),
    (dict(num_ranks=8, lsa_size=4, ranks_per_node=4, queue_depth=4), r"queue_depth: expected .*\[8, 65536\], got 4"),
])
def test_plan_refuses_shapes_naming_the_argument(kwargs, match):
    with pytest.raises(errors.InvalidArgument, match=match):
        nccl.plan_gin(all_to_all=True, **kwargs)


def test_credit_arithmetic():
    gib = 1 << 30
    assert nccl.gin_descriptors(16, False) == 1 and nccl.gin_descriptors(16, True) == 2
    assert nccl.gin_descriptors(0, True) == 1  # a signal alone
    assert nccl.gin_descriptors(gib, True) == 2 and nccl.gin_descriptors(gib + 16, True) == 3
    assert nccl.gin_flush_threshold(1024) == 1022


@needs_headers
def test_queue_depth_from_the_environment(monkeypatch):
    from moelink import _gin
    monkeypatch.setenv(_gin.QUEUE_DEPTH_ENV, "256")
    assert _gin.plan(16, 8, 8)["queue_depth"] == 256
    for bad in ("x", "2", "100000"):
        monkeypatch.setenv(_gin.QUEUE_DEPTH_ENV, bad)
        with pytest.raises(errors.InvalidArgument, match=_gin.QUEUE_DEPTH_ENV):
            _gin.plan(16, 8, 8)


def test_a_gin_handle_is_refused_on_the_host_target():
    table = torch.zeros(2, dtype=torch.int64)
    window = torch.zeros(1 << 20, dtype=torch.uint8)
    sizes = _host.internode.layout(num_nodes=2, ranks_per_node=1, num_channels=1, block_warps=2, nvl_queue_tokens=4,
                                   rdma_queue_tokens=8, row_bytes=64, num_scales=0, num_topk=2, experts_per_rank=1)
    nvl = torch.zeros(sizes["nvl_bytes"] + 4096, dtype=torch.uint8)
    ctx = _host.internode.Context(rank=0, num_nodes=2, ranks_per_node=1, num_channels=1, block_warps=2,
                                  nvl_queue_tokens=4, rdma_queue_tokens=8, row_bytes=64, num_scales=0, num_topk=2,
                                  experts_per_rank=1, nvl_windows=[nvl.data_ptr()], net_kind=3,
                                  net_window=window.data_ptr(), net_window_bytes=window.numel(),
                                  num_signals=sizes["num_signals"], net_queue=table.data_ptr())
    per_expert = torch.zeros(2, dtype=torch.int32)
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(errors.InvalidArgument, match="GIN transport exists on the GPU target only"):
        _host.internode.notify(ctx, 0, 0, per_expert.data_ptr(), 1, out.data_ptr(), out.data_ptr(), out.data_ptr())


def test_an_unregistered_ring_is_not_a_pump():
    assert nccl._gin_pump_registered(0) is False


def _bootstrap(ctx):
    from moelink import _gin
    try:
        _gin.bootstrap_gin_scaleout(ctx.group, 1 << 20, ranks_per_node=1, num_signals=64)
        return None
    except errors.MoelinkError as exc:
        return type(exc).__name__, str(exc)


@needs_headers
def test_bootstrap_without_gpu_fails_on_every_rank(group):
    if cuda.device_count() > 0:
        pytest.skip("a GPU is present")
    from moelink import _gin
    assert "no CUDA device" in _gin.available()
    for name, message in group.run(_bootstrap):
        assert name == "GPUUnavailable" and "prepare failed on 2 of 2 ranks" in message


@pytest.mark.gpu
def test_gin_between_two_nodes():
    pytest.skip("needs two nodes with an RDMA NIC NCCL's GIN can use (docs/gpu-transport.md §2.7); "
                "the one-GPU proof runs the same kernels over the loopback instead")


def test_a_gin_launch_without_a_live_transport_is_refused_before_any_cuda_call():
    """The GPU launcher looks the ring up before it starts the pump: an unknown ring (a destroyed
    transport) is InvalidArgument naming the rank, with no CUDA call made (so this runs here)."""
    shape = dict(num_nodes=2, ranks_per_node=1, num_channels=1, block_warps=cuda.intranode.GPU_BLOCK_WARPS,
                 nvl_queue_tokens=64, rdma_queue_tokens=128, row_bytes=64, num_scales=0, num_topk=2,
                 experts_per_rank=1)
    sizes = cuda.internode.layout(**shape)
    fake = 1 << 40  # never dereferenced: the launch is refused first
    ctx = cuda.internode.Context(rank=1, **shape, nvl_windows=[fake], net_kind=nccl.SCALE_OUT_KIND_GIN,
                                 net_window=fake, net_window_bytes=sizes["rdma_bytes"],
                                 num_signals=sizes["num_signals"], net_queue=fake + 4096)
    with pytest.raises(errors.InvalidArgument, match="rank 1: the work queue is not one of a live GIN transport"):
        cuda.internode.notify(ctx, 0, 0, 0, 1, 0, 0, 0)
