// MXFP8 payload codec (OCP Microscaling Formats v1.0): E4M3 elements, one UE8M0 scale byte
// X = 2**(b - 127) per token and block of 32 channels. The specification, rule by rule, is
// python/moelink/reference/codecs/ (package docstring, section "MXFP8"; mxfp8.py); these
// functions reproduce it bit for bit (kernels/numeric.cuh rules: single rounded float32
// operations, integer code on the bits).
//
// Device functions, in the two forms of codec_common.cuh:
//
//   Mxfp8GroupCodes mxfp8_quantize_group<Mode>(const float (&v)[4])                      [warp]
//       All 32 lanes call, each with 4 channels of one 128-channel tile (lane l: channels
//       4l .. 4l+3, zeros past the end): the tile's 4 blocks are lanes 0-7, 8-15, 16-23, 24-31.
//       Returns the lane's 4 E4M3 codes (byte i = channel 4l + i) and its block's scale byte
//       (the same on the block's 8 lanes; lane 8j is the one to store byte j). 3 shuffles.
//   void mxfp8_dequantize_lane(codes, scale_byte, out_dtype, float (&out)[4])           [lane]
//   uint32_t mxfp8_quantize_block<Mode>(const In* x, int count, uint8_t* q)             [lane]
//       One lane alone, one block of count <= 32 channels read from memory: writes q[0, count),
//       returns the scale byte. No collective (the host's form).
//   void mxfp8_dequantize_block(const uint8_t* q, int count, uint32_t scale_byte, Out* out) [lane]
#pragma once

#include <cstdint>

#include "kernels/codec_common.cuh"

namespace moelink::kernels::codec {

constexpr uint32_t kMxfp8MinScaleByte = 27;  // X >= 2**-100, FP8's floor: no subnormal product

// Scale byte from the block's finite amax (float32 bits).
template <Mxfp8ScaleMode M>
MOELINK_CODEC_INLINE uint32_t mxfp8_scale_byte(uint32_t amax_bits) {
  uint32_t b;
  if constexpr (M == Mxfp8ScaleMode::kFloor) {
    // floor(log2 amax) - emax(E4M3) = exponent field - 127 - 8; subnormal or zero maxima: the floor
    const uint32_t exp_field = amax_bits >> 23;
    b = exp_field > kMxfp8MinScaleByte + 8 ? exp_field - 8 : kMxfp8MinScaleByte;
  } else {
    // 2**ceil(log2(amax / 448)), computed as FP8's UE8M0 scale (floor 448 * 2**-100 on amax)
    const uint32_t floor_bits = float_bits(448.0f * 0x1p-100f);
    const uint32_t sb = float_bits(rn_div(bits_float(amax_bits > floor_bits ? amax_bits : floor_bits), 448.0f));
    b = (sb >> 23) + ((sb & 0x7FFFFFu) != 0 ? 1u : 0u);
  }
  return b > 254u ? 254u : b;
}

// X of any byte: 0 is 2**-127 (subnormal), 0xFF is NaN (OCP MX); the encoder writes 27..254.
MOELINK_CODEC_INLINE float mxfp8_scale_value(uint32_t b) {
  return bits_float(b == 0 ? 0x00400000u : (b == 0xFFu ? kQuietNanBits : b << 23));
}

// ---- one 128-channel tile from inside a warp (spread form) --------------------------------------

struct Mxfp8GroupCodes {
  uint32_t codes;       // this lane's four E4M3 codes, byte i = channel 4*lane + i of the tile
  uint32_t scale_byte;  // UE8M0 byte of the lane's 32-channel block (lanes 8j .. 8j+7 = block j)
};

template <Mxfp8ScaleMode M>
MOELINK_CODEC_INLINE Mxfp8GroupCodes mxfp8_quantize_group(const float (&v)[4]) {
  uint32_t amax_bits = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t mag = float_bits(v[i]) & kAbsMask;
    amax_bits = mag < kInfBits && mag > amax_bits ? mag : amax_bits;
  }
  for (int lanes = 1; lanes < kMxfp8Block / 4; lanes *= 2) {  // the 8 lanes of the block
    const uint32_t other = arch::shfl_xor(arch::kFullMask, amax_bits, lanes);
    amax_bits = other > amax_bits ? other : amax_bits;
  }
  Mxfp8GroupCodes out{0, mxfp8_scale_byte<M>(amax_bits)};
  const float inv = bits_float((254u - out.scale_byte) << 23);  // 2**(127 - b), exact
  for (int i = 0; i < 4; ++i) out.codes |= float_to_fp8_code<E4M3>(rn_mul(v[i], inv)) << (8 * i);
  return out;
}

MOELINK_CODEC_INLINE float mxfp8_decode(uint32_t code, float scale, uint32_t out_max_bits) {
  const float value = fp8_code_to_float<E4M3>(code);
  const uint32_t product = float_bits(rn_mul(value, scale));
  return bits_float(is_finite_bits(float_bits(value)) ? saturate_bits(product, out_max_bits) : product);
}

MOELINK_CODEC_INLINE void mxfp8_dequantize_lane(uint32_t codes, uint32_t scale_byte, CodecDType out_dtype, float (&out)[4]) {
  const uint32_t top = out_dtype == CodecDType::kBFloat16 ? kBf16MaxBits : kF32MaxBits;
  const float scale = mxfp8_scale_value(scale_byte);
  for (int i = 0; i < 4; ++i) out[i] = mxfp8_decode((codes >> (8 * i)) & 0xFFu, scale, top);
}

// ---- one block by one lane (owned form) ---------------------------------------------------------

// kCount: the block's channel count when known at compile time (a full block: loops the host
// vectorises without remainder handling), else 0 and `count` says.
template <Mxfp8ScaleMode M, int kCount = 0, typename In>
MOELINK_CODEC_INLINE uint32_t mxfp8_quantize_block(const In* x, int count, uint8_t* q) {
  const int n = kCount > 0 ? kCount : count;
  const uint32_t b = mxfp8_scale_byte<M>(finite_amax_bits(x, n));
  const float inv = bits_float((254u - b) << 23);
  for (int i = 0; i < n; ++i) q[i] = static_cast<uint8_t>(float_to_fp8_code<E4M3>(rn_mul(load_channel(x, i), inv)));
  return b;
}

template <int kCount = 0, typename Out>
MOELINK_CODEC_INLINE void mxfp8_dequantize_block(const uint8_t* q, int count, uint32_t scale_byte, Out* out) {
  const int n = kCount > 0 ? kCount : count;
  const uint32_t top = out_max_bits(out);
  const float scale = mxfp8_scale_value(scale_byte);
  for (int i = 0; i < n; ++i) store_channel(out, i, mxfp8_decode(q[i], scale, top));
}

// ---- standalone kernels -----------------------------------------------------------------------

template <Mxfp8ScaleMode M>
MOELINK_CODEC_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) mxfp8_quantize_kernel(Mxfp8QuantizeArgs args) {
  const size_t elem = element_bytes(args.x_dtype);
  const auto x_row = [&](int64_t token) MOELINK_CODEC_LAMBDA { return static_cast<const char*>(args.x) + token * args.x_row_stride * elem; };
  for_each_tile(
      args.split, args.num_tokens, args.hidden,
      [&](int64_t token, int64_t tile) MOELINK_CODEC_LAMBDA {
        const int count = tile_channels(args.hidden, tile);
        uint8_t* q = args.q + token * args.q_row_stride + tile * kCodecGroup;
        uint8_t* scales = args.scales + token * args.scales_row_stride + tile * (kCodecGroup / kMxfp8Block);
        with_row_type(x_row(token), args.x_dtype, [&](auto* x) MOELINK_CODEC_LAMBDA {
          int c = 0;
          for (; c + kMxfp8Block <= count; c += kMxfp8Block)
            scales[c / kMxfp8Block] =
                static_cast<uint8_t>(mxfp8_quantize_block<M, kMxfp8Block>(x + tile * kCodecGroup + c, kMxfp8Block, q + c));
          if (c < count)
            scales[c / kMxfp8Block] = static_cast<uint8_t>(mxfp8_quantize_block<M>(x + tile * kCodecGroup + c, count - c, q + c));
        });
      },
      [&](const GroupWork& w) MOELINK_CODEC_LAMBDA {
        float v[4];
        load4(x_row(w.token), args.x_dtype, w.first, w.count, v);
        const Mxfp8GroupCodes g = mxfp8_quantize_group<M>(v);
        uint8_t* q = args.q + w.token * args.q_row_stride + w.first;
        if (w.count == 4 && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
          store_vector(q, g.codes);
        } else {
          for (int i = 0; i < 4; ++i)
            if (i < w.count) q[i] = static_cast<uint8_t>(g.codes >> (8 * i));
        }
        if (w.lane % (kMxfp8Block / 4) == 0 && w.count > 0)
          args.scales[w.token * args.scales_row_stride + w.first / kMxfp8Block] = static_cast<uint8_t>(g.scale_byte);
      });
}

// A template only so that a header may define it in every translation unit that includes it.
template <typename = void>
MOELINK_CODEC_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) mxfp8_dequantize_kernel(Mxfp8DequantizeArgs args) {
  const size_t elem = element_bytes(args.out_dtype);
  const auto out_row = [&](int64_t token) MOELINK_CODEC_LAMBDA { return static_cast<char*>(args.out) + token * args.out_row_stride * elem; };
  for_each_tile(
      args.split, args.num_tokens, args.hidden,
      [&](int64_t token, int64_t tile) MOELINK_CODEC_LAMBDA {
        const int count = tile_channels(args.hidden, tile);
        const uint8_t* q = args.q + token * args.q_row_stride + tile * kCodecGroup;
        const uint8_t* scales = args.scales + token * args.scales_row_stride + tile * (kCodecGroup / kMxfp8Block);
        with_row_type(out_row(token), args.out_dtype, [&](auto* out) MOELINK_CODEC_LAMBDA {
          int c = 0;
          for (; c + kMxfp8Block <= count; c += kMxfp8Block)
            mxfp8_dequantize_block<kMxfp8Block>(q + c, kMxfp8Block, scales[c / kMxfp8Block], out + tile * kCodecGroup + c);
          if (c < count) mxfp8_dequantize_block(q + c, count - c, scales[c / kMxfp8Block], out + tile * kCodecGroup + c);
        });
      },
      [&](const GroupWork& w) MOELINK_CODEC_LAMBDA {
        if (w.count == 0) return;  // no collective below
        const uint32_t scale_byte = args.scales[w.token * args.scales_row_stride + w.first / kMxfp8Block];
        const uint8_t* q = args.q + w.token * args.q_row_stride + w.first;
        uint32_t codes = 0;
        if (w.count == 4 && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
          codes = load_vector<uint32_t>(q);
        } else {
          for (int i = 0; i < 4; ++i)
            if (i < w.count) codes |= static_cast<uint32_t>(q[i]) << (8 * i);
        }
        float out[4];
        mxfp8_dequantize_lane(codes, scale_byte, args.out_dtype, out);
        store4(out_row(w.token), args.out_dtype, w.first, w.count, out);
      });
}

inline void launch_mxfp8_quantize(const Mxfp8QuantizeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * num_groups(args.hidden));
  if (args.scale_mode == Mxfp8ScaleMode::kFloor)
    MOELINK_LAUNCH(ctx, "mxfp8_quantize", mxfp8_quantize_kernel<Mxfp8ScaleMode::kFloor>, grid, kThreads, 0, args);
  else
    MOELINK_LAUNCH(ctx, "mxfp8_quantize", mxfp8_quantize_kernel<Mxfp8ScaleMode::kRceil>, grid, kThreads, 0, args);
}

inline void launch_mxfp8_dequantize(const Mxfp8DequantizeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * num_groups(args.hidden));
  MOELINK_LAUNCH(ctx, "mxfp8_dequantize", mxfp8_dequantize_kernel<>, grid, kThreads, 0, args);
}

}  // namespace moelink::kernels::codec
