"""The one-copy paths (``Buffer.dispatch(..., zero_copy=True)``, ``Buffer.get_combine_input_buffer``
and ``Buffer.combine(..., zero_copy=True)``) on 2 and 4 rank processes: bit for bit the results of
the queue-based paths on the same inputs (and within the reference's bound), views that survive
combines of either kind, cached and padded dispatches, FP8 payloads, the size hint, every block
size and the random schedules (the GPU's lane split), and the errors: a window too small raises on
every rank and leaves the Buffer usable, a foreign combine input is refused before anything runs.
"""

from __future__ import annotations

import pytest
import torch

import moelink
from moelink import errors, reference, runtime
from moelink.reference.dispatch import assert_combine_close
from multiproc import rank_group_fixture

group = rank_group_fixture(2, 4, case_timeout=240)


def _inputs(seed, world, hidden, num_topk, experts_per_rank, max_tokens, fp8=False):
    gen = torch.Generator().manual_seed(seed)
    num_experts = experts_per_rank * world
    xs, idx, weights = [], [], []
    for _ in range(world):
        n = int(torch.randint(0, max_tokens, (1,), generator=gen))
        x = torch.randn(n, hidden, generator=gen).to(torch.bfloat16)
        if fp8:
            x = (x.to(torch.float8_e4m3fn), torch.rand(n, (hidden + 127) // 128, generator=gen) + 0.5)
        xs.append(x)
        idx.append(torch.randint(-1, num_experts, (n, num_topk), generator=gen))
        weights.append(torch.rand(n, num_topk, generator=gen))
    return xs, idx, weights, num_experts


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int16) \
        if t.element_size() == 2 else t


def _expert(rows: torch.Tensor) -> torch.Tensor:
    return (rows.float() * 0.5 + 1.0).to(torch.bfloat16)


def _same_as_queue_paths(ctx, seed, case):
    world, rank = ctx.world_size, ctx.rank
    runtime.set_schedule(case.get("schedule", "deterministic"))
    if "block_warps" in case:
        runtime.set_block_warps(case["block_warps"])
    try:
        hidden, topk, fp8 = case.get("hidden", 128), case.get("num_topk", 4), case.get("fp8", False)
        xs, idx, weights, num_experts = _inputs(seed, world, hidden, topk, case.get("experts_per_rank", 2),
                                                case.get("max_tokens", 120), fp8)
        worst = case.get("num_worst_tokens", 0)
        config = moelink.Config(case.get("num_sms", 4), case.get("send_chunk", 6), case.get("queue", 64))
        most = sum(x[0].shape[0] if fp8 else x.shape[0] for x in xs)  # no rank receives more
        size = config.get_nvl_buffer_size_hint(hidden * 2, world, num_topk=topk,
                                               num_max_zero_copy_recv_tokens=max(most, worst, 1))
        x, topk_idx, topk_weights = xs[rank], idx[rank], weights[rank]
        with moelink.Buffer(ctx.group, size) as buffer:
            _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
            layout = dict(is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                          topk_weights=topk_weights, num_worst_tokens=worst, config=config)
            queued = buffer.dispatch(x, **layout)
            want = [t.clone() if isinstance(t, torch.Tensor) else t for t in queued[:4]]
            want_x = (want[0][0].clone(), want[0][1].clone()) if fp8 else want[0]
            got = buffer.dispatch(x, zero_copy=True, **layout)
            handle = got[4]
            payloads = (got[0] if fp8 else (got[0],), want_x if fp8 else (want_x,))
            for mine, theirs in zip(*payloads):
                assert torch.equal(_bits(mine), _bits(theirs)), "one-copy recv_x / scales"
            window = buffer._windows.peer_ptr(rank)
            rows = got[0][0] if fp8 else got[0]
            assert rows.numel() == 0 or window <= rows.data_ptr() < window + size, "outputs are views of the window"
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]) and got[3] == want[3]
            m = handle.num_recv_tokens
            assert torch.equal(handle.recv_src_idx, queued[4].recv_src_idx)
            assert torch.equal(handle.send_head, queued[4].send_head)
            if case.get("cached"):
                again = buffer.dispatch(x, handle=handle, topk_idx=topk_idx, topk_weights=topk_weights,
                                        config=config, zero_copy=True)
                assert torch.equal(_bits(again[0][0] if fp8 else again[0]), _bits(want_x[0] if fp8 else want_x))
            if fp8:
                return m
            # A queue-based combine whose input is the one-copy view itself: its queues must leave it intact.
            bias = torch.randn(x.shape[0], hidden, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
            recv_w = got[2]
            plain = buffer.combine(_expert(want_x), queued[4], topk_weights=want[2], bias=bias, config=config)
            view_in = buffer.combine(_expert(rows), handle, topk_weights=recv_w, bias=bias, config=config)
            assert torch.equal(_bits(view_in[0]), _bits(plain[0])) and torch.equal(view_in[1], plain[1])
            assert torch.equal(_bits(rows), _bits(want_x)), "the view survived the combine"
            # The one-copy combine: expert outputs written into this rank's combine input buffer.
            staged = buffer.get_combine_input_buffer(handle)
            assert staged.shape == (handle.num_output_rows, hidden) and staged.dtype == torch.bfloat16
            assert staged.numel() == 0 or window <= staged.data_ptr() < window + size
            staged.copy_(_expert(rows))
            direct = buffer.combine(staged if case.get("padded_input", True) else staged[:m], handle,
                                    topk_weights=recv_w, bias=bias, config=config, zero_copy=True)
            assert torch.equal(_bits(direct[0]), _bits(plain[0])), "one-copy combine, bit for bit"
            assert torch.equal(direct[1], plain[1])
            assert torch.equal(_bits(rows), _bits(want_x)), "the view survived the one-copy combine"
            # and within the reference's bound
            all_dispatched = reference.intranode_dispatch(xs, idx, num_experts, weights)
            outputs = [_expert(d.recv_x) for d in all_dispatched]
            returned = [d.recv_topk_weights.float() for d in all_dispatched]
            biases = [torch.randn(xx.shape[0], hidden, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
                      for xx in xs]  # each rank's bias, drawn as that rank drew it
            expected = reference.intranode_combine(outputs, all_dispatched, [xx.shape[0] for xx in xs], returned,
                                                   biases)[rank]
            assert_combine_close(direct[0], direct[1], expected, context=f"rank {rank}")
            return m
    finally:
        runtime.set_block_warps(None)
        runtime.set_schedule("deterministic")


def _run(group, seed, **case):
    return group.run(_same_as_queue_paths, seed, case)


@pytest.mark.parametrize("hidden,num_topk,experts_per_rank", [(128, 4, 2), (64, 8, 4), (16, 1, 1), (512, 9, 3)])
def test_same_bits_as_the_queue_paths(group, seed, hidden, num_topk, experts_per_rank):
    _run(group, seed, hidden=hidden, num_topk=num_topk, experts_per_rank=experts_per_rank)


def test_deepseek_hidden_and_many_channels(group, seed):
    _run(group, seed, hidden=7168, num_topk=8, experts_per_rank=8, max_tokens=40, num_sms=8)


def test_cached_padded_and_unpadded_inputs(group, seed):
    _run(group, seed, cached=True, num_worst_tokens=130 * group.world_size, max_tokens=130)
    _run(group, seed, cached=True, padded_input=False)


def test_fp8_payload(group, seed):
    _run(group, seed, hidden=256, fp8=True, cached=True)


@pytest.mark.parametrize("block_warps", [1, 2, 3, 4, 16, 32])
def test_every_block_size(group, seed, block_warps):
    _run(group, seed, block_warps=block_warps, queue=max(8, 2 * group.world_size))


@pytest.mark.parametrize("schedule", ["random:5", "random:6:0.5"])
def test_under_random_schedules(group, seed, schedule):
    _run(group, seed, schedule=schedule, queue=8, send_chunk=3, max_tokens=60)


def _errors(ctx):
    world = ctx.world_size
    n = 6000  # everything to rank 0: it receives n * world rows, more than the queues' window holds
    topk = torch.zeros(n, 2, dtype=torch.int64)
    config = moelink.Config(2, 2, 16)
    sub = moelink._host.intranode.default_sub_channels(world, runtime.block_warps(world), 1, 16)
    def queues(**shape):  # exactly what a queue-based call of this shape needs
        return moelink.config.intranode_window_bytes(num_ranks=world, num_channels=1, queue_tokens=16, row_bytes=32,
                                                     num_scales=0, sub_channels=sub, **shape)
    with moelink.Buffer(ctx.group, queues(num_topk=2, experts_per_rank=2)) as buffer:
        _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * world)
        layout = dict(topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=config)
        x = torch.ones(n, 16, dtype=torch.bfloat16)
        with pytest.raises(errors.InvalidArgument, match="num_nvl_bytes: expected at least .* receive region"):
            buffer.dispatch(x, zero_copy=True, **layout)  # every rank knows M after notify, and raises
        assert buffer._unusable is None
        recv, _, _, _, handle, _ = buffer.dispatch(x, **layout)  # still usable, results still right
        assert recv.shape[0] == (n * world if ctx.rank == 0 else 0) and bool((recv == 1).all())
        with pytest.raises(errors.InvalidArgument, match="num_nvl_bytes: .*combine input buffer of"):
            buffer.combine(recv, handle, config=config, zero_copy=True)
        with pytest.raises(errors.InvalidType, match="zero_copy: expected a bool"):
            buffer.dispatch(x, zero_copy=1, **layout)
        combined = buffer.combine(recv, handle, config=config)[0]
        assert torch.equal(combined, x)
    # a window holding the receive region but not the combine's queues below it: exactly the queues
    with moelink.Buffer(ctx.group, queues(num_topk=0, experts_per_rank=0)) as buffer:
        spread = torch.tensor([[2 * j, 2 * j + 1] for j in range(world)])  # token j to rank j: every rank gets one
        _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(spread, 2 * world)
        layout = dict(topk_idx=spread, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=config)
        recv, _, _, _, handle, _ = buffer.dispatch(x[:world], zero_copy=True, **layout)
        assert recv.shape[0] == world
        with pytest.raises(errors.InvalidArgument, match="below the outputs of the last one-copy dispatch"):
            buffer.combine(recv, handle, config=config)
        assert buffer._unusable is None
        with pytest.raises(errors.InvalidArgument, match="x: expected Buffer.get_combine_input_buffer"):
            buffer.combine(recv.clone(), handle, config=config, zero_copy=True)
        staged = buffer.get_combine_input_buffer(handle)
        staged.copy_(recv)
        assert torch.equal(buffer.combine(staged, handle, config=config, zero_copy=True)[0], x[:world])
    return True


def test_errors_are_raised_on_every_rank_and_never_poison(group):
    assert group.run(_errors) == [True] * group.world_size


def test_size_hint_covers_both_regions():
    c = moelink.Config(20, 6, 256)
    plain = c.get_nvl_buffer_size_hint(14336, 4, num_topk=8)
    hint = c.get_nvl_buffer_size_hint(14336, 4, num_topk=8, num_max_zero_copy_recv_tokens=8192)
    recv = moelink.config.direct_recv_bytes(rows=8192, row_bytes=14336, num_scales=112, num_topk=8)
    assert hint == plain + recv  # the queues end after the combine input region at this shape
    assert moelink.config.combine_input_bytes(num_ranks=4, rows=8192, hidden=7168, num_topk=8) < plain
    with pytest.raises(errors.InvalidArgument, match="num_max_zero_copy_recv_tokens"):
        c.get_nvl_buffer_size_hint(14336, 4, num_max_zero_copy_recv_tokens=-1)


def test_host_block_size_defaults_to_one_warp_per_rank(monkeypatch):
    monkeypatch.setattr(runtime, "_block_warps", None)
    monkeypatch.delenv("MOELINK_HOST_BLOCK_WARPS", raising=False)
    gpu = moelink._host.intranode.GPU_BLOCK_WARPS
    assert [runtime.block_warps(r) for r in (1, 2, 4, 8, 16, 64)] == [1, 2, 4, 8, 16, gpu]
    assert runtime.block_warps() == gpu
    runtime.set_block_warps(3)
    assert runtime.block_warps(8) == 3
    runtime.set_block_warps(None)
    monkeypatch.setenv("MOELINK_HOST_BLOCK_WARPS", "5")
    assert runtime.block_warps(8) == 5
    runtime.set_block_warps(None)
    monkeypatch.setenv("MOELINK_HOST_BLOCK_WARPS", "x")
    with pytest.raises(errors.InvalidArgument, match="MOELINK_HOST_BLOCK_WARPS"):
        runtime.block_warps(4)
    runtime.set_block_warps(None)
