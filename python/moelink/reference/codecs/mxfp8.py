"""MXFP8 reference: E4M3 elements with one UE8M0 (power-of-two) scale per 32 channels, the OCP
Microscaling Formats (MX) v1.0 format. The rules are in the package docstring (section "MXFP8")."""

from __future__ import annotations

import torch

from ...errors import InvalidArgument, InvalidDType, InvalidShape, InvalidType, argument_error
from .common import _check_input, _check_out_dtype, _to_out
from .fp32 import _bits, _div, _from_bits
from .fp8 import FP8_FORMATS, FP8_SCALE_FLOOR, float_to_fp8_code, fp8_code_to_float

MXFP8_BLOCK = 32  # channels per scale (OCP MX: k = 32)
MXFP8_SCALE_MODES = ("floor", "rceil")
MXFP8_MIN_SCALE_BYTE = 27  # 2**-100, moelink's floor (as FP8's): no subnormal ever enters a product
_E4M3 = FP8_FORMATS["e4m3"]
_E4M3_EMAX = 8  # exponent of E4M3's largest normal, 448 = 1.75 * 2**8


def mxfp8_num_blocks(hidden: int) -> int:
    return -(-hidden // MXFP8_BLOCK)


def _blocks(xf: torch.Tensor, block: int) -> torch.Tensor:
    num_tokens, hidden = xf.shape
    blocks = -(-hidden // block)
    pad = blocks * block - hidden
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.reshape(num_tokens, blocks, block)


def _finite_amax(xg: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(xg), xg.abs(), torch.zeros_like(xg)).amax(dim=-1)


def mxfp8_scale_bytes(amax: torch.Tensor, scale_mode: str = "floor") -> torch.Tensor:
    """UE8M0 scale bytes (int64 biased exponents, X = 2**(b - 127)) from float32 block maxima."""
    if scale_mode == "floor":
        # OCP MX v1.0, section 6.3: X = 2**(floor(log2 amax) - emax_elem). floor(log2) of a normal
        # float32 is its unbiased exponent; subnormal or zero maxima take the floor byte.
        exp_field = (_bits(amax.float()) >> 23) & 0xFF
        b = exp_field - _E4M3_EMAX
    elif scale_mode == "rceil":
        # 2**ceil(log2(amax / 448)): no element saturates (the rule of moelink's FP8 UE8M0 scales,
        # NVIDIA's cuBLAS/cuDNN MXFP8 recipe "quantize_round_up(amax / 448)").
        amax_c = torch.maximum(amax.float(), torch.full_like(amax.float(), _E4M3.max_value * FP8_SCALE_FLOOR))
        sbits = _bits(_div(amax_c, _E4M3.max_value))
        b = ((sbits >> 23) & 0xFF) + ((sbits & 0x7FFFFF) != 0).to(torch.int64)
    else:
        raise argument_error(InvalidArgument, "scale_mode", "'floor' or 'rceil'", repr(scale_mode))
    return torch.clamp(b, min=MXFP8_MIN_SCALE_BYTE, max=254)


def mxfp8_scale_value(scale_bytes: torch.Tensor) -> torch.Tensor:
    """float32 X = 2**(b - 127) of UE8M0 bytes; 0 gives 2**-127 (a subnormal: the encoder never
    writes bytes below 27, but a decoder accepts any), 0xFF is NaN (OCP MX)."""
    b = scale_bytes.to(torch.int64)
    value = torch.where(b == 0, torch.full_like(b, 0x00400000), b << 23)
    return torch.where(b == 0xFF, torch.full_like(b, 0x7FC00000), value).to(torch.int32).view(torch.float32)


def mxfp8_quantize(x: torch.Tensor, scale_mode: str = "floor"):
    """[T, H] bf16/fp32 -> (q float8_e4m3fn [T, H], scales uint8 [T, ceil(H/32)]).

    Per token and block of 32 channels (the last may be partial): scale byte b from the block's
    finite amax (``scale_mode``), then ``q = e4m3(x * 2**(127 - b))`` (exact multiply; RNE,
    saturating, NaN/inf -> 0x7F); decode ``q * 2**(b - 127)``."""
    x = _check_input(x)
    if scale_mode not in MXFP8_SCALE_MODES:
        raise argument_error(InvalidArgument, "scale_mode", "'floor' or 'rceil'", repr(scale_mode))
    num_tokens, hidden = x.shape
    xg = _blocks(x.detach().cpu().float(), MXFP8_BLOCK)
    b = mxfp8_scale_bytes(_finite_amax(xg), scale_mode)
    inv = _from_bits((254 - b) << 23)  # 2**(127 - b), exact
    q = float_to_fp8_code(xg * inv.unsqueeze(-1), _E4M3).reshape(num_tokens, -1)[:, :hidden].contiguous()
    return q.view(torch.float8_e4m3fn), b.to(torch.uint8)


def mxfp8_dequantize(q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of mxfp8_quantize: value(q) * 2**(b - 127) in float32 (exact), then out_dtype."""
    if not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn:
        raise argument_error(InvalidDType, "q", "torch.float8_e4m3fn", getattr(q, "dtype", type(q).__name__))
    if q.dim() != 2:
        raise argument_error(InvalidShape, "q", "a 2-D [num_tokens, hidden] tensor", tuple(q.shape))
    _check_out_dtype(out_dtype)
    if not isinstance(scales, torch.Tensor):
        raise argument_error(InvalidType, "scales", "a torch.Tensor", type(scales).__name__)
    if scales.dtype != torch.uint8:
        raise argument_error(InvalidDType, "scales", "torch.uint8 (UE8M0 bytes)", scales.dtype)
    num_tokens, hidden = q.shape
    expected = (num_tokens, mxfp8_num_blocks(hidden))
    if tuple(scales.shape) != expected:
        raise argument_error(InvalidShape, "scales", str(expected), tuple(scales.shape))
    values = fp8_code_to_float(q.detach().cpu().contiguous(), _E4M3)
    scale = mxfp8_scale_value(scales.cpu())
    per_channel = scale.repeat_interleave(MXFP8_BLOCK, dim=1)[:, :hidden]
    return _to_out(values * per_channel, torch.isfinite(values), out_dtype)
