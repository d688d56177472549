// NVFP4 payload codec: FP4 E2M1 elements, one E4M3 scale byte per token and block of 16 channels,
// and one float32 per-tensor encode scale g (NVIDIA's two-level recipe as TensorRT-LLM and vLLM
// quantize activations). The specification, rule by rule, is python/moelink/reference/codecs/
// (package docstring, section "NVFP4"; nvfp4.py); these functions reproduce it bit for bit.
//
// Wire: payload byte i of a row = channel 2i (low nibble) | channel 2i+1 (high nibble); block
// scales one E4M3 byte per 16 channels; g travels once per tensor. Element codes: sign bit 3,
// magnitude 0..7 = {0, .5, 1, 1.5, 2, 3, 4, 6}; 0x8 marks a non-finite input (decodes to NaN).
//
// Device functions, in the two forms of codec_common.cuh (g = the per-tensor scale, in
// [2**-100, 2**100]):
//
//   Nvfp4GroupCodes nvfp4_quantize_group(const float (&v)[4], float g)                 [warp]
//       All 32 lanes call, each with 4 channels of one 128-channel tile (lane l: channels
//       4l .. 4l+3, zeros past the end): the tile's 8 blocks are lanes 4j .. 4j+3. Returns the
//       lane's 4 codes as 16 bits (its two payload bytes, little-endian) and its block's scale
//       byte (lane 4j stores byte j). 2 shuffles.
//   void nvfp4_dequantize_lane(uint32_t nibbles, uint32_t scale_byte, float g, out_dtype,
//                              float (&out)[4])                                          [lane]
//   uint32_t nvfp4_quantize_block(const In* x, int count, float g, uint8_t* packed)    [lane]
//       One lane alone, one block of count <= 16 channels from memory: writes ceil(count / 2)
//       payload bytes, returns the scale byte. No collective (the host's form).
//   void nvfp4_dequantize_block(const uint8_t* packed, int count, uint32_t scale_byte, float g,
//                               Out* out)                                                [lane]
#pragma once

#include <cstdint>

#include "kernels/codec_common.cuh"

namespace moelink::kernels::codec {

// The block's encode and decode multipliers from its finite amax (float32 bits) and g.
struct Nvfp4Block {
  uint32_t scale_byte;  // E4M3 code of s = e4m3(min((amax / 6) * g, 448)), RNE, sign 0
  float encode;         // g / value(s), 0 when s is 0
};

MOELINK_CODEC_INLINE Nvfp4Block nvfp4_block(uint32_t amax_bits, float g) {
  const float sf = rn_mul(rn_div(bits_float(amax_bits), 6.0f), g);
  const uint32_t code = float_to_fp8_code<E4M3>(sf < 448.0f ? sf : 448.0f);
  const float value = fp8_code_to_float<E4M3>(code);
  return {code, value != 0.0f ? rn_div(g, value) : 0.0f};
}

// Decode multiplier of a block: value(s) / g (any scale byte).
MOELINK_CODEC_INLINE float nvfp4_decode_scale(uint32_t scale_byte, float g) {
  return rn_div(fp8_code_to_float<E4M3>(scale_byte), g);
}

// Code of one element: e2m1(x * encode), RNE, saturating -- also when the product overflows to
// inf (a passed-in g far too large for the data) -- and the 0x8 marker for a non-finite x.
MOELINK_CODEC_INLINE uint32_t nvfp4_encode(float x, float encode) {
  const uint32_t p = float_bits(rn_mul(x, encode));
  const uint32_t pmag = p & kAbsMask;
  const uint32_t mag = round_magnitude<E2M1>(pmag < kInfBits ? pmag : kF32MaxBits);
  const uint32_t code = mag == 0 ? 0u : (((p >> 28) & 0x8u) | mag);
  return (float_bits(x) & kAbsMask) < kInfBits ? code : kFp4NonFinite;
}

MOELINK_CODEC_INLINE float nvfp4_decode(uint32_t code, float scale, uint32_t out_max_bits) {
  const float value = fp4_code_to_float(code);
  const uint32_t product = float_bits(rn_mul(value, scale));
  return bits_float(code != kFp4NonFinite ? saturate_bits(product, out_max_bits) : product);
}

// ---- one 128-channel tile from inside a warp (spread form) --------------------------------------

struct Nvfp4GroupCodes {
  uint32_t nibbles;     // this lane's four codes: bits [4i, 4i+4) = channel 4*lane + i of the tile
  uint32_t scale_byte;  // E4M3 scale of the lane's 16-channel block (lanes 4j .. 4j+3 = block j)
};

MOELINK_CODEC_INLINE Nvfp4GroupCodes nvfp4_quantize_group(const float (&v)[4], float g) {
  uint32_t amax_bits = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t mag = float_bits(v[i]) & kAbsMask;
    amax_bits = mag < kInfBits && mag > amax_bits ? mag : amax_bits;
  }
  for (int lanes = 1; lanes < kNvfp4Block / 4; lanes *= 2) {  // the 4 lanes of the block
    const uint32_t other = arch::shfl_xor(arch::kFullMask, amax_bits, lanes);
    amax_bits = other > amax_bits ? other : amax_bits;
  }
  const Nvfp4Block b = nvfp4_block(amax_bits, g);
  Nvfp4GroupCodes out{0, b.scale_byte};
  for (int i = 0; i < 4; ++i) out.nibbles |= nvfp4_encode(v[i], b.encode) << (4 * i);
  return out;
}

MOELINK_CODEC_INLINE void nvfp4_dequantize_lane(uint32_t nibbles, uint32_t scale_byte, float g, CodecDType out_dtype,
                                          float (&out)[4]) {
  const uint32_t top = out_dtype == CodecDType::kBFloat16 ? kBf16MaxBits : kF32MaxBits;
  const float scale = nvfp4_decode_scale(scale_byte, g);
  for (int i = 0; i < 4; ++i) out[i] = nvfp4_decode((nibbles >> (4 * i)) & 0xFu, scale, top);
}

// ---- one block by one lane (owned form) ---------------------------------------------------------

template <typename In>
MOELINK_CODEC_INLINE uint32_t nvfp4_quantize_block(const In* x, int count, float g, uint8_t* packed) {
  const Nvfp4Block b = nvfp4_block(finite_amax_bits(x, count), g);
  if (count == kNvfp4Block) {  // the common case, in straight-line form
    uint32_t codes[kNvfp4Block];
    for (int i = 0; i < kNvfp4Block; ++i) codes[i] = nvfp4_encode(load_channel(x, i), b.encode);
    for (int i = 0; i < kNvfp4Block / 2; ++i) packed[i] = static_cast<uint8_t>(codes[2 * i] | (codes[2 * i + 1] << 4));
  } else {
    for (int i = 0; i < count; i += 2) {
      const uint32_t lo = nvfp4_encode(load_channel(x, i), b.encode);
      const uint32_t hi = i + 1 < count ? nvfp4_encode(load_channel(x, i + 1), b.encode) : 0u;
      packed[i / 2] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
  return b.scale_byte;
}

template <typename Out>
MOELINK_CODEC_INLINE void nvfp4_dequantize_block(const uint8_t* packed, int count, uint32_t scale_byte, float g, Out* out) {
  const uint32_t top = out_max_bits(out);
  const float scale = nvfp4_decode_scale(scale_byte, g);
  if (count == kNvfp4Block) {  // the common case, in straight-line form: codes first, then values
    uint32_t codes[kNvfp4Block];
    for (int i = 0; i < kNvfp4Block / 2; ++i) {
      codes[2 * i] = packed[i] & 0xFu;
      codes[2 * i + 1] = packed[i] >> 4;
    }
    for (int i = 0; i < kNvfp4Block; ++i) store_channel(out, i, nvfp4_decode(codes[i], scale, top));
  } else {
    for (int i = 0; i < count; ++i) store_channel(out, i, nvfp4_decode((packed[i / 2] >> (4 * (i & 1))) & 0xFu, scale, top));
  }
}

// ---- standalone kernels -----------------------------------------------------------------------

// A template only so that a header may define it in every translation unit that includes it.
template <typename = void>
MOELINK_CODEC_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) nvfp4_quantize_kernel(Nvfp4QuantizeArgs args) {
  const size_t elem = element_bytes(args.x_dtype);
  const float g = *args.global_scale;
  const auto x_row = [&](int64_t token) MOELINK_CODEC_LAMBDA { return static_cast<const char*>(args.x) + token * args.x_row_stride * elem; };
  for_each_tile(
      args.split, args.num_tokens, args.hidden,
      [&](int64_t token, int64_t tile) MOELINK_CODEC_LAMBDA {
        const int count = tile_channels(args.hidden, tile);
        uint8_t* packed = args.packed + token * args.packed_row_stride + tile * (kCodecGroup / 2);
        uint8_t* scales = args.scales + token * args.scales_row_stride + tile * (kCodecGroup / kNvfp4Block);
        with_row_type(x_row(token), args.x_dtype, [&](auto* x) MOELINK_CODEC_LAMBDA {
          for (int c = 0; c < count; c += kNvfp4Block) {
            const int n = count - c < kNvfp4Block ? count - c : kNvfp4Block;
            scales[c / kNvfp4Block] = static_cast<uint8_t>(nvfp4_quantize_block(x + tile * kCodecGroup + c, n, g, packed + c / 2));
          }
        });
      },
      [&](const GroupWork& w) MOELINK_CODEC_LAMBDA {
        float v[4];
        load4(x_row(w.token), args.x_dtype, w.first, w.count, v);
        const Nvfp4GroupCodes c = nvfp4_quantize_group(v, g);
        uint8_t* packed = args.packed + w.token * args.packed_row_stride + w.first / 2;
        for (int i = 0; 2 * i < w.count; ++i) packed[i] = static_cast<uint8_t>(c.nibbles >> (8 * i));
        if (w.lane % (kNvfp4Block / 4) == 0 && w.count > 0)
          args.scales[w.token * args.scales_row_stride + w.first / kNvfp4Block] = static_cast<uint8_t>(c.scale_byte);
      });
}

// A template only so that a header may define it in every translation unit that includes it.
template <typename = void>
MOELINK_CODEC_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) nvfp4_dequantize_kernel(Nvfp4DequantizeArgs args) {
  const size_t elem = element_bytes(args.out_dtype);
  const float g = *args.global_scale;
  const auto out_row = [&](int64_t token) MOELINK_CODEC_LAMBDA { return static_cast<char*>(args.out) + token * args.out_row_stride * elem; };
  for_each_tile(
      args.split, args.num_tokens, args.hidden,
      [&](int64_t token, int64_t tile) MOELINK_CODEC_LAMBDA {
        const int count = tile_channels(args.hidden, tile);
        const uint8_t* packed = args.packed + token * args.packed_row_stride + tile * (kCodecGroup / 2);
        const uint8_t* scales = args.scales + token * args.scales_row_stride + tile * (kCodecGroup / kNvfp4Block);
        with_row_type(out_row(token), args.out_dtype, [&](auto* out) MOELINK_CODEC_LAMBDA {
          for (int c = 0; c < count; c += kNvfp4Block) {
            const int n = count - c < kNvfp4Block ? count - c : kNvfp4Block;
            nvfp4_dequantize_block(packed + c / 2, n, scales[c / kNvfp4Block], g, out + tile * kCodecGroup + c);
          }
        });
      },
      [&](const GroupWork& w) MOELINK_CODEC_LAMBDA {
        if (w.count == 0) return;  // no collective below
        const uint32_t scale_byte = args.scales[w.token * args.scales_row_stride + w.first / kNvfp4Block];
        const uint8_t* packed = args.packed + w.token * args.packed_row_stride + w.first / 2;
        uint32_t nibbles = 0;
        for (int i = 0; 2 * i < w.count; ++i) nibbles |= static_cast<uint32_t>(packed[i]) << (8 * i);
        float out[4];
        nvfp4_dequantize_lane(nibbles, scale_byte, g, args.out_dtype, out);
        store4(out_row(w.token), args.out_dtype, w.first, w.count, out);
      });
}

inline void launch_nvfp4_quantize(const Nvfp4QuantizeArgs& args, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "nvfp4_quantize", nvfp4_quantize_kernel<>, grid_for(args.num_tokens * num_groups(args.hidden)),
                 kThreads, 0, args);
}

inline void launch_nvfp4_dequantize(const Nvfp4DequantizeArgs& args, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "nvfp4_dequantize", nvfp4_dequantize_kernel<>, grid_for(args.num_tokens * num_groups(args.hidden)),
                 kThreads, 0, args);
}

}  // namespace moelink::kernels::codec
