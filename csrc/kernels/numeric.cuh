// Bit-level float helpers shared by kernels, identical on both targets (no <cuda_bf16.h> on the
// host, and the same rounding everywhere so the two builds agree bit for bit).
//
// Reproducible float32: rn_add/rn_sub/rn_mul/rn_div are one IEEE-754 binary32 operation rounded to
// nearest-even, never fused into an FMA (nvcc fuses a*b+c by default; g++ may with -mfma). Code
// that must give the same bits on both targets does its float arithmetic through them, and its
// conversions in integer code on the bits (never libm or <cuda_fp8.h>).
#pragma once

#include <cstdint>
#include <cstring>

#include "arch/arch.cuh"

namespace moelink::kernels {

MOELINK_DEVICE uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
#endif
}

MOELINK_DEVICE float bits_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
#endif
}

MOELINK_DEVICE float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest even; any NaN becomes the quiet NaN 0x7FC0 (what torch's float -> bfloat16 does).
// Written as a select, not a branch, so that loops of conversions vectorise.
MOELINK_DEVICE uint16_t float_to_bf16(float v) {
  const uint32_t b = float_bits(v);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>((b & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// ---- float32 bit patterns ---------------------------------------------------------------------

constexpr uint32_t kAbsMask = 0x7FFFFFFFu;       // everything but the sign
constexpr uint32_t kInfBits = 0x7F800000u;       // +inf; also the exponent mask
constexpr uint32_t kQuietNanBits = 0x7FC00000u;  // the canonical quiet NaN
constexpr uint32_t kF32MaxBits = 0x7F7FFFFFu;    // FLT_MAX
constexpr uint32_t kBf16MaxBits = 0x7F7F0000u;   // bfloat16's largest finite value, as float32

MOELINK_DEVICE bool is_finite_bits(uint32_t bits) { return (bits & kInfBits) != kInfBits; }

// 2**k for k in [-126, 127], exact.
MOELINK_DEVICE float pow2i(int k) { return bits_float(static_cast<uint32_t>(k + 127) << 23); }

// v >> shift rounded to nearest, ties to even, for shift in [1, 31]: the rounding step of
// float -> narrower-float conversions done on the significand's bits.
MOELINK_DEVICE uint32_t rshift_rne(uint32_t v, int shift) {
  uint32_t r = v >> shift;
  const uint32_t rem = v & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;
  return r;
}

// ---- reproducible float32 arithmetic ----------------------------------------------------------

#if defined(__CUDA_ARCH__)
MOELINK_DEVICE float rn_add(float a, float b) { return __fadd_rn(a, b); }
MOELINK_DEVICE float rn_sub(float a, float b) { return __fsub_rn(a, b); }
MOELINK_DEVICE float rn_mul(float a, float b) { return __fmul_rn(a, b); }
MOELINK_DEVICE float rn_div(float a, float b) { return __fdiv_rn(a, b); }
#else
// Hides a product from the optimiser so that it cannot become one half of an FMA -- needed only
// when the target ISA has a fused multiply-add to contract into. Baseline x86-64 (SSE2, what
// setup.py builds for) has none, so there the product is left alone and loops of rn_* operations
// stay vectorisable; -mfma / -march=native builds (__FMA__) and AArch64 keep the barrier.
MOELINK_DEVICE void no_contract(float& v) {
#if (defined(__x86_64__) || defined(__i386__)) && !defined(__FMA__) && !defined(__FMA4__)
  (void)v;  // no FMA instruction exists: a * b is always rounded on its own
#elif defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile float sink = v;
  v = sink;
#endif
}

MOELINK_DEVICE float rn_add(float a, float b) { return a + b; }
MOELINK_DEVICE float rn_sub(float a, float b) { return a - b; }
MOELINK_DEVICE float rn_mul(float a, float b) {
  float p = a * b;
  no_contract(p);
  return p;
}
MOELINK_DEVICE float rn_div(float a, float b) { return a / b; }
#endif

}  // namespace moelink::kernels
