"""Controls of the SIMT host runtime that executes kernels on the CPU (docs/simt.md).

These settings are process-wide and apply to the host target only; the GPU target reads its wait
deadline from MOELINK_TIMEOUT_S when it first uses a device.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import os

from . import _host
from .errors import InvalidArgument, argument_error

_BLOCK_WARPS_ENV = "MOELINK_HOST_BLOCK_WARPS"
_block_warps: int | None = None

__all__ = ["set_wait_timeout", "wait_timeout", "set_schedule", "schedule", "scheduled", "stats",
           "set_block_warps", "block_warps"]


def set_wait_timeout(seconds: float) -> None:
    """Deadline of every spin-wait inside a kernel (initially MOELINK_TIMEOUT_S, default 100 s)."""
    _host.simt.set_wait_timeout(float(seconds))


def wait_timeout() -> float:
    return _host.simt.wait_timeout()


def set_schedule(spec: str) -> None:
    """``"deterministic"`` (FIFO, the default) or ``"random:<seed>[:<p>]"``: a random runnable
    fiber at every switch, plus an extra switch at each memory primitive with probability ``p``
    (default 0.125). The k-th launch after this call uses seed + k, so a failure replays."""
    _host.simt.set_schedule(spec)


def schedule() -> str:
    return _host.simt.schedule()


@contextlib.contextmanager
def scheduled(spec: str) -> Iterator[None]:
    """Runs the body under schedule ``spec`` and restores the previous schedule afterwards."""
    previous = schedule()
    set_schedule(spec)
    try:
        yield
    finally:
        set_schedule(previous)


def stats() -> dict:
    """Cumulative counters of this process: launches, fibers, switches, parked waits, polls of
    parked waits and back-off sleeps."""
    return dict(_host.simt.stats())


def _check_block_warps(name: str, value: object) -> int:
    limit = _host.intranode.MAX_BLOCK_WARPS
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise argument_error(InvalidArgument, name, f"an int in [1, {limit}]", repr(value))
    return value


def block_warps(num_ranks: Optional[int] = None) -> int:
    """Warps per block of the host target's normal-mode kernels for a node of ``num_ranks`` ranks
    (the GPU build always runs ``moelink._host.intranode.GPU_BLOCK_WARPS``, 16).

    ``MOELINK_HOST_BLOCK_WARPS`` or :func:`set_block_warps` fix it; by default it is one warp per
    rank, at most the GPU's 16 (that value when ``num_ranks`` is not given). Why: the host runs a
    warp's work on one fiber (``arch.cuh``: ``work_lanes``) and every fiber on one OS thread, so the
    GPU's extra warps per peer (sub-channels) add fibers to start and switch, not parallelism; one
    warp per rank keeps one queue per (channel, peer) and no warp serving several peers. Measured
    at 4 ranks (docs/results.md): 16 warps cost about a quarter more CPU per call than 4. Every
    rank of a group must use the same value (the default is the same on all)."""
    global _block_warps
    if _block_warps is None:
        text = os.environ.get(_BLOCK_WARPS_ENV)
        if text is not None and text != "":
            try:
                value = int(text)
            except ValueError:
                raise argument_error(InvalidArgument, _BLOCK_WARPS_ENV, "an int", repr(text)) from None
            _block_warps = _check_block_warps(_BLOCK_WARPS_ENV, value)
    if _block_warps is not None:
        return _block_warps
    gpu = _host.intranode.GPU_BLOCK_WARPS
    return gpu if num_ranks is None else max(1, min(gpu, int(num_ranks)))


def set_block_warps(warps: Optional[int]) -> None:
    """Sets :func:`block_warps` for this process (host target only); None restores the default
    (``MOELINK_HOST_BLOCK_WARPS``, else one warp per rank)."""
    global _block_warps
    _block_warps = None if warps is None else _check_block_warps("warps", warps)
