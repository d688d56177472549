"""Turns the per-rank results of ``bench.intranode.run_rank`` into one summary and a table.

Per-rank bandwidth = that rank's bytes / the median of its iteration times; the summary gives the
median over ranks and the min and max across ranks. Ratios compare medians over ranks.
"""

from __future__ import annotations

import statistics
from typing import Optional

__all__ = ["summarize", "format_table"]

# (variant, the bytes it is credited with, label in the table)
_ROWS = (
    ("layout", None, "layout (get_dispatch_layout)"),
    ("dispatch", "dispatch_bytes", "dispatch: layout + notify + payload"),
    ("dispatch_cached", "dispatch_bytes", "dispatch, cached handle (DeepEP's figure)"),
    ("combine", "combine_bytes", "combine"),
    ("baseline_dispatch", "dispatch_bytes", "baseline dispatch (all_to_all_single)"),
    ("baseline_combine", "combine_bytes", "baseline combine (all_to_all_single)"),
)
# moelink variant -> the baseline variant it is compared with
_PAIRS = {"dispatch": "baseline_dispatch", "dispatch_cached": "baseline_dispatch", "combine": "baseline_combine"}


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(per_rank: list[dict], *, options: dict, solo_memcpy_Bps: Optional[float], context: dict) -> dict:
    """One JSON-ready object: options, per-variant time and bandwidth spreads, ratios, checks."""
    variants = {}
    for name, bytes_key, label in _ROWS:
        times = [r["median_s"][name] for r in per_rank]
        entry = {"label": label, "time_s": _spread(times)}
        if bytes_key is not None:
            entry["bytes_per_rank"] = _spread([r[bytes_key] for r in per_rank])
            entry["GBps"] = _spread([r[bytes_key] / t / 1e9 for r, t in zip(per_rank, times)])
        variants[name] = entry
    memcpy = {
        # the floor: each rank's share of the machine's copy rate while all ranks copy at once
        "shared_GBps": _spread([r["memcpy_shared_Bps"] / 1e9 for r in per_rank]),
        # baseline.memcpy_bandwidth in each rank: single copies of the dispatch bytes
        "single_copy_GBps": _spread([r["memcpy_Bps"] / 1e9 for r in per_rank]),
        # the same, in the launcher after the ranks exited: one process with the machine to itself
        "solo_GBps": None if solo_memcpy_Bps is None else solo_memcpy_Bps / 1e9,
    }
    floor = memcpy["shared_GBps"]["median"]
    ratios = {}
    for name in ("dispatch", "dispatch_cached", "combine", "baseline_dispatch", "baseline_combine"):
        bw = variants[name]["GBps"]["median"]
        ratios[name] = {"vs_memcpy": bw / floor}
        if name in _PAIRS:
            ratios[name]["vs_baseline"] = bw / variants[_PAIRS[name]]["GBps"]["median"]

    counters = {key: [r["bytes_moved"][key] for r in per_rank] for key in per_rank[0]["bytes_moved"]}
    expected = {key: [r["bytes_expected"][key] for r in per_rank] for key in per_rank[0]["bytes_expected"]}
    counters_match = all(counters[k] == expected[k] for k in expected) and not any(
        counters["dispatch_rdma"] + counters["combine_rdma"])

    # Fiber-runtime work per call (summed over timed iterations on each rank, then per call).
    iters = len(per_rank[0]["times_s"]["dispatch"])
    runtime_per_call = {
        name: {key: statistics.median(r["runtime_stats"][name][key] for r in per_rank) / max(iters, 1)
               for key in per_rank[0]["runtime_stats"][name]}
        for name in per_rank[0]["runtime_stats"]}

    return {
        "benchmark": "moelink intranode dispatch/combine, host target",
        **context,
        "options": options,
        "correct": True,  # run_rank raises before timing anything if moelink differs from the baseline
        "variants": variants,
        "memcpy": memcpy,
        "ratios": ratios,
        "bytes_moved": {"counters": counters, "expected": expected, "match": counters_match},
        "runtime_per_call": runtime_per_call,
        "configs": {"dispatch": per_rank[0]["dispatch_config"], "combine": per_rank[0]["combine_config"],
                    "num_nvl_bytes": per_rank[0]["num_nvl_bytes"]},
        "recv_rows_per_rank": [r["rows"]["recv_rows"] for r in per_rank],
        "per_rank": [{"rank": r["rank"], "times_s": r["times_s"], "memcpy_shared_Bps": r["memcpy_shared_Bps"],
                      "memcpy_Bps": r["memcpy_Bps"]} for r in per_rank],
    }


def _fmt_spread(spread: dict, scale: float = 1.0, digits: int = 2) -> str:
    return (f"{spread['median'] * scale:8.{digits}f} [{spread['min'] * scale:.{digits}f}"
            f"..{spread['max'] * scale:.{digits}f}]")


def format_table(s: dict) -> str:
    o = s["options"]
    payload = "FP8 e4m3 + f32 scales" if o["fp8"] else "bf16"
    lines = [
        f"moelink intranode dispatch/combine, host target: {s['ranks']} ranks (processes) on {s['cpus']} CPUs, "
        f"{o['tokens']} tokens/rank, hidden {o['hidden']}, top-{o['topk']} of {o['experts']} experts, {payload}, "
        f"{o['num_sms']} SMs = {o['num_sms'] // 2} channels, {o['iters']} iterations after {o['warmup']} warm-up",
        f"per-rank payload (median over ranks): dispatch receives "
        f"{s['variants']['dispatch']['bytes_per_rank']['median'] / 1e6:.2f} MB, combine sends "
        f"{s['variants']['combine']['bytes_per_rank']['median'] / 1e6:.2f} MB "
        f"(rows received per rank: {s['recv_rows_per_rank']})",
        "",
        f"{'':44}{'ms per call':>26}  {'GB/s per rank':>26}  {'/baseline':>9}  {'/memcpy':>8}",
        f"{'':44}{'median [min..max] ranks':>26}  {'median [min..max] ranks':>26}",
    ]
    for name, entry in s["variants"].items():
        bw = _fmt_spread(entry["GBps"], digits=3) if "GBps" in entry else "-"
        ratio = s["ratios"].get(name, {})
        vs_base = f"{ratio['vs_baseline']:9.2f}" if "vs_baseline" in ratio else f"{'':9}"
        vs_mem = f"{ratio['vs_memcpy']:8.3f}" if "vs_memcpy" in ratio else ""
        lines.append(f"{entry['label']:44}{_fmt_spread(entry['time_s'], 1e3):>26}  {bw:>26}  {vs_base}  {vs_mem}")
    m = s["memcpy"]
    lines.append(f"{'memcpy floor: share while all ranks copy':44}{'':26}  "
                 f"{_fmt_spread(m['shared_GBps'], digits=3):>26}  {'':9}  {1:8.3f}")
    lines.append(f"{'memcpy, single copies (memcpy_bandwidth)':44}{'':26}  "
                 f"{_fmt_spread(m['single_copy_GBps'], digits=3):>26}")
    if m["solo_GBps"] is not None:
        lines.append(f"{'memcpy, one process alone':44}{'':26}  {m['solo_GBps']:8.3f}")
    lines.append("")
    b = s["bytes_moved"]
    verdict = "equal to" if b["match"] else "DIFFERENT FROM"
    counters = b["counters"]
    lines.append(f"byte counters (Buffer.bytes_moved, nvl, per rank, one call): dispatch {counters['dispatch_nvl']}, "
                 f"combine {counters['combine_nvl']}; {verdict} the queue-slot bytes expected from the routing; "
                 f"rdma {counters['dispatch_rdma']} / {counters['combine_rdma']}")
    per_call = s["runtime_per_call"]
    lines.append("fiber runtime per call (median rank): " + "; ".join(
        f"{name} {st['switches']:.0f} switches, {st['fibers']:.0f} fibers, {st['idle_sleeps']:.0f} idle sleeps"
        for name, st in per_call.items()))
    lines.append("correctness: moelink's received rows, top-k ids, weights, per-expert counts and combined rows "
                 "equal the baseline's on every rank (checked before timing)")
    return "\n".join(lines)
