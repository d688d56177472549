"""Turns one mode's per-rank records (``bench.timing.time_variants`` plus the mode's byte counts)
into one summary and a table with its legend.

Every figure is first reduced over a rank's timed iterations (median), then given across ranks as
median [min..max]. Ratios are computed per iteration (a variant's bandwidth in iteration i over
the baseline's, or over the memcpy floor, of the same iteration i), then the median over
iterations: so a neighbour's burst of load that slows one iteration slows both sides of its ratio.
"""

from __future__ import annotations

import statistics
from typing import Optional

from .modes import Mode

__all__ = ["LEGEND", "summarize", "format_table", "format_legend"]

# Column -> what it holds; printed under every table and stored in --json as "legend".
LEGEND = {
    "ms per call": "wall time of one call on a rank, timed right after a barrier of all ranks; median over the "
                   "timed iterations, then median [min..max] over ranks",
    "GB/s per rank": "DeepEP's per-rank algorithm bandwidth: dispatch = payload bytes the rank receives "
                     "(received rows x row bytes, FP8 scales included), combine = the same rows sent back, "
                     "divided by the median time; top-k ids, weights and counts are not counted",
    "baseline": "how MoE frameworks dispatch without DeepEP (bench/baseline.py: split sizes, permute, "
                "all_to_all_single over gloo, un-permute), written as we would write it: every large buffer "
                "is reused across calls (a BaselineWorkspace), so like moelink it takes no per-call page "
                "faults; a baseline allocating fresh 100 MB buffers per call ran about 3x slower",
    "/baseline": "bandwidth over the baseline's, per iteration (both timed in the same iteration), then the "
                 "median over iterations; > 1: moelink is faster",
    "/memcpy": "bandwidth over the memcpy floor measured in the same iteration, then the median; a "
               "shared-memory dispatch copies each byte twice, so 0.5 is its ceiling unless it copies once",
    "memcpy floor": "each rank's share of the machine's copy rate while all ranks copy the dispatch bytes "
                    "back to back at once, measured in every timed iteration right after its variants (not "
                    "once after the loop: on a shared machine the floor moves with the neighbours' load)",
    "minor faults per call": "minor page faults of the rank's process during one call (getrusage ru_minflt "
                             "delta): pages of freshly mapped memory touched; a call that reuses its buffers "
                             "takes about none",
    "switches per call": "fiber switches of moelink's host runtime (moelink.runtime.stats) in one call; "
                         "'per token' divides by the rank's tokens; fibers = CUDA threads run, idle sleeps = "
                         "back-offs of parked waits",
    "load": "1-min load average of the machine (os.getloadavg): before and after the run, and its range over the "
            "timed iterations (rank 0 samples it at each); above the CPU count the ranks competed for cores",
}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def _per_iteration_ratios(numerator: list[float], denominator: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerator, denominator) if b > 0)


def summarize(mode: Mode, per_rank: list[dict], *, options: dict, context: Optional[dict] = None) -> dict:
    """One JSON-ready object for one mode: options, and per variant the time, bandwidth, ratio,
    page-fault and fiber-runtime spreads; the floor; the load; the mode's own checks."""
    variants = {}
    bandwidth = {}  # variant -> per rank -> per iteration bytes/s
    for row in mode.rows:
        times = [r["times_s"][row.variant] for r in per_rank]
        entry = {"label": row.label, "time_s": _spread([statistics.median(t) for t in times])}
        if row.bytes_key is not None:
            nbytes = [r[row.bytes_key] for r in per_rank]
            bandwidth[row.variant] = [[b / max(t, 1e-12) for t in ts] for b, ts in zip(nbytes, times)]
            entry["bytes_per_rank"] = _spread(nbytes)
            entry["GBps"] = _spread([b / statistics.median(ts) / 1e9 for b, ts in zip(nbytes, times)])
            entry["vs_memcpy"] = _spread([_per_iteration_ratios(bw, r["floor_Bps"])
                                          for bw, r in zip(bandwidth[row.variant], per_rank)])
        entry["minor_faults_per_call"] = _spread([statistics.median(r["minor_faults"][row.variant])
                                                  for r in per_rank])
        if row.variant in per_rank[0]["runtime"]:
            per_call = {key: statistics.median(statistics.median(r["runtime"][row.variant][key]) for r in per_rank)
                        for key in per_rank[0]["runtime"][row.variant]}
            tokens = statistics.median(r[mode.tokens_key] for r in per_rank)
            entry["runtime_per_call"] = per_call
            entry["switches_per_token"] = per_call["switches"] / max(tokens, 1)
        variants[row.variant] = entry
    for row in mode.rows:
        if row.baseline is not None and row.variant in bandwidth:
            variants[row.variant]["vs_baseline"] = _spread([
                _per_iteration_ratios(mine, theirs)
                for mine, theirs in zip(bandwidth[row.variant], bandwidth[row.baseline])])

    load = [x for r in per_rank for x in r.get("load_1min", [])]
    return {
        "mode": mode.name,
        "title": mode.title,
        "ranks": len(per_rank),
        **(context or {}),
        "options": options,
        "correct": True,  # a mode's run_rank raises before timing anything if its results are wrong
        "variants": variants,
        "memcpy_floor": {
            "GBps": _spread([statistics.median(r["floor_Bps"]) / 1e9 for r in per_rank]),
            "per_iteration_GBps": [[b / 1e9 for b in r["floor_Bps"]] for r in per_rank],
        },
        "load_1min_during": _spread(load) if load else None,
        **mode.summarize_extra(per_rank),
        "per_rank": [{"rank": r["rank"], "times_s": r["times_s"], "minor_faults": r["minor_faults"],
                      "floor_Bps": r["floor_Bps"]} for r in per_rank],
    }


def _fmt(spread: Optional[dict], scale: float = 1.0, digits: int = 2) -> str:
    if spread is None:
        return "-"
    return (f"{spread['median'] * scale:.{digits}f} [{spread['min'] * scale:.{digits}f}"
            f"..{spread['max'] * scale:.{digits}f}]")


def _header(s: dict) -> list[str]:
    o = s["options"]
    shape = [f"{s['ranks']} ranks (processes)"]
    if "cpus" in s:
        shape[0] += f" on {s['cpus']} CPUs"
    for key, text in (("tokens", "{} tokens/rank"), ("hidden", "hidden {}")):
        if key in o:
            shape.append(text.format(o[key]))
    if "topk" in o and "experts" in o:
        shape.append(f"top-{o['topk']} of {o['experts']} experts")
    if "fp8" in o:
        shape.append("FP8 e4m3 + f32 scales" if o["fp8"] else "bf16")
    if "num_sms" in o:
        shape.append(f"{o['num_sms']} SMs = {o['num_sms'] // 2} channels")
    if "iters" in o:
        shape.append(f"{o['iters']} iterations after {o.get('warmup', 0)} warm-up")
    return [f"{s['title']}: " + ", ".join(shape)]


def format_table(s: dict, mode: Optional[Mode] = None) -> str:
    """The two tables of one mode (speed; what each call costs), then the mode's own lines."""
    w = 44
    lines = _header(s) + [
        "",
        f"{'':{w}}{'ms per call':>26}  {'GB/s per rank':>26}  {'/baseline':>18}  {'/memcpy':>20}",
        f"{'(each: median [min..max] over ranks)':{w}}",
    ]
    for name, e in s["variants"].items():
        lines.append(f"{e['label']:{w}}{_fmt(e['time_s'], 1e3):>26}  {_fmt(e.get('GBps'), digits=3):>26}  "
                     f"{_fmt(e.get('vs_baseline')) if 'vs_baseline' in e else '':>18}  "
                     f"{_fmt(e.get('vs_memcpy'), digits=3) if 'vs_memcpy' in e else '':>20}")
    lines.append(f"{'memcpy floor (interleaved, all ranks copy)':{w}}{'':>26}  "
                 f"{_fmt(s['memcpy_floor']['GBps'], digits=3):>26}  {'':>18}  {'1':>20}")
    if s.get("memcpy_solo_GBps") is not None:
        lines.append(f"{'memcpy, one process alone (context only)':{w}}{'':>26}  {s['memcpy_solo_GBps']:>26.3f}")

    lines += ["", f"{'what each call costs (median rank)':{w}}{'minor faults per call':>26}  {'switches per call':>18}  "
                  f"{'per token':>10}  {'fibers':>8}  {'idle sleeps':>11}"]
    for name, e in s["variants"].items():
        rt = e.get("runtime_per_call")
        extra = (f"{rt['switches']:>18.0f}  {e['switches_per_token']:>10.1f}  {rt['fibers']:>8.0f}  "
                 f"{rt['idle_sleeps']:>11.0f}") if rt else f"{'-':>18}  {'-':>10}  {'-':>8}  {'-':>11}"
        lines.append(f"{e['label']:{w}}{_fmt(e['minor_faults_per_call'], digits=0):>26}  {extra}")
    lines.append("")
    if mode is not None:
        lines += mode.format_extra(s)
    return "\n".join(lines)


def format_legend() -> str:
    lines = ["legend:"]
    for column, text in LEGEND.items():
        lines.append(f"  {column}: {text}")
    return "\n".join(lines)
