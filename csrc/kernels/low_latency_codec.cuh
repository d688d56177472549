// The low-latency payload formats (runtime/ops_low_latency.h: LowLatencyFormat) as one warp
// encodes a row into a message and decodes a message, built from the codec device functions
// (codec_fp8.cuh, codec_mxfp8.cuh, codec_nvfp4.cuh, codec_logfmt.cuh), bit for bit
// moelink.reference.codecs. Hidden sizes are multiples of 128: every tile is full.
//
// Encoders come in the two forms of codec_common.cuh, chosen once per kernel (`owned`): lanes own
// whole tiles (the host's form: no collective) or the warp works on one tile at a time (the
// GPU's form: coalesced, warp reductions). Decoders are lane-local in either form (no
// collective), so they always take the warp's spread split: lane l holds channels 4l .. 4l+3 of
// each tile.
#pragma once

#include "kernels/codec_fp8.cuh"
#include "kernels/codec_logfmt.cuh"
#include "kernels/codec_mxfp8.cuh"
#include "kernels/codec_nvfp4.cuh"
#include "runtime/ops_low_latency.h"

namespace moelink::kernels::low_latency {

using namespace arch;
namespace cd = ::moelink::kernels::codec;
using F = LowLatencyFormat;

template <F kFormat>
constexpr bool kIsLogfmt = kFormat == F::kLogfmt8 || kFormat == F::kLogfmt9 || kFormat == F::kLogfmt10;
template <F kFormat>
constexpr int kLogfmtBits = kFormat == F::kLogfmt8 ? 8 : (kFormat == F::kLogfmt9 ? 9 : 10);

// Whether this kernel's encoders take the owned form (every lane of the warp calls).
MOELINK_DEVICE bool encoders_owned(const LowLatencyContext& c) {
  const bool owned = cd::codec_tiles_owned_by_lanes();
  return owned && c.codec_split == static_cast<int>(CodecLaneSplit::kAuto);
}

// Encodes the bf16 row `x` (hidden channels) into `out`: the payload at 0, scales at
// `scales_offset` (formats with scales). `g`: the NVFP4 tensor scale. `x_is_input`: x is a
// caller's tensor (read-only path). Every lane calls; out is complete for every lane after a
// syncwarp.
template <F kFormat>
MOELINK_DEVICE void encode_row(const uint16_t* x, int hidden, char* out, int64_t scales_offset, bool owned, float g,
                               bool x_is_input) {
  const int lane = static_cast<int>(lane_id());
  const int groups = hidden / 128;
  uint8_t* q = reinterpret_cast<uint8_t*>(out);
  uint8_t* scales = reinterpret_cast<uint8_t*>(out + scales_offset);
  if constexpr (kFormat == F::kBf16) {
    if (x_is_input) warp_copy_input(kFullMask, out, x, static_cast<size_t>(hidden) * 2);
    else warp_copy(kFullMask, out, x, static_cast<size_t>(hidden) * 2);
  } else if constexpr (kFormat == F::kFp8 || kFormat == F::kFp8Pow2 || kFormat == F::kFp8Ue8m0) {
    constexpr Fp8ScaleFormat S = kFormat == F::kFp8 ? Fp8ScaleFormat::kFloat32 : Fp8ScaleFormat::kUe8m0;
    const auto store_scale = [&](int group, const cd::Fp8Scale& s) {
      if constexpr (kFormat == F::kFp8Ue8m0) scales[group] = static_cast<uint8_t>(s.ue8m0);
      else reinterpret_cast<float*>(scales)[group] = s.scale;
    };
    if (kFormat == F::kFp8Ue8m0 && lane == 0)
      for (int pad = groups; pad % 4 != 0; ++pad) scales[pad] = 0;
    if (owned) {
      const LaneRange r = lane_range(kFullMask, groups);
      for (int64_t t = r.begin; t < r.end; t += r.step)
        store_scale(static_cast<int>(t), cd::fp8_quantize_tile<Fp8Format::kE4M3, S>(x + 128 * t, 128, q + 128 * t));
    } else {
      for (int t = 0; t < groups; ++t) {
        float v[4];
        cd::load4(x, CodecDType::kBFloat16, 128 * t + 4 * lane, 4, v);
        const cd::Fp8GroupCodes c = cd::fp8_quantize_group<Fp8Format::kE4M3, S>(v);
        cd::store_vector(q + 128 * t + 4 * lane, c.codes);
        if (lane == 0) store_scale(t, cd::Fp8Scale{c.scale, 0.0f, c.ue8m0});
      }
    }
  } else if constexpr (kFormat == F::kMxfp8) {
    if (owned) {
      const LaneRange r = lane_range(kFullMask, groups);
      for (int64_t t = r.begin; t < r.end; t += r.step)
        for (int j = 0; j < 4; ++j)
          scales[4 * t + j] = static_cast<uint8_t>(
              cd::mxfp8_quantize_block<Mxfp8ScaleMode::kFloor, 32>(x + 128 * t + 32 * j, 32, q + 128 * t + 32 * j));
    } else {
      for (int t = 0; t < groups; ++t) {
        float v[4];
        cd::load4(x, CodecDType::kBFloat16, 128 * t + 4 * lane, 4, v);
        const cd::Mxfp8GroupCodes c = cd::mxfp8_quantize_group<Mxfp8ScaleMode::kFloor>(v);
        cd::store_vector(q + 128 * t + 4 * lane, c.codes);
        if (lane % 8 == 0) scales[4 * t + lane / 8] = static_cast<uint8_t>(c.scale_byte);
      }
    }
  } else if constexpr (kFormat == F::kNvfp4) {
    if (owned) {
      const LaneRange r = lane_range(kFullMask, groups);
      for (int64_t t = r.begin; t < r.end; t += r.step)
        for (int j = 0; j < 8; ++j)
          scales[8 * t + j] = static_cast<uint8_t>(cd::nvfp4_quantize_block(x + 128 * t + 16 * j, 16, g, q + 64 * t + 8 * j));
    } else {
      for (int t = 0; t < groups; ++t) {
        float v[4];
        cd::load4(x, CodecDType::kBFloat16, 128 * t + 4 * lane, 4, v);
        const cd::Nvfp4GroupCodes c = cd::nvfp4_quantize_group(v, g);
        cd::store_vector(q + 64 * t + 2 * lane, static_cast<uint16_t>(c.nibbles));
        if (lane % 4 == 0) scales[8 * t + lane / 4] = static_cast<uint8_t>(c.scale_byte);
      }
    }
  } else {
    constexpr int kBits = kLogfmtBits<kFormat>;
    const cd::LogfmtRowLayout layout = cd::logfmt_row_layout(hidden, kBits);
    const auto store_header = [&](int64_t tile, cd::LogfmtHeader h) {
      float* header = reinterpret_cast<float*>(out + 8 * tile);
      header[0] = h.max_abs;
      header[1] = h.step;
    };
    if (lane == 0)
      for (int64_t b = 8 * layout.num_tiles; b < layout.header_bytes; ++b) q[b] = 0;
    if (owned) {
      const LaneRange r = lane_range(kFullMask, groups);
      for (int64_t t = r.begin; t < r.end; t += r.step)
        store_header(t, cd::logfmt_encode_tile<kBits>(x + 128 * t, 128, q + layout.payload_offset(t)));
    } else {
      for (int t = 0; t < groups; ++t) {
        float v[4];
        cd::load4(x, CodecDType::kBFloat16, 128 * t + 4 * lane, 4, v);
        const cd::LogfmtGroupCodes<kBits> c = cd::logfmt_encode_group<kBits>(v);
        cd::logfmt_store_payload<kBits>(c.lane_fields, reinterpret_cast<uint32_t*>(q + layout.payload_offset(t)),
                                        4 * kBits);
        if (lane == 0) store_header(t, c.header);
      }
    }
  }
}

// Lane-local: this lane's 4 channels (4 * lane .. + 3) of tile `t` of an encoded row, as float32
// values saturated to `out`'s range (the reference decoder's rule). kBf16 rows and LogFMT rows
// (the combine formats; dispatch LogFMT decodes the same way).
template <F kFormat>
MOELINK_DEVICE void decode_lane(const char* row, int hidden, int t, CodecDType out, float (&v)[4]) {
  const int lane = static_cast<int>(lane_id());
  if constexpr (kFormat == F::kBf16) {
    cd::load4(row, CodecDType::kBFloat16, 128 * t + 4 * lane, 4, v);
  } else {
    constexpr int kBits = kLogfmtBits<kFormat>;
    const cd::LogfmtRowLayout layout = cd::logfmt_row_layout(hidden, kBits);
    const float* header = reinterpret_cast<const float*>(row + 8 * t);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(row + layout.payload_offset(t));
    const uint64_t fields = cd::logfmt_load_lane<kBits>(words, lane, 4);
    cd::logfmt_decode_lane<kBits>(fields, cd::LogfmtHeader{header[0], header[1]}, 4, out, v);
  }
}

// Decodes an encoded row into bf16 `out` (optionally times `weight`, rounded once). Lane-local.
template <F kFormat>
MOELINK_DEVICE void decode_row_bf16(const char* row, int hidden, uint16_t* out, bool weighted, float weight) {
  const int lane = static_cast<int>(lane_id());
  for (int t = 0; t < hidden / 128; ++t) {
    float v[4];
    decode_lane<kFormat>(row, hidden, t, weighted ? CodecDType::kFloat32 : CodecDType::kBFloat16, v);
    if (weighted)
      for (int i = 0; i < 4; ++i) v[i] = rn_mul(weight, v[i]);
    cd::store4(out, CodecDType::kBFloat16, 128 * t + 4 * lane, 4, v);
  }
}

}  // namespace moelink::kernels::low_latency
