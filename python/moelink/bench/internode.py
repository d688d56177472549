"""The ``internode`` benchmark mode: internode dispatch and combine (IB once, then NVLink) of
``moelink.Buffer`` with ``ranks_per_node`` < ranks, beside the ``all_to_all_single`` baseline
doing the same job, on the same inputs as the intranode mode (``bench/intranode.py``).

Host target: rank processes pose as nodes of ``--ranks-per-node`` ranks and reach other nodes only
through the emulated NIC (``--nic-gbps`` / ``--nic-latency-us`` shape it, e.g. to a 1:4
network:NVLink ratio). Bandwidths follow DeepEP's tests/test_internode.py: "RDMA" = payload bytes
this rank sends to other nodes (rows x row bytes, once per distinct remote node of each token) /
time, "NVL" = payload bytes it receives / time. Before timing, moelink's results are checked equal
to the baseline's, and the NIC's byte counter is checked equal to the theoretical minimum (one wire
message per token and distinct remote node, plus the notify messages): the report prints that
ratio (1.00) and the bytes a naive scheme, one transfer per destination *rank*, would move.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from typing import Optional

import torch

import moelink
from moelink.bench import intranode
from moelink.bench.baseline import BaselineWorkspace, baseline_combine, baseline_dispatch
from moelink.bench.floor import SharedCopyFloor
from moelink.bench.modes import Mode, Row
from moelink.bench.progress import Progress
from moelink.bench.timing import Variant, time_variants

__all__ = ["InternodeOptions", "run_rank", "ROWS", "MODE"]

ROWS = (
    Row("dispatch", "dispatch: layout + notify + payload", "dispatch_bytes", "baseline_dispatch", "dispatch"),
    Row("dispatch_cached", "dispatch, cached handle (DeepEP's figure)", "dispatch_bytes", "baseline_dispatch",
        "dispatch"),
    Row("combine", "combine", "combine_bytes", "baseline_combine", "combine"),
    Row("baseline_dispatch", "baseline dispatch (all_to_all_single)", "dispatch_bytes", None, "dispatch", True),
    Row("baseline_combine", "baseline combine (all_to_all_single)", "combine_bytes", None, "combine", True),
)


@dataclasses.dataclass(frozen=True)
class InternodeOptions(intranode.BenchOptions):
    ranks_per_node: int = 2
    nic_gbps: float = 0.0
    nic_latency_us: float = 0.0


def _network_bytes(in_rank: torch.Tensor, world: int, rpn: int, rank: int) -> tuple[int, int]:
    """(wire messages to other nodes, transfers a per-rank scheme would make) for this rank."""
    nodes = world // rpn
    per_node = in_rank.view(in_rank.shape[0], nodes, rpn).any(dim=2)
    per_node[:, rank // rpn] = False
    remote_ranks = in_rank.clone()
    remote_ranks[:, (rank // rpn) * rpn:(rank // rpn + 1) * rpn] = False
    return int(per_node.sum()), int(remote_ranks.sum())


def run_rank(rank: int, world: int, group, opts: InternodeOptions, progress: Optional[Progress] = None) -> dict:
    progress = (progress or Progress(enabled=False)).for_rank(rank)
    if opts.nic_gbps:
        os.environ["MOELINK_HOST_NIC_GBPS"] = str(opts.nic_gbps)
    if opts.nic_latency_us:
        os.environ["MOELINK_HOST_NIC_LATENCY_US"] = str(opts.nic_latency_us)
    moelink.Buffer.set_num_sms(opts.num_sms)
    dispatch_config = moelink.Buffer.get_dispatch_config(world)
    combine_config = moelink.Buffer.get_combine_config(world)
    rpn, hidden_bytes = opts.ranks_per_node, opts.hidden * 2
    num_nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, world, ranks_per_node=rpn, num_topk=opts.topk)
                  for c in (dispatch_config, combine_config))
    num_rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, world, ranks_per_node=rpn, num_topk=opts.topk)
                   for c in (dispatch_config, combine_config))
    payload, topk_idx, topk_weights = intranode._inputs(rank, opts)
    progress(f"creating moelink.Buffer: {world // rpn} nodes x {rpn} ranks, {num_nvl / 2**20:.1f} MiB NVL + "
             f"{num_rdma / 2**20:.1f} MiB RDMA window per rank, NIC "
             f"{f'{opts.nic_gbps:g} GB/s' if opts.nic_gbps else 'unshaped'}"
             f"{f', {opts.nic_latency_us:g} us' if opts.nic_latency_us else ''}")
    buffer = moelink.Buffer(group, num_nvl, num_rdma, ranks_per_node=rpn)
    try:
        workspace = BaselineWorkspace()
        progress("checking moelink against the baseline and the byte counters against the minimum")
        handle, expert_out, counters, _, rows = intranode._verify_once(
            rank, buffer, opts, payload, topk_idx, topk_weights, dispatch_config, combine_config, workspace)
        b_handle = baseline_dispatch(payload, topk_idx, opts.experts, topk_weights, workspace=workspace)[4]
        _, _, _, in_rank, _ = buffer.get_dispatch_layout(topk_idx, opts.experts)
        messages, per_rank_transfers = _network_bytes(in_rank, world, rpn, rank)
        sizes = moelink._internode.window_sizes(
            num_nodes=world // rpn, ranks_per_node=rpn, num_channels=dispatch_config.num_sms // 2, block_warps=2,
            nvl_queue_tokens=2, rdma_queue_tokens=2, row_bytes=rows["row_bytes"], num_scales=rows["num_scales"],
            num_topk=opts.topk, experts_per_rank=opts.experts // world)
        # Metadata per rank of another node: the notify message and the barrier's agreement words.
        metadata = (world - rpn) * (sizes["notify_bytes"] + sizes["agreement_bytes"])
        minimum = messages * sizes["dispatch_slot_bytes"] + metadata
        naive = per_rank_transfers * sizes["dispatch_slot_bytes"] + metadata
        payload_bytes = rows["row_bytes"] + 4 * rows["num_scales"]
        floor = SharedCopyFloor(group, max(rows["recv_rows"] * payload_bytes, 1), opts.floor_seconds)

        def fresh_dispatch():
            per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, opts.experts)
            return buffer.dispatch(payload, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node,
                                   is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=topk_idx,
                                   topk_weights=topk_weights, config=dispatch_config)

        nic_busy = {"dispatch_cached": [], "combine": []}

        def timed_on_nic(name, call):
            def run():
                buffer._scaleout.nic.reset_busy()
                out = call()
                buffer._scaleout.wait_idle()
                nic_busy[name].append(buffer._scaleout.nic.busy_ns * 1e-9)
                return out
            return run

        calls = {
            "dispatch": fresh_dispatch,
            "dispatch_cached": timed_on_nic("dispatch_cached",
                                            lambda: buffer.dispatch(payload, handle=handle, config=dispatch_config)),
            "combine": timed_on_nic("combine", lambda: buffer.combine(expert_out, handle, config=combine_config)),
            "baseline_dispatch": lambda: baseline_dispatch(payload, topk_idx, opts.experts, topk_weights,
                                                           workspace=workspace),
            "baseline_combine": lambda: baseline_combine(expert_out, b_handle, workspace=workspace),
        }
        variants = [Variant(row.variant, calls[row.variant], runtime_counters=not row.is_baseline) for row in ROWS]
        progress(f"timing {opts.iters} iterations after {opts.warmup} warm-up")
        records = time_variants(group, variants, floor, iters=opts.iters, warmup=opts.warmup, progress=progress)
    finally:
        buffer.destroy()
    return {
        "rank": rank,
        "tokens": opts.tokens,
        "dispatch_bytes": rows["recv_rows"] * payload_bytes,
        "combine_bytes": rows["recv_rows"] * opts.hidden * 2,
        "rdma_dispatch_bytes": messages * payload_bytes,
        "rdma_combine_bytes": messages * opts.hidden * 2,
        "rows": rows,
        **records,
        "bytes_moved": counters,
        "network_minimum": minimum,
        "network_naive": naive,
        "nic_busy_s": {k: v[-opts.iters:] for k, v in nic_busy.items()},
        "num_nvl_bytes": num_nvl,
        "num_rdma_bytes": num_rdma,
    }


def make_options(args) -> InternodeOptions:
    base = intranode.make_options(args)
    return InternodeOptions(**dataclasses.asdict(base), ranks_per_node=_ranks_per_node(args),
                            nic_gbps=args.nic_gbps, nic_latency_us=args.nic_latency_us)


def _ranks_per_node(args) -> int:
    return args.ranks_per_node if args.ranks_per_node else max(1, args.ranks // 2)


def problems(args) -> list[str]:
    found = intranode.problems(args)
    rpn = _ranks_per_node(args)
    if args.ranks % rpn:
        found.append(f"--ranks-per-node {rpn} must divide --ranks {args.ranks}")
    return found


def unavailable(args) -> Optional[str]:
    if args.ranks < 2 or _ranks_per_node(args) >= args.ranks:
        return "needs at least two nodes (--ranks >= 2 and --ranks-per-node < --ranks)"
    return None


def summarize_extra(per_rank: list[dict]) -> dict:
    def spread(values):
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}
    rdma = {key: [r["bytes_moved"][key] for r in per_rank] for key in ("dispatch_rdma", "combine_rdma")}
    extra = {
        "network": {
            "dispatch_bytes": rdma["dispatch_rdma"],
            "minimum_bytes": [r["network_minimum"] for r in per_rank],
            "naive_bytes": [r["network_naive"] for r in per_rank],
            "vs_minimum": sum(rdma["dispatch_rdma"]) / max(1, sum(r["network_minimum"] for r in per_rank)),
            "naive_vs_minimum": sum(r["network_naive"] for r in per_rank) / max(1, sum(r["network_minimum"]
                                                                                       for r in per_rank)),
        },
        "bandwidth_split": {},
        "recv_rows_per_rank": [r["rows"]["recv_rows"] for r in per_rank],
        "windows": {"num_nvl_bytes": per_rank[0]["num_nvl_bytes"], "num_rdma_bytes": per_rank[0]["num_rdma_bytes"]},
    }
    for op, variant in (("dispatch", "dispatch_cached"), ("combine", "combine")):
        times = [statistics.median(r["times_s"][variant]) for r in per_rank]
        busy = [statistics.median(r["nic_busy_s"][variant]) if r["nic_busy_s"][variant] else 0.0 for r in per_rank]
        extra["bandwidth_split"][op] = {
            "rdma_GBps": spread([r[f"rdma_{op}_bytes"] / t / 1e9 for r, t in zip(per_rank, times)]),
            "nvl_GBps": spread([r[f"{op}_bytes"] / t / 1e9 for r, t in zip(per_rank, times)]),
            "nic_busy_share": spread([b / t for b, t in zip(busy, times)]),
        }
    return extra


def format_extra(extra: dict) -> list[str]:
    net = extra["network"]
    lines = [f"rows received per rank: {extra['recv_rows_per_rank']}",
             f"network bytes per dispatch: {net['vs_minimum']:.2f} x the theoretical minimum (one message per token "
             f"and distinct remote node, plus notify); a per-rank scheme would move {net['naive_vs_minimum']:.2f} x"]
    for op, split in extra["bandwidth_split"].items():
        lines.append(f"{op}: RDMA {split['rdma_GBps']['median']:.3f} GB/s, NVL {split['nvl_GBps']['median']:.3f} GB/s "
                     f"per rank (DeepEP's split); the NIC was busy {100 * split['nic_busy_share']['median']:.0f}% of "
                     "the call")
    return lines


MODE = Mode(name="internode", title="moelink internode dispatch/combine (IB once, then NVLink), host target",
            rows=ROWS, make_options=make_options, problems=problems, unavailable=unavailable, run_rank=run_rank,
            summarize_extra=summarize_extra, format_extra=format_extra)
