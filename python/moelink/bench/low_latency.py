"""The ``low_latency`` benchmark mode (``--mode low-latency``): DeepEP's low-latency dispatch and
combine (``Buffer.low_latency_dispatch`` / ``low_latency_combine``) for every payload format,
beside the normal (intranode) dispatch with a cached handle and combine on the same tokens, in
the same rank processes and iterations.

Shape: DeepEP's low-latency test (128 tokens per rank, hidden 7168, top-8) scaled to this machine:
tokens per rank = ``--tokens`` capped at 128, which is also ``num_max_dispatch_tokens_per_rank``;
hidden, experts and top-k from the command line. Under ``--mode all`` (the default run) the mode
takes a short pass instead: at most 32 tokens, 3 timed iterations after 1 warm-up (the header
says what ran). Every transfer goes through the emulated NIC
(``allow_nvlink_for_low_latency_mode=False``: the IBGDA path). Bytes on the wire per rank and
call: messages sent (one per (token, expert) pair) x message bytes (payload, scales, token index,
top-k ids; docs/low-latency.md); the table's GB/s divides those by the time. The extra lines give
µs per call (median and p99 over the timed iterations, median rank) and bytes per token.

Before timing, each format's dispatch is checked: recv_count equals the routing's counts; the
bf16 and LogFMT-10 combines of the identity expert equal moelink.reference.low_latency's combine
bit for bit. A mismatch raises, so no figure is reported for a wrong result.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Optional

import torch

import moelink
from moelink import _low_latency
from moelink.bench import intranode
from moelink.bench.floor import SharedCopyFloor
from moelink.bench.modes import Mode, Row
from moelink.bench.progress import Progress
from moelink.bench.timing import Variant, time_variants
from moelink.reference import low_latency as ref

__all__ = ["LowLatencyOptions", "run_rank", "ROWS", "MODE", "MAX_TOKENS"]

MAX_TOKENS = 128  # DeepEP's low-latency test: 128 tokens per rank
ALL_MODES_TOKENS = 32  # under --mode all (the default run), which must stay short
# (variant suffix, dispatch keyword arguments, payload name of moelink.reference.low_latency)
DISPATCH_FORMATS = (
    ("bf16", dict(use_fp8=False), "bf16"),
    ("fp8", dict(), "fp8"),
    ("fp8_ue8m0", dict(round_scale=True, use_ue8m0=True), "fp8_ue8m0"),
    ("mxfp8", dict(payload="mxfp8"), "mxfp8"),
    ("nvfp4", dict(payload="nvfp4"), "nvfp4"),
    ("logfmt10", dict(payload="logfmt10"), "logfmt10"),
)
COMBINE_FORMATS = (("bf16", None), ("logfmt10", 10))

ROWS = tuple(
    [Row(f"ll_dispatch_{name}", f"LL dispatch, {name}", f"bytes_ll_dispatch_{name}", "normal_dispatch", "dispatch")
     for name, _, _ in DISPATCH_FORMATS]
    + [Row(f"ll_combine_{name}", f"LL combine, {name}", f"bytes_ll_combine_{name}", "normal_combine", "combine")
       for name, _ in COMBINE_FORMATS]
    + [Row("normal_dispatch", "normal dispatch, cached handle (same tokens)", "bytes_normal_dispatch", None,
           "dispatch", True),
       Row("normal_combine", "normal combine (same tokens)", "bytes_normal_combine", None, "combine", True)])


@dataclasses.dataclass(frozen=True)
class LowLatencyOptions(intranode.BenchOptions):
    pass


class ResultMismatch(AssertionError):
    """The low-latency results differ from the reference on the same inputs."""


def _inputs(rank: int, opts: LowLatencyOptions):
    x, topk_idx, topk_weights = intranode._inputs(rank, dataclasses.replace(opts, fp8=False))
    return x, topk_idx, topk_weights


def _check(rank, world, opts, recv_count, name):
    el = opts.experts // world
    want = torch.zeros(el, dtype=torch.int64)
    for r in range(world):
        idx = _inputs(r, opts)[1]
        mine = idx[(idx >= rank * el) & (idx < (rank + 1) * el)] - rank * el
        want += torch.bincount(mine, minlength=el)
    if recv_count.tolist() != want.tolist():
        raise ResultMismatch(f"rank {rank}: low-latency dispatch ({name}): recv_count differs from the routing's")


def run_rank(rank: int, world: int, group, opts: LowLatencyOptions, progress: Optional[Progress] = None) -> dict:
    progress = (progress or Progress(enabled=False)).for_rank(rank)
    t_max = opts.tokens
    x, topk_idx, topk_weights = _inputs(rank, opts)
    moelink.Buffer.set_num_sms(opts.num_sms)
    dispatch_config = moelink.Buffer.get_dispatch_config(world)
    combine_config = moelink.Buffer.get_combine_config(world)
    num_nvl = max(c.get_nvl_buffer_size_hint(opts.hidden * 2, world, num_topk=opts.topk)
                  for c in (dispatch_config, combine_config))
    num_rdma = moelink.Buffer.get_low_latency_rdma_size_hint(t_max, opts.hidden, world, opts.experts)
    progress(f"creating moelink.Buffer: low-latency mode, {num_rdma / 2**20:.1f} MiB scale-out window, "
             f"{num_nvl / 2**20:.1f} MiB NVL window for the normal mode")
    buffer = moelink.Buffer(group, num_nvl, num_rdma, low_latency_mode=True,
                            allow_nvlink_for_low_latency_mode=False)
    el = opts.experts // world
    try:
        progress("checking every format against the routing and the reference combine")
        messages = int((topk_idx >= 0).sum())
        for name, kwargs, _ in DISPATCH_FORMATS:
            recv_x, recv_count, dispatched, _, _ = buffer.low_latency_dispatch(x, topk_idx, t_max, opts.experts,
                                                                               **kwargs)
            _check(rank, world, opts, recv_count, name)
            if name == "bf16":
                handle, expert_out = dispatched, recv_x.clone()  # the identity expert
        for name, bits in COMBINE_FORMATS:
            combined, _, _ = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle,
                                                        use_logfmt=bits is not None, logfmt_bits=bits or 10)
            y = x.unsqueeze(1).expand(-1, opts.topk, -1)
            if not torch.equal(combined, ref.low_latency_combine(y, topk_idx, topk_weights, bits)):
                raise ResultMismatch(f"rank {rank}: low-latency combine ({name}) differs from the reference")
        # The normal mode on the same tokens.
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, opts.experts)
        normal_x, _, _, _, normal_handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config)
        floor = SharedCopyFloor(group, max(messages * opts.hidden * 2, 1), opts.floor_seconds)

        calls = {}
        for name, kwargs, _ in DISPATCH_FORMATS:
            calls[f"ll_dispatch_{name}"] = (lambda kw: lambda: buffer.low_latency_dispatch(
                x, topk_idx, t_max, opts.experts, **kw))(kwargs)
        for name, bits in COMBINE_FORMATS:
            calls[f"ll_combine_{name}"] = (lambda b: lambda: buffer.low_latency_combine(
                expert_out, topk_idx, topk_weights, handle, use_logfmt=b is not None, logfmt_bits=b or 10))(bits)
        calls["normal_dispatch"] = lambda: buffer.dispatch(x, handle=normal_handle, config=dispatch_config)
        calls["normal_combine"] = lambda: buffer.combine(normal_x, normal_handle, config=combine_config)
        variants = [Variant(row.variant, calls[row.variant], runtime_counters=not row.is_baseline) for row in ROWS]
        progress(f"timing {opts.iters} iterations after {opts.warmup} warm-up")
        records = time_variants(group, variants, floor, iters=opts.iters, warmup=opts.warmup, progress=progress)
    finally:
        buffer.destroy()
    sizes = {}
    for name, _, payload in DISPATCH_FORMATS:
        sizes[f"ll_dispatch_{name}"] = _low_latency.layout(
            num_ranks=world, ranks_per_node=world, num_max_tokens=t_max, hidden=opts.hidden,
            num_experts=opts.experts, num_topk=opts.topk, payload=payload)["msg_bytes"]
    for name, bits in COMBINE_FORMATS:
        sizes[f"ll_combine_{name}"] = _low_latency.layout(
            num_ranks=world, ranks_per_node=world, num_max_tokens=t_max, hidden=opts.hidden,
            num_experts=opts.experts, num_topk=opts.topk, payload="bf16" if bits is None else f"logfmt{bits}")[
                "comb_msg_bytes"]
    normal_rows = int(in_rank.sum())  # normal mode: one row per (token, destination rank)
    out = {"rank": rank, "tokens": t_max, "messages": messages, "message_bytes": sizes,
           "bytes_normal_dispatch": normal_rows * opts.hidden * 2, "bytes_normal_combine": normal_rows * opts.hidden * 2,
           "num_rdma_bytes": num_rdma, **records}
    for variant, size in sizes.items():
        out[f"bytes_{variant}"] = messages * size
    return out


def make_options(args) -> LowLatencyOptions:
    """``--mode low-latency``: tokens = --tokens capped at 128 (DeepEP's shape). Under ``--mode
    all`` (the default run) a short pass: at most 32 tokens, 3 timed iterations after 1 warm-up."""
    base = dataclasses.asdict(intranode.make_options(args))
    if getattr(args, "mode", "low_latency") == "all":
        base.update(tokens=min(args.tokens, ALL_MODES_TOKENS), iters=min(args.iters, 3), warmup=min(args.warmup, 1))
    else:
        base.update(tokens=min(args.tokens, MAX_TOKENS))
    return LowLatencyOptions(**{**base, "fp8": False})


def problems(args) -> list[str]:
    found = [p for p in intranode.problems(args) if "--hidden" not in p]
    if args.hidden % 128:
        found.append(f"--hidden {args.hidden} must be a multiple of 128 (the low-latency formats' tiles)")
    if args.topk > 32:
        found.append(f"--topk {args.topk}: the low-latency mode takes at most 32")
    return found


def unavailable(args) -> Optional[str]:
    return None  # every build has the host target's emulated NIC


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarize_extra(per_rank: list[dict]) -> dict:
    latency = {}
    for row in ROWS:
        per = [r["times_s"][row.variant] for r in per_rank]
        latency[row.variant] = {"median_us": statistics.median(statistics.median(t) for t in per) * 1e6,
                                "p99_us": statistics.median(_quantile(t, 0.99) for t in per) * 1e6}
    first = per_rank[0]
    return {"latency": latency, "wire_bytes_per_token": first["message_bytes"],
            "messages_per_rank": [r["messages"] for r in per_rank], "num_rdma_bytes": first["num_rdma_bytes"]}


def format_extra(extra: dict) -> list[str]:
    lines = [f"{'low-latency table (median rank)':44}{'median µs':>12}{'p99 µs':>12}{'wire bytes/token':>18}"]
    for row in ROWS:
        lat = extra["latency"][row.variant]
        wire = extra["wire_bytes_per_token"].get(row.variant)
        lines.append(f"{row.label:44}{lat['median_us']:>12.0f}{lat['p99_us']:>12.0f}"
                     f"{(str(wire) if wire is not None else '-'):>18}")
    lines.append(f"messages (token, expert pairs) sent per rank: {extra['messages_per_rank']}; scale-out window "
                 f"{extra['num_rdma_bytes'] / 2**20:.1f} MiB per rank (get_low_latency_rdma_size_hint)")
    lines.append("correctness: recv_count of every format equals the routing's, the bf16 and LogFMT-10 combines "
                 "equal moelink.reference.low_latency bit for bit (checked before timing)")
    return lines


MODE = Mode(name="low_latency", title="moelink low-latency dispatch/combine (every transfer through the emulated "
            "NIC), host target", rows=ROWS, make_options=make_options, problems=problems, unavailable=unavailable,
            run_rank=run_rank, summarize_extra=summarize_extra, format_extra=format_extra)
