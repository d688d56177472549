"""Benchmark modes: what ``python -m moelink.bench --mode NAME`` runs.

A mode is one module of this package that defines ``MODE = Mode(...)``; ``MODE_MODULES`` lists
them, in the order ``--mode all`` (the default) runs them: ``intranode``, ``internode``, ``low_latency``.
To add one:

1. write ``bench/<name>.py`` with, as ``bench/intranode.py`` does,
   - ``make_options(args) -> options``: a picklable (frozen dataclass) options object from the
     command line (``args`` is the parsed ``argparse.Namespace``, shape options already checked);
   - ``problems(args) -> list[str]``: what is wrong with the arguments for this mode (an error
     when the mode was asked for by name, a skip under ``--mode all``);
   - ``unavailable(args) -> Optional[str]``: why the mode cannot run here at all (no RDMA, not
     compiled, too few ranks), or None;
   - ``run_rank(rank, world, group, options, progress) -> dict``: the per-rank body: build the
     inputs, check correctness against a baseline, then time its variants with
     ``bench.timing.time_variants`` (which also times the interleaved memcpy floor) and return
     its records plus the per-rank byte counts its rows credit (plain data only);
   - ``ROWS``: its table rows (:class:`Row`), one per timed variant;
   - optionally ``summarize_extra(per_rank) -> dict`` and ``format_extra(extra) -> list[str]``:
     mode-specific checks and lines under the table (byte counters, configs);
2. add ``"<name>"`` to ``MODE_MODULES``.

``report.summarize`` and ``report.format_table`` then produce the shared columns (time,
bandwidth, ratios per iteration, page faults, fiber switches), the legend, ``--json`` and the
``--sweep`` plots for it with no further code.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Optional

__all__ = ["Row", "Mode", "MODE_MODULES", "all_modes", "get_mode"]

MODE_MODULES = ("intranode", "internode", "low_latency")


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed variant as the report shows it."""

    variant: str  # the name the per-rank records use
    label: str  # what the table prints
    bytes_key: Optional[str] = None  # per-rank key with the bytes it is credited with (None: no bandwidth)
    baseline: Optional[str] = None  # the variant its "/baseline" column divides by
    panel: Optional[str] = None  # the --sweep plot panel it is drawn in ("dispatch", "combine")
    is_baseline: bool = False  # a baseline row (drawn dashed; its own /baseline is empty)


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    title: str  # first words of the report's header
    rows: tuple[Row, ...]
    make_options: Callable[[Any], Any]
    problems: Callable[[Any], list[str]]
    unavailable: Callable[[Any], Optional[str]]
    run_rank: Callable[..., dict]
    summarize_extra: Callable[[list[dict]], dict] = lambda per_rank: {}
    format_extra: Callable[[dict], list[str]] = lambda extra: []
    tokens_key: str = "tokens"  # per-rank key: tokens a call handles (for "per token" figures)

    @property
    def panels(self) -> dict[str, list[Row]]:
        """Rows with bandwidth, grouped by sweep plot panel."""
        out: dict[str, list[Row]] = {}
        for row in self.rows:
            if row.panel and row.bytes_key:
                out.setdefault(row.panel, []).append(row)
        return out


def get_mode(name: str) -> Mode:
    if name not in MODE_MODULES:
        raise KeyError(f"unknown benchmark mode {name!r}; known: {', '.join(MODE_MODULES)}")
    return importlib.import_module(f"{__package__}.{name}").MODE


def all_modes() -> list[Mode]:
    return [get_mode(name) for name in MODE_MODULES]


def run_points(rank: int, world: int, group, mode_name: str, points: list, progress) -> list[dict]:
    """Rank body for several option sets of one mode in the same rank processes (a sweep reuses
    its ranks for every point with the same rank count). ``points``: [(label, options)]."""
    mode = get_mode(mode_name)
    results = []
    for label, options in points:
        results.append(mode.run_rank(rank, world, group, options, progress.with_label(label)))
    return results
