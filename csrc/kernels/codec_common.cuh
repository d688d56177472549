// What the payload codecs (codec_fp8.cuh, codec_logfmt.cuh) share: element loads and stores of
// one lane's four channels, and how the standalone kernels spread (token, group) work items.
//
// Device functions work on one group of 128 channels from inside one warp: lane l holds channels
// 4l .. 4l+3 of the group (zeros past the end of a partial group), so a dispatch or combine kernel
// can quantize what it already holds in registers. The standalone kernels give every warp one
// (token, group) at a time.
//
// Bit-exactness across the two targets rests on kernels/numeric.cuh: float32 arithmetic through
// rn_add/rn_sub/rn_mul/rn_div (never an FMA), conversions as integer code on the bits.
#pragma once

#include <cstdint>
#include <cstring>

#include "arch/arch.cuh"
#include "kernels/numeric.cuh"
#include "runtime/ops_codecs.h"

namespace moelink::kernels::codec {

// ---- element loads and stores -----------------------------------------------------------------

// Vector load/store of a T at an address aligned for it: one LDG/STG.64 or .128 on the GPU, a
// memcpy (no aliasing questions) on the host.
struct alignas(16) Float4 {
  float v[4];
};
template <typename T>
MOELINK_DEVICE T load_vector(const void* p) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const T*>(p);
#else
  T value;
  std::memcpy(&value, p, sizeof value);
  return value;
#endif
}
template <typename T>
MOELINK_DEVICE void store_vector(void* p, const T& value) {
#if defined(__CUDA_ARCH__)
  *static_cast<T*>(p) = value;
#else
  std::memcpy(p, &value, sizeof value);
#endif
}

MOELINK_HOST_DEVICE size_t element_bytes(CodecDType dtype) { return dtype == CodecDType::kBFloat16 ? 2 : 4; }

// Channels [first, first + count) of a row into v[0..3]; missing channels read as zero.
MOELINK_DEVICE void load4(const void* row, CodecDType dtype, int64_t first, int count, float (&v)[4]) {
  if (dtype == CodecDType::kBFloat16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + first;
    if (count == 4 && (reinterpret_cast<uintptr_t>(p) & 7) == 0) {
      const uint64_t w = load_vector<uint64_t>(p);
      for (int i = 0; i < 4; ++i) v[i] = bf16_to_float(static_cast<uint16_t>(w >> (16 * i)));
      return;
    }
    for (int i = 0; i < 4; ++i) v[i] = i < count ? bf16_to_float(p[i]) : 0.0f;
  } else {
    const float* p = static_cast<const float*>(row) + first;
    if (count == 4 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      const Float4 w = load_vector<Float4>(p);
      for (int i = 0; i < 4; ++i) v[i] = w.v[i];
      return;
    }
    for (int i = 0; i < 4; ++i) v[i] = i < count ? p[i] : 0.0f;
  }
}

// Largest finite value of the output dtype: decoders saturate finite codes to it (the reference's
// rule), so a finite input never decodes to inf.
MOELINK_DEVICE float saturate_finite(float v, CodecDType dtype) {
  const uint32_t top = dtype == CodecDType::kBFloat16 ? kBf16MaxBits : kF32MaxBits;
  const uint32_t b = float_bits(v);
  if ((b & kAbsMask) > top) return bits_float((b & ~kAbsMask) | top);  // only called on non-NaN v
  return v;
}

MOELINK_DEVICE void store4(void* row, CodecDType dtype, int64_t first, int count, const float (&v)[4]) {
  if (dtype == CodecDType::kBFloat16) {
    uint16_t* p = static_cast<uint16_t*>(row) + first;
    if (count == 4 && (reinterpret_cast<uintptr_t>(p) & 7) == 0) {
      uint64_t w = 0;
      for (int i = 0; i < 4; ++i) w |= static_cast<uint64_t>(float_to_bf16(v[i])) << (16 * i);
      store_vector(p, w);
      return;
    }
    for (int i = 0; i < 4; ++i)  // constant trip count: v stays in registers
      if (i < count) p[i] = float_to_bf16(v[i]);
  } else {
    float* p = static_cast<float*>(row) + first;
    if (count == 4 && (reinterpret_cast<uintptr_t>(p) & 15) == 0) {
      store_vector(p, Float4{{v[0], v[1], v[2], v[3]}});
      return;
    }
    for (int i = 0; i < 4; ++i)
      if (i < count) p[i] = v[i];
  }
}

// ---- standalone kernels: work items and grid ---------------------------------------------------

// Every warp takes one (token, group) at a time, grid-striding. On the GPU: 4-warp blocks, enough
// of them for a few waves. On the host every thread is a fiber and each warp collective switches
// through all 32 lanes, so a single block runs fastest (fewest stacks to keep in cache) while its
// warps still interleave under the schedule fuzzer.
#if defined(__CUDACC__)
constexpr int kThreads = 128;
constexpr int64_t kMaxBlocks = 4096;
#else
constexpr int kThreads = 64;
constexpr int64_t kMaxBlocks = 1;
#endif
constexpr int kWarpsPerBlock = kThreads / arch::kWarpSize;

MOELINK_HOST_DEVICE int64_t num_groups(int64_t hidden) { return (hidden + kCodecGroup - 1) / kCodecGroup; }

// Channels of `group` this lane holds (0..4) and the first of them.
MOELINK_DEVICE int lane_channels(int64_t hidden, int64_t group, int lane, int64_t* first) {
  *first = group * kCodecGroup + 4 * lane;
  const int64_t left = hidden - *first;
  return left >= 4 ? 4 : (left > 0 ? static_cast<int>(left) : 0);
}

// One (token, group) work item as one lane sees it: the lane holds channels [first, first + count)
// of the group (count may be 0).
struct GroupWork {
  int64_t token, group, first;
  int lane, count;
};

// Runs body(GroupWork) for each (token, group) work item of this warp, on every lane. A body that
// uses a warp collective must not skip it on any lane.
template <typename Body>
MOELINK_DEVICE void for_each_group(int64_t num_tokens, int64_t hidden, Body&& body) {
  using namespace arch;
  const int lane = static_cast<int>(lane_id());
  const int64_t groups = num_groups(hidden);
  const int64_t total = num_tokens * groups;
  const int64_t warps = static_cast<int64_t>(num_blocks()) * kWarpsPerBlock;
  for (int64_t work = block_rank() * kWarpsPerBlock + warp_id(); work < total; work += warps) {
    GroupWork w{work / groups, work % groups, 0, lane, 0};
    w.count = lane_channels(hidden, w.group, lane, &w.first);
    body(w);
  }
}

inline unsigned grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace moelink::kernels::codec
