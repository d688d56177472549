"""Low-latency mode, the failure side: typed errors naming the argument (the Buffer stays usable),
a buffer too small naming the size that would do, pending hooks, mixing with internode
normal-mode calls and clean_low_latency_buffer, a missing peer -> CommTimeout naming it, a faulty
peer's counts message -> DeviceAssert naming it and the value. CI: 2 and 4 ranks."""

from __future__ import annotations

import pytest
import torch

import moelink
from moelink import errors, runtime
from multiproc import leftover_segments, nic_threads, rank_group_fixture
from test_low_latency import _case, _inputs

group = rank_group_fixture(2, 4, case_timeout=300)


def _expect(exc_type, name, fn, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(name), (name, str(info.value))
    return str(info.value)


def _bad_inputs(ctx, seed):
    """Typed errors naming the argument; none of them costs the Buffer, which works afterwards."""
    world, rank = ctx.world_size, ctx.rank
    case = dict(t_max=8, hidden=128, num_topk=2, experts=2 * world, tokens=[8] * world)
    xs, idx, weights = _inputs(seed, world, case)
    x, topk, w = xs[rank], idx[rank], weights[rank]
    size = moelink.Buffer.get_low_latency_rdma_size_hint(8, 128, world, 2 * world)
    buffer = moelink.Buffer(ctx.group, 0, size, low_latency_mode=True)
    try:
        d = buffer.low_latency_dispatch
        _expect(errors.InvalidDType, "x", d, x.float(), topk, 8, 2 * world)
        _expect(errors.InvalidShape, "hidden", d, torch.zeros(8, 100, dtype=torch.bfloat16), topk, 8, 2 * world)
        _expect(errors.InvalidShape, "x", d, x, topk, 4, 2 * world)
        twice = topk.clone()
        twice[0] = 1
        _expect(errors.InvalidArgument, "topk_idx", d, x, twice, 8, 2 * world)
        _expect(errors.InvalidArgument, "topk_idx", d, x, topk + 2 * world, 8, 2 * world)
        _expect(errors.InvalidShape, "topk_idx.shape[1]", d, x, torch.zeros(8, 33, dtype=torch.int64), 8, 2 * world)
        _expect(errors.InvalidArgument, "num_experts", d, x, topk, 8, 2 * world + 1)
        _expect(errors.InvalidArgument, "round_scale", d, x, topk, 8, 2 * world, use_fp8=False, round_scale=True)
        _expect(errors.InvalidArgument, "use_ue8m0", d, x, topk, 8, 2 * world, use_ue8m0=True)
        _expect(errors.InvalidArgument, "payload", d, x, topk, 8, 2 * world, payload="fp16")
        _expect(errors.InvalidDType, "cumulative_local_expert_recv_stats", d, x, topk, 8, 2 * world,
                cumulative_local_expert_recv_stats=torch.zeros(2, dtype=torch.int64))
        _expect(errors.InvalidShape, "dispatch_wait_recv_cost_stats", d, x, topk, 8, 2 * world,
                dispatch_wait_recv_cost_stats=torch.zeros(world + 1, dtype=torch.int64))
        _expect(errors.InvalidType, "return_recv_hook", d, x, topk, 8, 2 * world, return_recv_hook=1)
        # Payload rows start at a 16-byte boundary (a view at an element offset does not).
        shifted = torch.zeros(8 * 128 + 1, dtype=torch.bfloat16)[1:].view(8, 128)
        assert "data_ptr() % 16 = 2" in _expect(errors.InvalidArgument, "x", d, shifted, topk, 8, 2 * world)
        # The buffer is too small for a larger shape: the message names a size that does.
        message = _expect(errors.InvalidArgument, "num_rdma_bytes", d, torch.zeros(8, 1024, dtype=torch.bfloat16),
                          topk, 8, 2 * world)
        needed = int(message.split("at least ")[1].split()[0])
        assert needed <= moelink.Buffer.get_low_latency_rdma_size_hint(8, 1024, world, 2 * world)
        # A pending hook forbids the next call until it ran; it runs once.
        _, _, handle, _, hook = d(x, topk, 8, 2 * world, use_fp8=False, return_recv_hook=True)
        _expect(errors.InvalidArgument, "low_latency_combine", buffer.low_latency_combine,
                torch.zeros(2, 8 * world, 128, dtype=torch.bfloat16), topk, w, handle)
        hook()
        _expect(errors.InvalidArgument, "hook", hook)
        c = buffer.low_latency_combine
        _expect(errors.InvalidType, "handle", c, torch.zeros(2, 8 * world, 128, dtype=torch.bfloat16), topk, w,
                (1, 2, 3, 4, 5))
        _expect(errors.InvalidShape, "x", c, torch.zeros(2, 8, 128, dtype=torch.bfloat16), topk, w, handle)
        _expect(errors.InvalidShape, "out", c, torch.zeros(2, 8 * world, 128, dtype=torch.bfloat16), topk, w, handle,
                out=torch.zeros(3, 128, dtype=torch.bfloat16))
        _expect(errors.InvalidArgument, "out", c, torch.zeros(2, 8 * world, 128, dtype=torch.bfloat16), topk, w,
                handle, out=torch.zeros(8 * 128 + 4, dtype=torch.bfloat16)[4:].view(8, 128))
        _expect(errors.InvalidArgument, "logfmt_bits", c, torch.zeros(2, 8 * world, 128, dtype=torch.bfloat16), topk,
                w, handle, use_logfmt=True, logfmt_bits=7)
        combined, _, _ = c(torch.ones(2, 8 * world, 128, dtype=torch.bfloat16), topk, w, handle)
        want = (w * (topk >= 0)).sum(dim=1, keepdim=True).expand(8, 128)
        assert torch.allclose(combined.float(), want, rtol=1e-2), "the Buffer works after the errors"
        normal = moelink.Buffer(ctx.group, 1 << 20)
        try:
            _expect(errors.InvalidArgument, "low_latency_dispatch", normal.low_latency_dispatch, x, topk, 8, 2 * world)
        finally:
            normal.destroy()
    finally:
        buffer.destroy()
    return True


def test_bad_inputs_raise_typed_errors_naming_the_argument(group, seed):
    assert all(group.run(_bad_inputs, seed))


def _mixed(ctx, seed):
    """Normal-mode (internode) calls on a low-latency Buffer: the next low-latency call asks for
    clean_low_latency_buffer, after which the low-latency calls are right again, and vice versa."""
    world, rank = ctx.world_size, ctx.rank
    rpn = world // 2
    config = moelink.Config(4, 4, 32, 4, 32)
    nvl = config.get_nvl_buffer_size_hint(256, world, ranks_per_node=rpn)
    rdma = config.get_rdma_buffer_size_hint(256, world, ranks_per_node=rpn) + \
        moelink.Buffer.get_low_latency_rdma_size_hint(8, 128, world, 2 * world)
    buffer = moelink.Buffer(ctx.group, nvl, rdma, low_latency_mode=True, ranks_per_node=rpn)
    ctx.state[("ll", rpn, True)] = buffer
    case = dict(t_max=8, hidden=128, num_topk=2, experts=2 * world, rpn=rpn, allow_nvlink=True, payloads=["fp8"],
                iterations=2)
    try:
        for round_ in range(2):
            _case(ctx, seed + round_, case)
            x = torch.randn(6, 128).to(torch.bfloat16)
            topk = torch.rand(6, 2 * world).topk(2, dim=1).indices
            per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * world)
            recv_x, _, _, _, handle, _ = buffer.dispatch(x, topk_idx=topk, topk_weights=torch.ones(6, 2),
                                                         is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                         config=config)
            combined, _, _ = buffer.combine(recv_x, handle, config=config)
            assert torch.allclose(combined.float(), x.float() * in_rank.sum(dim=1, keepdim=True), rtol=2e-2)
            _expect(errors.InvalidArgument, "low_latency_dispatch", buffer.low_latency_dispatch, x, topk, 8, 2 * world)
            buffer.clean_low_latency_buffer(8, 128, 2 * world)
    finally:
        buffer.destroy()
        ctx.state.pop(("ll", rpn, True), None)
    return True


def test_mixing_normal_and_low_latency_calls(group, seed):
    if group.world_size < 4:
        pytest.skip("the internode path needs 2 nodes of 2")
    assert all(group.run(_mixed, seed))


def _absent_rank(ctx, allow_nvlink):
    """Rank `world - 1` never enters the dispatch: every other rank raises CommTimeout naming it;
    after destroy no NIC thread is left."""
    runtime.set_wait_timeout(1.5)
    world = ctx.world_size
    buffer = moelink.Buffer(ctx.group, 0, moelink.Buffer.get_low_latency_rdma_size_hint(4, 128, world, world),
                            low_latency_mode=True, ranks_per_node=2, allow_nvlink_for_low_latency_mode=allow_nvlink)
    try:
        missing = world - 1
        if ctx.rank == missing:
            return "absent"
        topk = torch.full((4, 1), missing, dtype=torch.int64)
        x = torch.zeros(4, 128, dtype=torch.bfloat16)
        with pytest.raises(errors.CommTimeout) as info:
            buffer.low_latency_dispatch(x, topk, 4, world)
        with pytest.raises(errors.BufferUnusable):
            buffer.low_latency_dispatch(x, topk, 4, world)
        return str(info.value)
    finally:
        during = nic_threads()
        buffer.destroy()
        runtime.set_wait_timeout(100.0)
        assert nic_threads() == during - 1, "the NIC thread was joined"


@pytest.mark.parametrize("allow_nvlink", [False, True])
def test_missing_peer_times_out_naming_it(group, seed, allow_nvlink):
    messages = group.run(_absent_rank, allow_nvlink, timeout=120)
    missing = group.world_size - 1
    for rank, message in enumerate(messages[:-1]):
        assert f"peer {missing}" in message and "low-latency dispatch" in message, (rank, message)
    assert messages[-1] == "absent"
    assert leftover_segments(group.shm_tag) == []


def _faulty_peer(ctx):
    """Rank 1 plays a faulty peer: instead of dispatching it stores a counts message announcing
    more tokens than fit into rank 0's window (over the node's mapping) and bumps the signal. Rank
    0's dispatch fails with DeviceAssert naming rank 1 and the value, before using it."""
    world, t_max, experts = ctx.world_size, 4, 2 * ctx.world_size
    buffer = moelink.Buffer(ctx.group, 0, moelink.Buffer.get_low_latency_rdma_size_hint(t_max, 128, world, experts),
                            low_latency_mode=True, allow_nvlink_for_low_latency_mode=True)
    try:
        ll = buffer._ll
        sizes = moelink._low_latency.layout(num_ranks=world, ranks_per_node=world, num_max_tokens=t_max, hidden=128,
                                            num_experts=experts, num_topk=1, payload="fp8",
                                            window_bytes=ll.scaleout.data_bytes)
        if ctx.rank == 1:
            align = lambda b: -(-b // 128) * 128  # noqa: E731  (LowLatencyLayout::align)
            count_out = align(t_max * sizes["msg_bytes"])
            disp_recv = align(count_out + world * sizes["count_bytes"])
            count_in = align(disp_recv + 2 * world * t_max * sizes["msg_bytes"])
            offset = ll.window["data_base"] + count_in + 1 * sizes["count_bytes"]  # half 0, from rank 1
            message = ll.scaleout.windows.view(0, offset, sizes["count_bytes"], torch.int32)
            fingerprint = sizes["fingerprint"] - (1 << 32 if sizes["fingerprint"] >= 1 << 31 else 0)
            message[:6] = torch.tensor([1, fingerprint, t_max + 7, 0, t_max + 7, 0], dtype=torch.int32)
            signals = ll.scaleout.windows.view(0, 0, 8 * ll.window["num_signals"], torch.int64)
            signals[ll.window["signal_base"] + 0 * world + 1] += 1  # count[half 0][from rank 1]
            return "planted"
        topk = torch.zeros(t_max, 1, dtype=torch.int64)
        with pytest.raises(errors.DeviceAssert) as info:
            buffer.low_latency_dispatch(torch.zeros(t_max, 128, dtype=torch.bfloat16), topk, t_max, experts)
        return str(info.value)
    finally:
        buffer.destroy()


def test_faulty_peer_counts_fail_with_device_assert_naming_it(group):
    if group.world_size != 2:
        pytest.skip("one victim, one faulty peer")
    messages = group.run(_faulty_peer, timeout=120)
    assert messages[1] == "planted"
    assert "rank 1 announced" in messages[0] and f"{4 + 7} tokens" in messages[0], messages[0]
