// Element conversions of the payload codecs: float32 <-> FP8 E4M3 / E5M2 and FP4 E2M1, the same
// bits on both targets (python/moelink/reference/codecs/ is the specification).
//
// Every function is straight-line code (selects, not branches) on 32-bit integers and single
// rounded float32 operations (kernels/numeric.cuh), so that on the host a loop of conversions
// over a lane's contiguous channels vectorises, and on the GPU it compiles to a short
// branch-free sequence. No <cuda_fp8.h>, no libm.
//
// Rounding to a format with m mantissa bits and exponent bias B, finite |v| (bits `mag`):
//   * |v| >= 2**(1-B) (a normal result): the exponent is rebiased and the 23-bit fraction is
//     rounded to m bits to nearest-even in integer arithmetic: exponent and significand simply add,
//     so a fraction that rounds up carries into the exponent;
//   * |v| <  2**(1-B) (a subnormal result): |v| + 2**(24 - B - m), one float32 addition rounded to
//     nearest-even, lands on the multiple of the format's subnormal step 2**(1-B-m) nearest |v|;
//     the difference of the bit patterns is the code (2**m, when |v| rounds up to the smallest
//     normal, is that normal's code: the carry again). A float32 subnormal |v| gives 0, with or
//     without flush-to-zero;
//   * codes above the format's largest finite magnitude saturate to it.
#pragma once

#include <cstdint>

#include "kernels/codec_build.cuh"
#include "kernels/numeric.cuh"

namespace moelink::kernels::codec {

// Format parameters: m mantissa bits, bias, largest finite magnitude code.
template <int kMantissa, int kBiasValue, uint32_t kMaxMagnitude>
struct MiniFloat {
  static constexpr int kMantissaBits = kMantissa;
  static constexpr int kBias = kBiasValue;
  static constexpr uint32_t kMaxCode = kMaxMagnitude;
  static constexpr uint32_t kMinNormalBits = static_cast<uint32_t>(128 - kBias) << 23;  // 2**(1-B)
  static constexpr uint32_t kRebias = static_cast<uint32_t>(127 - kBias) << 23;
  static constexpr uint32_t kSubnormalMagicBits = static_cast<uint32_t>(127 + 24 - kBias - kMantissa) << 23;
};
using E4M3 = MiniFloat<3, 7, 0x7E>;  // max 448, no infinity, NaN = S.1111.111
using E5M2 = MiniFloat<2, 15, 0x7B>;  // max 57344, inf = S.11111.00, NaN = S.11111.{01,10,11}
using E2M1 = MiniFloat<1, 1, 0x7>;    // max 6, no infinity, no NaN

// Magnitude code of a finite |v| (bits `mag` < 0x7F800000), rounded to nearest-even, saturated.
template <typename F>
MOELINK_CODEC_INLINE uint32_t round_magnitude(uint32_t mag) {
  constexpr int kShift = 23 - F::kMantissaBits;
  const uint32_t t = mag - F::kRebias;  // only used when mag >= kMinNormalBits (no wrap then)
  const uint32_t normal = (t + ((1u << (kShift - 1)) - 1u) + ((t >> kShift) & 1u)) >> kShift;
  const float magic = bits_float(F::kSubnormalMagicBits);
  const uint32_t subnormal = float_bits(rn_add(bits_float(mag), magic)) - F::kSubnormalMagicBits;
  const uint32_t code = mag < F::kMinNormalBits ? subnormal : normal;
  return code > F::kMaxCode ? F::kMaxCode : code;
}

// float32 of a magnitude code (exact): normal codes by rebiasing, subnormal ones as the magic
// number's difference (exact as well).
template <typename F>
MOELINK_CODEC_INLINE float magnitude_value(uint32_t mag_code) {
  const uint32_t normal = (mag_code << (23 - F::kMantissaBits)) + F::kRebias;
  const float magic = bits_float(F::kSubnormalMagicBits);
  const float subnormal = rn_sub(bits_float(F::kSubnormalMagicBits + mag_code), magic);
  return (mag_code >> F::kMantissaBits) == 0 ? subnormal : bits_float(normal);
}

constexpr uint32_t kFp8Nan = 0x7F;

// float32 -> E4M3 / E5M2 code (8 bits): RNE, finite values saturate, signs of zeros kept,
// NaN -> 0x7F, +-inf -> +-inf (E5M2: 0x7C / 0xFC) or 0x7F (E4M3, which has no infinity).
template <typename F>
MOELINK_CODEC_INLINE uint32_t float_to_fp8_code(float v) {
  constexpr bool kHasInf = F::kMaxCode == E5M2::kMaxCode;
  const uint32_t b = float_bits(v);
  const uint32_t mag = b & kAbsMask;
  const uint32_t sign = (b >> 24) & 0x80u;
  const uint32_t finite = sign | round_magnitude<F>(mag < kInfBits ? mag : 0u);
  const uint32_t inf = kHasInf ? (sign | 0x7Cu) : kFp8Nan;
  return mag < kInfBits ? finite : (mag == kInfBits ? inf : kFp8Nan);
}

// E4M3 / E5M2 code -> float32 (exact); NaN codes -> the canonical quiet NaN, E5M2 infinities kept.
template <typename F>
MOELINK_CODEC_INLINE float fp8_code_to_float(uint32_t code) {
  constexpr bool kHasInf = F::kMaxCode == E5M2::kMaxCode;
  const uint32_t mag = code & 0x7Fu;
  const uint32_t sign = (code & 0x80u) << 24;
  const uint32_t finite = float_bits(magnitude_value<F>(mag)) | sign;
  const uint32_t special = kHasInf ? (mag == 0x7Cu ? (sign | kInfBits) : kQuietNanBits) : kQuietNanBits;
  return bits_float(mag > F::kMaxCode ? special : finite);
}

// FP4 E2M1 fields of the NVFP4 payload. Sign bit 3, magnitude code 0..7 = {0, .5, 1, 1.5, 2, 3, 4,
// 6}. E2M1 has no NaN: moelink writes 0x8 ("negative zero") for a non-finite input, and never
// for a number (a negative value that rounds to zero gets +0), so its decoder can return NaN
// while any standard NVFP4 consumer reads a zero.
constexpr uint32_t kFp4NonFinite = 0x8;

MOELINK_CODEC_INLINE uint32_t float_to_fp4_code(float v) {
  const uint32_t b = float_bits(v);
  const uint32_t mag = b & kAbsMask;
  const uint32_t code = round_magnitude<E2M1>(mag < kInfBits ? mag : 0u);
  const uint32_t signed_code = code == 0 ? 0u : (((b >> 28) & 0x8u) | code);
  return mag < kInfBits ? signed_code : kFp4NonFinite;
}

MOELINK_CODEC_INLINE float fp4_code_to_float(uint32_t code) {
  const uint32_t mag = code & 0x7u;
  const uint32_t sign = (code & 0x8u) << 28;
  const float value = bits_float(float_bits(magnitude_value<E2M1>(mag)) | sign);
  return code == kFp4NonFinite ? bits_float(kQuietNanBits) : value;
}

}  // namespace moelink::kernels::codec
