"""Path "layout": every rank computes the dispatch layout of its own routing at the same time (one
kernel per rank, on its own stream or thread), checked bit for bit against
``moelink.reference.dispatch_layout``: per-rank, per-node and per-expert counts and the
``is_token_in_rank`` matrix, for int64 and int32 ids, several node splits and edge routings."""

from __future__ import annotations

import torch

from .. import reference
from .core import Case, RankGroup

name = "layout"


def cases(group: RankGroup):
    big = group.big
    ranks = group.num_ranks
    out = [
        Case("int64-one-node", dict(tokens=4096 if big else 300, topk=8, experts_per_rank=4, dtype="int64",
                                    ranks_per_node=ranks)),
        Case("int32-two-nodes", dict(tokens=2048 if big else 200, topk=6, experts_per_rank=3, dtype="int32",
                                     ranks_per_node=max(1, ranks // 2))),
        Case("sparse-and-empty", dict(tokens=513 if big else 77, topk=9, experts_per_rank=2, dtype="int64",
                                      ranks_per_node=1, sparse=True, empty_rank=True)),
    ]
    return out


def _routing(gen: torch.Generator, case: Case, rank: int, num_experts: int) -> torch.Tensor:
    p = case.params
    n = 0 if (p.get("empty_rank") and rank == 0) else p["tokens"] + rank
    idx = torch.randint(-1, num_experts, (n, p["topk"]), generator=gen)
    if p.get("sparse"):
        idx[torch.rand(n, p["topk"], generator=gen) < 0.7] = -1
    return idx.to(torch.int32 if p["dtype"] == "int32" else torch.int64)


def run(group: RankGroup, case: Case):
    p, ranks = case.params, group.num_ranks
    num_experts = p["experts_per_rank"] * ranks
    rpn = p["ranks_per_node"]
    nodes = ranks // rpn
    gen = torch.Generator().manual_seed(case.seed)
    routings = [_routing(gen, case, r, num_experts) for r in range(ranks)]
    with group.scratch() as mem:
        outs = []
        for r, idx in enumerate(routings):
            outs.append(dict(idx=mem.upload(idx), per_rank=mem.empty((ranks,), torch.int32, fill=0xff),
                             per_node=mem.empty((nodes,), torch.int32, fill=0xff) if nodes > 1 else None,
                             per_expert=mem.empty((num_experts,), torch.int32, fill=0xff),
                             in_rank=mem.empty((idx.shape[0], ranks), torch.bool, fill=0x7f)))

        def launch(r: int, stream: int) -> None:
            o, idx = outs[r], routings[r]
            group.module.dispatch_layout(
                o["idx"], idx.element_size(), idx.shape[0], idx.shape[1], idx.shape[1], num_experts, ranks, rpn,
                o["per_rank"].ptr, o["per_node"].ptr if o["per_node"] is not None else 0, o["per_expert"].ptr,
                o["in_rank"].ptr, stream=stream, rank=r)

        group.run_all("dispatch_layout", launch, check_fit=False)  # independent grids: no waits between ranks
        for r, idx in enumerate(routings):
            want = reference.dispatch_layout(idx, num_experts, ranks, rpn)
            o = outs[r]
            assert torch.equal(o["per_rank"].get(), want.num_tokens_per_rank), f"rank {r}: num_tokens_per_rank"
            assert torch.equal(o["per_expert"].get(), want.num_tokens_per_expert), f"rank {r}: num_tokens_per_expert"
            assert torch.equal(o["in_rank"].get(), want.is_token_in_rank), f"rank {r}: is_token_in_rank"
            if nodes > 1:
                assert torch.equal(o["per_node"].get(), want.num_tokens_per_node), f"rank {r}: num_tokens_per_node"
    return {"summary": f"{sum(t.shape[0] for t in routings)} tokens, {num_experts} experts, {nodes} node(s)"}
