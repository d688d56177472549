"""Reference semantics of the dispatch layout, in plain torch."""

from __future__ import annotations

from typing import Optional

import torch

from ..layout import DispatchLayout

__all__ = ["dispatch_layout"]


def dispatch_layout(
    topk_idx: torch.Tensor, num_experts: int, num_ranks: int, ranks_per_node: Optional[int] = None
) -> DispatchLayout:
    """What ``moelink.get_dispatch_layout`` returns, computed the obvious way:

    - ``num_tokens_per_expert[e]``: number of (token, slot) pairs with ``topk_idx == e``
      (a token listing an expert twice counts twice);
    - ``is_token_in_rank[t, r]``: token ``t`` has at least one expert on rank ``r``;
    - ``num_tokens_per_rank[r]`` / ``num_tokens_per_node[n]``: tokens with at least one expert on
      the rank / node, each token counted once (``None`` for a single node).
    """
    ranks_per_node = num_ranks if ranks_per_node is None else ranks_per_node
    experts_per_rank = num_experts // num_ranks
    num_tokens = topk_idx.shape[0]
    ids = topk_idx.to(torch.int64)
    valid = ids >= 0

    per_expert = torch.bincount(ids[valid], minlength=num_experts).to(torch.int32)

    in_rank = torch.zeros((num_tokens, num_ranks), dtype=torch.bool)
    tokens = torch.arange(num_tokens).unsqueeze(1).expand_as(ids)
    in_rank[tokens[valid], ids[valid] // experts_per_rank] = True
    per_rank = in_rank.sum(0, dtype=torch.int32)

    per_node = None
    num_nodes = num_ranks // ranks_per_node
    if num_nodes > 1:
        per_node = in_rank.view(num_tokens, num_nodes, ranks_per_node).any(-1).sum(0, dtype=torch.int32)
    return DispatchLayout(per_rank, per_node, per_expert, in_rank)
