// Eight bf16 channels in one 16-byte vector (arch::Vec16): the unit the combine reductions load,
// widen to fp32, sum and store, so every access is a single 16-byte load or store on the GPU and
// two 4-wide vector adds on the host.
#pragma once

#include "arch/arch.cuh"
#include "kernels/numeric.cuh"

#if !defined(__CUDACC__) && defined(__SSE2__)  // the g++ host target (nvcc compiles the plain form)
#include <emmintrin.h>
#define MOELINK_BF16X8_SSE2 1
#endif

namespace moelink::kernels {

// Channel i (0..7) of v: little-endian, channel 0 in the low half of word 0.
MOELINK_DEVICE uint16_t bf16_lane(const arch::Vec16& v, int i) {
  return static_cast<uint16_t>(v.w[i / 2] >> (16 * (i % 2)));
}

// fp32 sums of eight bf16 channels, held as the even channels (0, 2, 4, 6) and the odd ones
// (1, 3, 5, 7): channel 2w is the low half of word w of a Vec16 and channel 2w + 1 its high half,
// so widening is a shift (even) or a mask (odd) of whole words. Each channel is summed in the order
// of the add_bf16x8 calls, one IEEE fp32 addition (round to nearest even) each, on both targets:
// the GPU adds 8 registers; the host keeps each half in an SSE2 register (x86-64's baseline, so
// no target flags) because g++ does not vectorise the sum across the loop over a token's copies
// by itself. The two forms give the same bits.
struct Bf16x8Sum {
#if defined(MOELINK_BF16X8_SSE2)
  __m128 even = _mm_setzero_ps();
  __m128 odd = _mm_setzero_ps();
#else
  float even[4] = {0, 0, 0, 0};
  float odd[4] = {0, 0, 0, 0};
#endif
};

// Adds the eight channels of v, widened to fp32 (exact: bf16 is the top half of an fp32).
MOELINK_DEVICE void add_bf16x8(Bf16x8Sum& sum, const arch::Vec16& v) {
#if defined(MOELINK_BF16X8_SSE2)
  const __m128i words = _mm_load_si128(reinterpret_cast<const __m128i*>(v.w));
  sum.even = _mm_add_ps(sum.even, _mm_castsi128_ps(_mm_slli_epi32(words, 16)));
  sum.odd = _mm_add_ps(sum.odd, _mm_castsi128_ps(_mm_and_si128(words, _mm_set1_epi32(static_cast<int>(0xFFFF0000u)))));
#else
  for (int w = 0; w < 4; ++w) {
    sum.even[w] += bits_float(v.w[w] << 16);
    sum.odd[w] += bits_float(v.w[w] & 0xFFFF0000u);
  }
#endif
}

#if defined(MOELINK_BF16X8_SSE2)
namespace detail {
// float_to_bf16 (numeric.cuh) on four lanes: round to nearest even, any NaN to 0x7FC0; the result
// in the low 16 bits of each 32-bit lane.
inline __m128i bf16_rne4(__m128 values) {
  const __m128i bits = _mm_castps_si128(values);
  const __m128i odd = _mm_and_si128(_mm_srli_epi32(bits, 16), _mm_set1_epi32(1));
  const __m128i rounded = _mm_srli_epi32(_mm_add_epi32(_mm_add_epi32(bits, _mm_set1_epi32(0x7FFF)), odd), 16);
  // |v| > +inf as integers (both operands below 2^31, so the signed compare is the unsigned one).
  const __m128i nan = _mm_cmpgt_epi32(_mm_and_si128(bits, _mm_set1_epi32(0x7FFFFFFF)), _mm_set1_epi32(0x7F800000));
  return _mm_or_si128(_mm_andnot_si128(nan, rounded), _mm_and_si128(nan, _mm_set1_epi32(0x7FC0)));
}
}  // namespace detail
#endif

// Rounds the eight sums to bf16 (round to nearest even, NaN to 0x7FC0: float_to_bf16) and packs them.
MOELINK_DEVICE arch::Vec16 pack_bf16x8(const Bf16x8Sum& sum) {
  arch::Vec16 out;
#if defined(MOELINK_BF16X8_SSE2)
  const __m128i words = _mm_or_si128(detail::bf16_rne4(sum.even), _mm_slli_epi32(detail::bf16_rne4(sum.odd), 16));
  _mm_store_si128(reinterpret_cast<__m128i*>(out.w), words);
#else
  for (int w = 0; w < 4; ++w) {
    out.w[w] = static_cast<uint32_t>(float_to_bf16(sum.even[w])) | (static_cast<uint32_t>(float_to_bf16(sum.odd[w])) << 16);
  }
#endif
  return out;
}

}  // namespace moelink::kernels
