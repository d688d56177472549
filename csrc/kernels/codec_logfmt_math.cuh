// LogFMT's portable log2 and exp2: the fixed polynomials both targets evaluate in unfused float32
// (their coefficients are part of the format; python/moelink/reference/codecs/logfmt.py is the
// specification), and the integer normalisation and rounding around them, so that no subnormal
// enters a float operation and flush-to-zero cannot change a code. Every function is
// straight-line code (selects), so that loops of them vectorise on the host.
#pragma once

#include <cstdint>

#include "kernels/codec_build.cuh"
#include "kernels/numeric.cuh"

namespace moelink::kernels::codec {

// ---- portable log2 / exp2 ---------------------------------------------------------------------

// A positive finite nonzero float32 as (1 + frac / 2**23) * 2**exponent, subnormals included.
struct Binade {
  int exponent;
  uint32_t frac;
};

MOELINK_CODEC_INLINE Binade normalize(uint32_t mag) {
  const uint32_t exp_field = mag >> 23;
  const uint32_t frac = mag & 0x7FFFFFu;
  // A subnormal is frac * 2**-149, and float(frac) (exact: frac < 2**23, an integer conversion,
  // no float arithmetic on a subnormal) is normal: its exponent is the leading bit's position.
  const uint32_t fb = float_bits(static_cast<float>(static_cast<int32_t>(frac)));
  const int sub_exponent = static_cast<int>(fb >> 23) - 127 - 149;
  return {exp_field != 0 ? static_cast<int>(exp_field) - 127 : sub_exponent, exp_field != 0 ? frac : (fb & 0x7FFFFFu)};
}

// log2 f for f in [sqrt(1/2), sqrt 2): z * q(z^2), z = (f - 1)/(f + 1), q = atanh series.
MOELINK_CODEC_INLINE float log2_core(float f) {
  // q_j = 2 / (ln 2 * (2j + 1)) rounded to float32; Horner order fixed (it is part of the format).
  const float z = rn_div(rn_sub(f, 1.0f), rn_add(f, 1.0f));
  const float z2 = rn_mul(z, z);
  float q = 0x1.484b14p-2f;
  q = rn_add(rn_mul(q, z2), 0x1.a61762p-2f);
  q = rn_add(rn_mul(q, z2), 0x1.2776c6p-1f);
  q = rn_add(rn_mul(q, z2), 0x1.ec709ep-1f);
  q = rn_add(rn_mul(q, z2), 0x1.715476p+1f);
  return rn_mul(z, q);
}

struct Log2Split {
  int e;    // log2 x = e + l
  float l;  // |l| <= 1/2
};

MOELINK_CODEC_INLINE Log2Split log2_split(Binade b) {
  constexpr uint32_t kSqrt2Frac = 0x3504F3u;
  const uint32_t high = b.frac >= kSqrt2Frac ? 1u : 0u;
  return {b.exponent + static_cast<int>(high), log2_core(bits_float(((127u - high) << 23) | b.frac))};
}

// 2**y for y in [-34, 0]: y = i + f with i = floor(y), a degree-6 polynomial for 2**f, times the
// exact power of two 2**i. p(f) = 1 + f*(c1 + f*(c2 + ... + f*c6)) is a relative least-squares
// fit on [0, 1) rounded to float32 (max error 1.4 half-ulps, p(0) = 1 exactly).
MOELINK_CODEC_INLINE float exp2_nonpos(float y) {
  // floor by truncation (exact for |y| < 2**31): baseline x86-64 has no SSE4.1 round
  // instruction, and a libm floorf call per evaluation was a measurable share of the encoder.
  const int truncated = static_cast<int>(y);
  const int i = truncated - (static_cast<float>(truncated) > y ? 1 : 0);
  const float f = rn_sub(y, static_cast<float>(i));
  float p = 0x1.c165d4p-13f;
  p = rn_add(rn_mul(p, f), 0x1.47ef4cp-10f);
  p = rn_add(rn_mul(p, f), 0x1.3cf1f8p-7f);
  p = rn_add(rn_mul(p, f), 0x1.c68a5ep-5f);
  p = rn_add(rn_mul(p, f), 0x1.ebfd66p-3f);
  p = rn_add(rn_mul(p, f), 0x1.62e42ap-1f);
  p = rn_add(rn_mul(p, f), 1.0f);
  return rn_mul(p, pow2i(i));
}

// w * 2**k for a positive normal w, rounding to nearest-even into the subnormal range without
// depending on flush-to-zero: a subnormal result's bits are the integer round(w * 2**(k + 149)),
// obtained exactly as (v + 2**23) - 2**23 with v = w * 2**(k + 149) (exact, normal, < 2**23);
// rounding up to 2**23 gives the smallest normal, as it should. Never overflows here: decoded
// values are <= M. Branch-free (selects), so decoders vectorise on the host.
MOELINK_CODEC_INLINE float ldexp_rne(float w, int k) {
  const uint32_t wb = float_bits(w);
  const int exp_field = static_cast<int>(wb >> 23) + k;
  const uint32_t normal = (static_cast<uint32_t>(exp_field) << 23) | (wb & 0x7FFFFFu);
  // Only used when the result is subnormal, i.e. k <= -127 - log2(w) <= -93: then k + 149 <= 56.
  const int sub_shift = k + 149 < 127 ? k + 149 : 127;
  const float v = rn_mul(w, pow2i(sub_shift < -126 ? -126 : sub_shift));
  const uint32_t subnormal = float_bits(rn_add(v, 0x1p23f)) - 0x4B000000u;
  return bits_float(exp_field >= 1 ? normal : subnormal);
}

}  // namespace moelink::kernels::codec
