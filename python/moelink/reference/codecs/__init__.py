"""Reference semantics of moelink's payload codecs: FP8 (E4M3, E5M2), MXFP8, NVFP4 and LogFMT-nBit.

Plain torch, no performance tricks. This package *is* the specification of the wire formats: the
kernels in ``csrc/kernels/codec_*.cuh`` perform the same
float32 operations in the same order, so their encoders reproduce these functions bit for bit and
their decoders do too (the issue only asks decoders to agree within fp32 rounding; we get more
because the decoded values are part of the encoder's definition anyway). ``docs/codecs.md``
describes the layouts for readers; this docstring states the rules precisely.

Modules: ``fp32`` (float32 bit manipulation the codecs use), ``common`` (argument checks, the
128-channel grouping, output rounding), ``minifloat`` (rounding to E4M3/E2M1 from the
definition), ``fp8``, ``mxfp8``, ``nvfp4`` and ``logfmt`` (one codec each, LogFMT with the
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

MXFP8 (per token, per block of 32 channels; OCP Microscaling Formats (MX) v1.0)
---------------------------------------------------------------------------------
E4M3 elements ``P_i`` with one shared UE8M0 scale ``X = 2**(b - 127)`` per block of k = 32
channels (the last block may be partial), decoded ``X * P_i``.

* ``amax`` = max |x| over the block's finite elements.
* ``scale_mode="floor"`` (the default; the conversion of OCP MX v1.0 section 6.3):
  ``X = 2**(floor(log2 amax) - emax_elem)`` with emax_elem = 8 for E4M3 (448 = 1.75 * 2**8);
  on the bits: ``b = exponent_field(amax) - 8``. Values of the block in [448, 512) * X then
  saturate to 448 (the spec's clamp), so the block maximum may lose up to 12.5 %.
  ``scale_mode="rceil"``: ``X = 2**ceil(log2(amax / 448))`` exactly as FP8's UE8M0 scales
  (no element saturates; NVIDIA's cuBLAS/cuDNN recipe "quantize_round_up(amax / 448)").
* Both clamp ``b`` to [27, 254]: ``X >= 2**-100`` is moelink's floor, as for FP8 (all-zero and
  subnormal-only blocks are well defined, no subnormal enters a product); the spec would go down
  to 2**-127 and only matters for blocks whose largest value is below 2**-92. ``b`` is never 0xFF
  (NaN): non-finite elements do not take part in ``amax``.
* ``q = e4m3(x * 2**(127 - b))``: the multiply is exact, then RNE with saturation to +-448, signs
  of zeros kept, NaN and +-inf -> 0x7F (E4M3 has no infinity) -- FP8's element rule.
* Decode ``value(q) * X`` in float32 (exact for the encoder's bytes), then the output dtype.
  Decoders accept any byte: 0 is 2**-127, 0xFF is NaN (the spec's NaN scale).
* Wire: q float8_e4m3fn ``[T, H]``; scales uint8 ``[T, ceil(H/32)]``, byte j = block j (view it as
  ``torch.float8_e8m0fnu`` for libraries that take that dtype). 1.03125 bytes per element.

NVFP4 (per token, per block of 16 channels, plus one float32 per tensor)
-----------------------------------------------------------------------
FP4 E2M1 elements (values 0, 0.5, 1, 1.5, 2, 3, 4, 6), one E4M3 block scale ``s`` per 16
channels (the last block may be partial) and a float32 per-tensor *encode* scale ``g``, NVIDIA's
two-level recipe as TensorRT-LLM and vLLM quantize activations (``SFScaleVal`` there).

* ``g`` is passed in (``global_scale``; a calibrated value, e.g. one per expert) or computed from
  the tensor: ``g = 2688 / amax`` (2688 = 448 * 6, TensorRT-LLM's ``(448 * 6) / max|x|``) over the
  tensor's finite elements, rounded to float32 and clamped to [2**-100, 2**100]; passed-in values
  must lie in that range too. The range keeps every product and quotient below normal and finite.
* Per block: ``amax`` over finite elements; ``s = e4m3(min((amax / 6) * g, 448))`` (each operation
  rounded to float32, then RNE to E4M3: the recipe's round-to-nearest ``__nv_fp8_e4m3`` cast,
  not a round-up, so the block maximum may saturate at 6 by up to 1/16); ``s`` is stored with its
  sign bit 0 (UE4M3 and E4M3 agree).
* ``enc = g / value(s)`` (0 when ``s`` is 0: the block is all zeros), ``q = e2m1(x * enc)``: RNE
  with saturation to +-6 (a product that overflows to inf, possible only with a passed-in ``g``
  far too large for the data, saturates too). E2M1 has no NaN or infinity: a non-finite input gets the code 0x8
  ("negative zero"), and a number never does (anything rounding to zero is +0). moelink's decoder
  turns 0x8 into NaN; any other NVFP4 consumer reads a zero. Non-finite inputs do not take part
  in either ``amax``.
* Decode ``value(q) * (value(s) / g)`` in float32 (the block's decode multiplier is one rounded
  division), then the output dtype. Decoders take any block scale byte.
* Wire: payload uint8 ``[T, ceil(H/2)]``, byte i = channel 2i (low nibble) | channel 2i+1 (high
  nibble), 0 past the end; block scales float8_e4m3fn ``[T, ceil(H/16)]``; ``g`` float32 ``[1]``
  (4 bytes per tensor, not per token). 0.5625 bytes per element.

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

from . import common, fp8, fp32, logfmt, minifloat, mxfp8, nvfp4
from .common import CODEC_GROUP
from .fp8 import (FP8_FORMATS, FP8_SCALE_FLOOR, Fp8Format, float_to_fp8_code, fp8_code_to_float, fp8_dequantize,
                  fp8_num_groups, fp8_quantize, fp8_scale_shape, ue8m0_pack, ue8m0_unpack)
from .logfmt import (LOGFMT_BITS, LOGFMT_HEADER_BYTES, LOGFMT_MAX_LOG2_RANGE, LogfmtLayout, logfmt_decode,
                     logfmt_encode, logfmt_encode_exact, logfmt_layout, logfmt_unpack)
from .mxfp8 import (MXFP8_BLOCK, MXFP8_MIN_SCALE_BYTE, MXFP8_SCALE_MODES, mxfp8_dequantize, mxfp8_num_blocks,
                    mxfp8_quantize, mxfp8_scale_bytes, mxfp8_scale_value)
from .nvfp4 import (NVFP4_BLOCK, NVFP4_GLOBAL_NUMERATOR, NVFP4_GLOBAL_SCALE_RANGE, NVFP4_NON_FINITE,
                    check_global_scale, float_to_fp4_code, fp4_code_to_float, nvfp4_block_scales, nvfp4_dequantize,
                    nvfp4_global_scale, nvfp4_num_blocks, nvfp4_quantize, nvfp4_row_bytes, nvfp4_unpack)

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
    "MXFP8_BLOCK",
    "MXFP8_MIN_SCALE_BYTE",
    "MXFP8_SCALE_MODES",
    "mxfp8_num_blocks",
    "mxfp8_scale_bytes",
    "mxfp8_scale_value",
    "mxfp8_quantize",
    "mxfp8_dequantize",
    "NVFP4_BLOCK",
    "NVFP4_GLOBAL_NUMERATOR",
    "NVFP4_GLOBAL_SCALE_RANGE",
    "NVFP4_NON_FINITE",
    "check_global_scale",
    "float_to_fp4_code",
    "fp4_code_to_float",
    "nvfp4_block_scales",
    "nvfp4_global_scale",
    "nvfp4_num_blocks",
    "nvfp4_row_bytes",
    "nvfp4_unpack",
    "nvfp4_quantize",
    "nvfp4_dequantize",
]
