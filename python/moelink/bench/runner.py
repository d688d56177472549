"""Runs benchmark points of one mode on fresh rank processes and summarizes each (shared by a plain
run, one point, and ``--sweep``, every point of one rank count in the same rank processes)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .floor import memcpy_bandwidth
from .launch import run_ranks
from .modes import Mode, run_points
from .progress import Progress
from .report import summarize

__all__ = ["run_mode"]


def run_mode(mode: Mode, points: list[tuple[str, Any]], *, deadline_s: float, threads_per_rank: int,
             progress: Progress) -> list[dict]:
    """``points``: [(label, args)] with the same ``args.ranks``; returns one summary per point.
    Raises ``launch.RanksFailed`` if a rank fails."""
    ranks = points[0][1].ranks
    if any(a.ranks != ranks for _, a in points):
        raise ValueError("run_mode: every point of one launch must have the same --ranks")
    options = [(label, mode.make_options(a)) for label, a in points]
    # The kernels' own wait deadline stays below the launcher's, so a stuck rank raises CommTimeout
    # with a message naming the peer it waited for instead of being killed silently.
    env = {"MOELINK_TIMEOUT_S": str(max(5.0, min(100.0, deadline_s / 3)))}
    load_before = os.getloadavg()[0]
    per_rank = run_ranks(run_points, (mode.name, options, progress), ranks, deadline_s=deadline_s * len(points),
                         threads_per_rank=threads_per_rank, env=env, progress=progress.with_label(mode.name))
    load_after = os.getloadavg()[0]
    torch.set_num_threads(threads_per_rank)
    summaries = []
    for i, (label, opts) in enumerate(options):
        records = [rank_results[i] for rank_results in per_rank]
        # Context for the floor: one process copying alone, with the machine to itself (not a ratio).
        bytes_key = next((row.bytes_key for row in mode.rows if row.bytes_key), None)
        solo = None
        if bytes_key is not None:
            solo = memcpy_bandwidth(max(1, int(records[0][bytes_key])), iters=5, warmup=1) / 1e9
        context = {"point": label, "load_average_before": load_before, "load_average_after": load_after,
                   "memcpy_solo_GBps": solo}
        summaries.append(summarize(mode, records, options=dataclasses.asdict(opts), context=context))
    return summaries
