// Bit-level float helpers shared by kernels, identical on both targets (no <cuda_bf16.h> on the
// host, and the same rounding everywhere so the two builds agree bit for bit).
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
MOELINK_DEVICE uint16_t float_to_bf16(float v) {
  const uint32_t b = float_bits(v);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

}  // namespace moelink::kernels
