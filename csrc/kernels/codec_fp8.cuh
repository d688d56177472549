// FP8 payload codec (E4M3 / E5M2, one scale per token and 128-channel group, float32 or UE8M0),
// plus the scalar helpers both codecs share (codec_logfmt.cuh includes this file).
//
// The specification is python/moelink/reference/codecs.py; encoders here reproduce it bit for
// bit. That rests on two rules every function below follows:
//   * float32 arithmetic goes through rn_add/rn_sub/rn_mul/rn_div: one IEEE operation rounded to
//     nearest-even, never fused into an FMA (nvcc fuses a*b+c by default; g++ may with -mfma);
//   * conversions are integer code on the bits, never <cuda_fp8.h> or libm.
//
// Device functions work on one group of 128 channels from inside one warp: lane l holds channels
// 4l .. 4l+3 of the group (zeros past the end of a partial group), so a dispatch or combine kernel
// can quantize what it already holds in registers. The standalone kernels at the bottom give
// every warp one (token, group) at a time.
#pragma once

#include <cstdint>
#include <cstring>

#include "arch/arch.cuh"
#include "runtime/ops_codecs.h"

namespace moelink::kernels::codec {

// ---- reproducible float32 ---------------------------------------------------------------------

#if !defined(__CUDA_ARCH__)
// Hides a product from the optimiser so that it cannot become one half of an FMA.
MOELINK_DEVICE void no_contract(float& v) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+x"(v));
#elif defined(__aarch64__)
  __asm__("" : "+w"(v));
#else
  volatile float sink = v;
  v = sink;
#endif
}
#endif

#if defined(__CUDA_ARCH__)
MOELINK_DEVICE float rn_add(float a, float b) { return __fadd_rn(a, b); }
MOELINK_DEVICE float rn_sub(float a, float b) { return __fsub_rn(a, b); }
MOELINK_DEVICE float rn_mul(float a, float b) { return __fmul_rn(a, b); }
MOELINK_DEVICE float rn_div(float a, float b) { return __fdiv_rn(a, b); }
MOELINK_DEVICE uint32_t float_bits(float v) { return __float_as_uint(v); }
MOELINK_DEVICE float bits_float(uint32_t b) { return __uint_as_float(b); }
#else
MOELINK_DEVICE float rn_add(float a, float b) { return a + b; }
MOELINK_DEVICE float rn_sub(float a, float b) { return a - b; }
MOELINK_DEVICE float rn_mul(float a, float b) {
  float p = a * b;
  no_contract(p);
  return p;
}
MOELINK_DEVICE float rn_div(float a, float b) { return a / b; }
MOELINK_DEVICE uint32_t float_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}
MOELINK_DEVICE float bits_float(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
#endif

constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
constexpr uint32_t kInfBits = 0x7F800000u;
constexpr uint32_t kQuietNanBits = 0x7FC00000u;
constexpr uint32_t kF32MaxBits = 0x7F7FFFFFu;
constexpr uint32_t kBf16MaxBits = 0x7F7F0000u;

MOELINK_DEVICE bool is_finite_bits(uint32_t bits) { return (bits & kInfBits) != kInfBits; }
// 2**k for k in [-126, 127], exact.
MOELINK_DEVICE float pow2i(int k) { return bits_float(static_cast<uint32_t>(k + 127) << 23); }

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

MOELINK_DEVICE float bf16_to_float(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

// Round to nearest-even, NaN -> 0x7FC0: what torch's float -> bfloat16 does.
MOELINK_DEVICE uint16_t float_to_bf16(float v) {
  const uint32_t b = float_bits(v);
  if ((b & kAbsMask) > kInfBits) return 0x7FC0;
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

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
  const uint32_t significand = frac | 0x800000u;
  uint32_t r = significand >> shift;
  const uint32_t rem = significand & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1);
  r += (rem > half || (rem == half && (r & 1u))) ? 1u : 0u;
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

template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_KERNEL void fp8_quantize_kernel(Fp8QuantizeArgs args) {
  using namespace arch;
  const int lane = static_cast<int>(lane_id());
  const int64_t groups = num_groups(args.hidden);
  const int64_t total = args.num_tokens * groups;
  const int64_t warps = static_cast<int64_t>(num_blocks()) * kWarpsPerBlock;
  const size_t elem = args.x_dtype == CodecDType::kBFloat16 ? 2 : 4;
  for (int64_t work = block_rank() * kWarpsPerBlock + warp_id(); work < total; work += warps) {
    const int64_t token = work / groups, group = work % groups;
    int64_t first;
    const int count = lane_channels(args.hidden, group, lane, &first);
    const char* x_row = static_cast<const char*>(args.x) + token * args.x_row_stride * elem;
    float v[4];
    load4(x_row, args.x_dtype, first, count, v);
    const Fp8GroupCodes g = fp8_quantize_group<F, S>(v);

    uint8_t* q = args.q + token * args.q_row_stride + first;
    if (count == 4 && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
      store_vector(q, g.codes);
    } else {
      for (int i = 0; i < 4; ++i)
        if (i < count) q[i] = static_cast<uint8_t>(g.codes >> (8 * i));
    }
    if (lane == 0) {
      if constexpr (S == Fp8ScaleFormat::kFloat32) {
        static_cast<float*>(args.scales)[token * args.scales_row_stride + group] = g.scale;
      } else {
        // Byte `group` of the row's packed words (little-endian on both targets); the last group
        // also zeroes the padding bytes of its word, so the output is fully defined.
        uint8_t* bytes = reinterpret_cast<uint8_t*>(static_cast<int32_t*>(args.scales) + token * args.scales_row_stride);
        bytes[group] = static_cast<uint8_t>(g.ue8m0);
        if (group == groups - 1)
          for (int64_t pad = groups; pad % 4 != 0; ++pad) bytes[pad] = 0;
      }
    }
  }
}

template <Fp8Format F, Fp8ScaleFormat S>
MOELINK_KERNEL void fp8_dequantize_kernel(Fp8DequantizeArgs args) {
  using namespace arch;
  const int lane = static_cast<int>(lane_id());
  const int64_t groups = num_groups(args.hidden);
  const int64_t total = args.num_tokens * groups;
  const int64_t warps = static_cast<int64_t>(num_blocks()) * kWarpsPerBlock;
  for (int64_t work = block_rank() * kWarpsPerBlock + warp_id(); work < total; work += warps) {
    const int64_t token = work / groups, group = work % groups;
    int64_t first;
    const int count = lane_channels(args.hidden, group, lane, &first);
    if (count == 0) continue;  // no collective below: idle lanes may leave
    float scale;
    if constexpr (S == Fp8ScaleFormat::kFloat32) {
      scale = static_cast<const float*>(args.scales)[token * args.scales_row_stride + group];
    } else {
      const uint8_t* bytes = reinterpret_cast<const uint8_t*>(static_cast<const int32_t*>(args.scales) + token * args.scales_row_stride);
      scale = bits_float(static_cast<uint32_t>(bytes[group]) << 23);
    }
    const uint8_t* q = args.q + token * args.q_row_stride + first;
    uint32_t codes = 0;
    if (count == 4 && (reinterpret_cast<uintptr_t>(q) & 3) == 0) {
      codes = load_vector<uint32_t>(q);
    } else {
      for (int i = 0; i < 4; ++i)
        if (i < count) codes |= static_cast<uint32_t>(q[i]) << (8 * i);
    }
    float out[4];
    fp8_dequantize_lane<F>(codes, scale, args.out_dtype, out);
    const size_t elem = args.out_dtype == CodecDType::kBFloat16 ? 2 : 4;
    store4(static_cast<char*>(args.out) + token * args.out_row_stride * elem, args.out_dtype, first, count, out);
  }
}

inline unsigned grid_for(int64_t work_items) {
  const int64_t blocks = (work_items + kWarpsPerBlock - 1) / kWarpsPerBlock;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

template <Fp8Format F>
inline void launch_fp8_quantize_as(const Fp8QuantizeArgs& args, const LaunchContext& ctx, unsigned grid) {
  if (args.scale_format == Fp8ScaleFormat::kFloat32) {
    MOELINK_LAUNCH(ctx, "fp8_quantize", (fp8_quantize_kernel<F, Fp8ScaleFormat::kFloat32>), grid, kThreads, 0, args);
  } else {
    MOELINK_LAUNCH(ctx, "fp8_quantize", (fp8_quantize_kernel<F, Fp8ScaleFormat::kUe8m0>), grid, kThreads, 0, args);
  }
}

inline void launch_fp8_quantize(const Fp8QuantizeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * num_groups(args.hidden));
  if (args.format == Fp8Format::kE4M3) launch_fp8_quantize_as<Fp8Format::kE4M3>(args, ctx, grid);
  else launch_fp8_quantize_as<Fp8Format::kE5M2>(args, ctx, grid);
}

template <Fp8Format F>
inline void launch_fp8_dequantize_as(const Fp8DequantizeArgs& args, const LaunchContext& ctx, unsigned grid) {
  if (args.scale_format == Fp8ScaleFormat::kFloat32) {
    MOELINK_LAUNCH(ctx, "fp8_dequantize", (fp8_dequantize_kernel<F, Fp8ScaleFormat::kFloat32>), grid, kThreads, 0, args);
  } else {
    MOELINK_LAUNCH(ctx, "fp8_dequantize", (fp8_dequantize_kernel<F, Fp8ScaleFormat::kUe8m0>), grid, kThreads, 0, args);
  }
}

inline void launch_fp8_dequantize(const Fp8DequantizeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * num_groups(args.hidden));
  if (args.format == Fp8Format::kE4M3) launch_fp8_dequantize_as<Fp8Format::kE4M3>(args, ctx, grid);
  else launch_fp8_dequantize_as<Fp8Format::kE5M2>(args, ctx, grid);
}

}  // namespace moelink::kernels::codec
