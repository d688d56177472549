"""Prints the dispatch layout of a DeepSeek-V3-shaped routing, computed by the layout kernel.

    python -m moelink.demo [--tokens 4096] [--ranks 64] [--ranks-per-node 8] [--experts 256] [--topk 8]

DeepSeek-V3 routes each token to 8 of 256 routed experts, restricted to at most 4 of 8 expert
groups (here: nodes). This demo draws per-token expert scores at random, keeps the 4 best nodes
(by the sum of each node's two best scores, as DeepSeek-V3's group-limited routing does) and
picks the top-8 experts among them. CPU tensors run on the host target.
"""

from __future__ import annotations

import argparse
import time

import torch

import moelink


def node_limited_routing(scores: torch.Tensor, num_nodes: int, max_nodes: int, topk: int) -> torch.Tensor:
    num_tokens, num_experts = scores.shape
    per_node = scores.view(num_tokens, num_nodes, num_experts // num_nodes)
    node_score = per_node.topk(min(2, per_node.shape[-1]), dim=-1).values.sum(-1)
    chosen = node_score.topk(min(max_nodes, num_nodes), dim=-1).indices
    allowed = torch.zeros(num_tokens, num_nodes, dtype=torch.bool).scatter_(1, chosen, True)
    masked = scores.masked_fill(~allowed.repeat_interleave(num_experts // num_nodes, dim=1), float("-inf"))
    return masked.topk(topk, dim=-1).indices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--max-nodes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(args.seed)
    num_nodes = args.ranks // args.ranks_per_node
    scores = torch.rand(args.tokens, args.experts, generator=gen)
    topk_idx = node_limited_routing(scores, num_nodes, args.max_nodes, args.topk)

    start = time.perf_counter()
    layout = moelink.get_dispatch_layout(topk_idx, args.experts, args.ranks, args.ranks_per_node)
    elapsed = time.perf_counter() - start
    expected = moelink.reference.dispatch_layout(topk_idx, args.experts, args.ranks, args.ranks_per_node)
    agrees = all(torch.equal(a, b) for a, b in zip(layout, expected) if b is not None)

    def summary(t: torch.Tensor) -> str:
        t = t.float()
        return f"min {t.min():7.0f}  mean {t.mean():9.1f}  max {t.max():7.0f}"

    ranks_per_token = layout.is_token_in_rank.sum(1).float()
    nodes_per_token = layout.is_token_in_rank.view(args.tokens, num_nodes, -1).any(-1).sum(1).float()
    print(f"moelink dispatch layout: {args.tokens} tokens, top-{args.topk} of {args.experts} experts, "
          f"{args.ranks} ranks on {num_nodes} nodes (at most {args.max_nodes} nodes per token)")
    print(f"  tokens per expert  {summary(layout.num_tokens_per_expert)}")
    print(f"  tokens per rank    {summary(layout.num_tokens_per_rank)}")
    if layout.num_tokens_per_node is not None:
        print(f"  tokens per node    {summary(layout.num_tokens_per_node)}")
    print(f"  ranks per token    mean {ranks_per_token.mean():.2f}   nodes per token  mean {nodes_per_token.mean():.2f}"
          f" (max {nodes_per_token.max():.0f})")
    print(f"  kernel on the host target: {elapsed * 1e3:.1f} ms; matches moelink.reference: {agrees}")
    if not agrees:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
