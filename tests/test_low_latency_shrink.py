"""Low-latency shrink mode (DeepEP's ``enable_shrink``): a rank SIGKILLed between two calls of a
dispatch + combine loop is masked by the survivors' next call (its wait reaches the deadline),
which completes; later calls do not wait for it; query_mask reports it; every result equals
moelink.reference.low_latency over the surviving ranks (no rows from the dead source, its
experts' slots add nothing to the combine). Masking a live rank by hand on every rank gives the
same reference without it, and clean restores the full one. Bad arguments: typed errors naming
them. Without enable_shrink a dead peer still fails with CommTimeout and poisons the Buffer.

CI: 4 ranks (2 nodes of 2: NIC and NVLink paths)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

import moelink
from moelink import errors, runtime
from moelink.reference import low_latency as ref
from multiproc import RankCrashed, leftover_segments, rank_group_fixture
from test_low_latency import _DISPATCH, _check_dispatch, _expert, _inputs

group = rank_group_fixture(4, case_timeout=120)

_CASE = dict(t_max=8, hidden=128, num_topk=3, experts=8, drop=0.1)
_DEADLINE_S = 2.0  # MOELINK_TIMEOUT_S of the kill cases: also the shrink mode's give-up deadline


def _buffer(ctx, rpn=2, allow_nvlink=True, enable_shrink=True):
    size = moelink.Buffer.get_low_latency_rdma_size_hint(_CASE["t_max"], _CASE["hidden"], ctx.world_size,
                                                         _CASE["experts"])
    return moelink.Buffer(ctx.group, 0, size, low_latency_mode=True, ranks_per_node=rpn,
                          allow_nvlink_for_low_latency_mode=allow_nvlink, enable_shrink=enable_shrink)


def _mask_of(buffer, world):
    status = torch.full((world,), -1, dtype=torch.int32)
    buffer.low_latency_query_mask_buffer(status)
    return status.tolist()


def _step(ctx, buffer, seed, it, masked, payload, hook=False):
    """One dispatch + combine, checked against the reference over the ranks that are not masked for
    this rank (all of them when this rank itself is masked: it talks to no one)."""
    world, rank = ctx.world_size, ctx.rank
    t_max, hidden, experts = _CASE["t_max"], _CASE["hidden"], _CASE["experts"]
    el = experts // world
    out_of_view = set(range(world)) if rank in masked else set(masked)
    xs, idx, weights = _inputs(seed + 1000 * it, world, _CASE)
    # Dispatch: a masked source sends nothing (as if it had no tokens).
    xs_seen = [x[:0] if s in out_of_view else x for s, x in enumerate(xs)]
    idx_seen = [t[:0] if s in out_of_view else t for s, t in enumerate(idx)]
    recv_x, recv_count, handle, _, recv_hook = buffer.low_latency_dispatch(
        xs[rank], idx[rank], t_max, experts, return_recv_hook=hook, **_DISPATCH[payload])
    if hook:
        recv_hook()
    rows = _check_dispatch(ctx, _CASE, xs_seen, idx_seen, recv_x, recv_count, handle, payload)
    expert_out = torch.zeros(el, world * t_max, hidden, dtype=torch.bfloat16)
    for (e, i), values in rows.items():
        expert_out[e, i] = _expert(values, rank * el + e)
    combined, _, recv_hook = buffer.low_latency_combine(expert_out, idx[rank], weights[rank], handle,
                                                        return_recv_hook=hook)
    if hook:
        recv_hook()
    # Combine: the slots whose expert lives on a masked rank add nothing (DeepEP: no renormalising;
    # a token routed only to masked experts combines to 0).
    mine = ref.dequantize_rows(ref.encode_rows(xs[rank], payload), payload, hidden) if xs[rank].shape[0] else None
    topk = idx[rank].clone()
    for r in out_of_view:
        topk[(topk >= r * el) & (topk < (r + 1) * el)] = -1
    y = torch.zeros(xs[rank].shape[0], topk.shape[1], hidden, dtype=torch.bfloat16)
    for t, j in (topk >= 0).nonzero().tolist():
        y[t, j] = _expert(mine[t], int(topk[t, j]))
    want = ref.low_latency_combine(y, topk, weights[rank])
    assert torch.equal(combined, want), f"rank {rank} iteration {it}: combine with ranks {sorted(masked)} masked"


def _killed_mid_loop(ctx, seed, victim, kill_at, rpn, allow_nvlink, enable_shrink):
    """`victim` SIGKILLs itself before call `kill_at` (after its last call's messages landed)."""
    world = ctx.world_size
    runtime.set_wait_timeout(_DEADLINE_S)
    buffer = _buffer(ctx, rpn, allow_nvlink, enable_shrink)
    try:
        times = []
        for it in range(kill_at + 3):
            if it == kill_at and ctx.rank == victim:
                buffer._scaleout.wait_idle(10.0)  # its NIC delivered every put of the last call
                os.kill(os.getpid(), signal.SIGKILL)
            masked = {victim} if it >= kill_at else set()
            start = time.monotonic()
            if not enable_shrink and it == kill_at:
                with pytest.raises(errors.CommTimeout) as info:
                    _step(ctx, buffer, seed, it, masked, "fp8")
                with pytest.raises(errors.BufferUnusable):
                    _step(ctx, buffer, seed, it + 1, masked, "fp8")
                return dict(message=str(info.value))
            _step(ctx, buffer, seed, it, masked, ("fp8", "bf16")[it % 2], hook=it % 3 == 1)
            times.append(time.monotonic() - start)
        start = time.monotonic()
        buffer.clean_low_latency_buffer(_CASE["t_max"], _CASE["hidden"], _CASE["experts"])  # skips the dead rank
        _step(ctx, buffer, seed, kill_at + 3, {victim}, "fp8")
        times.append(time.monotonic() - start)
        return dict(mask=_mask_of(buffer, world), times=times)
    finally:
        buffer.destroy()
        runtime.set_wait_timeout(100.0)


@pytest.mark.parametrize("rpn, allow_nvlink", [(2, True), (2, False)], ids=["nvlink", "nic"])
def test_killed_rank_is_masked_and_survivors_keep_serving(group, seed, rpn, allow_nvlink):
    world = group.world_size
    victim, kill_at = 1 + seed % (world - 1), 2
    with pytest.raises(RankCrashed) as info:
        group.run(_killed_mid_loop, seed, victim, kill_at, rpn, allow_nvlink, True, grace_s=60)
    outcomes = info.value.outcomes
    for rank, outcome in enumerate(outcomes):
        if rank == victim:
            continue
        assert isinstance(outcome, dict), (rank, outcome)
        assert outcome["mask"] == [int(r == victim) for r in range(world)], (rank, outcome)
        times = outcome["times"]
        # The call that found the rank dead waited out one deadline; the calls after it wait for no one.
        assert _DEADLINE_S <= times[kill_at] < 3 * _DEADLINE_S + 10, (rank, times)
        assert max(times[kill_at + 1:]) < _DEADLINE_S, (rank, times)
    assert leftover_segments(group.shm_tag) == []


def test_without_shrink_a_dead_peer_still_times_out(group, seed):
    world = group.world_size
    victim = world - 1
    with pytest.raises(RankCrashed) as info:
        group.run(_killed_mid_loop, seed, victim, 1, 2, True, False, grace_s=60)
    for rank, outcome in enumerate(info.value.outcomes[:victim]):
        assert isinstance(outcome, dict) and f"peer {victim}" in outcome["message"], (rank, outcome)


def _together(ctx, change):
    """A change of the mask made by hand on every rank at one point between calls (the contract,
    docs/low-latency.md): no rank is still in an earlier call, none starts the next one before
    every rank changed its mask."""
    dist.barrier(group=ctx.group)
    change()
    dist.barrier(group=ctx.group)


def _masked_by_hand(ctx, seed, victim, schedule):
    world = ctx.world_size
    runtime.set_schedule(schedule)
    buffer = _buffer(ctx)
    update = buffer.low_latency_update_mask_buffer
    try:
        assert _mask_of(buffer, world) == [0] * world
        _step(ctx, buffer, seed, 0, set(), "fp8")
        _together(ctx, lambda: update(victim, True))
        assert _mask_of(buffer, world) == [int(r == victim) for r in range(world)]
        for it in (1, 2, 3):  # both halves while masked, with and without hooks
            _step(ctx, buffer, seed, it, {victim}, ("fp8", "bf16")[it % 2], hook=it == 2)
        _together(ctx, buffer.low_latency_clean_mask_buffer)
        assert _mask_of(buffer, world) == [0] * world
        _step(ctx, buffer, seed, 4, set(), "fp8")
        other = (victim + 1) % world
        _together(ctx, lambda: update(other, True))
        _step(ctx, buffer, seed, 5, {other}, "bf16")
        _together(ctx, lambda: update(other, False))  # unmask: back to every rank
        assert _mask_of(buffer, world) == [0] * world
        _step(ctx, buffer, seed, 6, set(), "fp8")
        _together(ctx, lambda: update(other, False))  # unmasking an unmasked rank: no-op
        _step(ctx, buffer, seed, 7, set(), "bf16", hook=True)
    finally:
        buffer.destroy()
        runtime.set_schedule("deterministic")
    return True


@pytest.mark.parametrize("schedule", ["deterministic", "random"])
def test_masking_by_hand_gives_the_reference_without_that_rank(group, seed, schedule):
    schedule = f"random:{seed}" if schedule == "random" else schedule
    assert all(group.run(_masked_by_hand, seed, seed % group.world_size, schedule))


def _expect(exc_type, name, fn, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert str(info.value).startswith(name), (name, str(info.value))


def _bad_arguments(ctx, seed):
    world = ctx.world_size
    buffer = _buffer(ctx)
    plain = _buffer(ctx, enable_shrink=False)
    try:
        update, query = buffer.low_latency_update_mask_buffer, buffer.low_latency_query_mask_buffer
        _expect(errors.InvalidArgument, "rank_to_mask", update, world, True)
        _expect(errors.InvalidArgument, "rank_to_mask", update, -1, True)
        _expect(errors.InvalidType, "rank_to_mask", update, True, True)
        _expect(errors.InvalidType, "rank_to_mask", update, "1", True)
        _expect(errors.InvalidType, "mask", update, 0, 1)
        _expect(errors.InvalidDType, "mask_status", query, torch.zeros(world, dtype=torch.int64))
        _expect(errors.InvalidShape, "mask_status", query, torch.zeros(world + 1, dtype=torch.int32))
        _expect(errors.InvalidType, "mask_status", query, [0] * world)
        for fn, args in ((plain.low_latency_update_mask_buffer, (0, True)),
                         (plain.low_latency_query_mask_buffer, (torch.zeros(world, dtype=torch.int32),)),
                         (plain.low_latency_clean_mask_buffer, ())):
            _expect(errors.InvalidArgument, "enable_shrink", fn, *args)
        # A pending receive hook forbids changing the mask (the call is still on the wire).
        xs, idx, _ = _inputs(seed, world, _CASE)
        _, _, _, _, hook = buffer.low_latency_dispatch(xs[ctx.rank], idx[ctx.rank], _CASE["t_max"], _CASE["experts"],
                                                       return_recv_hook=True)
        _expect(errors.InvalidArgument, "low_latency_update_mask_buffer", update, 0, True)
        _expect(errors.InvalidArgument, "low_latency_clean_mask_buffer", buffer.low_latency_clean_mask_buffer)
        hook()
        assert _mask_of(buffer, world) == [0] * world, "the errors changed nothing"
        _step(ctx, buffer, seed, 1, set(), "bf16")
    finally:
        buffer.destroy()
        plain.destroy()
    # enable_shrink is a bool, and every rank's the same (every rank raises, none waits).
    _expect(errors.InvalidType, "enable_shrink", moelink.Buffer, ctx.group, 0, 1 << 20, True, enable_shrink=1)
    with pytest.raises(errors.InvalidArgument):
        moelink.Buffer(ctx.group, 0, 1 << 20, True, enable_shrink=ctx.rank == 0)
    return True


def test_bad_arguments_raise_typed_errors_naming_them(group, seed):
    assert all(group.run(_bad_arguments, seed))
