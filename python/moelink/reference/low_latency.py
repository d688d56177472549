"""What the low-latency dispatch and combine return (``Buffer.low_latency_dispatch`` /
``low_latency_combine``), in plain torch, for every payload format.

Dispatch. Rank ``r`` hosts experts ``[r * EL, (r + 1) * EL)``. Local expert ``e`` of rank ``r``
receives one row per (source rank ``s``, token ``t``, top-k slot ``k``) with ``topk_idx[s][t][k]
== r * EL + e``: rows ``[0, recv_count[e])`` of ``recv_x[e]``, grouped by source rank in rank
order; inside a source's group the order is unspecified (the kernels claim slots with atomics),
so :func:`low_latency_dispatch` lists them by token index and tests compare sets. Each row is the
payload format's encoding of ``x[s][t]`` (:func:`encode_rows`, bit for bit
``moelink.reference.codecs``), LogFMT rows decoded back to bf16.

Combine. ``combined[t] = sum over k with topk_idx[t][k] >= 0 of topk_weights[t][k] *
decode(encode(y[t][k]))``, in float32, k in order, rounded once to bf16, where ``y[t][k]`` is the
bf16 row expert ``topk_idx[t][k]`` returned for (t, k) and encode/decode is bf16 (identity) or
LogFMT-n.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch

from . import codecs

__all__ = ["PAYLOADS", "encode_rows", "dequantize_rows", "LowLatencyDispatchResult", "low_latency_dispatch",
           "low_latency_combine", "combine_encode_decode"]

PAYLOADS = ("bf16", "fp8", "fp8_pow2", "fp8_ue8m0", "mxfp8", "nvfp4", "logfmt8", "logfmt9", "logfmt10")


def encode_rows(x: torch.Tensor, payload: str, global_scale=None) -> Tuple[torch.Tensor, ...]:
    """The rows a receiver gets for the bf16 rows ``x`` [N, H] in ``payload``:

    - ``bf16``: ``(x,)``; ``logfmt<n>``: ``(decode(encode(x)),)`` in bf16;
    - ``fp8``: ``(codes e4m3 [N, H], float32 scales [N, H/128])`` (amax / 448);
    - ``fp8_pow2`` (``round_scale``): ``(codes, float32 power-of-two scales [N, H/128])``;
    - ``fp8_ue8m0``: ``(codes, int32 packed UE8M0 [N, ceil(H/512)])``;
    - ``mxfp8``: ``(codes, uint8 scales [N, H/32])`` (the OCP floor rule);
    - ``nvfp4``: ``(packed uint8 [N, H/2], e4m3 scales [N, H/16], float32 g [N])`` with the
      rank's tensor scale ``global_scale`` (default: computed from ``x``).
    """
    hidden = x.shape[1]
    if payload == "bf16":
        return (x.to(torch.bfloat16),)
    if payload.startswith("logfmt"):
        bits = int(payload[len("logfmt"):])
        return (codecs.logfmt_decode(codecs.logfmt_encode(x, bits), hidden, bits, torch.bfloat16),)
    if payload == "fp8":
        return codecs.fp8_quantize(x, "e4m3", "float32")
    if payload in ("fp8_pow2", "fp8_ue8m0"):
        q, packed = codecs.fp8_quantize(x, "e4m3", "ue8m0")
        if payload == "fp8_ue8m0":
            return q, packed
        exponents = codecs.fp8.ue8m0_unpack(packed, hidden // 128)
        return q, torch.pow(2.0, (exponents - 127).double()).float()
    if payload == "mxfp8":
        return codecs.mxfp8_quantize(x, "floor")
    if payload == "nvfp4":
        packed, scales, g = codecs.nvfp4_quantize(x, global_scale)
        return packed, scales, g.expand(x.shape[0]).contiguous()
    raise ValueError(f"unknown payload {payload!r}")


def dequantize_rows(rows: Sequence[torch.Tensor], payload: str, hidden: int) -> torch.Tensor:
    """bf16 values of rows in the form :func:`encode_rows` returns (what an expert computes on)."""
    if payload == "bf16" or payload.startswith("logfmt"):
        return rows[0].to(torch.bfloat16)
    if payload == "fp8":
        return codecs.fp8_dequantize(rows[0], rows[1])
    if payload == "fp8_pow2":
        return (codecs.fp8_code_to_float(rows[0].view(torch.uint8), "e4m3").view(-1, hidden // 128, 128)
                * rows[1].unsqueeze(-1)).reshape(-1, hidden).to(torch.bfloat16)
    if payload == "fp8_ue8m0":
        return codecs.fp8_dequantize(rows[0], rows[1])
    if payload == "mxfp8":
        return codecs.mxfp8_dequantize(rows[0], rows[1])
    if payload == "nvfp4":
        out = [codecs.nvfp4_dequantize(rows[0][i:i + 1], rows[1][i:i + 1], rows[2][i:i + 1], hidden)
               for i in range(rows[0].shape[0])]
        return torch.cat(out) if out else torch.empty(0, hidden, dtype=torch.bfloat16)
    raise ValueError(f"unknown payload {payload!r}")


@dataclasses.dataclass
class LowLatencyDispatchResult:
    """One rank's expected receive side: per local expert, its (source, token, k) entries by
    (source, token), and the encoded rows in that order (a tuple like :func:`encode_rows`')."""

    recv_count: List[int]
    entries: List[List[Tuple[int, int, int]]]
    rows: List[Tuple[torch.Tensor, ...]]


def low_latency_dispatch(xs: Sequence[torch.Tensor], topk_idx: Sequence[torch.Tensor], num_experts: int,
                         payload: str = "bf16", global_scales: Optional[Sequence] = None
                         ) -> List[LowLatencyDispatchResult]:
    """Every rank's receive side for the rows ``xs[s]`` routed by ``topk_idx[s]`` (one per rank)."""
    ranks = len(xs)
    per_rank = num_experts // ranks
    encoded = [encode_rows(x, payload, None if global_scales is None else global_scales[s]) if x.shape[0] else None
               for s, x in enumerate(xs)]
    results = []
    for r in range(ranks):
        entries, rows = [], []
        for e in range(per_rank):
            expert = r * per_rank + e
            mine = [(s, int(t), int(k)) for s in range(ranks)
                    for t, k in (topk_idx[s] == expert).nonzero().tolist()]
            mine.sort()
            entries.append(mine)
            if not mine:
                rows.append(tuple(part[:0] for part in encoded[0]) if encoded[0] is not None else ())
                continue
            parts = []
            for i in range(len(next(enc for enc in encoded if enc is not None))):
                parts.append(torch.stack([encoded[s][i][t] for s, t, _ in mine]))
            rows.append(tuple(parts))
        results.append(LowLatencyDispatchResult([len(m) for m in entries], entries, rows))
    return results


def combine_encode_decode(rows: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """float32 values of bf16 rows as the combine receiver decodes them (LogFMT-``bits`` or bf16)."""
    if bits is None:
        return rows.float()
    flat = rows.reshape(-1, rows.shape[-1])
    if flat.shape[0] == 0:
        return flat.float().reshape(rows.shape)
    return codecs.logfmt_decode(codecs.logfmt_encode(flat, bits), flat.shape[1], bits, torch.float32).reshape(rows.shape)


def low_latency_combine(expert_rows: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        logfmt_bits: Optional[int] = None) -> torch.Tensor:
    """``expert_rows`` [N, K, H] bf16: the row returned for (t, k) (ignored where topk_idx is -1).
    Returns the bf16 ``[N, H]`` combine of one source rank."""
    values = combine_encode_decode(expert_rows, logfmt_bits)
    out = torch.zeros(values.shape[0], values.shape[2], dtype=torch.float32)
    for k in range(topk_idx.shape[1]):
        valid = (topk_idx[:, k] >= 0).unsqueeze(1)
        term = topk_weights[:, k:k + 1].float() * values[:, k]
        out = torch.where(valid, out + term, out)
    return out.to(torch.bfloat16)
