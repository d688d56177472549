"""moelink's main benchmark: dispatch and combine against the all_to_all_single baseline and the
memcpy floor, with each mode's figures in one table.

    python -m moelink.bench [--mode all|intranode|internode|low-latency] [--ranks 4] [--tokens 2048] [--hidden 7168]
                            [--num-sms 20] [--fp8] [--json] [--sweep [--out DIR]] [--plot DIR/sweep.json]

Launches ``--ranks`` local rank processes in a gloo group per mode (``bench/modes.py``: ``--mode
all``, the default, runs every mode this build has). The ``intranode`` mode creates a
``moelink.Buffer`` in each rank and times, on the same DeepSeek-V3-like routing (top-8 of 256
experts, uniform random), moelink's dispatch and combine and the baseline MoE frameworks use
without DeepEP (``bench/baseline.py``, its buffers reused across calls as moelink's are), each
iteration followed by the memcpy floor of that iteration. Bandwidth is DeepEP's per-rank
algorithm bandwidth: bytes this rank receives in dispatch (sends in combine) / time. Progress goes
to stderr, the report to stdout; the legend under the table explains every column.

``--sweep`` varies tokens, hidden, ranks and the SM budget one at a time around the command line's
shape and writes sweep.json and, with matplotlib (``pip install 'moelink[bench]'``), PNG plots.

Host target: ranks are processes and kernels run on the CPU under the SIMT fiber runtime; these
are not GPU numbers. The defaults finish in about a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys

import torch

from moelink.bench.launch import RanksFailed
from moelink.bench.modes import MODE_MODULES, all_modes, get_mode
from moelink.bench.progress import Progress
from moelink.bench.report import LEGEND, format_legend, format_table
from moelink.bench.runner import run_mode
from moelink.bench import sweep as sweeping

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


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moelink.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("all",) + MODE_MODULES, default="all", type=lambda text: text.replace("-", "_"),
                   help="benchmark mode (default all: every mode this build can run; low-latency = low_latency)")
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
    p.add_argument("--floor-seconds", type=_positive_float, default=0.25,
                   help="seconds every rank copies for the memcpy floor of each iteration (default 0.25)")
    p.add_argument("--fp8", action="store_true", help="dispatch FP8 e4m3 rows with float32 scales per 128 channels")
    p.add_argument("--seed", type=int, default=0, help="routing and payload seed (default 0)")
    p.add_argument("--threads-per-rank", type=_positive, default=1,
                   help="torch threads per rank (default 1: ranks already outnumber cores here)")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="seconds before the launcher gives up on the ranks, per point (default 600)")
    p.add_argument("--ranks-per-node", type=_positive, default=None,
                   help="internode mode: ranks per node (default --ranks / 2: two nodes)")
    p.add_argument("--nic-gbps", type=float, default=0.0,
                   help="internode mode: bandwidth of each rank's emulated NIC, GB/s (default 0: unshaped)")
    p.add_argument("--nic-latency-us", type=float, default=0.0,
                   help="internode mode: one-way latency of the emulated NIC, us (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    s = p.add_argument_group("sweep (--sweep)")
    s.add_argument("--sweep", action="store_true",
                   help="vary each of --sweep-axes around the other options; write sweep.json and PNG plots")
    s.add_argument("--sweep-axes", default=",".join(sweeping.AXES),
                   help=f"axes to sweep, comma-separated, of {', '.join(sweeping.AXES)} (default all)")
    for axis, values in sweeping.DEFAULT_VALUES.items():
        s.add_argument(f"--sweep-{axis}", type=_int_list, default=_int_list(values),
                       help=f"values of {axis} (default {values})")
    s.add_argument("--out", default=None,
                   help="directory for sweep.json and the plots (default moelink-bench-sweep-<UTC time>)")
    s.add_argument("--plot", metavar="SWEEP_JSON", default=None,
                   help="only write the PNG plots of a saved sweep.json (into its directory) and exit")
    args = p.parse_args(argv)
    if args.plot is not None:
        return args
    args.experts_given = args.experts is not None
    if args.experts is None:
        args.experts = default_experts(args.ranks)
    if args.num_sms is None:
        import moelink
        args.num_sms = moelink.Buffer.num_sms
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    axes = [a.strip() for a in args.sweep_axes.split(",") if a.strip()]
    unknown = [a for a in axes if a not in sweeping.AXES]
    if unknown or not axes:
        p.error(f"--sweep-axes: expected some of {', '.join(sweeping.AXES)}, got {args.sweep_axes!r}")
    args.sweep_axes = axes
    args.sweep_values = {axis: getattr(args, f"sweep_{axis}") for axis in sweeping.AXES}
    args.modes, args.skipped_modes = _select_modes(p, args)
    return args


def _select_modes(p: argparse.ArgumentParser, args):
    """The modes to run and {mode: why skipped}; errors for a mode asked for by name that cannot run."""
    candidates = [get_mode(args.mode)] if args.mode != "all" else all_modes()
    chosen, skipped, problems = [], {}, {}
    for mode in candidates:
        why = mode.unavailable(args)
        found = mode.problems(args)
        if why is not None:
            skipped[mode.name] = why
        elif found:
            problems[mode.name] = found
            skipped[mode.name] = "; ".join(found)
        else:
            chosen.append(mode)
    if not chosen:
        if problems:
            p.error("; ".join(f for found in problems.values() for f in found))
        p.error("no benchmark mode can run here: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    return chosen, skipped


def _context(argv, started, args) -> dict:
    return {
        "command": " ".join(["python -m moelink.bench", shlex.join(sys.argv[1:] if argv is None else argv)]).strip(),
        "date": started.isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads_per_rank": args.threads_per_rank,
        "load_average_before": os.getloadavg()[0],
    }


def _finish_context(context: dict, started) -> None:
    context["load_average_after"] = os.getloadavg()[0]
    context["elapsed_s"] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()


def _load_line(s: dict) -> str:
    during = s.get("load_1min_during")
    text = f"1-min load average {s['load_average_before']:.1f} before, {s['load_average_after']:.1f} after"
    if during:
        text += f", {during['min']:.1f}..{during['max']:.1f} during the timed iterations"
    return text + f" (on {s.get('cpus', os.cpu_count())} CPUs shared by {s['ranks']} ranks)"


def _plot_only(path: str) -> int:
    with open(path) as f:
        result = json.load(f)
    pngs, why_not = sweeping.write_plots(result, os.path.dirname(os.path.abspath(path)))
    if why_not:
        print(f"moelink.bench: {why_not}", file=sys.stderr)
        return 1
    print("\n".join(pngs))
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot is not None:
        return _plot_only(args.plot)
    started = datetime.datetime.now(datetime.timezone.utc)
    progress = Progress(enabled=not args.quiet)
    context = _context(argv, started, args)
    for name, why in args.skipped_modes.items():
        progress(f"skipping mode {name}: {why}")
    try:
        if args.sweep:
            return _main_sweep(args, progress, context, started)
        summaries = {}
        for mode in args.modes:
            progress.with_label(mode.name)(f"mode {mode.name}: {args.ranks} ranks, {args.iters} timed iterations "
                                           f"after {args.warmup} warm-up")
            summaries[mode.name] = run_mode(mode, [(mode.name, args)], deadline_s=args.deadline,
                                            threads_per_rank=args.threads_per_rank, progress=progress)[0]
    except RanksFailed as exc:
        print(f"moelink.bench: FAILED: {exc}", file=sys.stderr)
        return 1
    _finish_context(context, started)
    if args.json:
        print(json.dumps({"benchmark": "moelink.bench", "schema": 2, **context, "legend": LEGEND,
                          "modes": summaries, "skipped_modes": args.skipped_modes}, indent=1))
    else:
        for mode in args.modes:
            s = summaries[mode.name]
            print(format_table(s, mode))
            print(_load_line(s))
            print()
        for name, why in args.skipped_modes.items():
            print(f"mode {name} skipped: {why}")
        print(format_legend())
        print(f"\n{context['command']}  |  {context['date']}  |  {context['elapsed_s']:.0f} s  |  "
              f"1-min load average {context['load_average_before']:.1f} before, "
              f"{context['load_average_after']:.1f} after (on {context['cpus']} CPUs)")
    for name, s in summaries.items():
        if "bytes_moved" in s and not s["bytes_moved"]["match"]:
            print(f"moelink.bench: WARNING: {name}: the byte counters differ from the bytes the routing implies "
                  "(see bytes_moved in --json)", file=sys.stderr)
    return 0


def _main_sweep(args, progress: Progress, context: dict, started) -> int:
    out = args.out or f"moelink-bench-sweep-{started.strftime('%Y%m%d-%H%M%S')}"
    args.out = out
    result = sweeping.run_sweep(args, args.modes, progress, default_experts, context)
    _finish_context(context, started)
    result.update(context)
    json_path, pngs, why_not = sweeping.write_sweep(result, out)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(sweeping.format_sweep(result))
        print(f"sweep.json: {json_path}")
        for path in pngs:
            print(f"plot: {path}")
        print(f"\n{context['command']}  |  {context['date']}  |  {context['elapsed_s']:.0f} s  |  "
              f"1-min load average {context['load_average_before']:.1f} before, "
              f"{context['load_average_after']:.1f} after (on {context['cpus']} CPUs)")
    if why_not:
        print(f"moelink.bench: {why_not}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
