"""Controls of the SIMT host runtime that executes kernels on the CPU (docs/simt.md).

These settings are process-wide and apply to the host target only; the GPU target reads its wait
deadline from MOELINK_TIMEOUT_S when it first uses a device.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from . import _host

__all__ = ["set_wait_timeout", "wait_timeout", "set_schedule", "schedule", "scheduled", "stats"]


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
