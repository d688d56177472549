"""What every rank does in ``python -m moelink.bench``: intranode dispatch and combine through
``moelink.Buffer``, and the same job done by the ``all_to_all_single`` baseline, on the same inputs.

Routing is DeepSeek-V3-like: every token picks ``topk`` distinct experts uniformly at random out of
``experts``, which are spread evenly over the ranks (rank r owns a contiguous block). Payload rows
are bf16 ``[tokens, hidden]``, or the FP8 pair ``(e4m3 rows, float32 scales per 128 channels)``
with ``fp8``; the combine input is always bf16 (expert outputs), as in DeepEP.

Bandwidth follows DeepEP's tests/test_intranode.py ("NVL" figure): dispatch counts the payload
bytes this rank *receives* (received rows x row bytes, FP8 scales included), combine the bytes it
*sends back* (the same rows, bf16). Top-k ids, weights and counts are not counted.

Before any timing, one dispatch and one combine of each implementation are compared: moelink's
received rows, local expert ids, weights and per-expert counts must equal the baseline's, and the
combined rows too. A mismatch raises :class:`ResultMismatch`, so no number is ever reported for a
wrong result. The same pass reads ``Buffer.bytes_moved()`` and compares it with the bytes the
kernels' queue slots must carry (docs/buffer-layout.md), a structural check of what moved.

Then ``bench.timing.time_variants`` times the variants of :data:`ROWS` interleaved with the memcpy
floor. The baseline reuses its buffers across calls (a ``BaselineWorkspace``), as moelink's
Buffer does, so neither side pays page faults the other does not.

This module is the ``intranode`` benchmark mode (``MODE``; see ``bench/modes.py`` for the contract
a mode fulfils and how to add one).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

import moelink
from moelink.bench.baseline import BaselineWorkspace, baseline_combine, baseline_dispatch
from moelink.bench.floor import SharedCopyFloor
from moelink.bench.modes import Mode, Row
from moelink.bench.progress import Progress
from moelink.bench.timing import Variant, time_variants
from moelink.codecs import fp8_quantize

__all__ = ["BenchOptions", "ResultMismatch", "run_rank", "ROWS", "VARIANTS", "MODE"]

# Timed variants, in the order each iteration runs them (then the memcpy floor).
ROWS = (
    Row("layout", "layout (get_dispatch_layout)"),
    Row("dispatch", "dispatch: layout + notify + payload", "dispatch_bytes", "baseline_dispatch", "dispatch"),
    Row("dispatch_cached", "dispatch, cached handle (DeepEP's figure)", "dispatch_bytes", "baseline_dispatch",
        "dispatch"),
    Row("combine", "combine", "combine_bytes", "baseline_combine", "combine"),
    Row("dispatch_zero_copy", "dispatch, one copy (zero_copy=True)", "dispatch_bytes", "baseline_dispatch", "dispatch"),
    Row("dispatch_cached_zero_copy", "dispatch, cached, one copy", "dispatch_bytes", "baseline_dispatch", "dispatch"),
    Row("combine_zero_copy", "combine, one copy (zero_copy=True)", "combine_bytes", "baseline_combine", "combine"),
    Row("baseline_dispatch", "baseline dispatch (all_to_all_single)", "dispatch_bytes", None, "dispatch", True),
    Row("baseline_combine", "baseline combine (all_to_all_single)", "combine_bytes", None, "combine", True),
)
VARIANTS = tuple(row.variant for row in ROWS)


class ResultMismatch(AssertionError):
    """moelink's outputs differ from the baseline's on the same inputs."""


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    tokens: int  # tokens per rank
    hidden: int
    experts: int  # total routed experts, a multiple of the rank count
    topk: int
    num_sms: int
    iters: int
    warmup: int
    fp8: bool
    seed: int
    floor_seconds: float = 0.25  # each iteration's memcpy floor: seconds every rank copies


def _inputs(rank: int, opts: BenchOptions):
    """(payload, topk_idx, topk_weights) of one rank, seeded by rank: payload is bf16 rows, or the
    FP8 pair (e4m3 rows, float32 scales) quantized from them."""
    gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + rank)
    x = torch.randn(opts.tokens, opts.hidden, generator=gen).to(torch.bfloat16)
    # topk of i.i.d. uniform scores = a uniformly random set of topk distinct experts.
    scores = torch.rand(opts.tokens, opts.experts, generator=gen)
    topk_idx = scores.topk(opts.topk, dim=1).indices.contiguous()
    topk_weights = torch.rand(opts.tokens, opts.topk, generator=gen)
    payload = fp8_quantize(x) if opts.fp8 else x
    return payload, topk_idx, topk_weights


def _slot_bytes(opts: BenchOptions, row_bytes: int, num_scales: int) -> tuple[int, int]:
    """Bytes one token occupies in a dispatch queue slot and in a combine queue slot (without
    weights), per IntranodeLayout (csrc/runtime/ops_intranode.h): row, scales, top-k ids, weights,
    source index; combine: the bf16 row plus one float per returned weight (none here)."""
    return row_bytes + 4 * num_scales + 8 * opts.topk + 4, opts.hidden * 2


def _check_equal(name: str, got: torch.Tensor, want: torch.Tensor, rank: int) -> None:
    if got.shape != want.shape:
        raise ResultMismatch(f"rank {rank}: {name}: moelink shape {tuple(got.shape)}, baseline {tuple(want.shape)}")
    a, b = got.contiguous(), want.contiguous()
    if a.dtype.itemsize == 1 or a.dtype in (torch.bfloat16, torch.float16):  # compare bits (FP8 has no ==)
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    if not torch.equal(a, b):
        bad = (a != b).reshape(a.shape[0], -1).any(dim=1).nonzero()
        raise ResultMismatch(f"rank {rank}: {name}: moelink differs from the baseline in {bad.numel()} of "
                             f"{a.shape[0]} rows (first: row {int(bad[0])})")


def _verify_once(rank, buffer, opts, payload, topk_idx, topk_weights, dispatch_config, combine_config, workspace):
    """One untimed dispatch + combine of both implementations: equal results, and the byte
    counters. Returns (handle, bf16 combine input, counters, expected counters, row counts)."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, opts.experts)
    buffer.reset_bytes_moved()
    recv, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config)
    dispatch_counters = buffer.bytes_moved()
    b_recv, b_idx, b_w, b_counts, b_handle = baseline_dispatch(payload, topk_idx, opts.experts, topk_weights,
                                                                workspace=workspace)

    recv_rows = recv[0] if isinstance(recv, tuple) else recv
    _check_equal("recv_x", recv_rows, b_recv[0] if isinstance(b_recv, tuple) else b_recv, rank)
    if isinstance(recv, tuple):
        _check_equal("recv_x scales", recv[1], b_recv[1], rank)
    _check_equal("recv_topk_idx", recv_idx, b_idx, rank)
    _check_equal("recv_topk_weights", recv_w, b_w, rank)
    if list(counts) != list(b_counts):
        raise ResultMismatch(f"rank {rank}: num_recv_tokens_per_expert_list: moelink {counts}, baseline {b_counts}")

    # Expert outputs for combine: the received rows themselves (as DeepEP's test does), in bf16.
    expert_out = recv_rows if recv_rows.dtype == torch.bfloat16 else recv_rows.to(torch.bfloat16)
    buffer.reset_bytes_moved()
    combined, _, _ = buffer.combine(expert_out, handle, config=combine_config)
    combine_counters = buffer.bytes_moved()
    b_combined, _ = baseline_combine(expert_out, b_handle, workspace=workspace)
    _check_equal("combined_x", combined, b_combined, rank)

    sent_rows = in_rank.sum(dim=0).tolist()  # rows this rank sends to each rank (itself included)
    recv_from = b_handle.recv_counts  # rows this rank receives from each rank
    row_bytes = recv_rows.shape[1] * recv_rows.element_size()
    num_scales = recv[1].shape[1] if isinstance(recv, tuple) else 0
    dispatch_slot, combine_slot = _slot_bytes(opts, row_bytes, num_scales)
    expected = {
        "dispatch_nvl": dispatch_slot * sum(n for d, n in enumerate(sent_rows) if d != rank),
        "combine_nvl": combine_slot * sum(n for s, n in enumerate(recv_from) if s != rank),
    }
    counters = {"dispatch_nvl": dispatch_counters.get("nvl", 0), "dispatch_rdma": dispatch_counters.get("rdma", 0),
                "combine_nvl": combine_counters.get("nvl", 0), "combine_rdma": combine_counters.get("rdma", 0)}
    rows = {"recv_rows": int(recv_rows.shape[0]), "row_bytes": row_bytes, "num_scales": num_scales,
            "sent_rows": sent_rows, "recv_from": list(recv_from)}
    return handle, expert_out, counters, expected, rows


def _verify_zero_copy(rank, buffer, opts, payload, topk_idx, topk_weights, dispatch_config, combine_config,
                      expert_out):
    """The one-copy dispatch and combine must give the queue paths' bits; returns the one-copy
    dispatch's handle (for the cached and combine variants)."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, opts.experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                  topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config)
    queued = buffer.dispatch(payload, **layout)
    want = buffer.combine(expert_out, queued[4], config=combine_config)[0].clone()
    got = buffer.dispatch(payload, zero_copy=True, **layout)
    for name, mine, theirs in (("recv_x", got[0], queued[0]), ("recv_topk_idx", got[1], queued[1]),
                               ("recv_topk_weights", got[2], queued[2])):
        for a, b in zip(mine if isinstance(mine, tuple) else (mine,), theirs if isinstance(theirs, tuple) else (theirs,)):
            _check_equal(f"one-copy {name}", a, b, rank)
    handle = got[4]
    buffer.get_combine_input_buffer(handle).copy_(expert_out)
    combined = buffer.combine(buffer.get_combine_input_buffer(handle), handle, config=combine_config, zero_copy=True)[0]
    _check_equal("one-copy combined_x", combined, want, rank)
    return handle


def run_rank(rank: int, world: int, group, opts: BenchOptions, progress: Optional[Progress] = None) -> dict:
    """Benchmark body of one rank (``launch.run_ranks`` calls it). Returns plain data only."""
    progress = (progress or Progress(enabled=False)).for_rank(rank)
    moelink.Buffer.set_num_sms(opts.num_sms)
    dispatch_config = moelink.Buffer.get_dispatch_config(world)
    combine_config = moelink.Buffer.get_combine_config(world)
    hidden_bytes = opts.hidden * 2  # DeepEP's convention: bf16 rows; FP8 rows + scales are smaller
    # Room for the one-copy variants too: no rank receives more than every rank's tokens.
    num_nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden_bytes, world, num_topk=opts.topk,
                                                     num_max_zero_copy_recv_tokens=opts.tokens * world)
                        for cfg in (dispatch_config, combine_config))
    progress(f"building inputs: {opts.tokens} tokens x hidden {opts.hidden}, top-{opts.topk} of {opts.experts} "
             f"experts{', FP8' if opts.fp8 else ''}")
    payload, topk_idx, topk_weights = _inputs(rank, opts)

    progress(f"creating moelink.Buffer ({num_nvl_bytes / 2**20:.1f} MiB window per rank, {opts.num_sms} SMs)")
    buffer = moelink.Buffer(group, num_nvl_bytes)
    try:
        workspace = BaselineWorkspace()
        progress("checking moelink against the baseline (one untimed dispatch and combine of each)")
        handle, expert_out, counters, expected, rows = _verify_once(
            rank, buffer, opts, payload, topk_idx, topk_weights, dispatch_config, combine_config, workspace)
        b_handle = baseline_dispatch(payload, topk_idx, opts.experts, topk_weights, workspace=workspace)[4]
        progress("checking the one-copy paths against the queue-based ones (bit for bit)")
        zc_handle = _verify_zero_copy(rank, buffer, opts, payload, topk_idx, topk_weights, dispatch_config,
                                      combine_config, expert_out)
        dispatch_bytes = rows["recv_rows"] * (rows["row_bytes"] + 4 * rows["num_scales"])
        floor = SharedCopyFloor(group, max(dispatch_bytes, 1), opts.floor_seconds)

        def fresh_dispatch(zero_copy=False):
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, opts.experts)
            return buffer.dispatch(payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
                                   config=dispatch_config, zero_copy=zero_copy)

        def stage_combine_input():  # what the experts would have written: the same rows as expert_out
            buffer.get_combine_input_buffer(zc_handle).copy_(expert_out)

        calls = {
            # layout alone: what fresh dispatch pays on top of the notify + payload kernels
            "layout": lambda: buffer.get_dispatch_layout(topk_idx, opts.experts),
            # what a framework calls per MoE layer: layout + notify + payload
            "dispatch": fresh_dispatch,
            # DeepEP's benchmarked form (its test passes x, handle and config only): no layout,
            # no notify, no top-k metadata; the payload kernel alone
            "dispatch_cached": lambda: buffer.dispatch(payload, handle=handle, config=dispatch_config),
            "combine": lambda: buffer.combine(expert_out, handle, config=combine_config),
            # the one-copy paths: outputs are views of the window; the combine reads the expert
            # outputs where the experts wrote them (staged, untimed, before each call)
            "dispatch_zero_copy": lambda: fresh_dispatch(zero_copy=True),
            "dispatch_cached_zero_copy": lambda: buffer.dispatch(payload, handle=zc_handle, config=dispatch_config,
                                                                 zero_copy=True),
            "combine_zero_copy": lambda: buffer.combine(buffer.get_combine_input_buffer(zc_handle), zc_handle,
                                                        config=combine_config, zero_copy=True),
            "baseline_dispatch": lambda: baseline_dispatch(payload, topk_idx, opts.experts, topk_weights,
                                                           workspace=workspace),
            "baseline_combine": lambda: baseline_combine(expert_out, b_handle, workspace=workspace),
        }
        prepare = {"combine_zero_copy": stage_combine_input}
        variants = [Variant(name, calls[name], runtime_counters=not name.startswith("baseline"),
                            prepare=prepare.get(name)) for name in VARIANTS]
        progress(f"timing {opts.iters} iterations after {opts.warmup} warm-up, each: "
                 f"{', '.join(VARIANTS)}, then the memcpy floor ({opts.floor_seconds:g} s of copies)")
        records = time_variants(group, variants, floor, iters=opts.iters, warmup=opts.warmup, progress=progress)
        baseline_workspace = {"bytes": workspace.nbytes, "allocations": workspace.allocations}
    finally:
        buffer.destroy()

    return {
        "rank": rank,
        "tokens": opts.tokens,
        "dispatch_bytes": dispatch_bytes,
        "combine_bytes": rows["recv_rows"] * opts.hidden * 2,
        "rows": rows,
        **records,
        "bytes_moved": counters,
        "bytes_expected": expected,
        "baseline_workspace": baseline_workspace,
        "num_nvl_bytes": num_nvl_bytes,
        "dispatch_config": dataclasses.asdict(dispatch_config),
        "combine_config": dataclasses.asdict(combine_config),
    }


# ---- the mode's command-line side and its lines under the table ---------------------------------

def make_options(args) -> BenchOptions:
    return BenchOptions(tokens=args.tokens, hidden=args.hidden, experts=args.experts, topk=args.topk,
                        num_sms=args.num_sms, iters=args.iters, warmup=args.warmup, fp8=args.fp8, seed=args.seed,
                        floor_seconds=args.floor_seconds)


def problems(args) -> list[str]:
    found = []
    if args.experts % args.ranks:
        found.append(f"--experts {args.experts} must be a multiple of --ranks {args.ranks}")
    if args.topk > args.experts:
        found.append(f"--topk {args.topk} exceeds --experts {args.experts} (experts per token are distinct)")
    row_multiple = 16 if args.fp8 else 8  # kernel rows are a multiple of 16 bytes (bf16: 8 channels)
    if args.hidden % row_multiple:
        found.append(f"--hidden {args.hidden} must be a multiple of {row_multiple} "
                     f"(rows of a multiple of 16 bytes{' in FP8' if args.fp8 else ''})")
    if args.num_sms % 2:
        found.append(f"--num-sms {args.num_sms} must be even (a sender and a receiver block per channel)")
    if args.fp8 and not hasattr(torch, "float8_e4m3fn"):
        found.append("--fp8 needs a torch with float8_e4m3fn")
    return found


def unavailable(args) -> Optional[str]:
    return None  # every build has the host target's intranode path


def summarize_extra(per_rank: list[dict]) -> dict:
    counters = {key: [r["bytes_moved"][key] for r in per_rank] for key in per_rank[0]["bytes_moved"]}
    expected = {key: [r["bytes_expected"][key] for r in per_rank] for key in per_rank[0]["bytes_expected"]}
    match = all(counters[k] == expected[k] for k in expected) and not any(
        counters["dispatch_rdma"] + counters["combine_rdma"])
    return {
        "bytes_moved": {"counters": counters, "expected": expected, "match": match},
        "configs": {"dispatch": per_rank[0]["dispatch_config"], "combine": per_rank[0]["combine_config"],
                    "num_nvl_bytes": per_rank[0]["num_nvl_bytes"]},
        "recv_rows_per_rank": [r["rows"]["recv_rows"] for r in per_rank],
        "baseline_workspace": [r["baseline_workspace"] for r in per_rank],
    }


def format_extra(extra: dict) -> list[str]:
    b = extra["bytes_moved"]
    counters = b["counters"]
    verdict = "equal to" if b["match"] else "DIFFERENT FROM"
    ws = extra["baseline_workspace"]
    return [
        f"rows received per rank: {extra['recv_rows_per_rank']}",
        f"byte counters (Buffer.bytes_moved, nvl, per rank, one call): dispatch {counters['dispatch_nvl']}, "
        f"combine {counters['combine_nvl']}; {verdict} the queue-slot bytes expected from the routing; "
        f"rdma {counters['dispatch_rdma']} / {counters['combine_rdma']}",
        f"baseline workspace per rank: {max(w['bytes'] for w in ws) / 1e6:.1f} MB at most, "
        f"{max(w['allocations'] for w in ws)} allocations at most over the whole run (all in the first calls)",
        "correctness: moelink's received rows, top-k ids, weights, per-expert counts and combined rows "
        "equal the baseline's on every rank, and the one-copy variants' equal the queue-based ones bit for bit "
        "(checked before timing)",
    ]


MODE = Mode(name="intranode", title="moelink intranode dispatch/combine, host target", rows=ROWS,
            make_options=make_options, problems=problems, unavailable=unavailable, run_rank=run_rank,
            summarize_extra=summarize_extra, format_extra=format_extra)
