// LogFMT-nBit standalone kernels (logfmt_encode / logfmt_decode) and their launchers, built from
// the device functions of codec_logfmt.cuh in either lane form (codec_common.cuh: for_each_tile).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/codec_logfmt.cuh"

namespace moelink::kernels::codec {

// ---- standalone kernels -----------------------------------------------------------------------

template <int kBits>
MOELINK_CODEC_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) logfmt_encode_kernel(LogfmtEncodeArgs args) {
  const LogfmtRowLayout layout = logfmt_row_layout(args.hidden, kBits);
  const size_t elem = element_bytes(args.x_dtype);
  const auto x_row = [&](int64_t token) MOELINK_CODEC_LAMBDA { return static_cast<const char*>(args.x) + token * args.x_row_stride * elem; };
  // Header of (token, tile); the last tile also zeroes the row's padding, so that every byte of
  // the output is defined (`written`: payload bytes of the last tile already stored).
  const auto finish = [&](uint8_t* row, int64_t tile, LogfmtHeader h, int64_t written) MOELINK_CODEC_LAMBDA {
    float* header = reinterpret_cast<float*>(row + 8 * tile);
    header[0] = h.max_abs;
    header[1] = h.step;
    if (tile == layout.num_tiles - 1) {
      for (int64_t b = 8 * layout.num_tiles; b < layout.header_bytes; ++b) row[b] = 0;
      for (int64_t b = layout.payload_offset(tile) + written; b < layout.row_bytes; ++b) row[b] = 0;
    }
  };
  for_each_tile(
      args.split, args.num_tokens, args.hidden,
      [&](int64_t token, int64_t tile) MOELINK_CODEC_LAMBDA {
        uint8_t* row = args.packed + token * args.packed_row_stride;
        const int count = tile_channels(args.hidden, tile);
        LogfmtHeader h;
        with_row_type(x_row(token), args.x_dtype, [&](auto* x) MOELINK_CODEC_LAMBDA {
          h = logfmt_encode_tile<kBits>(x + tile * kCodecGroup, count, row + layout.payload_offset(tile));
        });
        finish(row, tile, h, (count * kBits + 7) / 8);
      },
      [&](const GroupWork& w) MOELINK_CODEC_LAMBDA {
        float v[4];
        load4(x_row(w.token), args.x_dtype, w.first, w.count, v);
        const LogfmtGroupCodes<kBits> g = logfmt_encode_group<kBits>(v);
        uint8_t* row = args.packed + w.token * args.packed_row_stride;
        const int num_words = (tile_channels(args.hidden, w.group) * kBits + 31) / 32;
        logfmt_store_payload<kBits>(g.lane_fields, reinterpret_cast<uint32_t*>(row + layout.payload_offset(w.group)),
                                    num_words);
        if (w.lane == 0) finish(row, w.group, g.header, 4 * num_words);
      });
}

template <int kBits>
MOELINK_CODEC_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) logfmt_decode_kernel(LogfmtDecodeArgs args) {
  const LogfmtRowLayout layout = logfmt_row_layout(args.hidden, kBits);
  const size_t elem = element_bytes(args.out_dtype);
  const auto out_row = [&](int64_t token) MOELINK_CODEC_LAMBDA { return static_cast<char*>(args.out) + token * args.out_row_stride * elem; };
  const auto header_of = [&](const uint8_t* row, int64_t tile) MOELINK_CODEC_LAMBDA {
    const float* header = reinterpret_cast<const float*>(row + 8 * tile);
    return LogfmtHeader{header[0], header[1]};
  };
  for_each_tile(
      args.split, args.num_tokens, args.hidden,
      [&](int64_t token, int64_t tile) MOELINK_CODEC_LAMBDA {
        const uint8_t* row = args.packed + token * args.packed_row_stride;
        with_row_type(out_row(token), args.out_dtype, [&](auto* out) MOELINK_CODEC_LAMBDA {
          logfmt_decode_tile<kBits>(row + layout.payload_offset(tile), tile_channels(args.hidden, tile),
                                    header_of(row, tile), out + tile * kCodecGroup);
        });
      },
      [&](const GroupWork& w) MOELINK_CODEC_LAMBDA {
        if (w.count == 0) return;  // no collective below
        const uint8_t* row = args.packed + w.token * args.packed_row_stride;
        const uint32_t* words = reinterpret_cast<const uint32_t*>(row + layout.payload_offset(w.group));
        const uint64_t fields = logfmt_load_lane<kBits>(words, w.lane, w.count);
        float out[4];
        logfmt_decode_lane<kBits>(fields, header_of(row, w.group), w.count, args.out_dtype, out);
        store4(out_row(w.token), args.out_dtype, w.first, w.count, out);
      });
}

// Calls launch(std::integral_constant<int, n>{}) for n = bits (8, 9, 10; anything else as 10 --
// ops_codecs.cu has rejected it already): one kernel instantiation each.
template <typename Launch>
inline void with_logfmt_bits(int bits, Launch&& launch) {
  switch (bits) {
    case 8: launch(std::integral_constant<int, 8>{}); break;
    case 9: launch(std::integral_constant<int, 9>{}); break;
    default: launch(std::integral_constant<int, 10>{}); break;
  }
}

inline void launch_logfmt_encode(const LogfmtEncodeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * logfmt_row_layout(args.hidden, args.bits).num_tiles);
  with_logfmt_bits(args.bits, [&](auto bits) MOELINK_CODEC_LAMBDA {
    MOELINK_LAUNCH(ctx, "logfmt_encode", logfmt_encode_kernel<decltype(bits)::value>, grid, kThreads, 0, args);
  });
}

inline void launch_logfmt_decode(const LogfmtDecodeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * logfmt_row_layout(args.hidden, args.bits).num_tiles);
  with_logfmt_bits(args.bits, [&](auto bits) MOELINK_CODEC_LAMBDA {
    MOELINK_LAUNCH(ctx, "logfmt_decode", logfmt_decode_kernel<decltype(bits)::value>, grid, kThreads, 0, args);
  });
}

}  // namespace moelink::kernels::codec
