// Eight bf16 channels in one 16-byte vector (arch::Vec16): the unit the combine reductions load,
// widen to fp32, sum and store, so every access is a single 16-byte load or store on the GPU and
// a loop the host compiler vectorises.
#pragma once

#include "arch/arch.cuh"
#include "kernels/numeric.cuh"

namespace moelink::kernels {

// Channel i (0..7) of v: little-endian, channel 0 in the low half of word 0.
MOELINK_DEVICE uint16_t bf16_lane(const arch::Vec16& v, int i) {
  return static_cast<uint16_t>(v.w[i / 2] >> (16 * (i % 2)));
}

// Adds the eight channels of v, widened to fp32, into sum[0..7].
MOELINK_DEVICE void add_bf16x8(float (&sum)[8], const arch::Vec16& v) {
  for (int i = 0; i < 8; ++i) sum[i] += bf16_to_float(bf16_lane(v, i));
}

// Rounds eight fp32 values to bf16 (round to nearest even) and packs them.
MOELINK_DEVICE arch::Vec16 pack_bf16x8(const float (&v)[8]) {
  arch::Vec16 out;
  for (int w = 0; w < 4; ++w) {
    out.w[w] = static_cast<uint32_t>(float_to_bf16(v[2 * w])) | (static_cast<uint32_t>(float_to_bf16(v[2 * w + 1])) << 16);
  }
  return out;
}

}  // namespace moelink::kernels
