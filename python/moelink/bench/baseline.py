"""The baseline moelink is measured against: how MoE frameworks dispatch without DeepEP, written
as well as we would write it.

Inside each rank, with nothing but ``torch.distributed``:

dispatch
  1. which ranks each token goes to (a token goes once to every rank owning one of its experts);
  2. ``all_to_all_single`` of the per-destination token counts (the split sizes);
  3. permute: gather the rows by destination rank, tokens in index order within a destination
     (``index_select`` straight into a reused send buffer);
  4. ``all_to_all_single`` of the rows, of the top-k indices (already converted to the
     destination's local expert ids, -1 elsewhere) and of the weights (0 where the index is -1),
     each into a reused receive buffer.
  The received rows arrive grouped by source rank, tokens in index order: exactly the receive
  order of ``moelink.reference.dispatch.intranode_dispatch`` (and of the kernels).

combine
  1. ``all_to_all_single`` of the expert outputs back, with the splits reversed;
  2. un-permute: accumulate every returned row onto its token in float32 (``index_add_`` over
     chunks of rows widened to float32 in a small reused staging buffer, in receive order, so each
     token sums its copies in source-rank order), add the bias first, round once to the output
     dtype. The returned weights are summed the same way.

Rows travel as raw bytes (``uint8``), which every backend supports for every dtype, FP8 included.

Buffers: pass a :class:`BaselineWorkspace` (one per caller, reused across calls) and every large
tensor of a call -- send and receive buffers, the float32 accumulator and staging, the combined
output -- lives in it, so a steady-state call allocates nothing large and takes no page faults
for it. Without it (``workspace=None``) a call uses a workspace of its own and the caller owns the
outputs. With it, the outputs are views into the workspace, valid until the next call of the same
kind (dispatch or combine) with that workspace: the trade DeepEP's low-latency buffers make too.
Why it matters: glibc serves allocations above its mmap threshold (at most 32 MiB) with ``mmap``
and returns them with ``munmap`` on free, so a baseline allocating a fresh 100 MB receive buffer
per call faults in and zeroes every page of it again; at the default benchmark shape that made it
about 3x slower than the same code under ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0`` (no mmap).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch
import torch.distributed as dist

from .floor import memcpy_bandwidth

__all__ = ["BaselineHandle", "BaselineWorkspace", "baseline_dispatch", "baseline_combine", "memcpy_bandwidth"]

Payload = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]

# Rows per float32 staging chunk in combine: about 4 MiB of float32, so the widened rows stay in
# cache between the copy that widens them and the index_add_ that reads them.
_STAGING_BYTES = 4 << 20


class BaselineWorkspace:
    """The baseline's reused buffers: one grow-only byte buffer per role (``"dispatch.x0.recv"``,
    ``"combine.acc"``, ...), sized by the largest shape seen so far.

    ``take(role, shape, dtype)`` returns a view of the role's buffer with that shape; the buffer is
    reallocated only when it is too small (then with 1/8 headroom, so shapes that creep up by a
    few rows do not reallocate each call). ``allocations`` counts (re)allocations and ``nbytes``
    the bytes held: both stop growing once every shape in use has been seen, which the tests check.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        buf = self._buffers.get(role)
        if buf is None or buf.numel() < need:
            size = need if buf is None else need + need // 8
            buf = torch.empty(max(size, 1), dtype=torch.uint8)
            self._buffers[role] = buf
            self.allocations += 1
        return buf[:need].view(dtype).view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._buffers.values())

    def roles(self) -> dict[str, int]:
        """Bytes held per role."""
        return {role: b.numel() for role, b in self._buffers.items()}

    def clear(self) -> None:
        """Drops every buffer (outputs still referenced by the caller stay valid)."""
        self._buffers.clear()


@dataclasses.dataclass
class BaselineHandle:
    """What combine needs from dispatch (small tensors, owned by the handle, not the workspace)."""

    permutation: torch.Tensor  # [sum(send_counts)] int64: token index of each sent row, by destination
    send_counts: list[int]  # rows sent to each rank
    recv_counts: list[int]  # rows received from each rank
    num_tokens: int  # tokens of this rank


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``[rows, ...]`` any dtype -> ``[rows, row_bytes]`` uint8 view (of a contiguous copy if needed)."""
    t = t.contiguous()
    row_bytes = math.prod(t.shape[1:]) * t.element_size()
    return t.view(-1).view(torch.uint8).view(t.shape[0], row_bytes)


def _exchange(src: torch.Tensor, index: Optional[torch.Tensor], send_counts: list[int], recv_counts: list[int],
              group, ws: BaselineWorkspace, role: str) -> torch.Tensor:
    """``all_to_all_single`` of the rows ``src[index]`` (or of ``src`` when ``index`` is None), as
    bytes, gathering into the workspace's ``role.send`` buffer and receiving into ``role.recv``.
    Returns the received rows, a view of ``role.recv`` with ``src``'s row shape and dtype."""
    row_shape, dtype = tuple(src.shape[1:]), src.dtype
    src_bytes = _as_bytes(src)
    row_bytes = src_bytes.shape[1]
    if index is None:
        send = src_bytes
    else:
        send = ws.take(role + ".send", (index.numel(), row_bytes), torch.uint8)
        torch.index_select(src_bytes, 0, index, out=send)
    recv = ws.take(role + ".recv", (sum(recv_counts), row_bytes), torch.uint8)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts, group=group)
    return recv.view(-1).view(dtype).view((recv.shape[0],) + row_shape)


def baseline_dispatch(
    x: Payload,
    topk_idx: torch.Tensor,
    num_experts: int,
    topk_weights: Optional[torch.Tensor] = None,
    *,
    expert_alignment: int = 1,
    group: Optional[dist.ProcessGroup] = None,
    workspace: Optional[BaselineWorkspace] = None,
) -> tuple[Payload, torch.Tensor, Optional[torch.Tensor], list[int], BaselineHandle]:
    """Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle)``
    with the semantics of ``Buffer.dispatch`` (see moelink.reference.dispatch). With ``workspace``,
    ``recv_x``, ``recv_topk_idx`` and ``recv_topk_weights`` are views into it (module doc)."""
    group = group or dist.group.WORLD
    ws = workspace if workspace is not None else BaselineWorkspace()
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
    dest_of_row, permutation = pairs[:, 0], pairs[:, 1].contiguous()
    lo = (dest_of_row * per_rank).unsqueeze(1)
    rows_idx = idx[permutation]
    local = (rows_idx >= lo) & (rows_idx < lo + per_rank)
    send_idx = torch.where(local, rows_idx - lo, torch.full_like(rows_idx, -1))

    # 4. the payload (rows gathered straight into the send buffer) and the metadata
    parts = x if isinstance(x, tuple) else (x,)
    recv_parts = tuple(_exchange(p, permutation, send_counts, recv_counts, group, ws, f"dispatch.x{i}")
                       for i, p in enumerate(parts))
    recv_idx = _exchange(send_idx, None, send_counts, recv_counts, group, ws, "dispatch.idx")
    recv_weights = None
    if topk_weights is not None:
        w = topk_weights[permutation]
        recv_weights = _exchange(torch.where(local, w, torch.zeros_like(w)), None, send_counts, recv_counts,
                                 group, ws, "dispatch.weights")

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
    workspace: Optional[BaselineWorkspace] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns ``(combined_x, combined_topk_weights)`` with the semantics of ``Buffer.combine``:
    the unweighted float32 sum of every copy of a token (bias first, then the copies in source-rank
    order), rounded once to ``x.dtype``. With ``workspace``, ``combined_x`` is a view into it."""
    group = group or dist.group.WORLD
    ws = workspace if workspace is not None else BaselineWorkspace()
    hidden = x.shape[1]
    back = _exchange(x, None, handle.recv_counts, handle.send_counts, group, ws, "combine.x")
    combined = ws.take("combine.acc", (handle.num_tokens, hidden), torch.float32)
    combined.zero_()
    rows = back.shape[0]
    biases = [b for b in (bias if isinstance(bias, tuple) else (bias,)) if b is not None]
    longest = max([rows] + [handle.num_tokens] * bool(biases))
    if longest:
        # Rows are widened to float32 a chunk at a time in the staging buffer (an in-place add of a
        # bf16 tensor to a float32 one would allocate a float32 copy of the whole tensor).
        chunk = max(1, min(longest, _STAGING_BYTES // max(1, hidden * 4)))
        staging = ws.take("combine.staging", (chunk, hidden), torch.float32)
        for b in biases:
            for start in range(0, handle.num_tokens, chunk):
                n = min(chunk, handle.num_tokens - start)
                widened = staging[:n]
                widened.copy_(b[start:start + n])
                combined[start:start + n].add_(widened)
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            widened = staging[:n]
            widened.copy_(back[start:start + n])
            combined.index_add_(0, handle.permutation[start:start + n], widened)
    combined_weights = None
    if topk_weights is not None:
        back_w = _exchange(topk_weights.float(), None, handle.recv_counts, handle.send_counts, group, ws,
                           "combine.weights")
        combined_weights = torch.zeros(handle.num_tokens, topk_weights.shape[1], dtype=torch.float32)
        combined_weights.index_add_(0, handle.permutation, back_w)
    out = ws.take("combine.out", (handle.num_tokens, hidden), x.dtype)
    out.copy_(combined)
    return out, combined_weights

