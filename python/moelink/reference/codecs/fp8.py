"""FP8 (E4M3, E5M2) reference: per token and 128-channel group, float32 or packed UE8M0 scales.
The rules are in the package docstring (section "FP8")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import InvalidArgument, InvalidDType, InvalidShape, InvalidType, argument_error
from .common import CODEC_GROUP, _check_input, _check_out_dtype, _groups_view, _to_out
from .fp32 import _bits, _div, _from_bits, _pow2, _rshift_rne

FP8_SCALE_FLOOR = 2.0**-100  # smallest FP8 scale: all-zero groups, and no subnormal products


@dataclass(frozen=True)
class Fp8Format:
    name: str
    mantissa_bits: int
    exponent_bias: int
    max_value: float
    max_code: int  # largest finite magnitude code
    inf_code: int | None  # +inf magnitude code, None when the format has no infinity
    torch_dtype: torch.dtype

    @property
    def min_exponent(self) -> int:  # exponent of the smallest normal
        return 1 - self.exponent_bias


FP8_FORMATS = {
    "e4m3": Fp8Format("e4m3", 3, 7, 448.0, 0x7E, None, torch.float8_e4m3fn),
    "e5m2": Fp8Format("e5m2", 2, 15, 57344.0, 0x7B, 0x7C, torch.float8_e5m2),
}
_FP8_NAN = 0x7F


def _fp8_format(fmt) -> Fp8Format:
    if isinstance(fmt, Fp8Format):
        return fmt
    if fmt not in FP8_FORMATS:
        raise argument_error(InvalidArgument, "fmt", "'e4m3' or 'e5m2'", repr(fmt))
    return FP8_FORMATS[fmt]


def float_to_fp8_code(v: torch.Tensor, fmt="e4m3") -> torch.Tensor:
    """float32 -> FP8 bits (uint8): round to nearest-even, finite values saturate to +-max,
    NaN -> 0x7F, +-inf -> +-inf (E5M2) or 0x7F (E4M3)."""
    f = _fp8_format(fmt)
    bits = _bits(v.float())
    sign = (bits >> 31) & 1
    exp_field = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    e = exp_field - 127
    below_normal = torch.clamp(f.min_exponent - e, min=0)
    shift = torch.clamp(23 - f.mantissa_bits + below_normal, max=31)
    r = _rshift_rne(frac | (1 << 23), shift)
    # Exponent and significand add up: a significand that rounds up to 2**(m+1) carries into the
    # exponent, and a subnormal that rounds up to 2**m becomes the smallest normal.
    code = (torch.clamp(e - f.min_exponent, min=0) << f.mantissa_bits) + r
    code = torch.where(exp_field == 0, torch.zeros_like(code), code)  # fp32 subnormals -> 0
    code = torch.clamp(code, max=f.max_code) | (sign << 7)
    is_nan = (exp_field == 0xFF) & (frac != 0)
    is_inf = (exp_field == 0xFF) & (frac == 0)
    if f.inf_code is None:
        code = torch.where(is_inf, torch.full_like(code, _FP8_NAN), code)
    else:
        code = torch.where(is_inf, f.inf_code | (sign << 7), code)
    code = torch.where(is_nan, torch.full_like(code, _FP8_NAN), code)
    return code.to(torch.uint8)


def _fp8_value_table(f: Fp8Format) -> torch.Tensor:
    """float32 value of every FP8 code (exact), from the bit layout."""
    codes = torch.arange(256, dtype=torch.int64)
    mag = codes & 0x7F
    exp_field = mag >> f.mantissa_bits
    mant = (mag & ((1 << f.mantissa_bits) - 1)).double()
    unit = 2.0 ** -f.mantissa_bits
    value = torch.where(
        exp_field == 0,
        mant * unit * 2.0**f.min_exponent,
        (1.0 + mant * unit) * torch.pow(2.0, (exp_field - f.exponent_bias).double()),
    )
    if f.inf_code is None:
        value = torch.where(mag == _FP8_NAN, float("nan"), value)
    else:
        value = torch.where(mag == f.inf_code, float("inf"), value)
        value = torch.where(mag > f.inf_code, float("nan"), value)
    value = torch.where(codes >= 128, -value, value)
    return value.float()


def fp8_code_to_float(codes: torch.Tensor, fmt="e4m3") -> torch.Tensor:
    """FP8 bits (uint8 or a float8 tensor) -> float32 values (exact)."""
    f = _fp8_format(fmt)
    idx = codes.view(torch.uint8).to(torch.int64)
    return _fp8_value_table(f)[idx]


def fp8_num_groups(hidden: int) -> int:
    return -(-hidden // CODEC_GROUP)


def fp8_scale_shape(num_tokens: int, hidden: int, scale_format: str) -> tuple[int, int]:
    groups = fp8_num_groups(hidden)
    return (num_tokens, groups) if scale_format == "float32" else (num_tokens, -(-groups // 4))


def ue8m0_pack(exponents: torch.Tensor) -> torch.Tensor:
    """Biased exponent bytes [T, G] (int in [0, 255]) -> int32 [T, ceil(G/4)]: byte i of word j is
    group 4j + i (little-endian), missing groups are 0."""
    num_tokens, groups = exponents.shape
    words = -(-groups // 4)
    padded = torch.zeros(num_tokens, words * 4, dtype=torch.int64)
    padded[:, :groups] = exponents.to(torch.int64)
    padded = padded.view(num_tokens, words, 4)
    packed = padded[..., 0] | (padded[..., 1] << 8) | (padded[..., 2] << 16) | (padded[..., 3] << 24)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def ue8m0_unpack(packed: torch.Tensor, groups: int) -> torch.Tensor:
    """int32 [T, W] -> biased exponent bytes [T, groups] as int64."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    parts = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
    return parts.reshape(packed.shape[0], -1)[:, :groups]


def fp8_quantize(x: torch.Tensor, fmt: str = "e4m3", scale_format: str = "float32"):
    """[T, H] bf16/fp32 -> (q [T, H] float8 (fmt), scales).

    scales: float32 [T, ceil(H/128)] for scale_format="float32"; int32 [T, ceil(H/512)] of packed
    UE8M0 exponents for scale_format="ue8m0".
    """
    f = _fp8_format(fmt)
    x = _check_input(x)
    if scale_format not in ("float32", "ue8m0"):
        raise argument_error(InvalidArgument, "scale_format", "'float32' or 'ue8m0'", repr(scale_format))
    num_tokens, hidden = x.shape
    xg = _groups_view(x.detach().cpu().float())
    finite = torch.isfinite(xg)
    amax = torch.where(finite, xg.abs(), torch.zeros_like(xg)).amax(dim=-1)
    amax_c = torch.maximum(amax, torch.full_like(amax, f.max_value * FP8_SCALE_FLOOR))
    scale = _div(amax_c, f.max_value)
    if scale_format == "float32":
        inv_scale = _div(torch.full_like(amax_c, f.max_value), amax_c)
        scales = scale
    else:
        sbits = _bits(scale)
        biased = ((sbits >> 23) & 0xFF) + ((sbits & 0x7FFFFF) != 0).to(torch.int64)
        inv_scale = _from_bits((254 - biased) << 23)  # 2**(127 - biased), exact
        scales = ue8m0_pack(biased)
    q = float_to_fp8_code(xg * inv_scale.unsqueeze(-1), f)
    q = q.reshape(num_tokens, -1)[:, :hidden].contiguous()
    return q.view(f.torch_dtype), scales


def fp8_dequantize(q: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16):
    """Inverse of fp8_quantize: q float8 [T, H]; scales float32 [T, G] or int32 UE8M0 [T, ceil(G/4)]."""
    if not isinstance(q, torch.Tensor) or q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise argument_error(InvalidDType, "q", "torch.float8_e4m3fn or torch.float8_e5m2",
                             getattr(q, "dtype", type(q).__name__))
    if q.dim() != 2:
        raise argument_error(InvalidShape, "q", "a 2-D [num_tokens, hidden] tensor", tuple(q.shape))
    _check_out_dtype(out_dtype)
    f = FP8_FORMATS["e4m3" if q.dtype == torch.float8_e4m3fn else "e5m2"]
    if not isinstance(scales, torch.Tensor):
        raise argument_error(InvalidType, "scales", "a torch.Tensor", type(scales).__name__)
    num_tokens, hidden = q.shape
    groups = fp8_num_groups(hidden)
    if scales.dtype == torch.float32:
        expected = (num_tokens, groups)
        scale = scales
    elif scales.dtype == torch.int32:
        expected = (num_tokens, -(-groups // 4))
        scale = None
    else:
        raise argument_error(InvalidDType, "scales", "torch.float32 or torch.int32 (packed UE8M0)", scales.dtype)
    if tuple(scales.shape) != expected:
        raise argument_error(InvalidShape, "scales", str(expected), tuple(scales.shape))
    if scale is None:
        scale = _pow2(ue8m0_unpack(scales.cpu(), groups) - 127)
    values = fp8_code_to_float(q.detach().cpu().contiguous(), f)
    per_channel = scale.cpu().float().repeat_interleave(CODEC_GROUP, dim=1)[:, :hidden]
    return _to_out(values * per_channel, torch.isfinite(values), out_dtype)
