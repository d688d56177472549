"""Argument checks of the low-latency calls (``_low_latency``): every bad input gets a typed error
naming the argument, the expected and the received value (errors.argument_error)."""

from __future__ import annotations

from typing import Optional

import torch

from . import _validate
from .errors import InvalidArgument, InvalidShape, InvalidType, argument_error

MAX_TOPK = 32  # runtime/ops_low_latency.h: kLowLatencyMaxTopk (checked equal in _low_latency)


def _check_hidden(hidden: int) -> None:
    if hidden < 128 or hidden % 128:
        raise argument_error(InvalidShape, "hidden", "a positive multiple of 128", hidden)


def _check_experts(num_experts: int, num_ranks: int) -> None:
    if num_experts < num_ranks or num_experts % num_ranks:
        raise argument_error(InvalidArgument, "num_experts", f"a positive multiple of the {num_ranks} ranks", num_experts)


def _tensor(name: str, t, dtypes, shape: tuple, layout: str, rows: bool = False) -> torch.Tensor:
    """A contiguous tensor of ``shape`` (``rows``: payload rows, 16-byte aligned); which device it
    must be on is the Buffer's target's to check (LowLatencyState.check_devices)."""
    return _validate.shaped(name, t, dtypes, shape, layout, rows=rows)


def _flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise argument_error(InvalidType, name, "a bool", type(value).__name__)
    return value


def _topk(name: str, topk_idx, num_tokens: Optional[int], num_experts: int) -> torch.Tensor:
    """int64 [N, K] ids in [-1, E), K in [1, 32], no expert twice in a row (values checked for
    CPU tensors); int32 is widened."""
    _validate.tensor(name, topk_idx)
    _validate.ndim(name, topk_idx, 2, "[num_tokens, num_topk]")
    rows = topk_idx.shape[0] if num_tokens is None else num_tokens
    _tensor(name, topk_idx, (torch.int64, torch.int32), (rows, topk_idx.shape[1]), "[num_tokens, num_topk]")
    k = topk_idx.shape[1]
    if not 1 <= k <= MAX_TOPK:
        raise argument_error(InvalidShape, f"{name}.shape[1] (top-k)", f"in [1, {MAX_TOPK}]", k)
    topk_idx = topk_idx.to(torch.int64)
    # The value checks read the ids on the host: skipped for CUDA tensors (each a device sync), as
    # in the normal mode; the kernels check the same and fail naming the id (docs/gpu-transport.md §3).
    if topk_idx.numel() and not topk_idx.is_cuda:
        low, high = int(topk_idx.min()), int(topk_idx.max())
        if low < -1 or high >= num_experts:
            raise argument_error(InvalidArgument, name, f"expert ids in [-1, {num_experts})", f"min {low}, max {high}")
        ordered = topk_idx.sort(dim=1).values
        twice = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
        if bool(twice.any()):
            row = int(twice.any(dim=1).nonzero()[0])
            raise argument_error(InvalidArgument, name, "distinct expert ids in every row (as torch.topk gives)",
                                 f"row {row} = {topk_idx[row].tolist()}")
    return topk_idx


def _payload(payload, use_fp8, round_scale, use_ue8m0) -> str:
    use_fp8, round_scale, use_ue8m0 = (_flag("use_fp8", use_fp8), _flag("round_scale", round_scale),
                                       _flag("use_ue8m0", use_ue8m0))
    names = ("bf16", "fp8", "mxfp8", "nvfp4", "logfmt8", "logfmt9", "logfmt10")
    if payload is None:
        payload = "fp8" if use_fp8 else "bf16"
    elif payload not in names:
        raise argument_error(InvalidArgument, "payload", "None or one of " + ", ".join(names), repr(payload))
    if (round_scale or use_ue8m0) and payload != "fp8":
        raise argument_error(InvalidArgument, "round_scale / use_ue8m0", f"False with payload {payload!r} (FP8 only)",
                             f"round_scale={round_scale}, use_ue8m0={use_ue8m0}")
    if use_ue8m0 and not round_scale:
        raise argument_error(InvalidArgument, "use_ue8m0", "True only with round_scale=True (UE8M0 scales are powers "
                             "of two, as in DeepEP)", "round_scale=False")
    if payload == "fp8":
        return "fp8_ue8m0" if use_ue8m0 else ("fp8_pow2" if round_scale else "fp8")
    return payload


def _stats(name: str, t, dtype: torch.dtype, length: int) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return _tensor(name, t, (dtype,), (length,), f"[{length}] {dtype}")


def _global_scale(value, x: torch.Tensor) -> torch.Tensor:
    from . import codecs
    if value is None:
        return codecs.nvfp4_global_scale(x) if x.shape[0] else torch.ones(1, dtype=torch.float32, device=x.device)
    return codecs._global_scale(value, x.device).contiguous()  # range-checked there
