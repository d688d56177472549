"""``python -m moelink.bench`` runs end to end and reports what it promises; its launcher never hangs.

No timing is asserted: the numbers depend on the machine and its load. What is checked is the
shape of the report, that the correctness check ran and passed, that the byte counters agree with
the routing, and that nothing is left in /dev/shm.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest

import moelink
from moelink.bench.__main__ import default_experts, parse_args
from moelink.bench.launch import RanksFailed, run_ranks

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(moelink.__file__)))
_SMALL = ["--ranks", "2", "--tokens", "64", "--hidden", "256", "--iters", "2", "--warmup", "1"]


def _bench_segments() -> set[str]:
    return set(glob.glob("/dev/shm/moelink-bench*"))


def _run_bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The subprocess must import the same moelink as this test (in-place build or installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "moelink.bench", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_small_run_reports_json_with_checks_passed():
    before = _bench_segments()
    proc = _run_bench(*_SMALL, "--json")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    report = json.loads(proc.stdout)

    assert report["correct"] is True
    assert report["ranks"] == 2
    assert report["options"]["tokens"] == 64 and report["options"]["hidden"] == 256
    assert report["options"]["experts"] == 256 and report["options"]["topk"] == 8
    for name in ("layout", "dispatch", "dispatch_cached", "combine", "baseline_dispatch", "baseline_combine"):
        assert report["variants"][name]["time_s"]["median"] > 0, name
    for name in ("dispatch", "dispatch_cached", "combine", "baseline_dispatch", "baseline_combine"):
        spread = report["variants"][name]["GBps"]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"], name
    for name in ("dispatch", "dispatch_cached", "combine"):
        assert report["ratios"][name]["vs_baseline"] > 0 and report["ratios"][name]["vs_memcpy"] > 0
    assert report["memcpy"]["shared_GBps"]["median"] > 0 and report["memcpy"]["solo_GBps"] > 0

    # DeepEP's byte definition: received rows x hidden x 2 bytes (bf16), the same for combine.
    rows = report["recv_rows_per_rank"]
    assert len(rows) == 2 and all(r > 0 for r in rows)
    dispatch_bytes = report["variants"]["dispatch"]["bytes_per_rank"]
    assert dispatch_bytes["min"] == min(rows) * 256 * 2 and dispatch_bytes["max"] == max(rows) * 256 * 2
    assert report["bytes_moved"]["match"] is True
    assert all(n > 0 for n in report["bytes_moved"]["counters"]["dispatch_nvl"])
    assert _bench_segments() <= before, "the benchmark left shared-memory segments behind"


def test_table_output_and_fp8():
    proc = _run_bench("--ranks", "2", "--tokens", "32", "--hidden", "256", "--iters", "1", "--warmup", "0", "--fp8")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    for text in ("FP8 e4m3", "dispatch, cached handle", "baseline combine", "memcpy floor", "/baseline",
                 "equal to the queue-slot bytes", "correctness:"):
        assert text in proc.stdout, text


def test_invalid_options_are_rejected_before_launching():
    with pytest.raises(SystemExit):
        parse_args(["--ranks", "3", "--experts", "256"])
    with pytest.raises(SystemExit):
        parse_args(["--hidden", "100"])  # 200-byte rows are not a multiple of 16 bytes
    with pytest.raises(SystemExit):
        parse_args(["--num-sms", "5"])
    assert default_experts(4) == 256 and default_experts(3) == 264 and default_experts(64) == 512


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
