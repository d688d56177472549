// FP8 payload codec (E4M3 / E5M2, one scale per token and 128-channel group, float32 or UE8M0).
//
// The specification is python/moelink/reference/codecs/ (the package docstring and fp8.py);
// encoders here reproduce it bit for bit. That rests on two rules every function below follows
// (kernels/numeric.cuh):
//   * float32 arithmetic goes through rn_add/rn_sub/rn_mul/rn_div: one IEEE operation rounded to
//     nearest-even, never fused into an FMA (nvcc fuses a*b+c by default; g++ may with -mfma);
//   * conversions are integer code on the bits, never <cuda_fp8.h> or libm.
//
// Device functions come in the two forms of codec_common.cuh: `fp8_quantize_group` /
// `fp8_dequantize_lane` on one group of 128 channels held by a warp in registers (4 per lane), for
// fusion into dispatch or combine kernels on the GPU; `fp8_quantize_tile` / `fp8_dequantize_tile`
// on one group owned by one lane, read from memory (no collective: the host's form).
#pragma once

#include <cstdint>

#include "kernels/codec_common.cuh"

namespace moelink::kernels::codec {

// ---- format parameters ------------------------------------------------------------------------

template <Fp8Format F>
struct Fp8Traits;
template <>
struct Fp8Traits<Fp8Format::kE4M3> {
  using Mini = E4M3;  // codec_minifloat.cuh: the element conversion
  static constexpr float kMax = 448.0f;
};
template <>
struct Fp8Traits<Fp8Format::kE5M2> {
  using Mini = E5M2;
  static constexpr float kMax = 57344.0f;
};

// ---- the scale of one group -------------------------------------------------------------------

struct Fp8Scale {
  float scale;      // decode multiplier (a power of two for UE8M0)
  float inv_scale;  // encode multiplier
  uint32_t ue8m0;   // biased exponent byte of `scale` (UE8M0 only, else 0)
};

// From the group's finite amax (float32 bits).
template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_CODEC_INLINE Fp8Scale fp8_scale_from_amax(uint32_t amax_bits) {
  using T = Fp8Traits<F>;
  // Floor: amax >= fp8_max * 2**-100, so the scale is >= 2**-100 (all-zero groups decode to
  // exact zeros, and no product below is subnormal).
  const uint32_t floor_bits = float_bits(T::kMax * 0x1p-100f);
  const float amax = bits_float(amax_bits > floor_bits ? amax_bits : floor_bits);
  Fp8Scale s;
  s.scale = rn_div(amax, T::kMax);
  s.ue8m0 = 0;
  if constexpr (S == Fp8ScaleFormat::kFloat32) {
    s.inv_scale = rn_div(T::kMax, amax);
  } else {
    const uint32_t sb = float_bits(s.scale);
    s.ue8m0 = (sb >> 23) + ((sb & 0x7FFFFFu) != 0 ? 1u : 0u);  // round up to a power of two
    s.scale = bits_float(s.ue8m0 << 23);
    s.inv_scale = bits_float((254u - s.ue8m0) << 23);
  }
  return s;
}

// Decoded value of one code: value(code) * scale, finite codes saturated to the output's range.
template <Fp8Format F>
MOELINK_CODEC_INLINE float fp8_decode(uint32_t code, float scale, uint32_t out_max_bits) {
  const float value = fp8_code_to_float<typename Fp8Traits<F>::Mini>(code);
  const uint32_t product = float_bits(rn_mul(value, scale));
  return bits_float(is_finite_bits(float_bits(value)) ? saturate_bits(product, out_max_bits) : product);
}

// ---- one group from inside a warp (spread form) -----------------------------------------------

struct Fp8GroupCodes {
  uint32_t codes;  // this lane's four FP8 codes, byte i = channel 4*lane + i of the group
  float scale;     // decode multiplier (a power of two for UE8M0), the same on every lane
  uint32_t ue8m0;  // biased exponent byte of `scale` (UE8M0 only)
};

// All 32 lanes must call (the amax is one warp reduction). v: this lane's four channels of a
// 128-channel group (channels 4*lane .. 4*lane + 3; zeros past a partial group's end).
template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_CODEC_INLINE Fp8GroupCodes fp8_quantize_group(const float (&v)[4]) {
  // amax over finite elements, on the bits: non-negative floats order like their bit patterns,
  // and integer max cannot be affected by NaN rules or flush-to-zero.
  uint32_t amax_bits = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t mag = float_bits(v[i]) & kAbsMask;
    if (is_finite_bits(mag) && mag > amax_bits) amax_bits = mag;
  }
  amax_bits = arch::warp_reduce_max(arch::kFullMask, amax_bits);
  const Fp8Scale s = fp8_scale_from_amax<F, S>(amax_bits);
  Fp8GroupCodes out{0, s.scale, s.ue8m0};
  for (int i = 0; i < 4; ++i)
    out.codes |= float_to_fp8_code<typename Fp8Traits<F>::Mini>(rn_mul(v[i], s.inv_scale)) << (8 * i);
  return out;
}

// Per lane, no warp collective: decodes the lane's four codes with the group's scale.
template <Fp8Format F>
MOELINK_CODEC_INLINE void fp8_dequantize_lane(uint32_t codes, float scale, CodecDType out_dtype, float (&out)[4]) {
  const uint32_t top = out_dtype == CodecDType::kBFloat16 ? kBf16MaxBits : kF32MaxBits;
  for (int i = 0; i < 4; ++i) out[i] = fp8_decode<F>((codes >> (8 * i)) & 0xFFu, scale, top);
}

// ---- one group by one lane (owned form) --------------------------------------------------------

// Per lane, no collective: quantizes channels x[0, count) (count <= 128, one group) into
// q[0, count) and returns the group's scale. In: uint16_t (bf16 bits) or float.
template <Fp8Format F, Fp8ScaleFormat S, typename In>
MOELINK_CODEC_INLINE Fp8Scale fp8_quantize_tile(const In* x, int count, uint8_t* q) {
  const Fp8Scale s = fp8_scale_from_amax<F, S>(finite_amax_bits(x, count));
  for (int i = 0; i < count; ++i)
    q[i] = static_cast<uint8_t>(float_to_fp8_code<typename Fp8Traits<F>::Mini>(rn_mul(load_channel(x, i), s.inv_scale)));
  return s;
}

// Per lane, no collective: decodes q[0, count) with `scale` into out[0, count). Out: uint16_t
// (bf16 bits) or float.
template <Fp8Format F, typename Out>
MOELINK_CODEC_INLINE void fp8_dequantize_tile(const uint8_t* q, int count, float scale, Out* out) {
  const uint32_t top = out_max_bits(out);
  for (int i = 0; i < count; ++i) store_channel(out, i, fp8_decode<F>(q[i], scale, top));
}

// ---- standalone kernels -----------------------------------------------------------------------

// Writes the scale of (token, group): a float32, or byte `group` of the row's packed UE8M0 words
// (little-endian on both targets); the last group also zeroes the padding bytes of its word, so
// the output is fully defined.
template <Fp8ScaleFormat S>
MOELINK_CODEC_INLINE void store_fp8_scale(const Fp8QuantizeArgs& args, int64_t token, int64_t group, int64_t groups,
                                    float scale, uint32_t ue8m0) {
  if constexpr (S == Fp8ScaleFormat::kFloat32) {
    static_cast<float*>(args.scales)[token * args.scales_row_stride + group] = scale;
  } else {
    uint8_t* bytes = reinterpret_cast<uint8_t*>(static_cast<int32_t*>(args.scales) + token * args.scales_row_stride);
    bytes[group] = static_cast<uint8_t>(ue8m0);
    if (group == groups - 1)
      for (int64_t pad = groups; pad % 4 != 0; ++pad) bytes[pad] = 0;
  }
}

template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_CODEC_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) fp8_quantize_kernel(Fp8QuantizeArgs args) {
  const int64_t groups = num_groups(args.hidden);
  const size_t elem = element_bytes(args.x_dtype);
  const auto x_row = [&](int64_t token) MOELINK_CODEC_LAMBDA { return static_cast<const char*>(args.x) + token * args.x_row_stride * elem; };
  for_each_tile(
      args.split, args.num_tokens, args.hidden,
      [&](int64_t token, int64_t group) MOELINK_CODEC_LAMBDA {
        uint8_t* q = args.q + token * args.q_row_stride + group * kCodecGroup;
        Fp8Scale s;
        with_row_type(x_row(token), args.x_dtype, [&](auto* x) MOELINK_CODEC_LAMBDA {
          s = fp8_quantize_tile<F, S>(x + group * kCodecGroup, tile_channels(args.hidden, group), q);
        });
        store_fp8_scale<S>(args, token, group, groups, s.scale, s.ue8m0);
      },
      [&](const GroupWork& w) MOELINK_CODEC_LAMBDA {
        float v[4];
        load4(x_row(w.token), args.x_dtype, w.first, w.count, v);
        const Fp8GroupCodes g = fp8_quantize_group<F, S>(v);
        uint8_t* q = args.q + w.token * args.q_row_stride + w.first;
        if (w.count == 4 && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
          store_vector(q, g.codes);
        } else {
          for (int i = 0; i < 4; ++i)
            if (i < w.count) q[i] = static_cast<uint8_t>(g.codes >> (8 * i));
        }
        if (w.lane == 0) store_fp8_scale<S>(args, w.token, w.group, groups, g.scale, g.ue8m0);
      });
}

template <Fp8ScaleFormat S>
MOELINK_CODEC_INLINE float load_fp8_scale(const Fp8DequantizeArgs& args, int64_t token, int64_t group) {
  if constexpr (S == Fp8ScaleFormat::kFloat32) {
    return static_cast<const float*>(args.scales)[token * args.scales_row_stride + group];
  } else {
    const uint8_t* bytes =
        reinterpret_cast<const uint8_t*>(static_cast<const int32_t*>(args.scales) + token * args.scales_row_stride);
    return bits_float(static_cast<uint32_t>(bytes[group]) << 23);
  }
}

template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_CODEC_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) fp8_dequantize_kernel(Fp8DequantizeArgs args) {
  const size_t elem = element_bytes(args.out_dtype);
  const auto out_row = [&](int64_t token) MOELINK_CODEC_LAMBDA { return static_cast<char*>(args.out) + token * args.out_row_stride * elem; };
  for_each_tile(
      args.split, args.num_tokens, args.hidden,
      [&](int64_t token, int64_t group) MOELINK_CODEC_LAMBDA {
        const uint8_t* q = args.q + token * args.q_row_stride + group * kCodecGroup;
        const float scale = load_fp8_scale<S>(args, token, group);
        with_row_type(out_row(token), args.out_dtype, [&](auto* out) MOELINK_CODEC_LAMBDA {
          fp8_dequantize_tile<F>(q, tile_channels(args.hidden, group), scale, out + group * kCodecGroup);
        });
      },
      [&](const GroupWork& w) MOELINK_CODEC_LAMBDA {
        if (w.count == 0) return;  // no collective below: idle lanes may leave
        const float scale = load_fp8_scale<S>(args, w.token, w.group);
        const uint8_t* q = args.q + w.token * args.q_row_stride + w.first;
        uint32_t codes = 0;
        if (w.count == 4 && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
          codes = load_vector<uint32_t>(q);
        } else {
          for (int i = 0; i < 4; ++i)
            if (i < w.count) codes |= static_cast<uint32_t>(q[i]) << (8 * i);
        }
        float out[4];
        fp8_dequantize_lane<F>(codes, scale, args.out_dtype, out);
        store4(out_row(w.token), args.out_dtype, w.first, w.count, out);
      });
}

// Calls launch(Fp8Kind<F, S>{}) for the runtime format pair: one kernel instantiation each.
template <Fp8Format F, Fp8ScaleFormat S>
struct Fp8Kind {
  static constexpr Fp8Format kFormat = F;
  static constexpr Fp8ScaleFormat kScale = S;
};
template <typename Launch>
inline void with_fp8_kind(Fp8Format format, Fp8ScaleFormat scale_format, Launch&& launch) {
  constexpr Fp8ScaleFormat kF32 = Fp8ScaleFormat::kFloat32, kUe8m0 = Fp8ScaleFormat::kUe8m0;
  const bool f32 = scale_format == kF32;
  if (format == Fp8Format::kE4M3) {
    if (f32) launch(Fp8Kind<Fp8Format::kE4M3, kF32>{});
    else launch(Fp8Kind<Fp8Format::kE4M3, kUe8m0>{});
  } else {
    if (f32) launch(Fp8Kind<Fp8Format::kE5M2, kF32>{});
    else launch(Fp8Kind<Fp8Format::kE5M2, kUe8m0>{});
  }
}

inline void launch_fp8_quantize(const Fp8QuantizeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * num_groups(args.hidden));
  with_fp8_kind(args.format, args.scale_format, [&](auto kind) MOELINK_CODEC_LAMBDA {
    using K = decltype(kind);
    MOELINK_LAUNCH(ctx, "fp8_quantize", (fp8_quantize_kernel<K::kFormat, K::kScale>), grid, kThreads, 0, args);
  });
}

inline void launch_fp8_dequantize(const Fp8DequantizeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * num_groups(args.hidden));
  with_fp8_kind(args.format, args.scale_format, [&](auto kind) MOELINK_CODEC_LAMBDA {
    using K = decltype(kind);
    MOELINK_LAUNCH(ctx, "fp8_dequantize", (fp8_dequantize_kernel<K::kFormat, K::kScale>), grid, kThreads, 0, args);
  });
}

}  // namespace moelink::kernels::codec
