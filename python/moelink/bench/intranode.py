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
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable

import torch
import torch.distributed as dist

import moelink
from moelink import runtime
from moelink.bench.baseline import baseline_combine, baseline_dispatch, memcpy_bandwidth
from moelink.codecs import fp8_quantize

__all__ = ["BenchOptions", "ResultMismatch", "run_rank", "VARIANTS"]

# Timed variants, in the order each iteration runs them. Interleaving the implementations inside
# every iteration (rather than timing one after the other) exposes them to the same background
# load, which matters on a shared machine.
VARIANTS = ("layout", "dispatch", "dispatch_cached", "combine", "baseline_dispatch", "baseline_combine")


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


def _verify_once(rank, buffer, opts, payload, topk_idx, topk_weights, dispatch_config, combine_config):
    """One untimed dispatch + combine of both implementations: equal results, and the byte
    counters. Returns (handle, bf16 combine input, counters, expected counters, row counts)."""
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, opts.experts)
    buffer.reset_bytes_moved()
    recv, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
        payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk_idx, topk_weights=topk_weights, config=dispatch_config)
    dispatch_counters = buffer.bytes_moved()
    b_recv, b_idx, b_w, b_counts, b_handle = baseline_dispatch(payload, topk_idx, opts.experts, topk_weights)

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
    b_combined, _ = baseline_combine(expert_out, b_handle)
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


def _timed(group, fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn`` on this rank, started right after a barrier."""
    dist.barrier(group)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _shared_memcpy_rate(group, num_bytes: int, seconds: float = 0.5) -> float:
    """Bytes/s this rank copies while every rank copies at once, for ``seconds``.

    This is the floor the per-rank figures are compared with. ``memcpy_bandwidth`` times single
    copies; a copy of a few MB ends within one scheduler time slice, so with more ranks than cores
    it measures a core to itself even when all ranks call it together. The ranks' dispatch and
    combine, though, run while every rank competes for the cores. Copying back to back for a
    common duration makes the copies overlap for real, so each rank measures its share.
    """
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before the clock starts
    dist.barrier(group)
    copied, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        dst.copy_(src)
        copied += num_bytes
    elapsed = time.perf_counter() - start
    dist.barrier(group)
    return copied / elapsed


def run_rank(rank: int, world: int, group, opts: BenchOptions) -> dict:
    """Benchmark body of one rank (``launch.run_ranks`` calls it). Returns plain data only."""
    moelink.Buffer.set_num_sms(opts.num_sms)
    dispatch_config = moelink.Buffer.get_dispatch_config(world)
    combine_config = moelink.Buffer.get_combine_config(world)
    hidden_bytes = opts.hidden * 2  # DeepEP's convention: bf16 rows; FP8 rows + scales are smaller
    num_nvl_bytes = max(cfg.get_nvl_buffer_size_hint(hidden_bytes, world, num_topk=opts.topk)
                        for cfg in (dispatch_config, combine_config))
    payload, topk_idx, topk_weights = _inputs(rank, opts)

    buffer = moelink.Buffer(group, num_nvl_bytes)
    try:
        handle, expert_out, counters, expected, rows = _verify_once(
            rank, buffer, opts, payload, topk_idx, topk_weights, dispatch_config, combine_config)
        b_handle = baseline_dispatch(payload, topk_idx, opts.experts, topk_weights)[4]

        def fresh_dispatch():
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, opts.experts)
            return buffer.dispatch(payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=per_expert, topk_idx=topk_idx, topk_weights=topk_weights,
                                   config=dispatch_config)

        variants = {
            # layout alone: what fresh dispatch pays on top of the notify + payload kernels
            "layout": lambda: buffer.get_dispatch_layout(topk_idx, opts.experts),
            # what a framework calls per MoE layer: layout + notify + payload
            "dispatch": fresh_dispatch,
            # DeepEP's benchmarked form (its test passes x, handle and config only): no layout,
            # no notify, no top-k metadata; the payload kernel alone
            "dispatch_cached": lambda: buffer.dispatch(payload, handle=handle, config=dispatch_config),
            "combine": lambda: buffer.combine(expert_out, handle, config=combine_config),
            "baseline_dispatch": lambda: baseline_dispatch(payload, topk_idx, opts.experts, topk_weights),
            "baseline_combine": lambda: baseline_combine(expert_out, b_handle),
        }
        times = {name: [] for name in VARIANTS}
        runtime_stats = {name: dict.fromkeys(runtime.stats(), 0)
                         for name in VARIANTS if not name.startswith("baseline")}
        for iteration in range(opts.warmup + opts.iters):
            for name in VARIANTS:
                before = runtime.stats() if name in runtime_stats else None
                elapsed = _timed(group, variants[name])
                if iteration >= opts.warmup:
                    times[name].append(elapsed)
                    if before is not None:
                        after = runtime.stats()
                        for key in before:
                            runtime_stats[name][key] += after[key] - before[key]

        dispatch_bytes = rows["recv_rows"] * (rows["row_bytes"] + 4 * rows["num_scales"])
        memcpy_Bps = memcpy_bandwidth(max(dispatch_bytes, 1), iters=max(5, opts.iters), warmup=max(1, opts.warmup))
        memcpy_shared_Bps = _shared_memcpy_rate(group, max(dispatch_bytes, 1))
    finally:
        buffer.destroy()

    return {
        "rank": rank,
        "tokens": opts.tokens,
        "dispatch_bytes": dispatch_bytes,
        "combine_bytes": rows["recv_rows"] * opts.hidden * 2,
        "rows": rows,
        "times_s": times,
        "median_s": {name: statistics.median(ts) for name, ts in times.items()},
        "memcpy_Bps": memcpy_Bps,  # single copies of the dispatch bytes (baseline.memcpy_bandwidth)
        "memcpy_shared_Bps": memcpy_shared_Bps,  # this rank's share while all ranks copy
        "bytes_moved": counters,
        "bytes_expected": expected,
        "runtime_stats": runtime_stats,
        "num_nvl_bytes": num_nvl_bytes,
        "dispatch_config": dataclasses.asdict(dispatch_config),
        "combine_config": dataclasses.asdict(combine_config),
    }
