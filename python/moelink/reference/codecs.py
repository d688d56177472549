"""Reference semantics of moelink's payload codecs: FP8 (E4M3, E5M2) and LogFMT-nBit.

Plain torch, no performance tricks. This module *is* the specification of the wire formats: the
kernels in ``csrc/kernels/codec_fp8.cuh`` and ``csrc/kernels/codec_logfmt.cuh`` perform the same
float32 operations in the same order, so their encoders reproduce these functions bit for bit and
their decoders do too (the issue only asks decoders to agree within fp32 rounding; we get more
because the decoded values are part of the encoder's definition anyway). ``docs/codecs.md``
describes the layouts for readers; this docstring states the rules precisely.

Inputs are 2-D ``[num_tokens, hidden]`` tensors of bfloat16 or float32. ``hidden`` may be any
positive size: channels are split into groups (FP8) / tiles (LogFMT) of 128 consecutive channels
and the last one may be partial (``hidden % 128`` channels, e.g. 2880 = 22 * 128 + 64). Its
statistics are taken over the channels it has.

Reproducible float32
--------------------
Every arithmetic step of an encoder is one IEEE-754 binary32 operation rounded to nearest-even:
``+ - * /`` (``/`` is correctly rounded on both targets), ``floor``, exact integer<->float
conversions and bit manipulations. The kernels never let a multiply and an add fuse into an FMA
(``__fmul_rn``/``__fadd_rn`` on the GPU) and never rely on libm: where a logarithm or an
exponential is needed, both sides evaluate the same fixed polynomial (``_log2_core``,
``_exp2_nonpos``) written in those operations. That is what makes encoders bit-exact across g++ on
x86 and nvcc on sm_90 even though ``log2f``/``exp2f`` differ between the two by ulps. LogFMT also
never feeds a subnormal into float arithmetic (it normalises by the tile maximum's exponent with
integer operations first), so flush-to-zero settings cannot change a code.

FP8 (per token, per group of 128 channels)
------------------------------------------
* ``amax`` = max |x| over the group's *finite* elements (exact in float32).
* ``amax_c = max(amax, fp8_max * 2**-100)``. The floor (``2**-100`` in scale terms) makes an
  all-zero group well defined -- its scale is ``2**-100`` and it decodes to exact zeros -- and
  keeps every product away from the subnormal range, so FTZ settings cannot change a code.
* float32 scales: ``scale = amax_c / fp8_max``, ``q = sat(x * (fp8_max / amax_c))`` (each
  operation rounded to float32; the convention DeepGEMM and DeepEP use: the encoder multiplies by
  ``fp8_max / amax``, the decoder multiplies by ``amax / fp8_max``).
* UE8M0 scales: ``scale = 2**ceil(log2(amax_c / fp8_max))`` computed on the bits of the float32
  quotient (exponent + 1 when any mantissa bit is set), stored as the biased exponent byte
  (``2**(b - 127)``), and ``q = sat(x * 2**(127 - b))`` (exact: a power of two).
* ``sat`` rounds float32 to the format to nearest-even and saturates finite values to +-fp8_max.
  NaN encodes as 0x7F. +-inf encodes as +-inf in E5M2 (0x7C/0xFC) and as NaN (0x7F) in E4M3, which
  has no infinity: a non-finite input never decodes to a finite number, and it does not disturb
  the scale of the other 127 elements of its group.
* Decode: ``x_hat = fp8_value(q) * scale`` in float32, then rounded to the output dtype (bf16 by
  round-to-nearest-even, NaN -> 0x7FC0, as torch does). Decoders saturate like the encoders: a
  finite code never decodes to inf (``q * scale`` can pass FLT_MAX, or round up past the bf16 range,
  when the input held values near the top of the range, e.g. bf16's largest with UE8M0 scales);
  such results are clamped to the output dtype's largest finite value. Same rule for LogFMT.
* Scale tensors: float32 ``[num_tokens, num_groups]``; UE8M0 int32
  ``[num_tokens, ceil(num_groups / 4)]`` where byte ``i`` (bits ``8i..8i+7``, little-endian) of
  word ``j`` holds group ``4j + i`` and missing groups are zero bytes -- the K-major packing that
  DeepGEMM's ``get_mn_major_tma_aligned_packed_ue8m0_tensor`` produces before its MN-major
  transpose.

LogFMT-nBit, n in {8, 9, 10} (per token, per tile of 128 channels)
------------------------------------------------------------------
Following "Insights into DeepSeek-V3: Scaling Challenges and Reflections on Hardware for AI
Architectures" (ISCA 2025, arXiv:2505.09343), section 3.2. ``K = 2**(n-1) - 1`` magnitude codes.

* Statistics over the tile's finite nonzero elements: ``M`` = max |x|, ``m`` = min |x|.
  ``R = min(log2 M - log2 m, 32)`` (the paper's ``min >= max - log(2**32)``), step ``s = R/(K-1)``.
* Code ``k`` in ``1..K`` decodes to ``v_k = M * 2**(-(K-k) * s)``: uniform in log2|x| from
  ``M * 2**-R`` to exactly ``M`` (anchoring the grid at the maximum makes the largest element of
  every tile, a single nonzero and a constant tile round-trip exactly). Code 0 is exact zero.
* Encoding rounds in *linear* space: between adjacent codes the decision point is the midpoint
  of their decoded values (ties go up, away from zero); below ``v_1`` the choice is between 0 and
  ``v_1`` by the same rule. Field = ``sign << (n-1) | code``; the sign is 0 whenever the code is 0.
* The field ``1 << (n-1)`` ("negative zero") is reserved for non-finite inputs and decodes to
  NaN; NaN/inf do not take part in ``M``/``m``. -0.0 encodes as +0.
* Header per tile: two little-endian float32, ``M`` (exact) and ``s``. 8 bytes per 128 channels:
  float32 keeps the header's own error near 1e-7 relative, far below the smallest LogFMT step
  (a 16-bit log-domain header would add errors comparable to LogFMT-10's step), and storing ``M``
  itself rather than ``log2 M`` is what lets the maximum decode exactly. A tile with no finite
  nonzero element has header (0, 0) and only zero/NaN fields.
* Row layout (every row of the output is ``row_bytes`` long, a multiple of 16):
  ``[G headers, 8 B each][zero pad to 16 B][tile 0 payload][tile 1 payload]...[zero pad to 16 B]``.
  A full tile's payload is ``16 * n`` bytes (a multiple of 16, so every tile starts 16-byte
  aligned); the last tile, with ``r`` channels, has ``ceil(r * n / 8)`` bytes. Inside a tile the
  fields are packed densely, least significant bit first: element ``i`` occupies bits
  ``[n*i, n*i + n)`` of the tile's little-endian bit stream (for n = 8, byte i is element i).

Exact float32 encoder recipe (what the kernels implement; ``K``, ``s`` as above):

1. ``log2_split(a)`` for a positive finite float32 (subnormals normalised with integer ops):
   binade ``a = f * 2**b`` with ``f`` in [1, 2); if the 23-bit fraction >= 0x3504F3
   (``f >= sqrt 2``) use ``(b + 1, f / 2)``; then ``log2 a = e + _log2_core(f')`` with
   ``_log2_core(f) = z * q(z*z)``, ``z = (f - 1) / (f + 1)``, ``q`` a degree-4 Horner polynomial.
2. ``R = float(eM - em) + (lM - lm)``, clamped to ``[0, 32]``; ``s = R / float(K - 1)``.
3. Per element ``a = |x|`` (finite, nonzero): if the binade of ``a`` is 35 or more below that of
   ``M`` the code is 0 (``a < v_1 / 2`` for sure); else if ``s == 0`` the code is ``K``; else
   ``delta = (float(eM - ea) + (lM - la)) * (1 / s)``, ``d = clamp(floor(delta), 0, K - 1)``,
   candidates ``k_up = K - d`` and ``k_up - 1``;
   ``w(k) = fM * _exp2_nonpos(float(-(K - k)) * s)`` (``fM`` = M's binade fraction, so the
   comparison runs on values in [2**-34, 2) with no subnormals), ``w(0) = 0``;
   ``mid = (w(k_up - 1) + w(k_up)) * 0.5``; ``a' = a * 2**-bM`` (exact); code ``k_up`` if
   ``a' >= mid`` else ``k_up - 1``.
4. ``_exp2_nonpos(y)``: ``i = floor(y)``, ``f = y - i``, degree-6 Horner polynomial ``p(f)``
   (``p(0) = 1`` exactly), times ``2**i`` (exact).

Decoding code ``k`` computes ``w(k)`` the same way and scales it by ``2**bM`` with integer
arithmetic (round-to-nearest-even into the subnormal range), then applies the sign.

Because ``floor(delta)`` comes from the same portable logarithm on both targets, the chosen code
is deterministic even where ``delta`` is off by an ulp; in exact arithmetic the two candidates
bracket ``a``, so the rule is the paper's nearest-in-linear-space rounding (``tests`` check it
against a float64 oracle, ``logfmt_encode_exact``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InvalidArgument, InvalidDType, InvalidShape, InvalidType, argument_error

__all__ = [
    "CODEC_GROUP",
    "FP8_FORMATS",
    "FP8_SCALE_FLOOR",
    "LOGFMT_BITS",
    "LOGFMT_HEADER_BYTES",
    "LOGFMT_MAX_LOG2_RANGE",
    "Fp8Format",
    "LogfmtLayout",
    "fp8_num_groups",
    "fp8_scale_shape",
    "fp8_quantize",
    "fp8_dequantize",
    "fp8_code_to_float",
    "float_to_fp8_code",
    "ue8m0_pack",
    "ue8m0_unpack",
    "logfmt_layout",
    "logfmt_encode",
    "logfmt_decode",
    "logfmt_unpack",
    "logfmt_encode_exact",
]

CODEC_GROUP = 128  # channels per FP8 scale group / LogFMT tile
LOGFMT_BITS = (8, 9, 10)
LOGFMT_HEADER_BYTES = 8  # float32 M, float32 s
LOGFMT_MAX_LOG2_RANGE = 32.0  # the paper's log(2**32) clamp of min against max
FP8_SCALE_FLOOR = 2.0**-100  # smallest FP8 scale: all-zero groups, and no subnormal products


# ---- float32 bit helpers ---------------------------------------------------------------------


def _bits(v: torch.Tensor) -> torch.Tensor:
    """float32 tensor -> its IEEE bits as int64 in [0, 2**32)."""
    assert v.dtype == torch.float32
    return v.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    """int64 bits in [0, 2**32) -> float32."""
    b = torch.where(b >= 2**31, b - 2**32, b)
    return b.to(torch.int32).view(torch.float32)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as float32 for integer k in [-126, 127] (exact)."""
    return _from_bits((k.to(torch.int64) + 127) << 23)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """Correctly rounded float32 division, tensor by same-shaped tensor (no scalar fast path)."""
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b.expand_as(a).contiguous()


def _f32(h: str) -> float:
    v = float.fromhex(h)
    assert torch.tensor(v, dtype=torch.float32).item() == v, h
    return v


def _normalize(mag_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive finite nonzero float32 bits -> (binade exponent b, 23-bit fraction) so that the value
    is (1 + frac / 2**23) * 2**b. Subnormals are normalised with integer operations only."""
    exp_field = mag_bits >> 23
    frac = mag_bits & 0x7FFFFF
    sub = exp_field == 0
    # Subnormal: the leading one of the fraction is at bit `lead` (0..22), read off the exact
    # float64 value of the integer; shift it to bit 23 (the kernels do the same with a loop).
    _, e = torch.frexp(torch.where(sub, frac, torch.ones_like(frac)).double())
    shift = 24 - e.to(torch.int64)
    frac_sub = (frac << shift) & 0x7FFFFF
    b = torch.where(sub, -126 - shift, exp_field - 127)
    return b, torch.where(sub, frac_sub, frac)


# ---- portable log2 / exp2 (the polynomials both targets evaluate) -----------------------------

# log2(f) = z * q(z^2), z = (f - 1)/(f + 1), f in [sqrt(1/2), sqrt 2): q's coefficients are the
# atanh series 2/(ln 2 * (2j + 1)) rounded to float32; truncation error < 1e-9, far below fp32.
_LOG2_Q = tuple(
    _f32(h)
    for h in ("0x1.715476p+1", "0x1.ec709ep-1", "0x1.2776c6p-1", "0x1.a61762p-2", "0x1.484b14p-2")
)
# 2**f on [0, 1): p(f) = 1 + f*(c1 + f*(c2 + ... f*c6)), a relative-error least-squares fit
# rounded to float32; max error 1.4 half-ulps, p(0) == 1 exactly, p(f) < 2 for f < 1.
_EXP2_C = tuple(
    _f32(h)
    for h in (
        "0x1.62e42ap-1",
        "0x1.ebfd66p-3",
        "0x1.c68a5ep-5",
        "0x1.3cf1f8p-7",
        "0x1.47ef4cp-10",
        "0x1.c165d4p-13",
    )
)
_SQRT2_FRAC = 0x3504F3  # fraction bits of float32(sqrt 2)


def _log2_core(f: torch.Tensor) -> torch.Tensor:
    """log2(f) for float32 f in [sqrt(1/2), sqrt 2), as the kernels evaluate it."""
    z = _div(f - 1.0, f + 1.0)
    z2 = z * z
    q = torch.full_like(z, _LOG2_Q[4])
    for c in reversed(_LOG2_Q[:4]):
        q = q * z2
        q = q + c
    return z * q


def _log2_split(mag_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive finite nonzero float32 bits -> (integer e, float32 l) with log2 = e + l, |l| <= 1/2."""
    b, frac = _normalize(mag_bits)
    high = (frac >= _SQRT2_FRAC).to(torch.int64)
    f = _from_bits(((127 - high) << 23) | frac)  # in [sqrt(1/2), sqrt 2)
    return b + high, _log2_core(f)


def _exp2_nonpos(y: torch.Tensor) -> torch.Tensor:
    """2**y for float32 y in [-34, 0], as the kernels evaluate it. Result in [2**-34, 1]."""
    i = torch.floor(y)
    f = y - i
    p = torch.full_like(f, _EXP2_C[5])
    for c in reversed(_EXP2_C[:5]):
        p = p * f
        p = p + c
    p = p * f
    p = p + 1.0
    return p * _pow2(i.to(torch.int64))


# ---- output rounding ---------------------------------------------------------------------------


_BF16_MAX = float.fromhex("0x1.fep+127")  # 0x7F7F
_F32_MAX = float.fromhex("0x1.fffffep+127")


def _to_out(v: torch.Tensor, finite_code: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Saturate decoded values of finite codes to out_dtype's range, then round to out_dtype."""
    top = _BF16_MAX if out_dtype == torch.bfloat16 else _F32_MAX
    v = torch.where(finite_code & (v > top), torch.full_like(v, top), v)
    v = torch.where(finite_code & (v < -top), torch.full_like(v, -top), v)
    # torch's float32 -> bfloat16 is round-to-nearest-even with NaN -> 0x7FC0; the kernels match it.
    return v if out_dtype == torch.float32 else v.to(out_dtype)


def _check_out_dtype(out_dtype) -> None:
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise argument_error(InvalidDType, "out_dtype", "torch.bfloat16 or torch.float32", out_dtype)


def _check_input(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise argument_error(InvalidType, name, "a torch.Tensor", type(x).__name__)
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise argument_error(InvalidDType, name, "torch.bfloat16 or torch.float32", x.dtype)
    if x.dim() != 2:
        raise argument_error(InvalidShape, name, "a 2-D [num_tokens, hidden] tensor", tuple(x.shape))
    if x.shape[1] < 1:
        raise argument_error(InvalidShape, f"{name}.shape[1] (hidden)", ">= 1", x.shape[1])
    return x


def _groups_view(xf: torch.Tensor) -> torch.Tensor:
    """[T, H] float32 -> [T, G, 128], the partial last group zero padded."""
    num_tokens, hidden = xf.shape
    groups = -(-hidden // CODEC_GROUP)
    pad = groups * CODEC_GROUP - hidden
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.reshape(num_tokens, groups, CODEC_GROUP)


# ---- FP8 ---------------------------------------------------------------------------------------


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
    significand = frac | (1 << 23)
    r = significand >> shift
    rem = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    r = r + ((rem > half) | ((rem == half) & ((r & 1) == 1))).to(torch.int64)
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


# ---- LogFMT ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogfmtLayout:
    """Byte layout of one encoded row (all offsets from the row start)."""

    bits: int
    hidden: int
    num_tiles: int
    header_bytes: int  # num_tiles * 8, padded to 16
    tile_payload_bytes: int  # 16 * bits for a full tile
    last_tile_channels: int
    last_tile_payload_bytes: int
    row_bytes: int  # multiple of 16

    @property
    def num_codes(self) -> int:  # K
        return (1 << (self.bits - 1)) - 1

    def payload_offset(self, tile: int) -> int:
        return self.header_bytes + tile * self.tile_payload_bytes

    @property
    def bytes_per_element(self) -> float:
        return self.row_bytes / self.hidden


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def logfmt_layout(hidden: int, bits: int) -> LogfmtLayout:
    if bits not in LOGFMT_BITS:
        raise argument_error(InvalidArgument, "bits", "8, 9 or 10", bits)
    if not isinstance(hidden, int) or hidden < 1:
        raise argument_error(InvalidArgument, "hidden", "a positive int", hidden)
    tiles = -(-hidden // CODEC_GROUP)
    last = hidden - (tiles - 1) * CODEC_GROUP
    header = _align16(tiles * LOGFMT_HEADER_BYTES)
    full = 16 * bits
    last_bytes = -(-last * bits // 8)
    row = _align16(header + (tiles - 1) * full + last_bytes)
    return LogfmtLayout(bits, hidden, tiles, header, full, last, last_bytes, row)


def _logfmt_tile_stats(mag_bits: torch.Tensor, data: torch.Tensor, num_codes: int):
    """Per tile: M bits, s (float32), and the float32 pieces the encoder and decoder share."""
    big = torch.full_like(mag_bits, 0x7F800000)
    m_bits = torch.where(data, mag_bits, big).amin(dim=-1)
    M_bits = torch.where(data, mag_bits, torch.zeros_like(mag_bits)).amax(dim=-1)
    has = data.any(dim=-1)
    safe_M = torch.where(has, M_bits, torch.full_like(M_bits, 0x3F800000))
    safe_m = torch.where(has, m_bits, torch.full_like(m_bits, 0x3F800000))
    eM, lM = _log2_split(safe_M)
    em, lm = _log2_split(safe_m)
    R = (eM - em).float() + (lM - lm)
    R = torch.clamp(R, 0.0, LOGFMT_MAX_LOG2_RANGE)
    s = _div(R, float(num_codes - 1))
    s = torch.where(has, s, torch.zeros_like(s))
    M_bits = torch.where(has, M_bits, torch.zeros_like(M_bits))
    return M_bits, s, eM, lM


def _logfmt_w(frac_M: torch.Tensor, steps_down: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """w = fM * 2**(-steps_down * s): a decoded value divided by 2**bM (float32, in (2**-34, 2))."""
    y = (-steps_down).float() * s
    return frac_M * _exp2_nonpos(y)


def _ldexp_rne(w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """w * 2**k for positive normal float32 w, rounding to nearest-even into the subnormal range
    with integer operations only (no FTZ dependence). The result never overflows here."""
    wb = _bits(w)
    exp_field = (wb >> 23) + k  # biased exponent of the result if it is normal
    normal = exp_field >= 1
    significand = (wb & 0x7FFFFF) | (1 << 23)
    shift = torch.clamp(1 - exp_field, min=0, max=25)  # extra right shift into the subnormal range
    r = significand >> shift
    rem = significand & ((1 << shift) - 1)
    half = torch.where(shift > 0, 1 << torch.clamp(shift - 1, min=0), torch.zeros_like(shift))
    r = r + ((shift > 0) & ((rem > half) | ((rem == half) & ((r & 1) == 1)))).to(torch.int64)
    sub_bits = r  # a subnormal (or, after rounding up, the smallest normal) has exponent field 0
    normal_bits = (torch.clamp(exp_field, min=1) << 23) | (wb & 0x7FFFFF)
    return _from_bits(torch.where(normal, normal_bits, sub_bits))


def _logfmt_fields(xg: torch.Tensor, bits: int):
    """[T, G, 128] float32 -> (fields int64 [T, G, 128], M bits [T, G], s [T, G])."""
    K = (1 << (bits - 1)) - 1
    xb = _bits(xg)
    sign = (xb >> 31) & 1
    mag = xb & 0x7FFFFFFF
    finite = (mag >> 23) != 0xFF
    data = finite & (mag != 0)
    M_bits, s, eM, lM = _logfmt_tile_stats(mag, data, K)
    bM, frac_M = _normalize(torch.where(M_bits != 0, M_bits, torch.full_like(M_bits, 0x3F800000)))
    fM = _from_bits((127 << 23) | frac_M)

    safe_mag = torch.where(data, mag, torch.full_like(mag, 0x3F800000))
    ba, frac_a = _normalize(safe_mag)
    ea, la = _log2_split(safe_mag)
    bM_e, fM_e, s_e = bM.unsqueeze(-1), fM.unsqueeze(-1), s.unsqueeze(-1)
    eM_e, lM_e = eM.unsqueeze(-1), lM.unsqueeze(-1)

    far = ba <= bM_e - 35
    inv_s = _div(torch.ones_like(s), torch.where(s > 0, s, torch.ones_like(s))).unsqueeze(-1)
    delta = ((eM_e - ea).float() + (lM_e - la)) * inv_s
    d = torch.where(delta >= K - 1, torch.full_like(delta, K - 1), torch.floor(torch.clamp(delta, min=0.0)))
    d = d.to(torch.int64)
    k_up = K - d
    w_up = _logfmt_w(fM_e, d, s_e)
    w_dn = torch.where(k_up > 1, _logfmt_w(fM_e, d + 1, s_e), torch.zeros_like(w_up))
    mid = (w_dn + w_up) * 0.5
    a_scaled = _from_bits((torch.clamp(ba - bM_e + 127, min=1) << 23) | frac_a)
    code = torch.where(a_scaled >= mid, k_up, k_up - 1)
    code = torch.where(s_e == 0, torch.full_like(code, K), code)
    code = torch.where(far | ~data, torch.zeros_like(code), code)
    fields = torch.where(code > 0, (sign << (bits - 1)) | code, torch.zeros_like(code))
    fields = torch.where(finite, fields, torch.full_like(fields, 1 << (bits - 1)))
    return fields, M_bits, s


def _pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[T, G, 128] n-bit fields -> [T, G, 16n] bytes, LSB-first bit stream per tile."""
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = (fields.unsqueeze(-1) >> shifts) & 1  # [T, G, 128, n]
    stream = stream.reshape(*fields.shape[:2], 16 * bits, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(-1)


def _unpack_fields(payload: torch.Tensor, bits: int) -> torch.Tensor:
    """[T, G, 16n] bytes -> [T, G, 128] fields."""
    stream = (payload.unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1
    stream = stream.reshape(*payload.shape[:2], CODEC_GROUP, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)


def logfmt_encode(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """[T, H] bf16/fp32 -> uint8 [T, logfmt_layout(H, bits).row_bytes]."""
    x = _check_input(x)
    layout = logfmt_layout(x.shape[1], bits)
    num_tokens = x.shape[0]
    xg = _groups_view(x.detach().cpu().float())
    fields, M_bits, s = _logfmt_fields(xg, bits)
    G = layout.num_tiles

    out = torch.zeros(num_tokens, layout.row_bytes, dtype=torch.uint8)
    header = torch.stack([_from_bits(M_bits), s], dim=-1).contiguous()  # [T, G, 2] float32
    out[:, : 8 * G] = header.view(torch.uint8).reshape(num_tokens, 8 * G)
    payload = _pack_fields(fields, bits).to(torch.uint8).reshape(num_tokens, -1)
    used = (G - 1) * layout.tile_payload_bytes + layout.last_tile_payload_bytes
    out[:, layout.header_bytes : layout.header_bytes + used] = payload[:, :used]
    return out


def logfmt_unpack(packed: torch.Tensor, hidden: int, bits: int):
    """Wire bytes -> (M float32 [T, G], s float32 [T, G], fields int64 [T, G, 128])."""
    layout = logfmt_layout(hidden, bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise argument_error(InvalidDType, "packed", "torch.uint8", getattr(packed, "dtype", type(packed).__name__))
    if packed.dim() != 2 or packed.shape[1] != layout.row_bytes:
        raise argument_error(InvalidShape, "packed", f"[num_tokens, {layout.row_bytes}]", tuple(packed.shape))
    packed = packed.detach().cpu().contiguous()
    num_tokens, G = packed.shape[0], layout.num_tiles
    header = packed[:, : 8 * G].contiguous().view(torch.float32).reshape(num_tokens, G, 2)
    used = (G - 1) * layout.tile_payload_bytes + layout.last_tile_payload_bytes
    payload = torch.zeros(num_tokens, G * layout.tile_payload_bytes, dtype=torch.int64)
    payload[:, :used] = packed[:, layout.header_bytes : layout.header_bytes + used].to(torch.int64)
    fields = _unpack_fields(payload.reshape(num_tokens, G, layout.tile_payload_bytes), bits)
    return header[..., 0].contiguous(), header[..., 1].contiguous(), fields


def logfmt_decode(packed: torch.Tensor, hidden: int, bits: int = 8,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 [T, row_bytes] -> [T, hidden] in out_dtype."""
    _check_out_dtype(out_dtype)
    M, s, fields = logfmt_unpack(packed, hidden, bits)
    K = (1 << (bits - 1)) - 1
    M_bits = _bits(M)
    bM, frac_M = _normalize(torch.where(M_bits != 0, M_bits, torch.full_like(M_bits, 0x3F800000)))
    fM = _from_bits((127 << 23) | frac_M).unsqueeze(-1)
    code = fields & K
    sign = (fields >> (bits - 1)) & 1
    w = _logfmt_w(fM, K - torch.clamp(code, min=1), s.unsqueeze(-1))
    v = _ldexp_rne(w, bM.unsqueeze(-1))
    v = torch.where(code > 0, v, torch.zeros_like(v))
    v = torch.where(sign == 1, -v, v)
    nonfinite = (code == 0) & (sign == 1)
    v = torch.where(nonfinite, torch.full_like(v, float("nan")), v)
    v = v.reshape(packed.shape[0], -1)[:, :hidden].contiguous()
    return _to_out(v, ~nonfinite.reshape(packed.shape[0], -1)[:, :hidden], out_dtype)


def logfmt_encode_exact(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle of LogFMT's rounding (no wire format): returns (codes [T, H] int64
    in 0..K, decoded float64 [T, H]) for the same grid, computed with libm in double precision and
    an exhaustive nearest-in-linear-space search. Only finite inputs. For tests and the study."""
    K = (1 << (bits - 1)) - 1
    xg = _groups_view(x.detach().cpu().double().float()).double()  # pad with zeros
    mag = xg.abs()
    data = mag > 0
    M = torch.where(data, mag, torch.zeros_like(mag)).amax(-1, keepdim=True)
    m = torch.where(data, mag, torch.full_like(mag, math.inf)).amin(-1, keepdim=True)
    has = data.any(-1, keepdim=True)
    R = torch.where(has, torch.log2(M / torch.where(has, m, M)), torch.zeros_like(M)).clamp(max=32.0)
    k = torch.arange(1, K + 1, dtype=torch.float64)
    grid = M.unsqueeze(-1) * torch.pow(2.0, -(K - k) * R.unsqueeze(-1) / (K - 1))  # [T, G, 1, K]
    grid = torch.cat([torch.zeros_like(grid[..., :1]), grid], dim=-1)  # code 0 = 0
    mids = (grid[..., 1:] + grid[..., :-1]) / 2  # [T, G, 1, K]
    code = (mag.unsqueeze(-1) >= mids).sum(-1)
    code = torch.where(data, code, torch.zeros_like(code))
    value = torch.gather(grid.squeeze(-2), -1, code) * torch.sign(xg)
    num_tokens, hidden = x.shape
    return code.reshape(num_tokens, -1)[:, :hidden], value.reshape(num_tokens, -1)[:, :hidden]
