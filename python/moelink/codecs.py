"""Payload codecs: FP8 (E4M3 / E5M2 with per-token, per-128-channel scales, float32 or UE8M0),
MXFP8 (E4M3 + one UE8M0 scale per 32 channels, OCP MX v1.0), NVFP4 (E2M1 + one E4M3 scale per 16
channels + a float32 per-tensor scale) and LogFMT-nBit (n = 8, 9, 10), run as kernels: on the
host target for CPU tensors, on the GPU for CUDA tensors.

The semantics, bit for bit, are those of :mod:`moelink.reference.codecs` (which also documents
every rule: NaN/inf, all-zero groups, subnormals, saturation, partial last groups); the wire
layouts and an accuracy study are in ``docs/codecs.md``.

Inputs are ``[num_tokens, hidden]`` tensors of bfloat16 or float32 with unit stride along
``hidden`` (rows may be strided). ``hidden`` can be any positive size: the last group or block
may be partial.

Every function takes ``split="auto"`` (keyword): how a kernel shares a row's 128-channel tiles
among a warp's lanes -- ``"auto"`` as the target suggests (whole tiles per lane on the host, one
tile per warp on the GPU), ``"warp"`` always one tile per warp through the warp-collective device
functions the GPU uses. Both give identical bits; ``"warp"`` exists so that the host tests the
GPU's form (it is slower on the host).
"""

from __future__ import annotations

import torch

from . import _backend, _validate
from .errors import InvalidArgument, InvalidDevice, InvalidShape, argument_error
from .reference.codecs import (FP8_FORMATS, LOGFMT_BITS, MXFP8_SCALE_MODES, check_global_scale, fp8_scale_shape,
                               logfmt_layout, mxfp8_num_blocks, nvfp4_num_blocks, nvfp4_row_bytes)
from .reference.codecs.nvfp4 import NVFP4_GLOBAL_NUMERATOR, NVFP4_GLOBAL_SCALE_RANGE

__all__ = [
    "fp8_quantize",
    "fp8_dequantize",
    "logfmt_encode",
    "logfmt_decode",
    "logfmt_row_bytes",
    "mxfp8_quantize",
    "mxfp8_dequantize",
    "nvfp4_quantize",
    "nvfp4_dequantize",
    "nvfp4_global_scale",
]

# Enum values of csrc/runtime/ops_codecs.h.
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
_FP8_CODE = {"e4m3": 0, "e5m2": 1}
_SCALE_CODE = {"float32": 0, "ue8m0": 1}
_FP8_DTYPES = {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}
_SPLIT_CODE = {"auto": 0, "warp": 1}
_MXFP8_MODE_CODE = {"floor": 0, "rceil": 1}


def _member(value, allowed) -> bool:
    """``value in allowed`` for any value (an unhashable or array-like one is simply not in it)."""
    try:
        return isinstance(value, (str, int, torch.dtype)) and value in allowed
    except TypeError:
        return False


def _split(split) -> int:
    if not _member(split, _SPLIT_CODE):
        raise argument_error(InvalidArgument, "split", "'auto' or 'warp'", repr(split))
    return _SPLIT_CODE[split]


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
    if not _member(out_dtype, _DTYPE_CODE):
        raise argument_error(InvalidArgument, "out_dtype", "torch.bfloat16 or torch.float32", out_dtype)


def fp8_quantize(x: torch.Tensor, fmt: str = "e4m3", scale_format: str = "float32", *, rank: int = -1,
                 split: str = "auto"):
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
    if not _member(fmt, _FP8_CODE):
        raise argument_error(InvalidArgument, "fmt", "'e4m3' or 'e5m2'", repr(fmt))
    if not _member(scale_format, _SCALE_CODE):
        raise argument_error(InvalidArgument, "scale_format", "'float32' or 'ue8m0'", repr(scale_format))
    num_tokens, hidden = x.shape
    _hidden("x", hidden)
    split_code = _split(split)
    module = _backend.for_device("x", x.device)
    q = torch.empty((num_tokens, hidden), dtype=FP8_FORMATS[fmt].torch_dtype, device=x.device)
    scale_dtype = torch.float32 if scale_format == "float32" else torch.int32
    scales = torch.empty(fp8_scale_shape(num_tokens, hidden, scale_format), dtype=scale_dtype, device=x.device)
    if num_tokens == 0:
        return q, scales
    module.fp8_quantize(
        x.data_ptr(), _DTYPE_CODE[x.dtype], _row_stride(x), num_tokens, hidden, _FP8_CODE[fmt],
        _SCALE_CODE[scale_format], q.data_ptr(), hidden, scales.data_ptr(), scales.shape[1], split_code,
        stream=_backend.stream_handle(x.device), rank=rank,
    )
    return q, scales


def fp8_dequantize(q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                   rank: int = -1, split: str = "auto") -> torch.Tensor:
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
    split_code = _split(split)
    module = _backend.for_device("q", q.device)
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=q.device)
    if num_tokens == 0:
        return out
    module.fp8_dequantize(
        q.data_ptr(), _row_stride(q), _FP8_CODE[_FP8_DTYPES[q.dtype]], _SCALE_CODE[scale_format],
        scales.data_ptr(), _row_stride(scales), num_tokens, hidden, out.data_ptr(), _DTYPE_CODE[out_dtype], hidden,
        split_code,
        stream=_backend.stream_handle(q.device), rank=rank,
    )
    return out


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in LOGFMT_BITS:
        raise argument_error(InvalidArgument, "bits", "8, 9 or 10", bits)


def logfmt_row_bytes(hidden: int, bits: int) -> int:
    """Bytes of one encoded row: 8 bytes of header per 128-channel tile (padded to 16), then
    ``bits`` bits per channel packed densely (16 * bits bytes per full tile), padded to 16."""
    _check_bits(bits)
    _validate.integer("hidden", hidden, minimum=1)
    return logfmt_layout(hidden, bits).row_bytes


def logfmt_encode(x: torch.Tensor, bits: int = 8, *, rank: int = -1, split: str = "auto") -> torch.Tensor:
    """Encodes ``x`` as LogFMT-``bits``: returns uint8 ``[num_tokens, logfmt_row_bytes(hidden, bits)]``,
    every row 16-byte aligned and fully written (padding is zero)."""
    _rows("x", x, (torch.bfloat16, torch.float32))
    _check_bits(bits)
    num_tokens, hidden = x.shape
    _hidden("x", hidden)
    split_code = _split(split)
    module = _backend.for_device("x", x.device)
    row_bytes = logfmt_layout(hidden, bits).row_bytes
    packed = torch.empty((num_tokens, row_bytes), dtype=torch.uint8, device=x.device)
    if num_tokens == 0:
        return packed
    module.logfmt_encode(
        x.data_ptr(), _DTYPE_CODE[x.dtype], _row_stride(x), num_tokens, hidden, bits, packed.data_ptr(), row_bytes,
        split_code, stream=_backend.stream_handle(x.device), rank=rank,
    )
    return packed


def logfmt_decode(packed: torch.Tensor, hidden: int, bits: int = 8, out_dtype: torch.dtype = torch.bfloat16, *,
                  rank: int = -1, split: str = "auto") -> torch.Tensor:
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
    split_code = _split(split)
    module = _backend.for_device("packed", packed.device)
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=packed.device)
    if num_tokens == 0:
        return out
    stride = _row_stride(packed)
    if packed.data_ptr() % 16 or stride % 16:
        raise argument_error(InvalidShape, "packed", "16-byte aligned rows (a row stride that is a multiple of 16)",
                             f"address {packed.data_ptr():#x}, row stride {stride}")
    module.logfmt_decode(
        packed.data_ptr(), stride, num_tokens, hidden, bits, out.data_ptr(), _DTYPE_CODE[out_dtype], hidden, split_code,
        stream=_backend.stream_handle(packed.device), rank=rank,
    )
    return out


# ---- MXFP8 ---------------------------------------------------------------------------------------


def mxfp8_quantize(x: torch.Tensor, scale_mode: str = "floor", *, rank: int = -1, split: str = "auto"):
    """Quantizes ``x`` to MXFP8 (OCP Microscaling v1.0): E4M3 elements with one UE8M0 scale per token
    and block of 32 channels.

    Returns ``(q, scales)``: ``q`` float8_e4m3fn ``[num_tokens, hidden]``, ``scales`` uint8
    ``[num_tokens, ceil(hidden / 32)]`` biased exponents (X = 2**(b - 127); view as
    ``torch.float8_e8m0fnu`` where a library wants that dtype). ``scale_mode="floor"`` is the
    spec's X = 2**(floor(log2 amax) - 8) (block maxima in [448, 512) X saturate to 448);
    ``"rceil"`` rounds amax / 448 up to a power of two (nothing saturates)."""
    _rows("x", x, (torch.bfloat16, torch.float32))
    if not _member(scale_mode, MXFP8_SCALE_MODES):
        raise argument_error(InvalidArgument, "scale_mode", "'floor' or 'rceil'", repr(scale_mode))
    num_tokens, hidden = x.shape
    _hidden("x", hidden)
    split_code = _split(split)
    module = _backend.for_device("x", x.device)
    q = torch.empty((num_tokens, hidden), dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty((num_tokens, mxfp8_num_blocks(hidden)), dtype=torch.uint8, device=x.device)
    if num_tokens == 0:
        return q, scales
    module.mxfp8_quantize(
        x.data_ptr(), _DTYPE_CODE[x.dtype], _row_stride(x), num_tokens, hidden, _MXFP8_MODE_CODE[scale_mode],
        q.data_ptr(), hidden, scales.data_ptr(), scales.shape[1], split_code,
        stream=_backend.stream_handle(x.device), rank=rank,
    )
    return q, scales


def mxfp8_dequantize(q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                     rank: int = -1, split: str = "auto") -> torch.Tensor:
    """Inverse of :func:`mxfp8_quantize`: ``value(q) * 2**(b - 127)`` per block, in ``out_dtype``.
    Any scale byte decodes (0 is 2**-127, 0xFF is NaN, as in the spec)."""
    _rows("q", q, (torch.float8_e4m3fn,))
    _validate.tensor("scales", scales)
    _validate.dtype("scales", scales, (torch.uint8,))
    _check_out_dtype(out_dtype)
    num_tokens, hidden = q.shape
    _hidden("q", hidden)
    expected = (num_tokens, mxfp8_num_blocks(hidden))
    if tuple(scales.shape) != expected:
        raise argument_error(InvalidShape, "scales", f"shape {expected} (one byte per 32 channels of q {tuple(q.shape)})",
                             f"shape {tuple(scales.shape)}")
    _rows("scales", scales, (torch.uint8,), "[num_tokens, blocks]")
    _same_device("scales", scales, "q", q)
    split_code = _split(split)
    module = _backend.for_device("q", q.device)
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=q.device)
    if num_tokens == 0:
        return out
    module.mxfp8_dequantize(
        q.data_ptr(), _row_stride(q), scales.data_ptr(), _row_stride(scales), num_tokens, hidden, out.data_ptr(),
        _DTYPE_CODE[out_dtype], hidden, split_code, stream=_backend.stream_handle(q.device), rank=rank,
    )
    return out


# ---- NVFP4 ---------------------------------------------------------------------------------------


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """The NVFP4 recipe's per-tensor encode scale of ``x``, float32 ``[1]`` on x's device:
    ``2688 / amax`` over the finite elements (2688 = 448 * 6), clamped to [2**-100, 2**100].
    No host synchronisation (the result stays on the device)."""
    _rows("x", x, (torch.bfloat16, torch.float32))
    if x.numel() == 0:
        amax = torch.zeros((), dtype=torch.float32, device=x.device)
    else:
        amax = torch.where(torch.isfinite(x), x.abs(), torch.zeros((), dtype=x.dtype, device=x.device)).amax().float()
    g = torch.full((1,), NVFP4_GLOBAL_NUMERATOR, dtype=torch.float32, device=x.device) / amax.reshape(1)
    lo, hi = NVFP4_GLOBAL_SCALE_RANGE
    return torch.clamp(g, min=lo, max=hi)


def _global_scale(global_scale, device: torch.device) -> torch.Tensor:
    """float32 [1] on ``device``. Floats and CPU tensors are range-checked; a CUDA tensor is used as
    it is (checking it would synchronise the stream)."""
    if isinstance(global_scale, torch.Tensor) and global_scale.device.type != "cpu":
        _validate.dtype("global_scale", global_scale, (torch.float32,))
        if global_scale.numel() != 1:
            raise argument_error(InvalidShape, "global_scale", "one element", f"shape {tuple(global_scale.shape)}")
        if global_scale.device != device:
            raise argument_error(InvalidDevice, "global_scale", f"a tensor on {device} or the CPU",
                                 f"device {global_scale.device}")
        return global_scale.reshape(1).contiguous()
    return check_global_scale(global_scale).to(device)


def nvfp4_quantize(x: torch.Tensor, global_scale=None, *, rank: int = -1, split: str = "auto"):
    """Quantizes ``x`` to NVFP4: E2M1 elements, one E4M3 scale per token and block of 16 channels, and
    one float32 per-tensor encode scale ``g``.

    ``global_scale``: None (computed as :func:`nvfp4_global_scale`), a float, or a float32 tensor of
    one element (CPU or x's device), in [2**-100, 2**100]. Returns ``(packed, block_scales, g)``:
    ``packed`` uint8 ``[num_tokens, ceil(hidden / 2)]`` (byte i = channel 2i in the low nibble,
    2i + 1 in the high one), ``block_scales`` float8_e4m3fn ``[num_tokens, ceil(hidden / 16)]``,
    ``g`` float32 ``[1]`` on x's device. Non-finite inputs are coded 0x8 (a zero to other NVFP4
    readers, NaN to :func:`nvfp4_dequantize`)."""
    _rows("x", x, (torch.bfloat16, torch.float32))
    num_tokens, hidden = x.shape
    _hidden("x", hidden)
    split_code = _split(split)
    g = nvfp4_global_scale(x) if global_scale is None else _global_scale(global_scale, x.device)
    module = _backend.for_device("x", x.device)
    packed = torch.empty((num_tokens, nvfp4_row_bytes(hidden)), dtype=torch.uint8, device=x.device)
    scales = torch.empty((num_tokens, nvfp4_num_blocks(hidden)), dtype=torch.float8_e4m3fn, device=x.device)
    if num_tokens == 0:
        return packed, scales, g
    module.nvfp4_quantize(
        x.data_ptr(), _DTYPE_CODE[x.dtype], _row_stride(x), num_tokens, hidden, g.data_ptr(), packed.data_ptr(),
        packed.shape[1], scales.data_ptr(), scales.shape[1], split_code,
        stream=_backend.stream_handle(x.device), rank=rank,
    )
    return packed, scales, g


def nvfp4_dequantize(packed: torch.Tensor, block_scales: torch.Tensor, global_scale, hidden: int,
                     out_dtype: torch.dtype = torch.bfloat16, *, rank: int = -1, split: str = "auto") -> torch.Tensor:
    """Inverse of :func:`nvfp4_quantize`: ``value(code) * (value(block scale) / g)`` in ``out_dtype``;
    the code 0x8 decodes to NaN."""
    _validate.integer("hidden", hidden, minimum=1)
    row_bytes = nvfp4_row_bytes(hidden)
    _rows("packed", packed, (torch.uint8,), f"[num_tokens, {row_bytes}]")
    if packed.shape[1] != row_bytes:
        raise argument_error(InvalidShape, "packed", f"{row_bytes} bytes per row (hidden {hidden})",
                             f"shape {tuple(packed.shape)}")
    num_tokens = packed.shape[0]
    _validate.tensor("block_scales", block_scales)
    _validate.dtype("block_scales", block_scales, (torch.float8_e4m3fn,))
    expected = (num_tokens, nvfp4_num_blocks(hidden))
    if tuple(block_scales.shape) != expected:
        raise argument_error(InvalidShape, "block_scales", f"shape {expected} (one per 16 channels)",
                             f"shape {tuple(block_scales.shape)}")
    _rows("block_scales", block_scales, (torch.float8_e4m3fn,), "[num_tokens, blocks]")
    _same_device("block_scales", block_scales, "packed", packed)
    _check_out_dtype(out_dtype)
    split_code = _split(split)
    g = _global_scale(global_scale, packed.device)
    module = _backend.for_device("packed", packed.device)
    out = torch.empty((num_tokens, hidden), dtype=out_dtype, device=packed.device)
    if num_tokens == 0:
        return out
    module.nvfp4_dequantize(
        packed.data_ptr(), _row_stride(packed), block_scales.data_ptr(), _row_stride(block_scales), g.data_ptr(),
        num_tokens, hidden, out.data_ptr(), _DTYPE_CODE[out_dtype], hidden, split_code,
        stream=_backend.stream_handle(packed.device), rank=rank,
    )
    return out


# Any __dlpack__ array in (NumPy on the host), arrays of the caller's library out; NumPy lacks
# bfloat16 and float8, whose raw bits (uint16 / uint8) stand for them (moelink/_interop.py).
from ._interop import wrap_module_functions  # noqa: E402

wrap_module_functions(globals(), ("fp8_quantize", "fp8_dequantize", "logfmt_encode", "logfmt_decode"),
                      fp8_quantize=dict(bits={"x": torch.bfloat16}), logfmt_encode=dict(bits={"x": torch.bfloat16}),
                      fp8_dequantize=dict(bits={"q": torch.float8_e4m3fn}))
