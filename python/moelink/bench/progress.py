"""Progress lines on stderr while the benchmark runs (stdout keeps only the report, so ``--json``
stays parseable): ``[  12.3 s] moelink.bench intranode: iteration 2/12: dispatch 542 ms, ...``.

A :class:`Progress` is plain data, so the launcher passes it to the rank processes; every line
shows the seconds since the launcher started, whichever process prints it. In the ranks only
rank 0 reports (``for_rank``), except for the line saying that a rank joined the group.
"""

from __future__ import annotations

import dataclasses
import sys
import time

__all__ = ["Progress"]


@dataclasses.dataclass(frozen=True)
class Progress:
    enabled: bool = True
    started: float = dataclasses.field(default_factory=time.time)  # wall clock of the launcher's start
    label: str = ""  # what is running: a mode name, a sweep point

    def with_label(self, label: str) -> "Progress":
        return dataclasses.replace(self, label=label)

    def for_rank(self, rank: int) -> "Progress":
        """This progress in rank ``rank``: silent except on rank 0."""
        return self if rank == 0 else dataclasses.replace(self, enabled=False)

    def _prefix(self) -> str:
        where = f"moelink.bench {self.label}" if self.label else "moelink.bench"
        return f"[{time.time() - self.started:7.1f} s] {where}:"

    def __call__(self, text: str) -> None:
        """One whole line."""
        if self.enabled:
            print(f"{self._prefix()} {text}", file=sys.stderr, flush=True)

    def begin(self, text: str) -> None:
        """Starts a line that :meth:`part` extends and :meth:`end` finishes (one line per iteration,
        each variant appended as soon as it was timed)."""
        if self.enabled:
            print(f"{self._prefix()} {text}", end="", file=sys.stderr, flush=True)

    def part(self, text: str) -> None:
        if self.enabled:
            print(f" {text}", end="", file=sys.stderr, flush=True)

    def end(self, text: str = "") -> None:
        if self.enabled:
            print(f" {text}" if text else "", file=sys.stderr, flush=True)
