"""Runs one function on N local rank processes joined in a gloo process group, and never hangs.

    results = run_ranks(fn, args, world_size=4, deadline_s=300)

``fn(rank, world_size, group, *args)`` runs in every rank (it must be importable: ranks are fresh
interpreters); ``run_ranks`` returns the values in rank order, or raises :class:`RanksFailed`
whose message holds the traceback of the first rank that raised, the exit status of a rank that
died, or the ranks still running at the deadline (their Python stacks are printed to stderr by
``faulthandler`` shortly before the deadline, so a hang shows where it hangs).

Why these choices:

- *spawn*, not fork: the launcher has imported torch, and forking a process that may hold
  OpenMP or gloo threads is undefined behaviour; a fresh interpreter costs a few seconds once.
- The launcher hosts the TCP store on a port the kernel picks (port 0), so there is no
  "find a free port, close it, hope nobody takes it" race; ranks connect as clients.
- Ranks die with the launcher (``PR_SET_PDEATHSIG``), so killing the launcher leaves no orphans.
- Every rank runs with ``MOELINK_SHM_TAG`` set to a tag of this run, so that after the ranks are
  gone the launcher can find (and remove, with a warning) any shared-memory segment of ours left
  in ``/dev/shm``. Buffers unlink their names once mapped, so normally there is none.
"""

from __future__ import annotations

import datetime
import glob
import multiprocessing as mp
import multiprocessing.connection
import os
import secrets
import sys
import time
import traceback
from typing import Any, Callable, Optional, Sequence

import torch.distributed as dist

__all__ = ["RanksFailed", "run_ranks"]

# Seconds between the ranks' faulthandler stack dump and the launcher's kill, so the dump is whole
# (at most this fraction of the deadline, so a short deadline does not dump right at the start).
_STACK_DUMP_MARGIN_S = 5.0
_STACK_DUMP_MARGIN_FRACTION = 0.2
# Seconds the other ranks get to finish on their own after one rank failed (they usually fail
# right away with a gloo or CommTimeout error, whose message is then useful too).
_GRACE_S = 3.0


class RanksFailed(RuntimeError):
    """A rank raised, died or outlived the deadline. ``str()`` says which and why."""


def _rank_entry(rank: int, world_size: int, store_port: int, conn, env: dict, deadline_s: float,
                deadline_wall: float, threads: int, fn: Callable, args: tuple, progress) -> None:
    """Body of a rank process: join the group, run ``fn``, send back ("ok", value) or ("error", text)."""
    os.environ.update(env)
    try:  # die with the launcher instead of lingering (Linux: prctl(PR_SET_PDEATHSIG, SIGKILL))
        import ctypes
        ctypes.CDLL(None).prctl(1, 9)
    except Exception:  # noqa: BLE001 - best effort on other systems
        pass
    import faulthandler
    # The launcher's deadline as wall-clock time: this process started seconds after it did.
    margin = min(_STACK_DUMP_MARGIN_S, _STACK_DUMP_MARGIN_FRACTION * deadline_s)
    faulthandler.dump_traceback_later(max(0.5, deadline_wall - time.time() - margin), exit=False)
    try:
        import torch
        torch.set_num_threads(threads)
        timeout = datetime.timedelta(seconds=deadline_s)
        store = dist.TCPStore("127.0.0.1", store_port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size, timeout=timeout)
        if progress is not None:
            progress(f"rank {rank}/{world_size} joined the gloo group (pid {os.getpid()})")
        try:
            reply = ("ok", fn(rank, world_size, dist.group.WORLD, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the launcher
        reply = ("error", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    faulthandler.cancel_dump_traceback_later()
    conn.send(reply)
    conn.close()


def _exit_text(code: Optional[int]) -> str:
    if code is None:
        return "still running"
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _stop(procs: Sequence[mp.process.BaseProcess]) -> None:
    """Terminates the given rank processes (only ours), then kills the ones that ignore it."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    end = time.monotonic() + 2.0
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)


def _remove_leftover_segments(tag: str) -> list[str]:
    leftovers = glob.glob(f"/dev/shm/moelink-{tag}-*")
    for path in leftovers:
        try:
            os.unlink(path)
        except OSError:
            pass
    return leftovers


def run_ranks(fn: Callable, args: tuple, world_size: int, *, deadline_s: float,
              threads_per_rank: int = 1, env: Optional[dict] = None, progress=None) -> list[Any]:
    """Runs ``fn(rank, world_size, group, *args)`` on ``world_size`` fresh processes; see the module doc.
    ``progress`` (a ``bench.progress.Progress``): say on stderr when the ranks start and join."""
    if world_size < 1:
        raise ValueError(f"world_size: expected >= 1, got {world_size}")
    tag = "bench" + secrets.token_hex(4)
    # Thread pools sized like torch's: idle OpenMP/OpenBLAS workers spinning in N ranks would steal
    # the cores the ranks are measured on.
    threads = str(threads_per_rank)
    rank_env = {"GLOO_SOCKET_IFNAME": "lo", "MOELINK_SHM_TAG": tag, "OMP_NUM_THREADS": threads,
                "OPENBLAS_NUM_THREADS": threads, **(env or {})}
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          timeout=datetime.timedelta(seconds=deadline_s), wait_for_workers=False)
    ctx = mp.get_context("spawn")
    deadline_wall = time.time() + deadline_s
    procs, conns = [], []
    if progress is not None:
        progress(f"starting {world_size} rank processes (spawn: each imports torch first, a few seconds)")
    try:
        for rank in range(world_size):
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_rank_entry, name=f"moelink-bench-rank{rank}", daemon=True,
                               args=(rank, world_size, store.port, child_end, rank_env, deadline_s,
                                     deadline_wall, threads_per_rank, fn, args, progress))
            proc.start()
            child_end.close()
            procs.append(proc)
            conns.append(parent_end)
        return _collect(procs, conns, time.monotonic() + deadline_s)
    finally:
        _stop(procs)
        leftovers = _remove_leftover_segments(tag)
        if leftovers:
            print(f"moelink.bench: removed {len(leftovers)} shared-memory segment(s) the ranks left behind: "
                  f"{', '.join(leftovers)}", file=sys.stderr)
        del store


def _collect(procs, conns, deadline: float) -> list[Any]:
    """Waits for every rank's reply; raises RanksFailed on the first failure or at the deadline."""
    results: list[Any] = [None] * len(procs)
    pending = set(range(len(procs)))
    while pending:
        waitables = [conns[r] for r in pending] + [procs[r].sentinel for r in pending]
        ready = multiprocessing.connection.wait(waitables, max(0.0, deadline - time.monotonic()))
        if not ready:
            late = sorted(pending)
            raise RanksFailed(f"rank(s) {late} did not finish before the deadline; their Python stacks were "
                              "dumped to stderr just before it (raise it with --deadline)")
        for rank in sorted(pending):
            conn, proc = conns[rank], procs[rank]
            if conn in ready or conn.poll():
                try:
                    status, value = conn.recv()
                except (EOFError, OSError):
                    status, value = "died", None
            elif proc.sentinel in ready:
                status, value = "died", None
            else:
                continue
            if status == "ok":
                results[rank] = value
                pending.discard(rank)
                continue
            if status == "died":
                proc.join(1.0)
                raise RanksFailed(f"rank {rank} died with {_exit_text(proc.exitcode)} before reporting a result")
            _give_others_grace(procs, conns, pending - {rank})
            raise RanksFailed(f"rank {rank} raised:\n{value}")
    return results


def _give_others_grace(procs, conns, others: set) -> None:
    """After a failure, lets the other ranks finish or fail for _GRACE_S, and prints their errors
    too (a peer's CommTimeout naming the absent rank often explains the first failure)."""
    end = time.monotonic() + _GRACE_S
    for rank in sorted(others):
        if conns[rank].poll(max(0.0, end - time.monotonic())):
            try:
                status, value = conns[rank].recv()
            except (EOFError, OSError):
                continue
            if status == "error":
                first_line = value.strip().splitlines()[-1] if value.strip() else value
                print(f"moelink.bench: rank {rank} also failed: {first_line}", file=sys.stderr)
