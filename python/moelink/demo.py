"""Moves real data: a dispatch and combine over local rank processes, checked against moelink.reference.

    python -m moelink.demo [--ranks 4] [--tokens 512] [--hidden 1024] [--experts 16] [--topk 4]
    python -m moelink.demo --layout-only [--ranks 64 --ranks-per-node 8 --experts 256 --topk 8]

Without a GPU each rank is a process on this machine and moelink's kernels run on the CPU under its
SIMT host runtime; the ranks' windows are shared memory. Every rank routes its tokens to random
top-k experts, dispatches them (bf16 rows), lets each local expert ``e`` compute ``(e + 1) * x``,
combines the weighted results back and compares every output with ``moelink.reference``.

``--layout-only`` prints the dispatch layout of a DeepSeek-V3-shaped, node-limited routing
(8 of 256 experts, at most 4 of 8 nodes per token) computed by the layout kernel, in this process.
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.distributed as dist

import moelink


def node_limited_routing(scores: torch.Tensor, num_nodes: int, max_nodes: int, topk: int) -> torch.Tensor:
    num_tokens, num_experts = scores.shape
    per_node = scores.view(num_tokens, num_nodes, num_experts // num_nodes)
    node_score = per_node.topk(min(2, per_node.shape[-1]), dim=-1).values.sum(-1)
    chosen = node_score.topk(min(max_nodes, num_nodes), dim=-1).indices
    allowed = torch.zeros(num_tokens, num_nodes, dtype=torch.bool).scatter_(1, chosen, True)
    masked = scores.masked_fill(~allowed.repeat_interleave(num_experts // num_nodes, dim=1), float("-inf"))
    return masked.topk(topk, dim=-1).indices


def _inputs(seed: int, world: int, args):
    gen = torch.Generator().manual_seed(seed)
    xs, idx, weights = [], [], []
    for _ in range(world):
        scores = torch.rand(args.tokens, args.experts, generator=gen)
        idx.append(scores.topk(args.topk, dim=-1).indices)
        weights.append(torch.rand(args.tokens, args.topk, generator=gen))
        xs.append(torch.randn(args.tokens, args.hidden, generator=gen).to(torch.bfloat16))
    return xs, idx, weights


def _rank(rank: int, world: int, port: int, args) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        xs, idx, weights = _inputs(args.seed, world, args)  # every rank draws all, keeps its own
        x, topk_idx, topk_weights = xs[rank], idx[rank], weights[rank]
        configs = (moelink.Buffer.get_dispatch_config(world), moelink.Buffer.get_combine_config(world))
        num_nvl_bytes = max(c.get_nvl_buffer_size_hint(args.hidden * 2, world) for c in configs)
        with moelink.Buffer(dist.group.WORLD, num_nvl_bytes) as buffer:
            start = time.perf_counter()
            per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, args.experts)
            recv_x, recv_idx, recv_w, counts, handle, _ = buffer.dispatch(
                x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                topk_idx=topk_idx, topk_weights=topk_weights)
            dispatched = time.perf_counter()
            # the experts: expert e (local id) multiplies its rows by (global id + 1), weighted
            first = rank * args.experts // world
            factor = ((recv_idx >= 0) * recv_w * (recv_idx + first + 1)).sum(1, keepdim=True)
            out = (recv_x.float() * factor).to(torch.bfloat16)
            combined, _, _ = buffer.combine(out, handle)
            finished = time.perf_counter()
            moved = buffer.bytes_moved()["nvl"]
        want_rows = moelink.reference.intranode_dispatch(xs, idx, args.experts, weights)[rank]
        rows_ok = torch.equal(recv_x, want_rows.recv_x) and counts == want_rows.num_recv_tokens_per_expert_list
        want = (x.float() * (topk_weights * (topk_idx + 1)).sum(1, keepdim=True))
        combine_err = float(((combined.float() - want).abs() / want.abs().clamp(min=1)).max())
        report = dict(rank=rank, sent=int(in_rank.sum()), received=recv_x.shape[0], per_expert=counts,
                      dispatch_ms=(dispatched - start) * 1e3, combine_ms=(finished - dispatched) * 1e3,
                      bytes_total=moved, rows_ok=rows_ok, combine_err=combine_err)
        reports = [None] * world
        dist.all_gather_object(reports, report)
        if rank == 0:
            _print(reports, world, args)
        ok = all(r["rows_ok"] and r["combine_err"] < 2e-2 for r in reports)
    finally:
        dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


def _print(reports, world: int, args) -> None:
    print(f"moelink demo: {world} ranks on this machine (host target: each rank a process, windows in shared "
          f"memory, kernels on the SIMT host runtime)")
    print(f"  each rank: {args.tokens} tokens of hidden {args.hidden} (bf16), top-{args.topk} of {args.experts} "
          f"experts ({args.experts // world} per rank)")
    for r in reports:
        print(f"  rank {r['rank']}: sent {r['sent']} token copies, received {r['received']} rows "
              f"(per local expert {r['per_expert']}); dispatch {r['dispatch_ms']:.1f} ms, combine {r['combine_ms']:.1f} ms; "
              f"wrote {r['bytes_total'] / 1e6:.2f} MB into peers' windows")
    rows_ok = all(r["rows_ok"] for r in reports)
    worst = max(r["combine_err"] for r in reports)
    print(f"  received rows equal moelink.reference bit for bit on every rank: {rows_ok}")
    print(f"  combined outputs match sum_k w_k * (e_k + 1) * x: largest relative error {worst:.1e} "
          f"(bf16 rounding) -> {'OK' if rows_ok and worst < 2e-2 else 'FAILED'}")
    print("  (timings are of the CPU twin on a shared machine, not GPU figures; python -m moelink.bench compares "
          "against a baseline)")


def layout_only(args) -> None:
    gen = torch.Generator().manual_seed(args.seed)
    ranks_per_node = args.ranks_per_node or args.ranks
    num_nodes = args.ranks // ranks_per_node
    scores = torch.rand(args.tokens, args.experts, generator=gen)
    topk_idx = node_limited_routing(scores, num_nodes, min(args.max_nodes, num_nodes), args.topk)
    start = time.perf_counter()
    layout = moelink.get_dispatch_layout(topk_idx, args.experts, args.ranks, ranks_per_node)
    elapsed = time.perf_counter() - start
    expected = moelink.reference.dispatch_layout(topk_idx, args.experts, args.ranks, ranks_per_node)
    agrees = all(torch.equal(a, b) for a, b in zip(layout, expected) if b is not None)

    def summary(t: torch.Tensor) -> str:
        t = t.float()
        return f"min {t.min():7.0f}  mean {t.mean():9.1f}  max {t.max():7.0f}"

    ranks_per_token = layout.is_token_in_rank.sum(1).float()
    nodes_per_token = layout.is_token_in_rank.view(args.tokens, num_nodes, -1).any(-1).sum(1).float()
    print(f"moelink dispatch layout: {args.tokens} tokens, top-{args.topk} of {args.experts} experts, "
          f"{args.ranks} ranks on {num_nodes} nodes (at most {min(args.max_nodes, num_nodes)} nodes per token)")
    print(f"  tokens per expert  {summary(layout.num_tokens_per_expert)}")
    print(f"  tokens per rank    {summary(layout.num_tokens_per_rank)}")
    if layout.num_tokens_per_node is not None:
        print(f"  tokens per node    {summary(layout.num_tokens_per_node)}")
    print(f"  ranks per token    mean {ranks_per_token.mean():.2f}   nodes per token  mean {nodes_per_token.mean():.2f}"
          f" (max {nodes_per_token.max():.0f})")
    print(f"  kernel on the host target: {elapsed * 1e3:.1f} ms; matches moelink.reference: {agrees}")
    if not agrees:
        raise SystemExit(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moelink.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout-only", action="store_true", help="print a DeepSeek-V3-shaped layout, move nothing")
    parser.add_argument("--ranks", type=int, default=None, help="ranks (default 4; 64 with --layout-only)")
    parser.add_argument("--ranks-per-node", type=int, default=8, help="--layout-only: ranks per node")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per rank (default 512; 4096 with --layout-only)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=None, help="experts (default 16; 256 with --layout-only)")
    parser.add_argument("--topk", type=int, default=None, help="experts per token (default 4; 8 with --layout-only)")
    parser.add_argument("--max-nodes", type=int, default=4, help="--layout-only: nodes a token may reach")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layout = args.layout_only
    args.ranks = args.ranks or (64 if layout else 4)
    args.tokens = args.tokens or (4096 if layout else 512)
    args.experts = args.experts or (256 if layout else 16)
    args.topk = args.topk or (8 if layout else 4)
    if layout:
        layout_only(args)
        return
    if args.experts % args.ranks:
        parser.error(f"--experts ({args.experts}) must be a multiple of --ranks ({args.ranks})")
    print(f"starting {args.ranks} rank processes ...", flush=True)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(_rank, args=(args.ranks, _free_port(), args), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
