"""The low-latency mode of ``moelink.Buffer`` on the GPU target (marker ``gpu``; skipped without a
GPU and a CUDA torch): an NCCL group of one rank on one GPU, CUDA tensors, the scale-out window an
NCCL window; one node, so the "network" is the NVLink (LSA) binding (``_scaleout.NodeScaleOut``),
and every transfer the rank's own (by the NVLink path with ``allow_nvlink_for_low_latency_mode``,
by NVLink puts through the window table without). Dispatch in several payload formats,
the receive hook, zero-copy and LogFMT combines, several calls alternating the halves, checked
against moelink.reference.low_latency by tests/test_low_latency.py's own checks; events.

What one GPU cannot show: GIN (two nodes at least), the internode path and any real peer (NCCL
allows one rank per GPU in a communicator); the kernels at 2-8 ranks on one GPU are the proof's (tests/test_gpu_proof.py).
Nothing here has run yet: no GPU was available when it was written."""

from __future__ import annotations

import types

import pytest
import torch

import moelink
from moelink import _backend
from moelink.reference import low_latency as ref
from multiproc import rank_group_fixture
from test_low_latency import _DISPATCH, _check_dispatch, _expert, _inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_backend.cuda_available() and torch.cuda.is_available()),
                       reason="needs a CUDA GPU and a CUDA build of torch"),
]

one = rank_group_fixture(1, name="one", case_timeout=300)


def _buffer(ctx, allow_nvlink: bool, nbytes: int) -> moelink.Buffer:
    import torch.distributed as dist
    key = ("gpu_ll", allow_nvlink)
    buffer = ctx.state.get(key)
    if buffer is None or buffer._unusable or buffer.num_rdma_bytes < nbytes:
        if buffer is not None:
            buffer.destroy()
        torch.cuda.set_device(0)
        group = ctx.state.get("nccl_group") or dist.new_group([0], backend="nccl")
        ctx.state["nccl_group"] = group
        buffer = moelink.Buffer(group, 0, nbytes, low_latency_mode=True,
                                allow_nvlink_for_low_latency_mode=allow_nvlink)
        ctx.state[key] = buffer
    return buffer


def _cpu(value):
    return tuple(v.cpu() for v in value) if isinstance(value, tuple) else value.cpu()


def _round_trips(ctx, seed, case):
    dev = torch.device("cuda", 0)
    t_max, hidden, experts = case["t_max"], case["hidden"], case["experts"]
    buffer = _buffer(ctx, case["allow_nvlink"], moelink.Buffer.get_low_latency_rdma_size_hint(t_max, hidden, 1, experts))
    host = types.SimpleNamespace(world_size=1, rank=0)
    for it, payload in enumerate(case["payloads"]):
        xs, idx, weights = _inputs(seed + 1000 * it, 1, case)
        hook_mode, zero_copy = case.get("hook", False), case.get("zero_copy", False) and it % 2 == 0
        recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(
            xs[0].to(dev), idx[0].to(dev), t_max, experts, return_recv_hook=hook_mode,
            async_finish=case.get("async_finish", False), **_DISPATCH[payload])
        if hook_mode:
            hook()
        event.current_stream_wait()
        assert recv_count.is_cuda
        cpu_handle = (handle[0].cpu(), handle[1].cpu())
        rows = _check_dispatch(host, case, xs, idx, _cpu(recv_x), recv_count.cpu(), cpu_handle, payload)

        expert_out = torch.zeros(experts, t_max, hidden, dtype=torch.bfloat16)
        for (e, i), values in rows.items():
            expert_out[e, i] = _expert(values, e)
        if zero_copy:
            buffer.get_next_low_latency_combine_buffer(handle).copy_(expert_out.to(dev))
        bits = case.get("combine_logfmt")
        combined, event, hook = buffer.low_latency_combine(
            expert_out.to(dev), idx[0].to(dev), weights[0].to(dev), handle, use_logfmt=bits is not None,
            logfmt_bits=bits or 10, zero_copy=zero_copy, return_recv_hook=hook_mode)
        if hook_mode:
            hook()
        event.current_stream_wait()
        mine = ref.dequantize_rows(ref.encode_rows(xs[0], payload), payload, hidden) if xs[0].shape[0] else \
            torch.zeros(0, hidden, dtype=torch.bfloat16)
        k = idx[0].shape[1]
        y = torch.zeros(xs[0].shape[0], k, hidden, dtype=torch.bfloat16)
        for t in range(xs[0].shape[0]):
            for j in range(k):
                if int(idx[0][t, j]) >= 0:
                    y[t, j] = _expert(mine[t], int(idx[0][t, j]))
        want = ref.low_latency_combine(y, idx[0], weights[0], bits)
        assert torch.equal(combined.cpu(), want), f"combine (call {it}, {payload}, logfmt {bits}, seed {seed})"
    return True


CASES = [
    dict(allow_nvlink=True, t_max=24, hidden=256, num_topk=4, experts=8, payloads=["bf16", "fp8", "nvfp4", "mxfp8"]),
    dict(allow_nvlink=False, t_max=16, hidden=384, num_topk=3, experts=6, payloads=["fp8_ue8m0", "bf16", "logfmt10"],
         combine_logfmt=10),
    dict(allow_nvlink=True, t_max=20, hidden=128, num_topk=2, experts=4, payloads=["fp8", "bf16"] * 3, hook=True,
         zero_copy=True, async_finish=True),
]


@pytest.mark.parametrize("case", CASES, ids=["nvlink-formats", "puts-logfmt", "hooks-zero-copy-async"])
def test_low_latency_on_cuda_tensors(one, seed, case):
    assert one.run(_round_trips, seed, case) == [True]
