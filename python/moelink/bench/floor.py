"""The memcpy floor the benchmark compares every variant with.

:class:`SharedCopyFloor` is the floor of the table: each rank's share of the machine's copy rate
while every rank copies at once. The benchmark measures it inside every timed iteration, right
after the variants of that iteration, so each iteration's ratios divide by the floor of the same
moment (a floor measured once, after the timed loop, mostly measured what the neighbours were
doing then: it swung from 1.7 to 5.0 GB/s per rank between runs on a shared machine).

:func:`memcpy_bandwidth` is one process's single-copy rate, context only.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..errors import InvalidArgument, argument_error

__all__ = ["SharedCopyFloor", "memcpy_bandwidth"]


class SharedCopyFloor:
    """Bytes/s this rank copies while every rank of ``group`` copies at once.

    Every rank calls :meth:`measure` together. After a barrier each copies ``num_bytes`` (the bytes
    its dispatch receives) back to back for ``seconds``, between buffers allocated and faulted in
    once at construction, and returns bytes copied / elapsed. Copying for a common duration, not
    a single copy each, makes the copies overlap for real: a copy of a few MB ends within one
    scheduler time slice, so with more ranks than cores single copies each measure a core to
    themselves, while dispatch and combine run with every rank competing for the cores.
    """

    def __init__(self, group, num_bytes: int, seconds: float) -> None:
        if num_bytes <= 0:
            raise argument_error(InvalidArgument, "num_bytes", "> 0", num_bytes)
        if not seconds > 0:
            raise argument_error(InvalidArgument, "seconds", "> 0", seconds)
        self.group, self.num_bytes, self.seconds = group, num_bytes, seconds
        self._src = torch.ones(num_bytes, dtype=torch.uint8)
        self._dst = torch.empty_like(self._src)
        self._dst.copy_(self._src)  # fault the pages in before any clock starts

    def measure(self) -> float:
        dist.barrier(self.group)
        copied, start = 0, time.perf_counter()
        while True:
            self._dst.copy_(self._src)
            copied += self.num_bytes
            elapsed = time.perf_counter() - start
            if elapsed >= self.seconds:
                return copied / elapsed


def memcpy_bandwidth(num_bytes: int, *, iters: int = 20, warmup: int = 3) -> float:
    """Median bytes/s of ``dst.copy_(src)`` over ``num_bytes`` (CPU, torch's current thread count),
    one process copying alone: context for the shared floor, not the floor itself."""
    if num_bytes <= 0:
        raise argument_error(InvalidArgument, "num_bytes", "> 0", num_bytes)
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    rates = []
    for _ in range(max(1, iters)):
        start = time.perf_counter()
        dst.copy_(src)
        rates.append(num_bytes / max(time.perf_counter() - start, 1e-9))
    return statistics.median(rates)
