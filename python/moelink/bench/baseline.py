"""The baseline moelink is measured against: how MoE frameworks dispatch without DeepEP.

Inside each rank, with nothing but ``torch.distributed``:

dispatch
  1. which ranks each token goes to (a token goes once to every rank owning one of its experts);
  2. ``all_to_all_single`` of the per-destination token counts (the split sizes);
  3. permute: gather the rows by destination rank, tokens in index order within a destination;
  4. ``all_to_all_single`` of the rows, of the top-k indices (already converted to the
     destination's local expert ids, -1 elsewhere) and of the weights (0 where the index is -1).
  The received rows arrive grouped by source rank, tokens in index order: exactly the receive
  order of ``moelink.reference.dispatch.intranode_dispatch`` (and of the kernels).

combine
  1. ``all_to_all_single`` of the expert outputs back, with the splits reversed;
  2. un-permute: accumulate every returned row onto its token in float32 (``index_add_``), add
     the bias, round once to the output dtype. The returned weights are summed the same way.

Rows travel as raw bytes (``uint8``), which every backend supports for every dtype, FP8 included.
``memcpy_bandwidth`` measures this machine's copy floor for a given number of bytes.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from typing import Optional, Union

import torch
import torch.distributed as dist

from ..errors import InvalidArgument, argument_error

__all__ = ["BaselineHandle", "baseline_dispatch", "baseline_combine", "memcpy_bandwidth"]

Payload = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class BaselineHandle:
    """What combine needs from dispatch."""

    permutation: torch.Tensor  # [sum(send_counts)] int64: token index of each sent row, by destination
    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    num_tokens: int  # tokens of this rank


def _exchange(rows: torch.Tensor, send_counts: list[int], recv_counts: list[int], group) -> torch.Tensor:
    """all_to_all_single of the rows of ``rows`` (any dtype) as bytes."""
    shape, dtype = tuple(rows.shape[1:]), rows.dtype
    row_bytes = math.prod(shape) * rows.element_size()
    send = rows.contiguous().view(torch.uint8).reshape(rows.shape[0], row_bytes)
    recv = torch.empty(sum(recv_counts), row_bytes, dtype=torch.uint8)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return recv.view(dtype).reshape((recv.shape[0],) + shape)


def baseline_dispatch(
    x: Payload,
    topk_idx: torch.Tensor,
    num_experts: int,
    topk_weights: Optional[torch.Tensor] = None,
    *,
    expert_alignment: int = 1,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[Payload, torch.Tensor, Optional[torch.Tensor], list[int], BaselineHandle]:
    """Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle)``
    with the semantics of ``Buffer.dispatch`` (see moelink.reference.dispatch)."""
    group = group or dist.group.WORLD
    num_ranks = dist.get_world_size(group)
    per_rank = num_experts // num_ranks
    idx = topk_idx.long()
    dest = torch.where(idx >= 0, idx // per_rank, torch.full_like(idx, -1))  # [N, K]
    in_rank = torch.zeros(idx.shape[0], num_ranks, dtype=torch.bool)
    valid = dest >= 0
    in_rank[torch.nonzero(valid)[:, 0], dest[valid]] = True

    # 1-2. split sizes
    send_counts_t = in_rank.sum(dim=0).long()
    recv_counts_t = torch.empty_like(send_counts_t)
    dist.all_to_all_single(recv_counts_t, send_counts_t, group=group)
    send_counts, recv_counts = send_counts_t.tolist(), recv_counts_t.tolist()

    # 3. permute by destination rank (stable: token order within a destination)
    pairs = torch.nonzero(in_rank.t())  # (destination, token), sorted by destination then token
    dest_of_row, permutation = pairs[:, 0], pairs[:, 1]
    lo = (dest_of_row * per_rank).unsqueeze(1)
    rows_idx = idx[permutation]
    local = (rows_idx >= lo) & (rows_idx < lo + per_rank)
    send_idx = torch.where(local, rows_idx - lo, torch.full_like(rows_idx, -1))

    # 4. the payload
    parts = x if isinstance(x, tuple) else (x,)
    recv_parts = tuple(_exchange(p[permutation], send_counts, recv_counts, group) for p in parts)
    recv_idx = _exchange(send_idx, send_counts, recv_counts, group)
    recv_weights = None
    if topk_weights is not None:
        w = topk_weights[permutation]
        recv_weights = _exchange(torch.where(local, w, torch.zeros_like(w)), send_counts, recv_counts, group)

    counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=per_rank).tolist()
    counts = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts]
    handle = BaselineHandle(permutation, send_counts, recv_counts, idx.shape[0])
    recv_x = recv_parts if isinstance(x, tuple) else recv_parts[0]
    return recv_x, recv_idx, recv_weights, counts, handle


def baseline_combine(
    x: torch.Tensor,
    handle: BaselineHandle,
    topk_weights: Optional[torch.Tensor] = None,
    bias: Union[None, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] = None,
    *,
    group: Optional[dist.ProcessGroup] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns ``(combined_x, combined_topk_weights)`` with the semantics of ``Buffer.combine``:
    the unweighted float32 sum of every copy of a token, plus bias, in ``x.dtype``."""
    group = group or dist.group.WORLD
    back = _exchange(x, handle.recv_counts, handle.send_counts, group)
    combined = torch.zeros(handle.num_tokens, x.shape[1], dtype=torch.float32)
    for b in bias if isinstance(bias, tuple) else (bias,):
        if b is not None:
            combined += b.float()
    combined.index_add_(0, handle.permutation, back.float())
    combined_weights = None
    if topk_weights is not None:
        back_w = _exchange(topk_weights.float(), handle.recv_counts, handle.send_counts, group)
        combined_weights = torch.zeros(handle.num_tokens, topk_weights.shape[1], dtype=torch.float32)
        combined_weights.index_add_(0, handle.permutation, back_w)
    return combined.to(x.dtype), combined_weights


def memcpy_bandwidth(num_bytes: int, *, iters: int = 20, warmup: int = 3) -> float:
    """Median bytes/s of ``dst.copy_(src)`` over ``num_bytes`` (CPU, torch's current thread count):
    the floor any shared-memory transport moving that many bytes is compared with."""
    if num_bytes <= 0:
        raise argument_error(InvalidArgument, "num_bytes", "> 0", num_bytes)
    src = torch.ones(num_bytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    rates = []
    for _ in range(max(1, iters)):
        start = time.perf_counter()
        dst.copy_(src)
        rates.append(num_bytes / max(time.perf_counter() - start, 1e-9))
    return statistics.median(rates)
