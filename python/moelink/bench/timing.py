"""The timed loop every benchmark mode shares (a mode builds its variants, this times them).

Each iteration runs every variant once, in order, then measures the memcpy floor
(:class:`~moelink.bench.floor.SharedCopyFloor`): the implementations and the floor are interleaved,
so background load on a shared machine hits them alike, and every iteration's ratios divide by
the floor measured in that iteration. Every timed call starts right after a barrier of all ranks.

Per timed iteration and variant, a rank records: seconds, minor page faults (``ru_minflt`` delta
of this process: faults of fresh anonymous memory, the cost a reused buffer avoids), and for the
variants that run kernels under moelink's host runtime, its counters (``moelink.runtime.stats``:
fiber switches, fibers, parked waits, idle sleeps). Counters are read outside the timed region.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import time
from typing import Callable, Optional, Sequence

import torch.distributed as dist

from .floor import SharedCopyFloor
from .progress import Progress

__all__ = ["Variant", "time_variants", "FLOOR"]

FLOOR = "memcpy_floor"  # name of the floor in the per-iteration records


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    call: Callable[[], object]
    runtime_counters: bool = False  # read moelink.runtime.stats() around each call
    prepare: Optional[Callable[[], object]] = None  # untimed, before each call (e.g. staging its input)


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _format_seconds(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} ms" if ms < 100 else f"{ms:.0f} ms"


def time_variants(group, variants: Sequence[Variant], floor: SharedCopyFloor, *, iters: int, warmup: int,
                  progress: Progress) -> dict:
    """Runs ``warmup + iters`` iterations; returns this rank's records of the timed ones:
    ``times_s``, ``minor_faults`` ({variant: [per iteration]}), ``runtime`` ({variant: {counter:
    [per iteration]}}), ``floor_Bps`` and ``load_1min`` ([per iteration])."""
    stats = None
    if any(v.runtime_counters for v in variants):
        from moelink import runtime
        stats = runtime.stats
    times = {v.name: [] for v in variants}
    faults = {v.name: [] for v in variants}
    counters = {v.name: {key: [] for key in stats()} for v in variants if v.runtime_counters}
    floor_Bps, load = [], []
    total = warmup + iters
    for iteration in range(total):
        timed = iteration >= warmup
        what = "warm-up" if not timed else f"timed {iteration - warmup + 1}/{iters}"
        progress.begin(f"iteration {iteration + 1}/{total} ({what}):")
        if timed:
            load.append(os.getloadavg()[0])
        for v in variants:
            if v.prepare is not None:
                v.prepare()
            before = stats() if v.runtime_counters else None
            faults_before = _minor_faults()
            dist.barrier(group)
            start = time.perf_counter()
            v.call()
            elapsed = time.perf_counter() - start
            faulted = _minor_faults() - faults_before
            if timed:
                times[v.name].append(elapsed)
                faults[v.name].append(faulted)
                if before is not None:
                    after = stats()
                    for key, values in counters[v.name].items():
                        values.append(after[key] - before[key])
            progress.part(f"{v.name} {_format_seconds(elapsed)},")
        rate = floor.measure()
        if timed:
            floor_Bps.append(rate)
        progress.end(f"{FLOOR} {rate / 1e9:.2f} GB/s")
    return {"times_s": times, "minor_faults": faults, "runtime": counters, "floor_Bps": floor_Bps, "load_1min": load}
