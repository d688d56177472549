"""Dispatch layout: how many tokens each rank, node and expert receives, and which ranks each token
goes to. Same semantics as DeepEP's ``get_dispatch_layout``; the computation runs as a kernel
(csrc/kernels/layout.cuh) on the host target for CPU tensors and on the GPU for CUDA tensors."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import _backend, _validate
from ._interop import accepts_arrays
from .errors import InvalidArgument, argument_error

__all__ = ["DispatchLayout", "get_dispatch_layout"]


class DispatchLayout(NamedTuple):
    num_tokens_per_rank: torch.Tensor  # [num_ranks] int32: tokens with at least one expert on the rank
    num_tokens_per_node: Optional[torch.Tensor]  # [num_nodes] int32, None when there is one node
    num_tokens_per_expert: torch.Tensor  # [num_experts] int32: (token, top-k slot) pairs per expert
    is_token_in_rank: torch.Tensor  # [num_tokens, num_ranks] bool


def _check_expert_ids(topk_idx: torch.Tensor, num_experts: int) -> None:
    # Skipped for CUDA ids (two host syncs per call, and no graph capture); the kernel counts an
    # id outside [0, num_experts) nowhere, as the dispatch kernels then map it to -1.
    if topk_idx.numel() == 0 or topk_idx.is_cuda:
        return
    low, high = int(topk_idx.min()), int(topk_idx.max())
    if low < -1 or high >= num_experts:
        bad = (topk_idx < -1) | (topk_idx >= num_experts)
        token, slot = (int(i) for i in bad.nonzero()[0])
        raise argument_error(
            InvalidArgument,
            "topk_idx",
            f"expert ids in [-1, num_experts = {num_experts})",
            f"{int(topk_idx[token, slot])} at [{token}, {slot}] (min {low}, max {high})",
        )


@accepts_arrays
def get_dispatch_layout(
    topk_idx: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    ranks_per_node: Optional[int] = None,
    *,
    rank: int = -1,
) -> DispatchLayout:
    """Computes the dispatch layout of ``topk_idx`` ``[num_tokens, num_topk]`` (int64 or int32,
    ``-1`` = no expert). Experts are laid out contiguously: rank ``r`` owns experts
    ``[r * E / R, (r + 1) * E / R)``; node ``n`` owns ranks ``[n * ranks_per_node, (n + 1) *
    ranks_per_node)``. ``ranks_per_node=None`` means a single node. ``rank`` only labels error
    messages."""
    _validate.tensor("topk_idx", topk_idx)
    _validate.dtype("topk_idx", topk_idx, (torch.int64, torch.int32))
    _validate.ndim("topk_idx", topk_idx, 2, "[num_tokens, num_topk]")
    _validate.contiguous("topk_idx", topk_idx)
    _validate.integer("num_experts", num_experts, minimum=1, maximum=_validate.MAX_EXPERTS)
    _validate.integer("num_ranks", num_ranks, minimum=1, maximum=_validate.MAX_RANKS)
    _validate.divides("num_ranks", num_ranks, "num_experts", num_experts)
    if ranks_per_node is None:
        ranks_per_node = num_ranks
    _validate.integer("ranks_per_node", ranks_per_node, minimum=1)
    _validate.divides("ranks_per_node", ranks_per_node, "num_ranks", num_ranks)
    module = _backend.for_device("topk_idx", topk_idx.device)
    _check_expert_ids(topk_idx, num_experts)

    num_tokens, num_topk = topk_idx.shape
    num_nodes = num_ranks // ranks_per_node
    device = topk_idx.device
    per_rank = torch.empty(num_ranks, dtype=torch.int32, device=device)
    per_node = torch.empty(num_nodes, dtype=torch.int32, device=device) if num_nodes > 1 else None
    per_expert = torch.empty(num_experts, dtype=torch.int32, device=device)
    in_rank = torch.empty((num_tokens, num_ranks), dtype=torch.bool, device=device)
    module.dispatch_layout(
        topk_idx.data_ptr(),
        topk_idx.element_size(),
        num_tokens,
        num_topk,
        num_topk,
        num_experts,
        num_ranks,
        ranks_per_node,
        per_rank.data_ptr(),
        per_node.data_ptr() if per_node is not None else 0,
        per_expert.data_ptr(),
        in_rank.data_ptr(),
        stream=_backend.stream_handle(device),
        rank=rank,
    )
    return DispatchLayout(per_rank, per_node, per_expert, in_rank)
