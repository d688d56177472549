"""The pieces every path of the proof shares: the group of virtual ranks, its windows, cases and
their results.

A *path* (layout, codecs, intranode, internode, low_latency) is a module-level object
with a ``name``, ``cases(group)`` (the :class:`Case` list it runs at this group's rank count and
target) and ``run(group, case)`` that raises AssertionError (a wrong result), a moelink error, or
:class:`Skip`, and may return details for the report. Paths are listed in
``moelink.proof.PATHS``; adding one is adding an entry there.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
from typing import Any, Callable, Dict, List, Optional

import torch

from ..errors import CudaError
from .backend import Backend, Mem, check_coresident

__all__ = ["Case", "CaseResult", "Skip", "RankGroup", "run_case"]


class Skip(Exception):
    """The case cannot run here (the message says why); reported, never counted as passed."""


@dataclasses.dataclass
class Case:
    name: str
    params: Dict[str, Any]
    seed: int = 0
    kind: str = "check"  # "check", "timeout" (a forced timeout) or "recovery" (a normal case after one)


@dataclasses.dataclass
class CaseResult:
    path: str
    case: str
    ranks: int
    target: str
    status: str  # "pass", "fail", "skip"
    seconds: float
    seed: int
    params: Dict[str, Any]
    details: Dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str = ""

    def line(self) -> str:
        text = f"{self.status.upper():4} {self.path:10} {self.case:28} ranks={self.ranks} {self.seconds:7.2f}s"
        if self.details.get("summary"):
            text += f"  {self.details['summary']}"
        if self.error:
            text += "\n       " + self.error.strip().replace("\n", "\n       ")
        return text


class RankGroup:
    """``num_ranks`` virtual ranks on one backend. Windows of a kind ("nvl", "rdma") are
    carved out of ONE allocation, ``stride`` bytes apart, zeroed when created, and kept across
    cases like a Buffer's (epochs and queue counters carry on from call to call). After a failed
    collective they are garbage, exactly as a poisoned Buffer's: :meth:`reset` drops them."""

    WINDOW_ALIGN = 1 << 12

    def __init__(self, backend: Backend, num_ranks: int, wait_s: float, big: Optional[bool] = None):
        self.backend = backend
        # GPU-sized cases (thousands of tokens, DeepSeek's hidden) or CI-sized ones; GPU-sized by
        # default on the cuda target only.
        self.big = backend.target == "cuda" if big is None else big
        self.num_ranks = num_ranks
        self.wait_s = wait_s  # host deadline of one phase (well past the device deadline)
        self._windows: Dict[str, tuple] = {}  # kind -> (Mem, stride, [bases])
        self._counters: Optional[Mem] = None
        self.coresidency: Dict[str, dict] = {}

    @property
    def target(self) -> str:
        return self.backend.target

    @property
    def module(self):
        return self.backend.module

    def windows(self, kind: str, nbytes: int) -> List[int]:
        """Base address of every rank's window of `kind`, at least `nbytes` each."""
        held = self._windows.get(kind)
        if held is None or held[1] < nbytes:
            if held is not None:
                self.backend.free(held[0])
            stride = (nbytes + self.WINDOW_ALIGN - 1) // self.WINDOW_ALIGN * self.WINDOW_ALIGN
            arena = self.backend.zeros(stride * self.num_ranks)
            held = (arena, stride, [arena.at(r * stride) for r in range(self.num_ranks)])
            self._windows[kind] = held
        return list(held[2])

    def window_mem(self, kind: str) -> Mem:
        """The one allocation the windows of `kind` were carved from (for reading them back)."""
        return self._windows[kind][0]

    def counters(self) -> List[int]:
        """One u64 per rank (64 bytes apart), zeroed by :meth:`read_counters`: the byte counters."""
        if self._counters is None:
            self._counters = self.backend.zeros(64 * self.num_ranks)
        return [self._counters.at(64 * r) for r in range(self.num_ranks)]

    def read_counters(self, clear: bool = True) -> List[int]:
        self.counters()
        values = self.backend.download(self._counters, torch.int64, (self.num_ranks, 8))[:, 0].tolist()
        if clear:
            self.backend.clear(self._counters)
        return values

    def reset(self) -> None:
        for arena, _, _ in self._windows.values():
            self.backend.free(arena)
        self._windows = {}
        if self._counters is not None:
            self.backend.free(self._counters)
            self._counters = None

    def phase(self, name: str, launchers: Dict[int, Callable[[int], None]], *, check_fit: bool = True) -> None:
        """Runs one step on every rank of `launchers` at once; raises the first rank's error
        (naming the rank) if any failed. On the GPU the step is first probed: grids that cannot be
        co-resident are refused with a message (they would wait on each other forever)."""
        if check_fit and self.target == "cuda":
            try:
                kernels = self.backend.probe(launchers)
            except CudaError as exc:
                # Stream capture refused a launch (the probe's limitation, not the kernels'): run
                # unprobed; a grid that cannot be resident still fails, by CommTimeout.
                self.coresidency[name] = {"probe_failed": str(exc)}
            else:
                self.coresidency[name] = check_coresident(f"{name} at {self.num_ranks} ranks", kernels,
                                                          self.backend.info["sm_count"])
        errors = self.backend.run_phase(name, launchers, self.wait_s)
        failed = {r: e for r, e in errors.items() if e is not None}
        if failed:
            rank, exc = min(failed.items())
            exc.failed_ranks = sorted(failed)  # type: ignore[attr-defined]
            exc.rank_errors = failed  # type: ignore[attr-defined]
            raise exc

    def run_all(self, name: str, fn: Callable[[int, int], None], ranks=None, **kw) -> None:
        """phase() with the same function for every rank: fn(rank, stream)."""
        ranks = range(self.num_ranks) if ranks is None else ranks
        self.phase(name, {r: (lambda s, r=r: fn(r, s)) for r in ranks}, **kw)

    # ---- memory helpers for paths ----
    def scratch(self) -> "Scratch":
        return Scratch(self.backend)

    def close(self) -> None:
        self.reset()
        self.backend.close()


class Scratch:
    """Per-case device memory, freed when the case ends (``with group.scratch() as mem:``)."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.held: List[Mem] = []

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        for m in self.held:
            try:
                self.backend.free(m)
            except Exception:  # noqa: BLE001 - freeing after a failure
                pass
        self.held = []

    def upload(self, tensor: Optional[torch.Tensor]) -> int:
        """Device address of a copy of `tensor` (0 for None or an empty tensor)."""
        if tensor is None or tensor.numel() == 0:
            return 0
        m = self.backend.upload(tensor)
        self.held.append(m)
        return m.ptr

    def empty(self, shape, dtype: torch.dtype, fill: int = 0) -> "Out":
        """A device tensor of `shape` (bytes set to `fill`), read back with Out.get()."""
        count = 1
        for d in shape:
            count *= int(d)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if fill:
            m = self.backend.upload(torch.full((max(nbytes, 1),), fill, dtype=torch.uint8))
        else:
            m = self.backend.zeros(max(nbytes, 1))
        self.held.append(m)
        return Out(self.backend, m, tuple(int(d) for d in shape), dtype, nbytes)


@dataclasses.dataclass
class Out:
    backend: Backend
    mem: Mem
    shape: tuple
    dtype: torch.dtype
    nbytes: int

    @property
    def ptr(self) -> int:
        return self.mem.ptr if self.nbytes else 0

    def get(self) -> torch.Tensor:
        return self.backend.download(self.mem, self.dtype, self.shape)


def run_case(path, group: RankGroup, case: Case) -> CaseResult:
    start = time.monotonic()
    result = CaseResult(path.name, case.name, group.num_ranks, group.target, "pass", 0.0, case.seed,
                        dict(case.params))
    try:
        details = path.run(group, case)
        if details:
            result.details.update(details)
    except Skip as exc:
        result.status, result.error = "skip", str(exc)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the case's result
        result.status = "fail"
        result.error = f"{type(exc).__name__}: {exc}\n" + "".join(traceback.format_tb(exc.__traceback__)[-3:])
        group.reset()  # the windows are garbage after a failed collective, as a poisoned Buffer's
    result.seconds = time.monotonic() - start
    return result
