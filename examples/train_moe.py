"""Trains an expert-parallel MoE layer on 4 CPU ranks and shows its loss matching a single-process run.

    python examples/train_moe.py [--ranks 4] [--steps 8] [--tokens 64] [--hidden 64] [--experts 8] [--topk 2]

Each rank is a process (gloo over loopback); moelink's kernels run on the CPU under its SIMT host
runtime, and the windows are shared memory. Every rank holds ``experts / ranks`` experts of a
``moelink.nn.ExpertParallelMoE`` and a replicated router; each step it trains on its own slice of
the batch with SGD, tokens moving to their experts and back through moelink's dispatch and
combine (``moelink.autograd``), router gradients summed over the ranks. Beside it, every rank
trains the same layer in one process (``moelink.nn.MoE``, every expert local, the whole batch),
from the same initial parameters; rank 0 prints both losses per step. They agree to bf16
precision: combine carries bf16 rows, the single-process layer stays in float32.

Routing is node-limited (each token may use experts of at most half of the expert groups, one
group per rank) when ``moelink.routing`` is installed, plain top-k otherwise; the output says which.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

import moelink
from moelink.nn import NODE_LIMITED_ROUTING, ExpertParallelMoE, MoE


def batch(step: int, world: int, tokens_per_rank: int, hidden: int, seed: int) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Step ``step``'s inputs and targets of every rank (each rank draws all, then takes its own)."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    teacher = torch.randn(hidden, hidden, generator=torch.Generator().manual_seed(seed)) / hidden ** 0.5
    xs = [torch.randn(tokens_per_rank, hidden, generator=gen) for _ in range(world)]
    return xs, [torch.tanh(x @ teacher) for x in xs]


def train(group: dist.ProcessGroup, *, steps: int = 8, tokens_per_rank: int = 64, hidden: int = 64,
          ffn_hidden: int = 128, num_experts: int = 8, num_topk: int = 2, lr: float = 0.5, seed: int = 0,
          log: Optional[Callable[[str], None]] = None) -> List[Tuple[float, float]]:
    """Trains both layers for ``steps`` steps; returns ``(expert_parallel_loss, single_process_loss)``
    per step (the same on every rank). Collective over ``group``."""
    rank, world = group.rank(), group.size()
    groups = dict(num_groups=world, max_groups=max(1, world // 2)) if NODE_LIMITED_ROUTING else {}
    dense = MoE(hidden, ffn_hidden, num_experts, num_topk, generator=torch.Generator().manual_seed(seed), **groups)
    configs = (moelink.Buffer.get_dispatch_config(world), moelink.Buffer.get_combine_config(world))
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(hidden * 4, world) for c in configs)  # fp32 rows
    results = []
    with moelink.Buffer(group, num_nvl_bytes) as buffer:
        layer = ExpertParallelMoE.from_dense(dense, buffer)
        if log:
            log(f"{world} ranks, {num_experts} experts ({num_experts // world} per rank), top-{num_topk}, hidden {hidden}, "
                f"{tokens_per_rank} tokens per rank; routing: {layer.routing}")
        ep_opt = torch.optim.SGD(layer.parameters(), lr=lr)
        dense_opt = torch.optim.SGD(dense.parameters(), lr=lr)
        scale = 1.0 / (world * tokens_per_rank * hidden)  # mean over the whole batch
        for step in range(steps):
            xs, targets = batch(step, world, tokens_per_rank, hidden, seed)
            # expert parallel: this rank's tokens; every rank runs forward and backward together
            loss = ((layer(xs[rank]) - targets[rank]) ** 2).sum() * scale
            ep_opt.zero_grad()
            loss.backward()
            layer.all_reduce_router_grads()
            ep_opt.step()
            total = loss.detach().clone()
            dist.all_reduce(total, group=group)
            # single process: the whole batch, in per-rank chunks (the same router matmul shapes)
            dense_loss = sum(((dense(x) - t) ** 2).sum() for x, t in zip(xs, targets)) * scale
            dense_opt.zero_grad()
            dense_loss.backward()
            dense_opt.step()
            results.append((float(total), float(dense_loss.detach())))
            if log:
                ep, sp = results[-1]
                log(f"step {step + 1:3d}   expert-parallel loss {ep:.6f}   single-process loss {sp:.6f}   "
                    f"relative difference {abs(ep - sp) / abs(sp):.1e}")
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, options: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results = train(dist.group.WORLD, log=print if rank == 0 else None, **options)
        if rank == 0:
            worst = max(abs(ep - sp) / abs(sp) for ep, sp in results)
            print(f"largest relative difference over {len(results)} steps: {worst:.1e} "
                  f"({'matches' if worst < 2e-2 else 'DOES NOT match'} to bf16 precision); "
                  f"loss {results[0][0]:.4f} -> {results[-1][0]:.4f}")
            if worst >= 2e-2:
                sys.exit(1)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per rank per step")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--ffn-hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = dict(steps=args.steps, tokens_per_rank=args.tokens, hidden=args.hidden, ffn_hidden=args.ffn_hidden,
                   num_experts=args.experts, num_topk=args.topk, lr=args.lr, seed=args.seed)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.multiprocessing.spawn(_rank, args=(args.ranks, _free_port(), options), nprocs=args.ranks, join=True)


if __name__ == "__main__":
    main()
