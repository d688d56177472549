"""NVFP4 reference: FP4 E2M1 elements, one E4M3 scale per 16 channels and a float32 per-tensor
scale, NVIDIA's two-level recipe (Blackwell, TensorRT-LLM, vLLM). The rules are in the package
docstring (section "NVFP4")."""

from __future__ import annotations

import math

import torch

from ...errors import InvalidArgument, InvalidDType, InvalidShape, InvalidType, argument_error
from .common import _check_input, _check_out_dtype, _to_out
from .fp32 import _bits, _div, _from_bits
from .fp8 import FP8_FORMATS, float_to_fp8_code, fp8_code_to_float
from .minifloat import E2M1, round_magnitude, value_of_magnitude
from .mxfp8 import _blocks, _finite_amax

NVFP4_BLOCK = 16  # channels per E4M3 block scale
NVFP4_GLOBAL_NUMERATOR = 448.0 * 6.0  # e4m3 max * e2m1 max: the recipe's global scale = 2688 / amax
NVFP4_GLOBAL_SCALE_RANGE = (2.0**-100, 2.0**100)  # accepted / produced global scales
NVFP4_NON_FINITE = 0x8  # "negative zero": moelink's marker for NaN/inf inputs; decodes to NaN
_E4M3 = FP8_FORMATS["e4m3"]
_F32_MAX = float.fromhex("0x1.fffffep+127")


def nvfp4_num_blocks(hidden: int) -> int:
    return -(-hidden // NVFP4_BLOCK)


def nvfp4_row_bytes(hidden: int) -> int:
    return -(-hidden // 2)


def float_to_fp4_code(v: torch.Tensor) -> torch.Tensor:
    """float32 -> E2M1 codes (int64, 0..15): RNE, saturating at 6; +0 for anything that rounds to
    zero (no -0); NVFP4_NON_FINITE for NaN/inf."""
    v = v.float()
    finite = torch.isfinite(v)
    mag = round_magnitude(torch.where(finite, v.abs(), torch.zeros_like(v)), E2M1)
    code = torch.where((mag != 0) & (v < 0), mag | 0x8, mag)
    return torch.where(finite, code, torch.full_like(code, NVFP4_NON_FINITE))


def fp4_code_to_float(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes -> float32 (exact); NVFP4_NON_FINITE -> NaN."""
    codes = codes.to(torch.int64)
    value = value_of_magnitude(codes & 0x7, E2M1)
    value = torch.where((codes & 0x8) != 0, -value, value)
    return torch.where(codes == NVFP4_NON_FINITE, torch.full_like(value, float("nan")), value)


def nvfp4_global_scale(x: torch.Tensor) -> torch.Tensor:
    """The recipe's per-tensor encode scale, float32 [1]: 2688 / amax over the finite elements of
    ``x``, clamped to [2**-100, 2**100] (an all-zero tensor gets 2**100)."""
    x = _check_input(x)
    xf = x.detach().cpu().float()
    amax = torch.where(torch.isfinite(xf), xf.abs(), torch.zeros_like(xf)).amax() if xf.numel() else torch.tensor(0.0)
    g = _div(torch.full((1,), NVFP4_GLOBAL_NUMERATOR), amax.reshape(1))  # 2688 / 0 = inf -> clamped
    lo, hi = NVFP4_GLOBAL_SCALE_RANGE
    return torch.clamp(g, min=lo, max=hi)


def check_global_scale(global_scale) -> torch.Tensor:
    """A float, or a float32 tensor of one element, in [2**-100, 2**100] -> float32 [1] (CPU)."""
    if isinstance(global_scale, torch.Tensor):
        if global_scale.dtype != torch.float32:
            raise argument_error(InvalidDType, "global_scale", "torch.float32", global_scale.dtype)
        if global_scale.numel() != 1:
            raise argument_error(InvalidShape, "global_scale", "one element", tuple(global_scale.shape))
        value = global_scale.detach().cpu().reshape(1)
    elif isinstance(global_scale, (int, float)) and not isinstance(global_scale, bool):
        value = torch.tensor([float(global_scale)], dtype=torch.float32)
    else:
        raise argument_error(InvalidType, "global_scale", "a float, a float32 tensor of one element, or None",
                             type(global_scale).__name__)
    v = value.item()
    lo, hi = NVFP4_GLOBAL_SCALE_RANGE
    if not (math.isfinite(v) and lo <= v <= hi):
        raise argument_error(InvalidArgument, "global_scale", "a finite number in [2**-100, 2**100] (as float32)", v)
    return value


def nvfp4_block_scales(amax: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """E4M3 block scale codes (int64) from float32 block maxima and the global scale:
    e4m3(min((amax / 6) * g, 448)), RNE."""
    sf = _div(amax.float(), 6.0) * g.float()
    sf = torch.minimum(sf, torch.full_like(sf, _E4M3.max_value))
    return float_to_fp8_code(sf, _E4M3).to(torch.int64)


def nvfp4_quantize(x: torch.Tensor, global_scale=None):
    """[T, H] bf16/fp32 -> (packed uint8 [T, ceil(H/2)], block_scales float8_e4m3fn [T, ceil(H/16)],
    global_scale float32 [1]). Byte i of a row holds channel 2i in its low nibble and 2i + 1 in
    its high nibble (0 past the end)."""
    x = _check_input(x)
    g = nvfp4_global_scale(x) if global_scale is None else check_global_scale(global_scale)
    num_tokens, hidden = x.shape
    xg = _blocks(x.detach().cpu().float(), NVFP4_BLOCK)
    sf = nvfp4_block_scales(_finite_amax(xg), g)
    sf_val = fp8_code_to_float(sf.to(torch.uint8), _E4M3)
    enc = torch.where(sf_val != 0, _div(g.expand_as(sf_val).contiguous(), torch.where(sf_val != 0, sf_val, 1.0)),
                      torch.zeros_like(sf_val))
    # A finite input whose product overflows (only with a passed-in g far too large for the data)
    # saturates like any other large value; non-finite inputs get the 0x8 marker.
    product = torch.clamp(xg * enc.unsqueeze(-1), min=-_F32_MAX, max=_F32_MAX)
    codes = torch.where(torch.isfinite(xg), float_to_fp4_code(product), NVFP4_NON_FINITE)
    codes = codes.reshape(num_tokens, -1)[:, :hidden]
    if hidden % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8).contiguous()
    return packed, sf.to(torch.uint8).view(torch.float8_e4m3fn), g


def nvfp4_unpack(packed: torch.Tensor, hidden: int) -> torch.Tensor:
    """uint8 [T, ceil(H/2)] -> E2M1 codes int64 [T, H]."""
    p = packed.to(torch.int64)
    codes = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(p.shape[0], -1)
    return codes[:, :hidden]


def nvfp4_dequantize(packed: torch.Tensor, block_scales: torch.Tensor, global_scale, hidden: int,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of nvfp4_quantize: value(code) * (value(block scale) / global_scale) in float32,
    then out_dtype. The 0x8 code decodes to NaN."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise argument_error(InvalidDType, "packed", "torch.uint8", getattr(packed, "dtype", type(packed).__name__))
    if packed.dim() != 2:
        raise argument_error(InvalidShape, "packed", "a 2-D [num_tokens, ceil(hidden/2)] tensor", tuple(packed.shape))
    if not isinstance(block_scales, torch.Tensor) or block_scales.dtype != torch.float8_e4m3fn:
        raise argument_error(InvalidDType, "block_scales", "torch.float8_e4m3fn",
                             getattr(block_scales, "dtype", type(block_scales).__name__))
    _check_out_dtype(out_dtype)
    g = check_global_scale(global_scale)
    num_tokens = packed.shape[0]
    if packed.shape[1] != nvfp4_row_bytes(hidden):
        raise argument_error(InvalidShape, "packed", f"{nvfp4_row_bytes(hidden)} bytes per row (hidden {hidden})",
                             tuple(packed.shape))
    expected = (num_tokens, nvfp4_num_blocks(hidden))
    if tuple(block_scales.shape) != expected:
        raise argument_error(InvalidShape, "block_scales", str(expected), tuple(block_scales.shape))
    values = fp4_code_to_float(nvfp4_unpack(packed.cpu(), hidden))
    sf_val = fp8_code_to_float(block_scales.cpu().contiguous(), _E4M3)
    d = _div(sf_val, g.expand_as(sf_val).contiguous())
    per_channel = d.repeat_interleave(NVFP4_BLOCK, dim=1)[:, :hidden]
    return _to_out(values * per_channel, torch.isfinite(values), out_dtype)
