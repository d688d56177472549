"""``python -m moelink.bench --sweep``: bandwidth against tokens, hidden, ranks and the SM budget.

Each axis varies one option over its ``--sweep-<axis>`` values while every other option keeps the
command line's value (the base point). Points with the same rank count run in one launch of rank
processes, one after another (a fresh Buffer each); a point appearing on several axes runs once.
The sweep writes ``sweep.json`` (every point's full summary) and, with matplotlib, one PNG per
mode and axis into ``--out``; it prints one table per mode and axis.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from typing import Optional

from .modes import Mode
from .plots import MISSING_MATPLOTLIB, matplotlib_missing, write_plots
from .progress import Progress
from .runner import run_mode

__all__ = ["AXES", "DEFAULT_VALUES", "points_of", "run_sweep", "format_sweep"]

# axis -> the argparse attribute it sets
AXES = {"tokens": "tokens", "hidden": "hidden", "ranks": "ranks", "sms": "num_sms"}
DEFAULT_VALUES = {"tokens": "256,512,1024,2048,4096,8192", "hidden": "2048,4096,7168", "ranks": "2,4,8",
                  "sms": "2,4,8,20"}


def _point_args(args: argparse.Namespace, axis: str, value: int, default_experts) -> argparse.Namespace:
    point = copy.copy(args)
    setattr(point, AXES[axis], value)
    if axis == "ranks" and not args.experts_given:
        point.experts = default_experts(value)
    return point


def _key(args: argparse.Namespace) -> tuple:
    return tuple(getattr(args, name) for name in ("ranks", "tokens", "hidden", "experts", "topk", "num_sms", "fp8"))


def points_of(args: argparse.Namespace, mode: Mode, default_experts) -> tuple[dict, dict, dict]:
    """(axis -> [(value, key)], key -> point args, key -> why the point is skipped)."""
    axes, unique, skipped = {}, {}, {}
    for axis in args.sweep_axes:
        axes[axis] = []
        for value in args.sweep_values[axis]:
            point = _point_args(args, axis, value, default_experts)
            key = _key(point)
            why_not = mode.unavailable(point)
            problems = [why_not] if why_not else mode.problems(point)
            if problems:
                skipped[key] = "; ".join(problems)
            else:
                unique[key] = point
            axes[axis].append((value, key))
    return axes, unique, skipped


def _label(args: argparse.Namespace) -> str:
    return f"{args.ranks}r/{args.tokens}t/h{args.hidden}/{args.num_sms}sm"


def run_sweep(args: argparse.Namespace, modes: list[Mode], progress: Progress, default_experts,
              context: dict) -> dict:
    missing = matplotlib_missing()
    if missing is not None:
        progress("note: " + MISSING_MATPLOTLIB.format(json=os.path.join(args.out, "sweep.json")))
    result = {"benchmark": "moelink.bench --sweep", "schema": 2, **context,
              "base": {axis: getattr(args, attr) for axis, attr in AXES.items()},
              "axes": {axis: args.sweep_values[axis] for axis in args.sweep_axes}, "modes": {}, "skipped_points": {}}
    for mode in modes:
        axes, unique, skipped = points_of(args, mode, default_experts)
        by_ranks: dict[int, list] = {}
        for key, point in unique.items():
            by_ranks.setdefault(point.ranks, []).append((key, point))
        progress(f"sweep of {mode.name}: {len(unique)} points in {len(by_ranks)} launches "
                 f"({', '.join(args.sweep_axes)}); {len(skipped)} skipped")
        summaries = {}
        for ranks, group in sorted(by_ranks.items()):
            labelled = [(_label(point), point) for _, point in group]
            for (key, _), summary in zip(group, run_mode(mode, labelled, deadline_s=args.deadline,
                                                          threads_per_rank=args.threads_per_rank,
                                                          progress=progress)):
                summaries[key] = summary
        result["modes"][mode.name] = {
            axis: [{"value": value, "summary": summaries[key]} if key in summaries
                   else {"value": value, "skipped": skipped[key]} for value, key in entries]
            for axis, entries in axes.items()}
        result["skipped_points"][mode.name] = sorted({skipped[k] for k in skipped})
    return result


def write_sweep(result: dict, out_dir: str) -> tuple[str, list[str], Optional[str]]:
    """Writes sweep.json and the plots; returns (json path, png paths, why no plots or None)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "sweep.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    pngs, why_not = write_plots(result, out_dir)
    return path, pngs, why_not


def format_sweep(result: dict) -> str:
    """One table per mode and axis: GB/s per rank (median over ranks) of each variant and the floor."""
    from .modes import get_mode
    lines = []
    for mode_name, axes in result["modes"].items():
        rows = [row for row in get_mode(mode_name).rows if row.bytes_key]
        for axis, points in axes.items():
            lines.append(f"{mode_name}: GB/s per rank (median over ranks) vs {axis}; "
                         f"other options at {', '.join(f'{k} {v}' for k, v in result['base'].items() if k != axis)}")
            header = f"{axis:>8}" + "".join(f"{row.variant:>19}" for row in rows) + f"{'memcpy_floor':>14}{'load':>12}"
            lines.append(header)
            for p in points:
                if "skipped" in p:
                    lines.append(f"{p['value']:>8}  skipped: {p['skipped']}")
                    continue
                s = p["summary"]
                during = s.get("load_1min_during")
                load = f"{during['min']:.1f}..{during['max']:.1f}" if during else "-"
                lines.append(f"{p['value']:>8}" + "".join(f"{s['variants'][row.variant]['GBps']['median']:>19.3f}"
                                                          for row in rows)
                             + f"{s['memcpy_floor']['GBps']['median']:>14.3f}{load:>12}")
            lines.append("")
    return "\n".join(lines)
