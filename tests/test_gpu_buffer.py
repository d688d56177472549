"""``moelink.Buffer`` on the GPU target (marker ``gpu``; skipped without a GPU and a CUDA torch):
an NCCL group of one rank on one GPU, CUDA tensors, NCCL windows, kernels on the comm stream.
Dispatch, cached dispatch, combine, ``num_worst_tokens``, the one-copy paths and FP8 pairs against
moelink.reference on fresh random routings; events (``async_finish``, ``previous_event``,
``allocate_on_comm_stream``); tensors on the wrong device refused. One rank is all NCCL allows on
one GPU (a communicator refuses two ranks on one device); the kernels at 2-8 ranks on one GPU are
the proof's (tests/test_gpu_proof.py). Nothing here has run yet: no GPU was available when it
was written."""

from __future__ import annotations

import pytest
import torch

import moelink
from moelink import _backend, errors, reference
from moelink.reference.dispatch import assert_combine_close
from multiproc import rank_group_fixture

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (_backend.cuda_available() and torch.cuda.is_available()),
                       reason="needs a CUDA GPU and a CUDA build of torch"),
]

one = rank_group_fixture(1, name="one", case_timeout=300)


def _buffer(ctx, num_nvl_bytes=1 << 26) -> moelink.Buffer:
    import torch.distributed as dist
    buffer = ctx.state.get("gpu_buffer")
    if buffer is None or buffer._unusable:
        torch.cuda.set_device(0)
        group = ctx.state.get("nccl_group") or dist.new_group([0], backend="nccl")
        ctx.state["nccl_group"] = group
        buffer = moelink.Buffer(group, num_nvl_bytes)
        ctx.state["gpu_buffer"] = buffer
    return buffer


def _inputs(seed, num_tokens, hidden, num_topk, num_experts):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen).to(torch.bfloat16)
    scores = torch.rand(num_tokens, num_experts, generator=gen)
    idx = scores.topk(num_topk, dim=1).indices
    idx[torch.rand(num_tokens, num_topk, generator=gen) < 0.1] = -1
    weights = torch.rand(num_tokens, num_topk, generator=gen)
    return x, idx, weights


def _round_trip(ctx, seed, case):
    buffer = _buffer(ctx)
    dev = torch.device("cuda", 0)
    hidden, num_topk, num_experts = case["hidden"], case["num_topk"], case["num_experts"]
    x, idx, weights = _inputs(seed, case["tokens"], hidden, num_topk, num_experts)
    worst, zero_copy = case.get("num_worst_tokens", 0), case.get("zero_copy", False)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx.to(dev), num_experts)
    previous = buffer.capture() if case.get("async") else None
    recv_x, recv_idx, recv_w, per_expert_list, handle, event = buffer.dispatch(
        x.to(dev), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx.to(dev), topk_weights=weights.to(dev), num_worst_tokens=worst, zero_copy=zero_copy,
        previous_event=previous, async_finish=case.get("async", False),
        allocate_on_comm_stream=case.get("async", False))
    assert event.is_empty != case.get("async", False)
    event.current_stream_wait()
    assert recv_x.is_cuda and recv_idx.is_cuda and recv_w.is_cuda
    want = reference.intranode_dispatch([x], [idx], num_experts, [weights], num_worst_tokens=worst)[0]
    m = want.num_recv_tokens
    assert recv_x.shape[0] == (worst or m)
    assert torch.equal(recv_x[:m].cpu(), want.recv_x[:m]), f"recv_x (seed {seed})"
    assert torch.equal(recv_idx.cpu(), want.recv_topk_idx), f"recv_topk_idx (seed {seed})"
    assert torch.equal(recv_w.cpu(), want.recv_topk_weights.float()), f"recv_topk_weights (seed {seed})"
    assert per_expert_list == ([] if worst else want.num_recv_tokens_per_expert_list)

    again = buffer.dispatch(x.to(dev), handle=handle, topk_idx=idx.to(dev), topk_weights=weights.to(dev),
                            num_worst_tokens=worst, zero_copy=zero_copy)
    assert torch.equal(again[0][:m].cpu(), want.recv_x[:m]), f"cached recv_x (seed {seed})"

    expert = (want.recv_x.float() * 0.5 + 1.0).to(torch.bfloat16)
    expected = reference.intranode_combine([expert], [want], [x.shape[0]], [want.recv_topk_weights.float()])[0]
    if zero_copy:
        rows = buffer.get_combine_input_buffer(handle)
        rows[:m].copy_(expert[:m].to(dev))
        combined_x, combined_w, event = buffer.combine(rows, handle, topk_weights=again[2], zero_copy=True)
    else:
        combined_x, combined_w, event = buffer.combine(expert.to(dev), handle, topk_weights=again[2],
                                                       async_finish=case.get("async", False))
    event.current_stream_wait()
    assert combined_x.is_cuda
    assert_combine_close(combined_x.cpu(), combined_w.cpu(), expected, context=f"seed {seed}")
    return m


CASES = [
    dict(tokens=256, hidden=1024, num_topk=4, num_experts=8),
    dict(tokens=0, hidden=256, num_topk=2, num_experts=4),
    dict(tokens=300, hidden=2048, num_topk=8, num_experts=64, num_worst_tokens=320),
    dict(tokens=200, hidden=512, num_topk=4, num_experts=16, zero_copy=True),
    dict(tokens=128, hidden=768, num_topk=6, num_experts=32, **{"async": True}),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_dispatch_and_combine_on_cuda_tensors(one, seed, case):
    one.run(_round_trip, seed, case)


def _refusals(ctx):
    buffer = _buffer(ctx)
    dev = torch.device("cuda", 0)
    idx = torch.zeros(4, 2, dtype=torch.int64, device=dev)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, 4)
    with pytest.raises(errors.InvalidDevice, match="x: expected a tensor on cuda:0"):
        buffer.dispatch(torch.zeros(4, 64, dtype=torch.bfloat16), num_tokens_per_rank=per_rank,
                        is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx)
    assert buffer._unusable is None  # refused before anything ran
    assert isinstance(buffer.get_comm_stream(), torch.cuda.Stream)
    assert buffer.get_local_buffer_tensor(torch.int32, (16,)).is_cuda
    return True


def test_tensors_on_another_device_are_refused_without_poisoning(one):
    assert one.run(_refusals) == [True]
