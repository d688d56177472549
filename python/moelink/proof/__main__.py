"""python -m moelink.proof: run the one-GPU proof and write its results.

    python -m moelink.proof --target cuda --ranks 2,4,8 --bench --out device-results
    python -m moelink.proof --target host --ranks 2,4

Writes <out>/proof-<target>.txt and <out>/proof-<target>.json (bench-<target>.* with
--bench-only) when --out is given, and prints the text as it goes. Exit status: 0 all passed, 1 a case failed, 2 the target is unavailable
(no GPU: the message says why), 3 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _parse(argv):
    ap = argparse.ArgumentParser(prog="python -m moelink.proof", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=("cuda", "host", "auto"), default="auto",
                    help="cuda: N streams on one GPU; host: N threads on the SIMT runtime; auto: cuda if a GPU is usable")
    ap.add_argument("--ranks", default=None, help="comma list of rank counts (default: 2,4,8 on cuda, 2,4 on host)")
    ap.add_argument("--seed", type=int, default=None, help="base seed (printed; a failure replays with it)")
    ap.add_argument("--only", default=None, help="run only cases whose 'path/case' contains this text")
    ap.add_argument("--no-timeouts", action="store_true", help="skip the forced timeouts")
    ap.add_argument("--bench", action="store_true", help="also run the benchmark (GPU only)")
    ap.add_argument("--bench-only", action="store_true", help="only the benchmark (writes bench-<target>.txt/.json)")
    ap.add_argument("--small", action="store_true", help="CI-sized cases also on the GPU (a quick smoke run)")
    ap.add_argument("--out", default=None, help="folder for proof-<target>.txt/.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    target = args.target
    if target in ("cuda", "auto"):
        # Before the CUDA extension first touches a device: the deadline is read once per process.
        os.environ.setdefault("MOELINK_TIMEOUT_S", "5")
    from .. import _backend
    from ..errors import GPUUnavailable
    if target == "auto":
        target = "cuda" if _backend.cuda_available() else "host"
        print(f"moelink.proof: target {target}" + ("" if target == "cuda" else " (no usable GPU)"), flush=True)
    if target == "cuda":
        try:
            _backend.cuda()
        except GPUUnavailable as exc:
            print(f"moelink.proof: no GPU to run on: {exc}", file=sys.stderr)
            return 2
    try:
        ranks = [int(r) for r in (args.ranks or ("2,4,8" if target == "cuda" else "2,4")).split(",") if r.strip()]
    except ValueError:
        print(f"moelink.proof: --ranks expects a comma list of ints, got {args.ranks!r}", file=sys.stderr)
        return 3
    if not ranks or min(ranks) < 1:
        print(f"moelink.proof: --ranks expects counts >= 1, got {args.ranks!r}", file=sys.stderr)
        return 3
    from . import run_proof
    bench = (args.bench or args.bench_only) and target == "cuda"
    report = run_proof(target, [] if args.bench_only else ranks, seed=args.seed, only=args.only,
                       timeouts=not args.no_timeouts, bench=bench, big=False if args.small else None,
                       log=lambda line: print(line, flush=True))
    text = report.text()
    print(text.splitlines()[-1], flush=True)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{'bench' if args.bench_only else 'proof'}-{target}"
        (out / f"{stem}.txt").write_text(text + "\n")
        (out / f"{stem}.json").write_text(json.dumps(report.as_json(), indent=1, default=str) + "\n")
        print(f"moelink.proof: wrote {out / stem}.txt and .json", flush=True)
    if report.bench_failed:
        print(f"moelink.proof: {len(report.bench_failed)} benchmark point(s) failed", flush=True)
    return 1 if report.failed or report.bench_failed else 0


if __name__ == "__main__":
    sys.exit(main())
