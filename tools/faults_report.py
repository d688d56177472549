"""Summarises the JSON lines tests/test_faults.py writes (MOELINK_FAULTS_REPORT=path) into the
table of docs/results.md: per operation and signal, the runs, the survivors that raised
CommTimeout naming the victim, the time from the fault to the error less the deadline, and what
leaked.

    MOELINK_FAULTS_RUNS=20 MOELINK_FAULTS_REPORT=/tmp/faults.jsonl python -m pytest -q -m faults tests/test_faults.py
    python tools/faults_report.py /tmp/faults.jsonl
"""

from __future__ import annotations

import collections
import json
import statistics
import sys


def main(path: str) -> int:
    rows = collections.defaultdict(list)
    order = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            key = (r["op"], r["signal"])
            if key not in rows:
                order.append(key)
            rows[key].append(r)
    print("| operation | signal | runs | survivors | CommTimeout naming the victim | signal inside the operation | "
          "fault to error, less the deadline (s): min / median / max | segments held after | fds or threads "
          "gained | Buffer poisoned | new Buffer works |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for op, sig in order:
        rs = rows[(op, sig)]
        runs = len({(r["seed"], r["victim"]) for r in rs})
        state = "has exited" if sig == "SIGKILL" else "is stopped"
        named = sum(1 for r in rs if r["error"] and (f"root cause: rank {r['victim']} {state}" in r["error"] or
                                                    f"missing ranks: [{r['victim']}]" in r["error"]))
        inside = len({r["seed"] for r in rs if r["death"]["inside"]})
        past = sorted(r["raised_at"] - r["death"]["time"] - r["deadline_s"] for r in rs if r.get("raised_at"))
        held = sum(len(r["after"]["segments"]) + len(r["after"]["dev_shm"]) for r in rs)
        gained = sum(1 for r in rs if r["after"]["fds"] > r["before"]["fds"] or
                     len(r["after"]["tasks"]) > len(r["before"]["tasks"]) or r["after"]["threads"] > r["before"]["threads"])
        bootstrap = [r for r in rs if "bootstrap step" in (r["error"] or "")]
        poisoned = sum(1 for r in rs if r.get("poisoned"))
        works = sum(1 for r in rs if r.get("new_buffer_works"))
        spread = f"{past[0]:+.2f} / {statistics.median(past):+.2f} / {past[-1]:+.2f}" if past else "-"
        poison_text = f"{poisoned} of {len(rs) - len(bootstrap)}" + (f" ({len(bootstrap)} failed in the bootstrap: no Buffer)"
                                                                    if bootstrap else "")
        print(f"| {op} | {sig} | {runs} | {len(rs)} | {named} | {inside} of {runs} | {spread} | {held} | {gained} | "
              f"{poison_text} | {works} of {len(rs)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
