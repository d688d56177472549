"""Root cause of a cascade of timeouts (docs/semantics.md, "Failures"): the first rank whose wait
expires publishes what it waited for in its window header, and every later CommTimeout follows the
records to the rank that waits on nobody, and names it with its state (exited, stopped, alive
but absent). Real rank processes, real kernels, real failures."""

from __future__ import annotations

import ast
import os
import signal
import threading
import time

import pytest
import torch

import moelink
from moelink import _host, errors, runtime
from multiproc import RankFailed, rank_group_fixture

group = rank_group_fixture(3, 4, case_timeout=120)
DEADLINE_S = 1.5


def _fresh_buffer(ctx) -> moelink.Buffer:
    old = ctx.state.pop("buffer", None)
    if old is not None:
        old.destroy()
    return moelink.Buffer(ctx.group, 1 << 22)


def _dispatch_args(buffer, topk):
    _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * buffer.group_size)
    return dict(topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)


def _never_enters(ctx, absent):
    runtime.set_wait_timeout(DEADLINE_S)
    buffer = _fresh_buffer(ctx)
    try:
        if ctx.rank == absent:
            return "absent"
        topk = torch.zeros(8, 2, dtype=torch.int64)
        start = time.monotonic()
        with pytest.raises(errors.CommTimeout) as info:
            buffer.dispatch(torch.zeros(8, 16, dtype=torch.bfloat16), **_dispatch_args(buffer, topk))
        elapsed = time.monotonic() - start
        with pytest.raises(errors.BufferUnusable):
            buffer.dispatch(torch.zeros(8, 16, dtype=torch.bfloat16), **_dispatch_args(buffer, topk))
        records = {r: f.peer for r, f in buffer._windows.peer_failures().items()}
        return dict(message=str(info.value), elapsed=elapsed, records=records)
    finally:
        runtime.set_wait_timeout(100.0)
        buffer.destroy()


def test_rank_that_never_enters_a_dispatch_is_the_root_cause(group):
    absent = 1
    outcomes = group.run(_never_enters, absent)
    for rank, res in enumerate(outcomes):
        if rank == absent:
            assert res == "absent"
            continue
        assert f"root cause: rank {absent} is alive but did not take part" in res["message"], res["message"]
        assert f"from peer {absent}" in res["message"] and res["records"][rank] == absent
        # The deadline, plus the root-cause grace (a tenth of it), plus slack for 2 loaded cores.
        assert res["elapsed"] < DEADLINE_S * 1.1 + 1.5, res


def _stops_mid_combine(ctx, victim, kill):
    """Tokens of rank 0 go to ranks 1 and 2, of rank 1 to 0 and 1, of rank 2 to 0 and 2. ``victim``
    (rank 1) stops (or dies) right after the combine's node barrier. Rank 0's reduction then waits
    for rank 1's rows; rank 2 needs nothing from rank 1, but its rows for rank 0 fill rank 0's
    tiny queue, so rank 2 waits on rank 0: a live peer, itself waiting on rank 1."""
    runtime.set_wait_timeout(DEADLINE_S)
    world, rank = ctx.world_size, ctx.rank
    buffer = _fresh_buffer(ctx)
    config = moelink.Config(2, 1, world)
    tokens = 1200
    targets = {0: (1, 2), 1: (0, 1), 2: (0, 2)}.get(rank, (0, rank))
    topk = torch.tensor([[2 * targets[0], 2 * targets[1]]], dtype=torch.int64).expand(tokens, 2).contiguous()
    x = torch.randn(tokens, 64).to(torch.bfloat16)
    recv_x, _, _, _, handle, _ = buffer.dispatch(x, config=config, **_dispatch_args(buffer, topk))
    if rank == victim:
        epoch = buffer._epoch + 1  # the combine's
        slots = buffer._windows.view(rank, _host.intranode.BARRIER_OFFSET, 8 * world, dtype=torch.int64)

        def stop_after_barrier():
            while not all(int(v) >= epoch for v in slots):
                time.sleep(0.0002)
            os.kill(os.getpid(), signal.SIGKILL if kill else signal.SIGSTOP)

        threading.Thread(target=stop_after_barrier, daemon=True).start()
    start = time.monotonic()
    try:
        buffer.combine(recv_x, handle, config=config)
    except errors.CommTimeout as exc:
        elapsed = time.monotonic() - start
        records = {r: f.peer for r, f in buffer._windows.peer_failures().items()}
        raise AssertionError(dict(message=str(exc), elapsed=elapsed, records=records)) from None
    finally:
        runtime.set_wait_timeout(100.0)
    return "combine finished"


@pytest.mark.parametrize("kill", [False, True], ids=["stopped", "killed"])
def test_cascade_names_the_stalled_rank_not_the_live_peer(group, kill):
    if group.world_size != 3:
        pytest.skip("the routing is written for 3 ranks")
    victim = 1
    with pytest.raises(RankFailed) as info:
        group.run(_stops_mid_combine, victim, kill, timeout=60, grace_s=3 * DEADLINE_S)
    results = {}
    for rank, outcome in enumerate(info.value.outcomes):
        if rank != victim:
            assert outcome is not None and getattr(outcome, "type_name", None) == "AssertionError", (rank, outcome)
            results[rank] = ast.literal_eval(outcome.message)  # the dict raised above
    state = "has exited" if kill else "is stopped"
    for rank, res in results.items():
        assert f"root cause: rank {victim} {state}" in res["message"], res["message"]
        assert res["elapsed"] < DEADLINE_S * 1.1 + 1.5, res
    # Rank 0 waited on rank 1 itself; rank 2 waited on rank 0, and still names rank 1.
    assert results[0]["records"][0] == victim
    assert "from peer 0" in results[2]["message"], results[2]["message"]
    assert "(waits: rank 0 -> rank 1)" in results[2]["message"], results[2]["message"]
    group.close()
