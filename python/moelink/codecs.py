"""Payload codecs: FP8 (E4M3 / E5M2 with per-token, per-128-channel scales, float32 or UE8M0) and
LogFMT-nBit (n = 8, 9, 10), run as kernels: on the host target for CPU tensors, on the GPU for
CUDA tensors.

The semantics, bit for bit, are those of :mod:`moelink.reference.codecs` (which also documents
every rule: NaN/inf, all-zero groups, subnormals, saturation, partial last groups); the wire
layouts and an accuracy study are in ``docs/codecs.md``.

Inputs are ``[num_tokens, hidden]`` tensors of bfloat16 or float32 with unit stride along
``hidden`` (rows may be strided). ``hidden`` can be any positive size: the last 128-channel group
may be partial.
"""

from __future__ import annotations

import torch

from . import _backend, _validate
from .errors import InvalidArgument, InvalidDevice, InvalidShape, argument_error
from .reference.codecs import FP8_FORMATS, LOGFMT_BITS, fp8_scale_shape, logfmt_layout

__all__ = [
    "fp8_quantize",
    "fp8_dequantize",
    "logfmt_encode",
    "logfmt_decode",
    "logfmt_row_bytes",
]

# Enum values of csrc/runtime/ops_codecs.h.
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
_FP8_CODE = {"e4m3": 0, "e5m2": 1}
_SCALE_CODE = {"float32": 0, "ue8m0": 1}
_FP8_DTYPES = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}


def _rows(name: str, t: torch.Tensor, dtypes, layout: str = "[num_tokens, hidden]") -> None:
    _validate.tensor(name, t)
    _validate.dtype(name, t, dtypes)
    _validate.ndim(name, t, 2, layout)
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise argument_error(InvalidShape, name, "unit stride along the last dimension", f"strides {tuple(t.stride())}")
    if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
        raise argument_error(InvalidShape, name, "non-overlapping rows", f"strides {tuple(t.stride())}")


def _hidden(name: str, hidden: int) -> None:
    if hidden < 1:
        raise argument_error(InvalidShape, f"{name}.shape[1] (hidden)", ">= 1", hidden)


def _same_device(name: str, t: torch.Tensor, other_name: str, other: torch.Tensor) -> None:
    if t.device != other.device:
        raise argument_error(InvalidDevice, name, f"a tensor on {other_name}'s device {other.device}", f"device {t.device}")


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _check_out_dtype(out_dtype) -> None:
    if out_dtype not in _DTYPE_CODE:
        raise argument_error(InvalidArgument, "out_dtype", "torch.bfloat16 or torch.float32", out_dtype)


def fp8_quantize(x: torch.Tensor, fmt: str = "e4m3", scale_format: str = "float32", *, rank: int = -1):
    """Quantizes ``x`` to FP8 with one scale per token and group of 128 channels.

    Returns ``(q, scales)``: ``q`` is ``[num_tokens, hidden]`` ``torch.float8_e4m3fn`` (``fmt="e4m3"``,
    max 448) or ``torch.float8_e5m2`` (``"e5m2"``, max 57344). With ``scale_format="float32"``,
    ``scales`` is float32 ``[num_tokens, ceil(hidden / 128)]`` holding ``amax / fp8_max`` (decode:
    ``q * scale``); with ``"ue8m0"`` the scales are rounded up to powers of two and ``scales`` is int32
    ``[num_tokens, ceil(hidden / 512)]``, four biased exponent bytes per word (byte i of word j is
    group 4j + i, little-endian), the packing DeepGEMM-style consumers read. ``rank`` only labels
    error messages.
    """
    _rows("x", x, (torch.bfloat16, torch.float32))
    if fmt not in _FP8_CODE:
        raise argument_error(InvalidArgument, "fmt", "'e4m3' or 'e5m2'", repr(fmt))
    if scale_format not in _SCALE_CODE:
        raise argument_error(InvalidArgument, "scale_format", "'float32' or 'ue8m0'", repr(scale_format))
    num_tokens, hidden = x.shape
    _hidden("x", hidden)
    module = _backend.for_device("x", x.device)
    q = torch.empty((num_tokens, hidden), dtype=FP8_FORMATS[fmt].torch_dtype, device=x.device)
    scale_dtype = torch.float32 if scale_format == "float32" else torch.int32
    scales = torch.empty(fp8_scale_shape(num_tokens, hidden, scale_format), dtype=scale_dtype, device=x.device)
    if num_tokens == 0:
        return q, scales
    module.fp8_quantize(
        x.data_ptr(), _DTYPE_CODE[x.dtype], _row_stride(x), num_tokens, hidden, _FP8_CODE[fmt],
        _SCALE_CODE[scale_format], q.data_ptr(), hidden, scales.data_ptr(), scales.shape[1],
        stream=_backend.stream_handle(x.device), rank=rank,
    )
    return q, scales


def fp8_dequantize(q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                   rank: int = -1) -> torch.Tensor:
    """Inverse of :func:`fp8_quantize`: ``q * scale`` per group, in ``out_dtype`` (bf16 or float32).
    The FP8 format comes from ``q.dtype``, the scale format from ``scales.dtype`` (float32, or int32
    for packed UE8M0). Finite codes saturate to ``out_dtype``'s largest value; NaN stays NaN."""
    _rows("q", q, tuple(_FP8_DTYPES))
    _validate.tensor("scales", scales)
    _validate.dtype("scales", scales, (torch.float32, torch.int32))
    _check_out_dtype(out_dtype)
    num_tokens, hidden = q.shape
    _hidden("q", hidden)
    scale_format = "float32" if scales.dtype == torch.float32 else "ue8m0"
    expected = fp8_scale_shape(num_tokens, hidden, scale_format)
    if tuple(scales.shape) != expected:
        raise argument_error(InvalidShape, "scales", f"shape {expected} ({scale_format} scales of q {tuple(q.shape)})",
                             f"shape {tuple(scales.shape)}")
    _rows("scales", scales, (torch.float32, torch.int32), "[num_tokens, groups]")
    _same_device("scales", scales, "q", q)
    module = _backend.for_device("q", q.device)
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=q.device)
    if num_tokens == 0:
        return out
    module.fp8_dequantize(
        q.data_ptr(), _row_stride(q), _FP8_CODE[_FP8_DTYPES[q.dtype]], _SCALE_CODE[scale_format],
        scales.data_ptr(), _row_stride(scales), num_tokens, hidden, out.data_ptr(), _DTYPE_CODE[out_dtype], hidden,
        stream=_backend.stream_handle(q.device), rank=rank,
    )
    return out


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or bits not in LOGFMT_BITS:
        raise argument_error(InvalidArgument, "bits", "8, 9 or 10", bits)


def logfmt_row_bytes(hidden: int, bits: int) -> int:
    """Bytes of one encoded row: 8 bytes of header per 128-channel tile (padded to 16), then
    ``bits`` bits per channel packed densely (16 * bits bytes per full tile), padded to 16."""
    _check_bits(bits)
    _validate.integer("hidden", hidden, minimum=1)
    return logfmt_layout(hidden, bits).row_bytes


def logfmt_encode(x: torch.Tensor, bits: int = 8, *, rank: int = -1) -> torch.Tensor:
    """Encodes ``x`` as LogFMT-``bits``: returns uint8 ``[num_tokens, logfmt_row_bytes(hidden, bits)]``,
    every row 16-byte aligned and fully written (padding is zero)."""
    _rows("x", x, (torch.bfloat16, torch.float32))
    _check_bits(bits)
    num_tokens, hidden = x.shape
    _hidden("x", hidden)
    module = _backend.for_device("x", x.device)
    row_bytes = logfmt_layout(hidden, bits).row_bytes
    packed = torch.empty((num_tokens, row_bytes), dtype=torch.uint8, device=x.device)
    if num_tokens == 0:
        return packed
    module.logfmt_encode(
        x.data_ptr(), _DTYPE_CODE[x.dtype], _row_stride(x), num_tokens, hidden, bits, packed.data_ptr(), row_bytes,
        stream=_backend.stream_handle(x.device), rank=rank,
    )
    return packed


def logfmt_decode(packed: torch.Tensor, hidden: int, bits: int = 8, out_dtype: torch.dtype = torch.bfloat16, *,
                  rank: int = -1) -> torch.Tensor:
    """Decodes rows written by :func:`logfmt_encode` into ``[num_tokens, hidden]`` ``out_dtype``.
    Non-finite inputs decode to NaN; finite codes saturate to ``out_dtype``'s largest value."""
    _check_bits(bits)
    _validate.integer("hidden", hidden, minimum=1)
    _check_out_dtype(out_dtype)
    row_bytes = logfmt_layout(hidden, bits).row_bytes
    _rows("packed", packed, (torch.uint8,), f"[num_tokens, {row_bytes}]")
    if packed.shape[1] != row_bytes:
        raise argument_error(InvalidShape, "packed", f"{row_bytes} bytes per row (hidden {hidden}, bits {bits})",
                             f"shape {tuple(packed.shape)}")
    num_tokens = packed.shape[0]
    module = _backend.for_device("packed", packed.device)
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=packed.device)
    if num_tokens == 0:
        return out
    stride = _row_stride(packed)
    if packed.data_ptr() % 16 or stride % 16:
        raise argument_error(InvalidShape, "packed", "16-byte aligned rows (a row stride that is a multiple of 16)",
                             f"address {packed.data_ptr():#x}, row stride {stride}")
    module.logfmt_decode(
        packed.data_ptr(), stride, num_tokens, hidden, bits, out.data_ptr(), _DTYPE_CODE[out_dtype], hidden,
        stream=_backend.stream_handle(packed.device), rank=rank,
    )
    return out


# Any __dlpack__ array in (NumPy on the host), arrays of the caller's library out; NumPy lacks
# bfloat16 and float8, whose raw bits (uint16 / uint8) stand for them (moelink/_interop.py).
from ._interop import wrap_module_functions  # noqa: E402

wrap_module_functions(globals(), ("fp8_quantize", "fp8_dequantize", "logfmt_encode", "logfmt_decode"),
                      fp8_quantize=dict(bits={"x": torch.bfloat16}), logfmt_encode=dict(bits={"x": torch.bfloat16}),
                      fp8_dequantize=dict(bits={"q": torch.float8_e4m3fn}))
