"""moelink's main benchmark: intranode dispatch and combine against the all_to_all_single baseline.

    python -m moelink.bench [--ranks 4] [--tokens 2048] [--hidden 7168] [--num-sms 20] [--fp8] [--json]

Launches ``--ranks`` local rank processes in a gloo group. Each creates a ``moelink.Buffer`` and
times, on the same DeepSeek-V3-like routing (top-8 of 256 experts spread evenly, uniform random),
moelink's dispatch and combine and the baseline MoE frameworks use without DeepEP
(``bench/baseline.py``), plus this machine's memcpy rate for the same bytes. Bandwidth is DeepEP's
per-rank algorithm bandwidth: bytes this rank receives in dispatch (sends in combine) / time.

Host target: ranks are processes and kernels run on the CPU under the SIMT fiber runtime; these
are not GPU numbers. The defaults finish in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shlex
import sys

import torch

from moelink.bench.baseline import memcpy_bandwidth
from moelink.bench.intranode import BenchOptions, run_rank
from moelink.bench.launch import RanksFailed, run_ranks
from moelink.bench.report import format_table, summarize

DEEPSEEK_V3_EXPERTS = 256


def default_experts(ranks: int) -> int:
    """DeepSeek-V3's 256 routed experts when the ranks divide them evenly in blocks of 8 or more,
    else the nearest multiple of 8 * ranks above 256 (every rank must own the same number)."""
    unit = 8 * ranks
    return -(-DEEPSEEK_V3_EXPERTS // unit) * unit


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moelink.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=_positive, default=4, help="rank processes (default 4)")
    p.add_argument("--tokens", type=_positive, default=2048, help="tokens per rank (default 2048)")
    p.add_argument("--hidden", type=_positive, default=7168, help="hidden size (default 7168, DeepSeek-V3)")
    p.add_argument("--experts", type=_positive, default=None,
                   help="routed experts, a multiple of --ranks (default 256 when it is a multiple of 8 * ranks)")
    p.add_argument("--topk", type=_positive, default=8, help="experts per token (default 8)")
    p.add_argument("--num-sms", type=_positive, default=None,
                   help="SM budget: num_sms / 2 channels (default: moelink.Buffer.num_sms, 20 as in DeepEP)")
    p.add_argument("--iters", type=_positive, default=10, help="timed iterations (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    p.add_argument("--fp8", action="store_true", help="dispatch FP8 e4m3 rows with float32 scales per 128 channels")
    p.add_argument("--seed", type=int, default=0, help="routing and payload seed (default 0)")
    p.add_argument("--threads-per-rank", type=_positive, default=1,
                   help="torch threads per rank (default 1: ranks already outnumber cores here)")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="seconds before the launcher gives up on the ranks (default 600)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.experts is None:
        args.experts = default_experts(args.ranks)
    if args.num_sms is None:
        import moelink
        args.num_sms = moelink.Buffer.num_sms
    problems = []
    if args.warmup < 0:
        problems.append("--warmup must be >= 0")
    if args.experts % args.ranks:
        problems.append(f"--experts {args.experts} must be a multiple of --ranks {args.ranks}")
    if args.topk > args.experts:
        problems.append(f"--topk {args.topk} exceeds --experts {args.experts} (experts per token are distinct)")
    row_multiple = 16 if args.fp8 else 8  # kernel rows are a multiple of 16 bytes (bf16: 8 channels)
    if args.hidden % row_multiple:
        problems.append(f"--hidden {args.hidden} must be a multiple of {row_multiple} "
                        f"(rows of a multiple of 16 bytes{' in FP8' if args.fp8 else ''})")
    if args.num_sms % 2:
        problems.append(f"--num-sms {args.num_sms} must be even (a sender and a receiver block per channel)")
    if args.fp8 and not hasattr(torch, "float8_e4m3fn"):
        problems.append("--fp8 needs a torch with float8_e4m3fn")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    options = BenchOptions(tokens=args.tokens, hidden=args.hidden, experts=args.experts, topk=args.topk,
                           num_sms=args.num_sms, iters=args.iters, warmup=args.warmup, fp8=args.fp8, seed=args.seed)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    # The kernels' own wait deadline stays below the launcher's, so a stuck rank raises CommTimeout
    # with a message naming the peer it waited for instead of being killed silently.
    env = {"MOELINK_TIMEOUT_S": str(max(5.0, min(100.0, args.deadline / 3)))}
    try:
        per_rank = run_ranks(run_rank, (options,), args.ranks, deadline_s=args.deadline,
                             threads_per_rank=args.threads_per_rank, env=env)
    except RanksFailed as exc:
        print(f"moelink.bench: FAILED: {exc}", file=sys.stderr)
        return 1
    load_after = os.getloadavg()
    # Context for the floor: one process copying alone, with the whole machine to itself.
    torch.set_num_threads(args.threads_per_rank)
    solo = memcpy_bandwidth(max(1, int(per_rank[0]["dispatch_bytes"])), iters=max(5, args.iters))
    context = {
        "command": " ".join(["python -m moelink.bench", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
        "date": started.isoformat(timespec="seconds"),
        "elapsed_s": (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
        "ranks": args.ranks,
        "cpus": os.cpu_count(),
        "load_average_before": load_before[0],
        "load_average_after": load_after[0],
        "torch": torch.__version__,
        "threads_per_rank": args.threads_per_rank,
    }
    summary = summarize(per_rank, options=dataclasses.asdict(options), solo_memcpy_Bps=solo, context=context)
    if args.json:
        print(json.dumps(summary, indent=1, sort_keys=False))
    else:
        print(format_table(summary))
        print(f"\n{context['command']}  |  {context['date']}  |  {context['elapsed_s']:.0f} s  |  "
              f"1-min load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
              f"(on {context['cpus']} CPUs shared by {args.ranks} ranks)")
    if not summary["bytes_moved"]["match"]:
        print("moelink.bench: WARNING: the byte counters differ from the bytes the routing implies "
              "(see bytes_moved in --json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
