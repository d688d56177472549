// What the payload codecs (codec_fp8.cuh, codec_mxfp8.cuh, codec_nvfp4.cuh, codec_logfmt.cuh)
// share: element loads and stores, and how a warp splits a row's 128-channel tiles among lanes.
//
// Two ways to work on one tile of 128 channels, chosen per launch by asking arch::lane_range how
// it hands out work (codec_tiles_owned_by_lanes):
//
//   * spread ("warp") form -- the GPU's: the whole warp works on one tile, lane l holding
//     channels 4l .. 4l+3 in registers (zeros past a partial tile's end); statistics are warp
//     shuffles. Loads and stores are coalesced. The `*_group` device functions of each codec are
//     this form, so a dispatch or combine kernel can quantize what it already holds in registers.
//   * owned ("lane") form -- the host's: every lane takes whole tiles of a contiguous run
//     (lane_range's contiguous chunks) and encodes each alone, reading its channels from memory:
//     no collective at all, and straight-line loops over contiguous channels that the compiler
//     vectorises. The `*_tile` device functions of each codec are this form.
//
// Both forms produce the same bits (python/moelink/reference/codecs/ is the specification;
// kernels/numeric.cuh: float32 through rn_add/rn_sub/rn_mul/rn_div, never an FMA, conversions
// as integer code). A kernel is written once and runs either form on either target: the
// standalone kernels below take the owned form when lane_range gives lanes whole tiles, unless
// the caller forces the spread form (CodecLaneSplit::kWarp), which is how the host tests the
// GPU's form bit for bit.
#pragma once

#include <cstdint>
#include <cstring>

#include "arch/arch.cuh"
#include "kernels/codec_build.cuh"
#include "kernels/codec_minifloat.cuh"
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
MOELINK_CODEC_INLINE T load_vector(const void* p) {
#if defined(__CUDA_ARCH__)
  return *static_cast<const T*>(p);
#else
  T value;
  std::memcpy(&value, p, sizeof value);
  return value;
#endif
}
template <typename T>
MOELINK_CODEC_INLINE void store_vector(void* p, const T& value) {
#if defined(__CUDA_ARCH__)
  *static_cast<T*>(p) = value;
#else
  std::memcpy(p, &value, sizeof value);
#endif
}

MOELINK_HOST_DEVICE size_t element_bytes(CodecDType dtype) { return dtype == CodecDType::kBFloat16 ? 2 : 4; }

// Channels [first, first + count) of a row into v[0..3]; missing channels read as zero.
MOELINK_CODEC_INLINE void load4(const void* row, CodecDType dtype, int64_t first, int count, float (&v)[4]) {
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

// Decoders saturate the value of a finite code to the output dtype's largest finite value (the
// reference's rule), so a finite input never decodes to inf; NaN (a NaN scale read from the wire)
// stays NaN. `top`: kBf16MaxBits or kF32MaxBits.
MOELINK_CODEC_INLINE uint32_t saturate_bits(uint32_t b, uint32_t top) {
  const uint32_t mag = b & kAbsMask;
  return mag > top && mag <= kInfBits ? ((b & ~kAbsMask) | top) : b;
}
MOELINK_CODEC_INLINE float saturate_finite(float v, CodecDType dtype) {
  return bits_float(saturate_bits(float_bits(v), dtype == CodecDType::kBFloat16 ? kBf16MaxBits : kF32MaxBits));
}

MOELINK_CODEC_INLINE void store4(void* row, CodecDType dtype, int64_t first, int count, const float (&v)[4]) {
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

// Lane-local element access for the owned form: In is uint16_t (bf16 bits) or float; Out too.
MOELINK_CODEC_INLINE float load_channel(const uint16_t* p, int i) { return bf16_to_float(p[i]); }
MOELINK_CODEC_INLINE float load_channel(const float* p, int i) { return p[i]; }
MOELINK_CODEC_INLINE void store_channel(uint16_t* p, int i, float v) { p[i] = float_to_bf16(v); }
MOELINK_CODEC_INLINE void store_channel(float* p, int i, float v) { p[i] = v; }
MOELINK_CODEC_INLINE uint32_t out_max_bits(const uint16_t*) { return kBf16MaxBits; }
MOELINK_CODEC_INLINE uint32_t out_max_bits(const float*) { return kF32MaxBits; }

// Largest |x| over the finite elements of x[0, count), as float32 bits (0 when there is none).
// Magnitudes order like their bit patterns, and fit a signed int: a plain max reduction that
// vectorises (bf16 rows on the 16-bit patterns).
MOELINK_CODEC_INLINE uint32_t finite_amax_bits(const uint16_t* x, int count) {
  int32_t amax = 0;
  for (int i = 0; i < count; ++i) {
    const int32_t mag = x[i] & 0x7FFF;
    const int32_t finite = mag < 0x7F80 ? mag : 0;
    amax = amax > finite ? amax : finite;
  }
  return static_cast<uint32_t>(amax) << 16;
}
MOELINK_CODEC_INLINE uint32_t finite_amax_bits(const float* x, int count) {
  int32_t amax = 0;
  for (int i = 0; i < count; ++i) {
    const int32_t mag = static_cast<int32_t>(float_bits(x[i]) & kAbsMask);
    const int32_t finite = mag < static_cast<int32_t>(kInfBits) ? mag : 0;
    amax = amax > finite ? amax : finite;
  }
  return static_cast<uint32_t>(amax);
}

// Calls body(pointer) with the row typed by its dtype: bf16 rows as uint16_t, float32 as float.
template <typename Body>
MOELINK_CODEC_INLINE void with_row_type(const void* row, CodecDType dtype, Body&& body) {
  if (dtype == CodecDType::kBFloat16) body(static_cast<const uint16_t*>(row));
  else body(static_cast<const float*>(row));
}
template <typename Body>
MOELINK_CODEC_INLINE void with_row_type(void* row, CodecDType dtype, Body&& body) {
  if (dtype == CodecDType::kBFloat16) body(static_cast<uint16_t*>(row));
  else body(static_cast<float*>(row));
}

// ---- how lanes share tiles ------------------------------------------------------------------

// True when arch::lane_range hands every lane of the warp whole 32-piece items (the host's
// contiguous chunks), false when it spreads items over the lanes (the GPU's interleaved pieces,
// which keep a warp's accesses coalesced). Every lane of the warp must call; one vote, so the
// answer is the same on every lane whatever lane_range does.
MOELINK_CODEC_INLINE bool codec_tiles_owned_by_lanes() {
  constexpr int64_t kPieces = 32;
  const arch::LaneRange r = arch::lane_range(arch::kFullMask, kPieces * arch::kWarpSize);
  const bool whole = r.step == 1 && r.begin % kPieces == 0 && r.end - r.begin == kPieces;
  return arch::all(arch::kFullMask, whole);
}

// ---- standalone kernels: work items and grid ---------------------------------------------------


// GPU: 4-warp blocks, enough of them for a few waves, a warp per (token, tile) at a time. Host:
// one block of two warps (the fibers' stacks stay in cache) whose lanes take contiguous runs of
// whole tiles and never meet at a collective after the first vote.
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
MOELINK_CODEC_INLINE int lane_channels(int64_t hidden, int64_t group, int lane, int64_t* first) {
  *first = group * kCodecGroup + 4 * lane;
  const int64_t left = hidden - *first;
  return left >= 4 ? 4 : (left > 0 ? static_cast<int>(left) : 0);
}

// Channels of tile `group` (1..128).
MOELINK_CODEC_INLINE int tile_channels(int64_t hidden, int64_t group) {
  const int64_t left = hidden - group * kCodecGroup;
  return left >= kCodecGroup ? kCodecGroup : static_cast<int>(left);
}

// One (token, group) work item as one lane sees it in the spread form: the lane holds channels
// [first, first + count) of the group (count may be 0).
struct GroupWork {
  int64_t token, group, first;
  int lane, count;
};

// Spread form: runs body(GroupWork) for each (token, group) work item of this warp, on every lane.
// A body that uses a warp collective must not skip it on any lane.
template <typename Body>
MOELINK_CODEC_INLINE void for_each_group(int64_t num_tokens, int64_t hidden, Body&& body) {
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

// Owned form: runs tile(token, group) for each work item of this lane. Each warp takes a
// contiguous share of the (token, group) items in row-major order, and lane_range splits it.
template <typename Tile>
MOELINK_CODEC_INLINE void for_each_owned_tile(int64_t num_tokens, int64_t hidden, Tile&& tile) {
  using namespace arch;
  const int64_t groups = num_groups(hidden);
  const int64_t total = num_tokens * groups;
  const int64_t warps = static_cast<int64_t>(num_blocks()) * kWarpsPerBlock;
  const int64_t share = (total + warps - 1) / warps;
  const int64_t first = (static_cast<int64_t>(block_rank()) * kWarpsPerBlock + warp_id()) * share;
  const int64_t count = first >= total ? 0 : (total - first < share ? total - first : share);
  const LaneRange r = lane_range(kFullMask, count);
  for (int64_t i = r.begin; i < r.end; i += r.step) tile((first + i) / groups, (first + i) % groups);
}

// The standalone kernels' driver: the owned form when lanes own tiles (and the caller allows
// it), else the spread form. Every lane of every warp must call.
template <typename Tile, typename Spread>
MOELINK_CODEC_INLINE void for_each_tile(CodecLaneSplit split, int64_t num_tokens, int64_t hidden, Tile&& tile,
                                  Spread&& spread) {
  const bool owned = codec_tiles_owned_by_lanes() && split == CodecLaneSplit::kAuto;
  if (owned) for_each_owned_tile(num_tokens, hidden, tile);
  else for_each_group(num_tokens, hidden, spread);
}

inline unsigned grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace moelink::kernels::codec
