// FP8 payload codec (E4M3 / E5M2, one scale per token and 128-channel group, float32 or UE8M0).
//
// The specification is python/moelink/reference/codecs/ (the package docstring and fp8.py);
// encoders here reproduce it bit for bit. That rests on two rules every function below follows
// (kernels/numeric.cuh):
//   * float32 arithmetic goes through rn_add/rn_sub/rn_mul/rn_div: one IEEE operation rounded to
//     nearest-even, never fused into an FMA (nvcc fuses a*b+c by default; g++ may with -mfma);
//   * conversions are integer code on the bits, never <cuda_fp8.h> or libm.
//
// Device functions work on one group of 128 channels from inside one warp (codec_common.cuh), so
// a dispatch or combine kernel can quantize what it already holds in registers.
#pragma once

#include <cstdint>

#include "kernels/codec_common.cuh"

namespace moelink::kernels::codec {

// ---- FP8 element conversion -------------------------------------------------------------------

template <Fp8Format F>
struct Fp8Traits;
template <>
struct Fp8Traits<Fp8Format::kE4M3> {
  static constexpr int kMantissaBits = 3, kBias = 7;
  static constexpr uint32_t kMaxCode = 0x7E;  // 448
  static constexpr bool kHasInf = false;
  static constexpr float kMax = 448.0f;
};
template <>
struct Fp8Traits<Fp8Format::kE5M2> {
  static constexpr int kMantissaBits = 2, kBias = 15;
  static constexpr uint32_t kMaxCode = 0x7B;  // 57344
  static constexpr bool kHasInf = true;      // 0x7C
  static constexpr float kMax = 57344.0f;
};
constexpr uint32_t kFp8Nan = 0x7F;

// float32 -> FP8: round to nearest-even, finite values saturate, NaN -> 0x7F, inf -> inf (E5M2)
// or NaN (E4M3). Integer code: exponent and rounded significand simply add, so a significand
// that rounds up to the next binade (or a subnormal up to the smallest normal) carries itself.
template <Fp8Format F>
MOELINK_DEVICE uint32_t float_to_fp8(float v) {
  using T = Fp8Traits<F>;
  constexpr int kMinExponent = 1 - T::kBias;
  const uint32_t b = float_bits(v);
  const uint32_t sign = (b >> 24) & 0x80u;
  const int exp_field = static_cast<int>((b >> 23) & 0xFF);
  const uint32_t frac = b & 0x7FFFFFu;
  if (exp_field == 0xFF) {
    if (frac != 0 || !T::kHasInf) return kFp8Nan;
    return sign | 0x7Cu;
  }
  if (exp_field == 0) return sign;  // float32 subnormals are far below FP8's smallest step
  const int e = exp_field - 127;
  const int below_normal = e < kMinExponent ? kMinExponent - e : 0;
  int shift = 23 - T::kMantissaBits + below_normal;
  if (shift > 31) shift = 31;
  const uint32_t r = rshift_rne(frac | 0x800000u, shift);
  uint32_t code = (static_cast<uint32_t>(e > kMinExponent ? e - kMinExponent : 0) << T::kMantissaBits) + r;
  if (code > T::kMaxCode) code = T::kMaxCode;
  return sign | code;
}

template <Fp8Format F>
MOELINK_DEVICE float fp8_to_float(uint32_t code) {
  using T = Fp8Traits<F>;
  const uint32_t sign = (code & 0x80u) << 24;
  const uint32_t mag = code & 0x7Fu;
  const uint32_t exp_field = mag >> T::kMantissaBits;
  const uint32_t mant = mag & ((1u << T::kMantissaBits) - 1u);
  if (T::kHasInf ? exp_field == (0x7Fu >> T::kMantissaBits) : mag == kFp8Nan) {
    return bits_float(mant != 0 || !T::kHasInf ? kQuietNanBits : (sign | kInfBits));
  }
  if (exp_field == 0) {  // subnormal: mant * 2**(1 - bias - m), exact
    const float value = rn_mul(static_cast<float>(mant), pow2i(1 - T::kBias - T::kMantissaBits));
    return bits_float(float_bits(value) | sign);
  }
  return bits_float(sign | ((exp_field - T::kBias + 127) << 23) | (mant << (23 - T::kMantissaBits)));
}

// ---- one group from inside a warp -------------------------------------------------------------

struct Fp8GroupCodes {
  uint32_t codes;  // this lane's four FP8 codes, byte i = channel 4*lane + i of the group
  float scale;     // decode multiplier (a power of two for UE8M0), the same on every lane
  uint32_t ue8m0;  // biased exponent byte of `scale` (UE8M0 only)
};

// All 32 lanes must call (the amax is a warp reduction). v: this lane's four channels.
template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_DEVICE Fp8GroupCodes fp8_quantize_group(const float (&v)[4]) {
  using T = Fp8Traits<F>;
  // amax over finite elements, on the bits: non-negative floats order like their bit patterns,
  // and integer max cannot be affected by NaN rules or flush-to-zero.
  uint32_t amax_bits = 0;
  for (int i = 0; i < 4; ++i) {
    const uint32_t mag = float_bits(v[i]) & kAbsMask;
    if (is_finite_bits(mag) && mag > amax_bits) amax_bits = mag;
  }
  amax_bits = arch::warp_reduce_max(arch::kFullMask, amax_bits);
  // Floor: amax >= fp8_max * 2**-100, so the scale is >= 2**-100 (all-zero groups decode to
  // exact zeros, and no product below is subnormal).
  const uint32_t floor_bits = float_bits(T::kMax * 0x1p-100f);
  const float amax = bits_float(amax_bits > floor_bits ? amax_bits : floor_bits);

  Fp8GroupCodes out;
  out.scale = rn_div(amax, T::kMax);
  out.ue8m0 = 0;
  float inv_scale;
  if constexpr (S == Fp8ScaleFormat::kFloat32) {
    inv_scale = rn_div(T::kMax, amax);
  } else {
    const uint32_t sb = float_bits(out.scale);
    out.ue8m0 = (sb >> 23) + ((sb & 0x7FFFFFu) != 0 ? 1u : 0u);  // round up to a power of two
    out.scale = bits_float(out.ue8m0 << 23);
    inv_scale = bits_float((254u - out.ue8m0) << 23);
  }
  out.codes = 0;
  for (int i = 0; i < 4; ++i) out.codes |= float_to_fp8<F>(rn_mul(v[i], inv_scale)) << (8 * i);
  return out;
}

// Per lane, no warp collective: decodes the lane's four codes with the group's scale.
template <Fp8Format F>
MOELINK_DEVICE void fp8_dequantize_lane(uint32_t codes, float scale, CodecDType out_dtype, float (&out)[4]) {
  for (int i = 0; i < 4; ++i) {
    const float value = fp8_to_float<F>((codes >> (8 * i)) & 0xFFu);
    const float product = rn_mul(value, scale);
    out[i] = is_finite_bits(float_bits(value)) ? saturate_finite(product, out_dtype) : product;
  }
}

// ---- standalone kernels -----------------------------------------------------------------------

template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_KERNEL void fp8_quantize_kernel(Fp8QuantizeArgs args) {
  const int64_t groups = num_groups(args.hidden);
  const size_t elem = element_bytes(args.x_dtype);
  for_each_group(args.num_tokens, args.hidden, [&](const GroupWork& w) {
    const char* x_row = static_cast<const char*>(args.x) + w.token * args.x_row_stride * elem;
    float v[4];
    load4(x_row, args.x_dtype, w.first, w.count, v);
    const Fp8GroupCodes g = fp8_quantize_group<F, S>(v);

    uint8_t* q = args.q + w.token * args.q_row_stride + w.first;
    if (w.count == 4 && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
      store_vector(q, g.codes);
    } else {
      for (int i = 0; i < 4; ++i)
        if (i < w.count) q[i] = static_cast<uint8_t>(g.codes >> (8 * i));
    }
    if (w.lane == 0) {
      if constexpr (S == Fp8ScaleFormat::kFloat32) {
        static_cast<float*>(args.scales)[w.token * args.scales_row_stride + w.group] = g.scale;
      } else {
        // Byte `group` of the row's packed words (little-endian on both targets); the last group
        // also zeroes the padding bytes of its word, so the output is fully defined.
        uint8_t* bytes = reinterpret_cast<uint8_t*>(static_cast<int32_t*>(args.scales) + w.token * args.scales_row_stride);
        bytes[w.group] = static_cast<uint8_t>(g.ue8m0);
        if (w.group == groups - 1)
          for (int64_t pad = groups; pad % 4 != 0; ++pad) bytes[pad] = 0;
      }
    }
  });
}

template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_KERNEL void fp8_dequantize_kernel(Fp8DequantizeArgs args) {
  const size_t elem = element_bytes(args.out_dtype);
  for_each_group(args.num_tokens, args.hidden, [&](const GroupWork& w) {
    if (w.count == 0) return;  // no collective below: idle lanes may leave
    float scale;
    if constexpr (S == Fp8ScaleFormat::kFloat32) {
      scale = static_cast<const float*>(args.scales)[w.token * args.scales_row_stride + w.group];
    } else {
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(static_cast<const int32_t*>(args.scales) + w.token * args.scales_row_stride);
      scale = bits_float(static_cast<uint32_t>(bytes[w.group]) << 23);
    }
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
    store4(static_cast<char*>(args.out) + w.token * args.out_row_stride * elem, args.out_dtype, w.first, w.count, out);
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
  with_fp8_kind(args.format, args.scale_format, [&](auto kind) {
    using K = decltype(kind);
    MOELINK_LAUNCH(ctx, "fp8_quantize", (fp8_quantize_kernel<K::kFormat, K::kScale>), grid, kThreads, 0, args);
  });
}

inline void launch_fp8_dequantize(const Fp8DequantizeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * num_groups(args.hidden));
  with_fp8_kind(args.format, args.scale_format, [&](auto kind) {
    using K = decltype(kind);
    MOELINK_LAUNCH(ctx, "fp8_dequantize", (fp8_dequantize_kernel<K::kFormat, K::kScale>), grid, kThreads, 0, args);
  });
}

}  // namespace moelink::kernels::codec
