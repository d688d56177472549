"""``python -m moelink.bench`` runs end to end and reports what it promises; its launcher never hangs.

No timing is asserted: the numbers depend on the machine and its load. What is checked is the
shape of the report (JSON schema, table, legend), that the correctness check ran and passed, that
the byte counters agree with the routing, that the floor is measured per iteration and ratios are
per iteration, the progress lines, the sweep and its plots (or the message when matplotlib is
missing), and that nothing is left in /dev/shm.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import subprocess
import sys
import time

import pytest

import moelink
from moelink.bench.__main__ import default_experts, main, parse_args
from moelink.bench.launch import RanksFailed, run_ranks
from moelink.bench.modes import MODE_MODULES, Mode, Row, all_modes, get_mode
from moelink.bench.plots import matplotlib_missing, write_plots
from moelink.bench.report import LEGEND, format_legend, format_table, summarize

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(moelink.__file__)))
_SMALL = ["--ranks", "2", "--tokens", "64", "--hidden", "256", "--iters", "2", "--warmup", "1",
          "--floor-seconds", "0.05"]


def _bench_segments() -> set[str]:
    return set(glob.glob("/dev/shm/moelink-bench*"))


def _run_bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The subprocess must import the same moelink as this test (in-place build or installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "moelink.bench", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


_VARIANTS = ("layout", "dispatch", "dispatch_cached", "combine", "baseline_dispatch", "baseline_combine")
_MOELINK = ("dispatch", "dispatch_cached", "combine")


def test_small_run_reports_json_with_checks_passed():
    before = _bench_segments()
    proc = _run_bench(*_SMALL, "--json")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    top = json.loads(proc.stdout)  # progress goes to stderr: stdout is the JSON alone
    assert top["schema"] == 2 and top["skipped_modes"] == {} and set(top["modes"]) == {"intranode", "internode",
                                                                                     "low_latency"}
    assert set(top["legend"]) >= {"ms per call", "GB/s per rank", "/baseline", "/memcpy", "memcpy floor",
                                  "minor faults per call", "switches per call", "load", "baseline"}
    for key in ("load_average_before", "load_average_after", "cpus", "command", "date", "elapsed_s"):
        assert key in top, key
    # --mode all (the default) runs every mode; the internode one is checked in its own test.
    assert top["modes"]["internode"]["correct"] is True
    low = top["modes"]["low_latency"]
    assert low["correct"] is True and low["options"]["tokens"] == 32  # the short pass of --mode all
    for variant, lat in low["latency"].items():
        assert 0 < lat["median_us"] <= lat["p99_us"], variant
    wire = low["wire_bytes_per_token"]  # bf16 rows are the largest, NVFP4 the smallest on the wire
    assert wire["ll_dispatch_bf16"] > wire["ll_dispatch_fp8"] > wire["ll_dispatch_nvfp4"] > 0
    report = top["modes"]["intranode"]

    assert report["correct"] is True
    assert report["ranks"] == 2
    assert report["options"]["tokens"] == 64 and report["options"]["hidden"] == 256
    assert report["options"]["experts"] == 256 and report["options"]["topk"] == 8
    assert report["options"]["iters"] == 2
    for name in _VARIANTS:
        entry = report["variants"][name]
        assert entry["time_s"]["median"] > 0, name
        faults = entry["minor_faults_per_call"]
        assert 0 <= faults["min"] <= faults["median"] <= faults["max"], name
    for name in _VARIANTS[1:]:
        spread = report["variants"][name]["GBps"]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"], name
        assert report["variants"][name]["vs_memcpy"]["median"] > 0, name
    for name in _MOELINK:
        entry = report["variants"][name]
        assert entry["vs_baseline"]["median"] > 0
        assert entry["runtime_per_call"]["switches"] > 0 and entry["runtime_per_call"]["fibers"] > 0
        assert entry["switches_per_token"] == pytest.approx(entry["runtime_per_call"]["switches"] / 64)
    for name in ("baseline_dispatch", "baseline_combine"):
        assert "runtime_per_call" not in report["variants"][name] and "vs_baseline" not in report["variants"][name]

    # The floor is measured in every timed iteration, on every rank, and ratios are per iteration.
    floor = report["memcpy_floor"]["per_iteration_GBps"]
    assert len(floor) == 2 and all(len(f) == 2 and min(f) > 0 for f in floor)
    rows = report["recv_rows_per_rank"]
    for name in ("dispatch", "combine"):
        per_rank = []
        for r, rank in enumerate(report["per_rank"]):
            ratios = [rows[r] * 256 * 2 / t / b for t, b in zip(rank["times_s"][name], rank["floor_Bps"])]
            per_rank.append(statistics.median(ratios))
        assert report["variants"][name]["vs_memcpy"]["median"] == pytest.approx(statistics.median(per_rank))
    during = report["load_1min_during"]
    assert 0 <= during["min"] <= during["max"]
    assert report["memcpy_solo_GBps"] > 0

    # DeepEP's byte definition: received rows x hidden x 2 bytes (bf16), the same for combine.
    assert len(rows) == 2 and all(r > 0 for r in rows)
    dispatch_bytes = report["variants"]["dispatch"]["bytes_per_rank"]
    assert dispatch_bytes["min"] == min(rows) * 256 * 2 and dispatch_bytes["max"] == max(rows) * 256 * 2
    assert report["bytes_moved"]["match"] is True
    assert all(n > 0 for n in report["bytes_moved"]["counters"]["dispatch_nvl"])
    # The baseline's workspace: each of its 8 roles (combine returns no weights here) allocated once,
    # in the untimed first calls, and never regrown.
    assert all(w["allocations"] == 8 and w["bytes"] > 0 for w in report["baseline_workspace"])
    assert _bench_segments() <= before, "the benchmark left shared-memory segments behind"

    # Progress on stderr: ranks starting and joining, the buffer, each variant of each iteration.
    err = proc.stderr
    for text in ("starting 2 rank processes", "rank 0/2 joined", "rank 1/2 joined", "creating moelink.Buffer",
                 "checking moelink against the baseline", "iteration 1/3 (warm-up):", "iteration 3/3 (timed 2/2):"):
        assert text in err, text
    last = [line for line in err.splitlines() if "iteration 3/3" in line][0]
    assert all(f" {name} " in last for name in _VARIANTS) and "memcpy_floor" in last


def test_table_output_legend_and_fp8():
    proc = _run_bench("--ranks", "2", "--tokens", "32", "--hidden", "256", "--iters", "1", "--warmup", "0",
                      "--fp8", "--mode", "intranode")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for text in ("FP8 e4m3", "dispatch, cached handle", "baseline combine", "memcpy floor (interleaved", "/baseline",
                 "minor faults per call", "switches per call", "per token", "1-min load average",
                 "during the timed iterations", "equal to the queue-slot bytes", "correctness:", "baseline workspace",
                 "legend:", "  /memcpy: ", "  minor faults per call: ", "  baseline: "):
        assert text in proc.stdout, text
    assert "(warm-up)" not in proc.stdout and "joined" not in proc.stdout  # progress stays on stderr
    quiet = _run_bench("--ranks", "2", "--tokens", "16", "--hidden", "256", "--iters", "1", "--warmup", "0", "--quiet")
    assert quiet.returncode == 0 and "moelink.bench" not in quiet.stderr, quiet.stderr


def test_invalid_options_are_rejected_before_launching():
    with pytest.raises(SystemExit):
        parse_args(["--ranks", "3", "--experts", "256"])
    with pytest.raises(SystemExit):
        parse_args(["--hidden", "100"])  # 200-byte rows are not a multiple of 16 bytes
    with pytest.raises(SystemExit):
        parse_args(["--num-sms", "5"])
    with pytest.raises(SystemExit):
        parse_args(["--mode", "nonesuch"])
    with pytest.raises(SystemExit):
        parse_args(["--sweep", "--sweep-axes", "tokens,colour"])
    with pytest.raises(SystemExit):
        parse_args(["--sweep", "--sweep-tokens", "256,x"])
    with pytest.raises(SystemExit):
        parse_args(["--floor-seconds", "0"])
    assert default_experts(4) == 256 and default_experts(3) == 264 and default_experts(64) == 512
    args = parse_args(["--ranks", "2"])
    assert [m.name for m in args.modes] == list(MODE_MODULES) and args.skipped_modes == {}


# ---- the modes registry and the report, on synthetic records --------------------------------------

def test_every_registered_mode_is_complete():
    modes = all_modes()
    assert [m.name for m in modes] == list(MODE_MODULES) and "intranode" in MODE_MODULES
    for mode in modes:
        variants = [row.variant for row in mode.rows]
        assert len(set(variants)) == len(variants), mode.name
        for row in mode.rows:
            assert row.baseline is None or row.baseline in variants, (mode.name, row)
        assert mode.panels, mode.name
        assert callable(mode.run_rank) and callable(mode.make_options)
    with pytest.raises(KeyError, match="unknown benchmark mode"):
        get_mode("nonesuch")


_TOY = Mode(
    name="toy", title="toy mode", make_options=lambda a: a, problems=lambda a: [], unavailable=lambda a: None,
    run_rank=lambda *a: {}, rows=(Row("fast", "fast thing", "nbytes", "slow", "p"),
                                  Row("slow", "slow thing", "nbytes", None, "p", True)))


def _toy_rank(rank, fast, slow, floor):
    return {"rank": rank, "tokens": 10, "nbytes": 1e9, "times_s": {"fast": fast, "slow": slow},
            "minor_faults": {"fast": [0, 2, 4], "slow": [100, 100, 300]},
            "runtime": {"fast": {"switches": [10, 20, 30], "fibers": [1, 1, 1], "idle_sleeps": [0, 0, 0]}},
            "floor_Bps": floor, "load_1min": [1.0, 2.0, 3.0][:len(floor)]}


def test_report_divides_per_iteration_then_takes_the_median():
    # Rank 0's medians come from different iterations for the two sides, so a ratio of medians
    # (fast 2 s, slow 3 s: 1.5; bandwidth 0.5 GB/s over floor 3 GB/s: 0.167) differs from the
    # median of per-iteration ratios (4, 1, 1.1: 1.1; 0.25, 0.333, 0.167: 0.25), which is the report's.
    per_rank = [_toy_rank(0, [1.0, 3.0, 2.0], [4.0, 3.0, 2.2], [4e9, 1e9, 3e9]),
                _toy_rank(1, [1.0, 1.0, 1.0], [3.0, 3.0, 3.0], [2e9, 2e9, 2e9])]
    s = summarize(_TOY, per_rank, options={"iters": 3})
    fast = s["variants"]["fast"]
    assert fast["vs_baseline"] == pytest.approx({"median": 2.05, "min": 1.1, "max": 3.0})
    assert fast["vs_memcpy"] == pytest.approx({"median": 0.375, "min": 0.25, "max": 0.5})
    assert fast["GBps"] == pytest.approx({"median": 0.75, "min": 0.5, "max": 1.0})
    assert fast["minor_faults_per_call"]["median"] == 2 and s["variants"]["slow"]["minor_faults_per_call"]["max"] == 100
    assert fast["runtime_per_call"]["switches"] == 20 and fast["switches_per_token"] == 2
    assert s["memcpy_floor"]["GBps"]["min"] == 2 and s["memcpy_floor"]["GBps"]["max"] == 3
    assert s["load_1min_during"] == {"median": 2.0, "min": 1.0, "max": 3.0}
    table = format_table(s, _TOY)
    assert "fast thing" in table and "slow thing" in table and "2.05 [1.10..3.00]" in table
    assert all(column in format_legend() for column in LEGEND)


def test_internode_mode_reports_network_bytes_at_the_minimum():
    """2 nodes of 2 ranks: the run checks itself against the baseline, and every rank's network
    bytes per dispatch equal the one-message-per-(token, node) minimum (printed as 1.00)."""
    proc = _run_bench("--mode", "internode", "--ranks", "4", "--ranks-per-node", "2", "--tokens", "64",
                      "--hidden", "256", "--iters", "2", "--warmup", "1", "--floor-seconds", "0.05", "--json",
                      timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = json.loads(proc.stdout)["modes"]["internode"]
    assert set(json.loads(proc.stdout)["modes"]) == {"internode"} and report["correct"] is True
    net = report["network"]
    assert net["dispatch_bytes"] == net["minimum_bytes"] and all(b > 0 for b in net["dispatch_bytes"])
    assert net["vs_minimum"] == 1.0 and net["naive_vs_minimum"] > 1.0
    for name in ("dispatch", "dispatch_cached", "combine", "baseline_dispatch", "baseline_combine"):
        assert report["variants"][name]["time_s"]["median"] > 0, name
    assert set(report["bandwidth_split"]) >= {"dispatch", "combine"}


# ---- --sweep and its plots ----------------------------------------------------------------------

def test_sweep_writes_json_tables_and_plots_or_says_why_not(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    proc = _run_bench("--ranks", "2", "--tokens", "32", "--hidden", "256", "--iters", "1", "--warmup", "0",
                      "--floor-seconds", "0.05", "--sweep", "--sweep-axes", "tokens,sms", "--sweep-tokens", "16,32",
                      "--sweep-sms", "2,4", "--mode", "intranode", "--out", str(out), timeout=240)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    result = json.loads((out / "sweep.json").read_text())
    axes = result["modes"]["intranode"]
    assert [p["value"] for p in axes["tokens"]] == [16, 32] and [p["value"] for p in axes["sms"]] == [2, 4]
    for axis, points in axes.items():
        for point in points:
            s = point["summary"]
            assert s["correct"] and s["variants"]["dispatch"]["GBps"]["median"] > 0, (axis, point["value"])
            assert s["memcpy_floor"]["GBps"]["median"] > 0
    assert axes["tokens"][0]["summary"]["options"]["tokens"] == 16
    assert axes["sms"][1]["summary"]["options"]["num_sms"] == 4
    assert axes["sms"][0]["summary"]["options"]["tokens"] == 32  # the other options stay at the base point
    # the four distinct points ran in one launch of 2 ranks
    assert proc.stderr.count("starting 2 rank processes") == 1
    assert "GB/s per rank (median over ranks) vs tokens" in proc.stdout and "vs sms" in proc.stdout
    assert "load_average_before" in result and "load_average_after" in result
    pngs = sorted(p.name for p in out.glob("*.png"))
    if matplotlib_missing() is None:
        assert pngs == ["intranode_bandwidth_vs_sms.png", "intranode_bandwidth_vs_tokens.png"]
        for name in pngs:
            assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert pngs == [] and "pip install 'moelink[bench]'" in proc.stderr

    # Without matplotlib: no plots, and a message saying how to get them from the saved sweep.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    again = tmp_path / "again"
    again.mkdir()
    paths, why_not = write_plots(result, str(again))
    assert paths == [] and "pip install 'moelink[bench]'" in why_not and "--plot" in why_not
    assert main(["--plot", str(out / "sweep.json")]) == 1
    monkeypatch.delitem(sys.modules, "matplotlib")


def test_plots_from_a_saved_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    summary = summarize(_TOY, [_toy_rank(0, [1.0, 1.0], [2.0, 2.0], [4e9, 4e9])], options={})
    sweep = {"base": {"tokens": 8}, "load_average_before": 0.5, "load_average_after": 1.0,
             "modes": {"intranode": {}}}
    # plot through the real intranode rows: give the toy summary their variant names
    rows = {row.variant: summary["variants"]["fast"] for row in get_mode("intranode").rows}
    summary = dict(summary, variants=rows)
    sweep["modes"]["intranode"]["tokens"] = [{"value": v, "summary": summary} for v in (8, 16)]
    (tmp_path / "sweep.json").write_text(json.dumps(sweep))
    assert main(["--plot", str(tmp_path / "sweep.json")]) == 0
    png = tmp_path / "intranode_bandwidth_vs_tokens.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ---- the launcher ------------------------------------------------------------------------------

def _rank_returns(rank, world, group, value):
    import torch.distributed as dist
    dist.barrier(group)
    return (rank, world, value)


def _rank_1_raises(rank, world, group):
    if rank == 1:
        raise ValueError("rank one refuses")
    return rank


def _rank_1_hangs(rank, world, group):
    if rank == 1:
        time.sleep(600)
    return rank


def test_launcher_returns_results_in_rank_order():
    assert run_ranks(_rank_returns, ("x",), 2, deadline_s=60) == [(0, 2, "x"), (1, 2, "x")]


def test_launcher_reports_a_failing_rank_with_its_traceback():
    with pytest.raises(RanksFailed, match=r"(?s)rank 1 raised.*Traceback.*rank one refuses"):
        run_ranks(_rank_1_raises, (), 2, deadline_s=60)


def test_launcher_gives_up_at_the_deadline_and_shows_where_ranks_hang(capfd):
    start = time.monotonic()
    with pytest.raises(RanksFailed, match=r"rank\(s\) \[1\] did not finish before the deadline"):
        run_ranks(_rank_1_hangs, (), 2, deadline_s=12)
    assert time.monotonic() - start < 30
    assert "_rank_1_hangs" in capfd.readouterr().err  # the hung rank's stack, dumped before the kill
