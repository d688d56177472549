"""Intranode dispatch and combine (DeepEP V1 semantics), stated from a global view.

Inputs are lists indexed by rank (what every rank passes), outputs are lists indexed by rank
(what every rank gets back). Plain torch, no performance tricks; sums are exact in float64.

Dispatch. Rank r owns experts ``[r * E / R, (r + 1) * E / R)``. Token t of rank s goes to every
rank owning at least one of its top-k experts, once per rank however many of its experts live
there (``-1`` entries select nothing; a token selecting nothing goes nowhere).

- Receive order on every rank: by source rank, then token index. The kernels cut each source's
  tokens into channels that are contiguous token ranges in order, so this is also "source rank,
  channel, token", the order DeepEP documents.
- ``recv_topk_idx``: the token's top-k row with experts of the receiving rank as *local* ids
  (``expert - r * E / R``) and ``-1`` everywhere else; ``recv_topk_weights`` the same row with
  ``0`` where the index is ``-1``.
- ``num_recv_tokens_per_expert_list[e]``: (token, top-k slot) pairs received for local expert e,
  rounded up to a multiple of ``expert_alignment``.
- ``num_worst_tokens > 0`` (the form that skips the host wait): outputs have exactly that many
  rows; rows past the received ones have index ``-1`` and weight 0 (x rows: zero here, unspecified
  from kernels, so compare only the first ``num_recv_tokens``) and, as in DeepEP, the per-expert
  count list is empty because the host never learns the counts.
- An FP8 input ``(x_e4m3, scales)`` travels as-is: both tensors' rows are received.

Combine. Rank r passes one row per received token (same order as dispatch's output). Token t of
rank s gets the *unweighted* sum of the rows returned by every rank it went to, plus the optional
bias of rank s (a tensor, or a pair of tensors added both), ``[N, hidden]``. A token that went
nowhere gets the bias alone (or zeros). ``combined_topk_weights[t][k]`` is the sum over those ranks
of the weights they returned for slot k (DeepEP's intranode combine reduces ``topk_weights`` that
way: deep_ep/buffer.py ``combine`` and csrc/kernels/intranode.cu); passing dispatch's
``recv_topk_weights`` back therefore returns the original weights, 0 where the index was -1.

Precision decision: the kernels accumulate in float32 and round once to the output dtype. The
reference sums in float64 and also returns ``abs_sum`` (the sum of the magnitudes of the terms),
from which :func:`assert_combine_close` derives a rigorous per-element bound: output rounding
``u_out * |sum|`` plus float32 accumulation ``(n + 1) * 2**-24 * abs_sum``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import torch

from ..errors import InvalidArgument, InvalidShape, argument_error

__all__ = [
    "DispatchResult",
    "CombineResult",
    "intranode_dispatch",
    "intranode_combine",
    "combine_tolerance",
    "assert_combine_close",
]

Payload = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
Bias = Union[None, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


@dataclasses.dataclass
class DispatchResult:
    """What one rank receives. ``recv_src_rank`` / ``recv_src_idx`` say where each row came from
    (what the kernels keep in the handle); -1 on padding rows."""

    recv_x: Payload
    recv_topk_idx: Optional[torch.Tensor]  # [M, K] int64, local expert ids or -1
    recv_topk_weights: Optional[torch.Tensor]  # [M, K], 0 where recv_topk_idx is -1
    num_recv_tokens_per_expert_list: list[int]
    recv_src_rank: torch.Tensor  # [M] int64
    recv_src_idx: torch.Tensor  # [M] int64
    num_recv_tokens: int  # received rows (M without num_worst_tokens padding)


@dataclasses.dataclass
class CombineResult:
    """What one rank gets back from combine, in float64."""

    combined_x: torch.Tensor  # [N, hidden] float64
    combined_topk_weights: Optional[torch.Tensor]  # [N, K] float64
    abs_sum: torch.Tensor  # [N, hidden] float64: sum of |term| over every term of combined_x
    num_terms: torch.Tensor  # [N] int64: terms summed per token (copies + bias tensors)
    weights_abs_sum: Optional[torch.Tensor]  # [N, K] float64


def _rows(payload: Payload) -> int:
    return (payload[0] if isinstance(payload, tuple) else payload).shape[0]


def _check_lists(num_ranks: int, **lists) -> None:
    for name, value in lists.items():
        if value is not None and len(value) != num_ranks:
            raise argument_error(InvalidArgument, name, f"one entry per rank ({num_ranks})", f"{len(value)} entries")


def intranode_dispatch(
    x: Sequence[Payload],
    topk_idx: Sequence[torch.Tensor],
    num_experts: int,
    topk_weights: Optional[Sequence[torch.Tensor]] = None,
    *,
    expert_alignment: int = 1,
    num_worst_tokens: int = 0,
) -> list[DispatchResult]:
    """What every rank receives; ``x[s]`` is ``[N_s, hidden]`` (or an FP8 pair), ``topk_idx[s]``
    ``[N_s, K]`` expert ids or -1, ``topk_weights[s]`` ``[N_s, K]`` (optional)."""
    num_ranks = len(x)
    _check_lists(num_ranks, topk_idx=topk_idx, topk_weights=topk_weights)
    if num_ranks == 0 or num_experts <= 0 or num_experts % num_ranks:
        raise argument_error(InvalidArgument, "num_experts", f"a positive multiple of num_ranks = {num_ranks}", num_experts)
    if expert_alignment < 1:
        raise argument_error(InvalidArgument, "expert_alignment", "an int >= 1", expert_alignment)
    if num_worst_tokens < 0:
        raise argument_error(InvalidArgument, "num_worst_tokens", "an int >= 0", num_worst_tokens)
    per_rank = num_experts // num_ranks
    for s in range(num_ranks):
        idx = topk_idx[s]
        if idx.dim() != 2 or idx.shape[0] != _rows(x[s]):
            raise argument_error(InvalidShape, f"topk_idx[{s}]", f"[{_rows(x[s])}, num_topk]", tuple(idx.shape))
        if idx.numel() and (idx.min() < -1 or idx.max() >= num_experts):
            raise argument_error(InvalidArgument, f"topk_idx[{s}]", f"expert ids in [-1, {num_experts})",
                                 f"values in [{int(idx.min())}, {int(idx.max())}]")
        if topk_weights is not None and topk_weights[s].shape != idx.shape:
            raise argument_error(InvalidShape, f"topk_weights[{s}]", f"shape {tuple(idx.shape)}", tuple(topk_weights[s].shape))

    results = []
    for r in range(num_ranks):
        lo, hi = r * per_rank, (r + 1) * per_rank
        src_rank, src_idx, idx_rows, weight_rows, payload_rows = [], [], [], [], []
        for s in range(num_ranks):
            idx = topk_idx[s].long()
            local = (idx >= lo) & (idx < hi)
            tokens = torch.nonzero(local.any(dim=1)).flatten()  # ascending token order
            src_rank.append(torch.full((tokens.numel(),), s, dtype=torch.int64))
            src_idx.append(tokens)
            idx_rows.append(torch.where(local, idx - lo, torch.full_like(idx, -1))[tokens])
            if topk_weights is not None:
                w = topk_weights[s]
                weight_rows.append(torch.where(local, w, torch.zeros_like(w))[tokens])
            parts = x[s] if isinstance(x[s], tuple) else (x[s],)
            payload_rows.append(tuple(p[tokens] for p in parts))
        recv_idx = torch.cat(idx_rows)
        recv_payload = tuple(torch.cat([rows[i] for rows in payload_rows]) for i in range(len(payload_rows[0])))
        recv_weights = torch.cat(weight_rows) if topk_weights is not None else None
        recv_src_rank, recv_src_idx = torch.cat(src_rank), torch.cat(src_idx)
        num_recv = recv_idx.shape[0]

        counts = torch.bincount(recv_idx[recv_idx >= 0], minlength=per_rank).tolist()
        counts = [(c + expert_alignment - 1) // expert_alignment * expert_alignment for c in counts]
        if num_worst_tokens:
            if num_worst_tokens < num_recv:
                raise argument_error(InvalidArgument, "num_worst_tokens", f">= the {num_recv} tokens rank {r} receives",
                                     num_worst_tokens)
            pad = num_worst_tokens - num_recv
            recv_idx = torch.cat([recv_idx, recv_idx.new_full((pad, recv_idx.shape[1]), -1)])
            if recv_weights is not None:
                recv_weights = torch.cat([recv_weights, recv_weights.new_zeros((pad, recv_weights.shape[1]))])
            recv_payload = tuple(torch.cat([p, p.new_zeros((pad,) + tuple(p.shape[1:]))]) for p in recv_payload)
            recv_src_rank = torch.cat([recv_src_rank, recv_src_rank.new_full((pad,), -1)])
            recv_src_idx = torch.cat([recv_src_idx, recv_src_idx.new_full((pad,), -1)])
            counts = []
        results.append(DispatchResult(
            recv_x=recv_payload if isinstance(x[0], tuple) else recv_payload[0],
            recv_topk_idx=recv_idx, recv_topk_weights=recv_weights, num_recv_tokens_per_expert_list=counts,
            recv_src_rank=recv_src_rank, recv_src_idx=recv_src_idx, num_recv_tokens=num_recv,
        ))
    return results


def intranode_combine(
    x: Sequence[torch.Tensor],
    dispatched: Sequence[DispatchResult],
    num_tokens: Sequence[int],
    topk_weights: Optional[Sequence[torch.Tensor]] = None,
    bias: Optional[Sequence[Bias]] = None,
) -> list[CombineResult]:
    """What every rank gets back. ``x[r]``: one row per row of ``dispatched[r]`` (padding rows of
    ``num_worst_tokens`` are ignored); ``num_tokens[s]``: tokens rank s dispatched;
    ``topk_weights[r]``: ``[rows, K]`` weights rank r returns; ``bias[s]``: None, a tensor or a
    pair of tensors ``[num_tokens[s], hidden]`` for rank s."""
    num_ranks = len(x)
    _check_lists(num_ranks, dispatched=dispatched, num_tokens=num_tokens, topk_weights=topk_weights, bias=bias)
    hidden = x[0].shape[1]
    num_topk = topk_weights[0].shape[1] if topk_weights is not None else 0
    out = [torch.zeros(n, hidden, dtype=torch.float64) for n in num_tokens]
    abs_sum = [torch.zeros(n, hidden, dtype=torch.float64) for n in num_tokens]
    terms = [torch.zeros(n, dtype=torch.int64) for n in num_tokens]
    w_out = [torch.zeros(n, num_topk, dtype=torch.float64) for n in num_tokens] if topk_weights is not None else None
    w_abs = [torch.zeros(n, num_topk, dtype=torch.float64) for n in num_tokens] if topk_weights is not None else None
    for r in range(num_ranks):
        d = dispatched[r]
        m = d.num_recv_tokens
        if x[r].shape[0] < m or x[r].shape[1] != hidden:
            raise argument_error(InvalidShape, f"x[{r}]", f"[>= {m}, {hidden}]", tuple(x[r].shape))
        rows = x[r][:m].double()
        for s in range(num_ranks):
            sel = (d.recv_src_rank[:m] == s).nonzero().flatten()
            tokens = d.recv_src_idx[sel]
            out[s].index_add_(0, tokens, rows[sel])
            abs_sum[s].index_add_(0, tokens, rows[sel].abs())
            terms[s].index_add_(0, tokens, torch.ones_like(tokens))
            if topk_weights is not None:
                w = topk_weights[r][:m].double()[sel]
                w_out[s].index_add_(0, tokens, w)
                w_abs[s].index_add_(0, tokens, w.abs())
    for s in range(num_ranks):
        entry = bias[s] if bias is not None else None
        for b in (entry if isinstance(entry, tuple) else (entry,)):
            if b is None:
                continue
            if tuple(b.shape) != (num_tokens[s], hidden):
                raise argument_error(InvalidShape, f"bias[{s}]", f"[{num_tokens[s]}, {hidden}]", tuple(b.shape))
            out[s] += b.double()
            abs_sum[s] += b.double().abs()
            terms[s] += 1
    return [
        CombineResult(out[s], w_out[s] if w_out else None, abs_sum[s], terms[s], w_abs[s] if w_abs else None)
        for s in range(num_ranks)
    ]


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def combine_tolerance(expected: CombineResult, out_dtype: torch.dtype, partials: int = 1) -> torch.Tensor:
    """Per-element bound on |kernel - reference| for combined_x: rounding the float32 sum to
    ``out_dtype`` plus float32 accumulation of ``num_terms`` terms (a small absolute floor covers
    subnormal outputs).

    ``partials > 1`` (the internode combine): each node's copies are summed in float32 and rounded
    once to ``out_dtype`` before the source adds the node partials, so each partial p carries up
    to ``u * |p|`` more; since the |p| of a token's partials sum to at most its ``abs_sum``, the
    bound grows by ``u * abs_sum`` (u the unit roundoff of ``out_dtype``)."""
    n = expected.num_terms.double().unsqueeze(1)
    bound = _unit_roundoff(out_dtype) * expected.combined_x.abs() * (1 + 2**-20)
    bound += (n + 1) * 2**-24 * expected.abs_sum
    if partials > 1:
        bound += _unit_roundoff(out_dtype) * (1 + 2**-20) * expected.abs_sum
    return bound + torch.finfo(out_dtype).tiny


def assert_combine_close(combined_x: torch.Tensor, combined_topk_weights: Optional[torch.Tensor],
                         expected: CombineResult, *, context: str = "", partials: int = 1) -> None:
    """Raises AssertionError if a kernel's combine output is outside the bound of
    :func:`combine_tolerance` (and the float32 weight sums outside theirs); ``partials``: nodes
    whose rounded partial sums the source adds (1 for the intranode combine)."""
    where = f" ({context})" if context else ""
    actual = combined_x.double()
    if actual.shape != expected.combined_x.shape:
        raise AssertionError(f"combined_x shape {tuple(actual.shape)} != {tuple(expected.combined_x.shape)}{where}")
    excess = (actual - expected.combined_x).abs() - combine_tolerance(expected, combined_x.dtype, partials)
    if excess.numel() and excess.max() > 0:
        t, h = divmod(int(excess.argmax()), actual.shape[1])
        raise AssertionError(f"combined_x[{t}, {h}] = {actual[t, h].item()} but reference {expected.combined_x[t, h].item()} "
                             f"(bound exceeded by {excess.max().item():.3g}){where}")
    if (combined_topk_weights is None) != (expected.combined_topk_weights is None):
        raise AssertionError(f"combined_topk_weights presence differs from the reference{where}")
    if combined_topk_weights is not None:
        w = combined_topk_weights.double()
        bound = _unit_roundoff(combined_topk_weights.dtype) * expected.combined_topk_weights.abs()
        bound += (expected.num_terms.double().unsqueeze(1) + 1) * 2**-24 * expected.weights_abs_sum + 1e-38
        if w.shape != expected.combined_topk_weights.shape or ((w - expected.combined_topk_weights).abs() > bound).any():
            raise AssertionError(f"combined_topk_weights differ from the reference beyond float32 rounding{where}")
