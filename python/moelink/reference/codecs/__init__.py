"""Reference semantics of moelink's payload codecs: FP8 (E4M3, E5M2) and LogFMT-nBit.

Plain torch, no performance tricks. This package *is* the specification of the wire formats: the
kernels in ``csrc/kernels/codec_fp8.cuh`` and ``csrc/kernels/codec_logfmt.cuh`` perform the same
float32 operations in the same order, so their encoders reproduce these functions bit for bit and
their decoders do too (the issue only asks decoders to agree within fp32 rounding; we get more
because the decoded values are part of the encoder's definition anyway). ``docs/codecs.md``
describes the layouts for readers; this docstring states the rules precisely.

Modules: ``fp32`` (float32 bit manipulation both codecs use), ``common`` (argument checks, the
128-channel grouping, output rounding), ``fp8`` and ``logfmt`` (one codec each, LogFMT with the
portable log2/exp2). Everything public is re-exported here.

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

from . import common, fp8, fp32, logfmt
from .common import CODEC_GROUP
from .fp8 import (FP8_FORMATS, FP8_SCALE_FLOOR, Fp8Format, float_to_fp8_code, fp8_code_to_float, fp8_dequantize,
                  fp8_num_groups, fp8_quantize, fp8_scale_shape, ue8m0_pack, ue8m0_unpack)
from .logfmt import (LOGFMT_BITS, LOGFMT_HEADER_BYTES, LOGFMT_MAX_LOG2_RANGE, LogfmtLayout, logfmt_decode,
                     logfmt_encode, logfmt_encode_exact, logfmt_layout, logfmt_unpack)

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
