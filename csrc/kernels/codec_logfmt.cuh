// LogFMT-nBit payload codec (n = 8, 9, 10), after "Insights into DeepSeek-V3: Scaling Challenges
// and Reflections on Hardware for AI Architectures" (ISCA 2025), section 3.2.
//
// Per token and tile of 128 channels: code 0 is zero, codes 1..K (K = 2**(n-1) - 1) are spaced
// uniformly in log2|x| from M * 2**-R up to M, the tile's largest magnitude (R = the tile's log2
// range, clamped to 32); the encoder rounds in linear space (midpoint of neighbouring decoded
// values). Wire row: [tile headers {float32 M, float32 step}, padded to 16 B][dense n-bit fields,
// 16*n bytes per full tile][pad to 16 B]. Field = sign << (n-1) | code; "negative zero" marks a
// non-finite input and decodes to NaN. python/moelink/reference/codecs/ is the specification.
//
// Why no log2f/exp2f: the code an encoder picks depends on comparing |x| with a midpoint of two
// decoded values, and CUDA's and glibc's exp2f differ by ulps, which would flip codes near a
// midpoint. Both targets therefore evaluate the same small polynomials in unfused float32
// (log2_core, exp2_nonpos), and work on values normalised by the tile maximum's exponent (integer
// arithmetic), so no subnormal ever enters a float operation and FTZ cannot matter either.
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels/codec_common.cuh"

namespace moelink::kernels::codec {

// ---- row layout -------------------------------------------------------------------------------

struct LogfmtRowLayout {
  int64_t num_tiles;       // ceil(hidden / 128)
  int64_t header_bytes;    // 8 * num_tiles, padded to 16
  int64_t tile_bytes;      // payload bytes of a full tile: 16 * bits
  int64_t last_channels;   // channels in the last tile, 1..128
  int64_t last_tile_bytes; // ceil(last_channels * bits / 8)
  int64_t row_bytes;       // padded to 16

  MOELINK_HOST_DEVICE int64_t payload_offset(int64_t tile) const { return header_bytes + tile * tile_bytes; }
};

MOELINK_HOST_DEVICE int64_t align16(int64_t n) { return (n + 15) / 16 * 16; }

MOELINK_HOST_DEVICE LogfmtRowLayout logfmt_row_layout(int64_t hidden, int bits) {
  LogfmtRowLayout l;
  l.num_tiles = (hidden + kCodecGroup - 1) / kCodecGroup;
  l.header_bytes = align16(8 * l.num_tiles);
  l.tile_bytes = 16 * bits;
  l.last_channels = hidden - (l.num_tiles - 1) * kCodecGroup;
  l.last_tile_bytes = (l.last_channels * bits + 7) / 8;
  l.row_bytes = align16(l.payload_offset(l.num_tiles - 1) + l.last_tile_bytes);
  return l;
}

// ---- portable log2 / exp2 ---------------------------------------------------------------------

// A positive finite nonzero float32 as (1 + frac / 2**23) * 2**exponent, subnormals included.
struct Binade {
  int exponent;
  uint32_t frac;
};

MOELINK_DEVICE Binade normalize(uint32_t mag) {
  const int exp_field = static_cast<int>(mag >> 23);
  uint32_t frac = mag & 0x7FFFFFu;
  if (exp_field != 0) return {exp_field - 127, frac};
  int shift = 0;
  while ((frac & 0x800000u) == 0) {  // rare: a subnormal; at most 23 steps
    frac <<= 1;
    ++shift;
  }
  return {-126 - shift, frac & 0x7FFFFFu};
}

// log2 f for f in [sqrt(1/2), sqrt 2): z * q(z^2), z = (f - 1)/(f + 1), q = atanh series.
MOELINK_DEVICE float log2_core(float f) {
  // q_j = 2 / (ln 2 * (2j + 1)) rounded to float32; Horner order fixed (it is part of the format).
  const float z = rn_div(rn_sub(f, 1.0f), rn_add(f, 1.0f));
  const float z2 = rn_mul(z, z);
  float q = 0x1.484b14p-2f;
  q = rn_add(rn_mul(q, z2), 0x1.a61762p-2f);
  q = rn_add(rn_mul(q, z2), 0x1.2776c6p-1f);
  q = rn_add(rn_mul(q, z2), 0x1.ec709ep-1f);
  q = rn_add(rn_mul(q, z2), 0x1.715476p+1f);
  return rn_mul(z, q);
}

struct Log2Split {
  int e;    // log2 x = e + l
  float l;  // |l| <= 1/2
};

MOELINK_DEVICE Log2Split log2_split(Binade b) {
  constexpr uint32_t kSqrt2Frac = 0x3504F3u;
  const uint32_t high = b.frac >= kSqrt2Frac ? 1u : 0u;
  return {b.exponent + static_cast<int>(high), log2_core(bits_float(((127u - high) << 23) | b.frac))};
}

// 2**y for y in [-34, 0]: y = i + f with i = floor(y), a degree-6 polynomial for 2**f, times the
// exact power of two 2**i. p(f) = 1 + f*(c1 + f*(c2 + ... + f*c6)) is a relative least-squares
// fit on [0, 1) rounded to float32 (max error 1.4 half-ulps, p(0) = 1 exactly).
MOELINK_DEVICE float exp2_nonpos(float y) {
  // floor by truncation (exact for |y| < 2**31): baseline x86-64 has no SSE4.1 round
  // instruction, and a libm floorf call per evaluation was a measurable share of the encoder.
  const int truncated = static_cast<int>(y);
  const int i = truncated - (static_cast<float>(truncated) > y ? 1 : 0);
  const float f = rn_sub(y, static_cast<float>(i));
  float p = 0x1.c165d4p-13f;
  p = rn_add(rn_mul(p, f), 0x1.47ef4cp-10f);
  p = rn_add(rn_mul(p, f), 0x1.3cf1f8p-7f);
  p = rn_add(rn_mul(p, f), 0x1.c68a5ep-5f);
  p = rn_add(rn_mul(p, f), 0x1.ebfd66p-3f);
  p = rn_add(rn_mul(p, f), 0x1.62e42ap-1f);
  p = rn_add(rn_mul(p, f), 1.0f);
  return rn_mul(p, pow2i(i));
}

// w * 2**k for a positive normal w, rounding to nearest-even into the subnormal range with
// integer operations (no FTZ dependence). Never overflows here: decoded values are <= M.
MOELINK_DEVICE float ldexp_rne(float w, int k) {
  const uint32_t wb = float_bits(w);
  const int exp_field = static_cast<int>(wb >> 23) + k;
  if (exp_field >= 1) return bits_float((static_cast<uint32_t>(exp_field) << 23) | (wb & 0x7FFFFFu));
  const int shift = 1 - exp_field;
  // Rounding up to 2**23 gives the smallest normal, as it should.
  return bits_float(rshift_rne((wb & 0x7FFFFFu) | 0x800000u, shift > 25 ? 25 : shift));
}

// ---- tile scale -------------------------------------------------------------------------------

template <int kBits>
struct Logfmt {
  static_assert(kBits >= 8 && kBits <= 10, "LogFMT-n is defined for n = 8, 9, 10");
  static constexpr int kCodes = (1 << (kBits - 1)) - 1;           // K
  static constexpr uint32_t kNonFinite = 1u << (kBits - 1);      // "negative zero"
  static constexpr uint32_t kFieldMask = (1u << kBits) - 1u;
  static constexpr int kLaneBits = 4 * kBits;                     // four fields per lane
};

struct LogfmtHeader {
  float max_abs;  // M, exact; 0 for a tile without finite nonzero elements
  float step;     // s = R / (K - 1)
};

// What both sides derive from a header: M = max_frac * 2**max_binade.
struct LogfmtTile {
  int max_binade;
  float max_frac;  // in [1, 2)
  float step;
};

MOELINK_DEVICE LogfmtTile tile_from_header(LogfmtHeader h) {
  const uint32_t mb = float_bits(h.max_abs);
  const Binade b = normalize(mb != 0 ? mb : 0x3F800000u);
  return {b.exponent, bits_float((127u << 23) | b.frac), h.step};
}

// Decoded value of `steps_down` codes below the top, divided by 2**max_binade: in (2**-34, 2).
MOELINK_DEVICE float scaled_code_value(const LogfmtTile& t, int steps_down) {
  return rn_mul(t.max_frac, exp2_nonpos(rn_mul(static_cast<float>(-steps_down), t.step)));
}

// ---- one tile from inside a warp --------------------------------------------------------------

template <int kBits>
struct LogfmtGroupCodes {
  uint64_t lane_fields;  // field i of this lane (channel 4*lane + i) at bits [kBits*i, kBits*(i+1))
  LogfmtHeader header;   // the same on every lane
};

template <int kBits>
MOELINK_DEVICE uint32_t logfmt_encode_element(uint32_t bits, const LogfmtTile& t, Log2Split top, float inv_step) {
  using L = Logfmt<kBits>;
  const uint32_t mag = bits & kAbsMask;
  if (!is_finite_bits(mag)) return L::kNonFinite;
  if (mag == 0) return 0;
  const Binade a = normalize(mag);
  // a < 2**(b_M - 34) <= M * 2**-34 while v_1 / 2 >= M * 2**-33.0001: code 0 for certain, and
  // past this test every value below is normal once scaled by 2**-b_M.
  if (a.exponent <= t.max_binade - 35) return 0;
  int code = L::kCodes;
  if (t.step != 0.0f) {
    const Log2Split la = log2_split(a);
    // Steps below the top, from the portable logs; floor() picks the bracketing pair of codes.
    const float delta = rn_mul(rn_add(static_cast<float>(top.e - la.e), rn_sub(top.l, la.l)), inv_step);
    // floor of a non-negative value below K - 1: truncation
    const int d = delta >= static_cast<float>(L::kCodes - 1) ? L::kCodes - 1 : static_cast<int>(delta > 0.0f ? delta : 0.0f);
    const int upper = L::kCodes - d;
    const float w_upper = scaled_code_value(t, d);
    const float w_lower = upper > 1 ? scaled_code_value(t, d + 1) : 0.0f;
    const float midpoint = rn_mul(rn_add(w_lower, w_upper), 0.5f);
    const float a_scaled = bits_float((static_cast<uint32_t>(a.exponent - t.max_binade + 127) << 23) | a.frac);
    code = a_scaled >= midpoint ? upper : upper - 1;
  }
  return code == 0 ? 0u : (((bits >> 31) << (kBits - 1)) | static_cast<uint32_t>(code));
}

// All 32 lanes must call (max/min are warp reductions). v: this lane's four channels.
template <int kBits>
MOELINK_DEVICE LogfmtGroupCodes<kBits> logfmt_encode_group(const float (&v)[4]) {
  using L = Logfmt<kBits>;
  uint32_t lane_max = 0, lane_min = kInfBits;
  for (int i = 0; i < 4; ++i) {
    const uint32_t mag = float_bits(v[i]) & kAbsMask;
    if (!is_finite_bits(mag) || mag == 0) continue;
    lane_max = mag > lane_max ? mag : lane_max;
    lane_min = mag < lane_min ? mag : lane_min;
  }
  const uint32_t max_bits = arch::warp_reduce_max(arch::kFullMask, lane_max);
  const uint32_t min_bits = arch::warp_reduce_min(arch::kFullMask, lane_min);

  LogfmtGroupCodes<kBits> out;
  out.header = {0.0f, 0.0f};
  Log2Split top = {0, 0.0f};
  if (max_bits != 0) {
    top = log2_split(normalize(max_bits));
    const Log2Split bottom = log2_split(normalize(min_bits));
    float range = rn_add(static_cast<float>(top.e - bottom.e), rn_sub(top.l, bottom.l));
    range = range < 0.0f ? 0.0f : (range > 32.0f ? 32.0f : range);  // min >= max - 32
    out.header = {bits_float(max_bits), rn_div(range, static_cast<float>(L::kCodes - 1))};
  }
  const LogfmtTile t = tile_from_header(out.header);
  const float inv_step = t.step > 0.0f ? rn_div(1.0f, t.step) : 0.0f;
  out.lane_fields = 0;
  for (int i = 0; i < 4; ++i)
    out.lane_fields |= static_cast<uint64_t>(logfmt_encode_element<kBits>(float_bits(v[i]), t, top, inv_step)) << (kBits * i);
  return out;
}

// Writes payload words [0, num_words) of a tile (num_words = ceil(channels * n / 32)). Lane l's
// fields are stream bits [4n*l, 4n*(l+1)) and 32 <= 4n <= 40, so each word starts inside exactly
// one lane's range and ends at the latest inside the next lane's: the lane where a word starts
// writes it, with its right neighbour's fields from one shuffle. All 32 lanes must call.
template <int kBits>
MOELINK_DEVICE void logfmt_store_payload(uint64_t lane_fields, uint32_t* words, int num_words) {
  using L = Logfmt<kBits>;
  const int lane = static_cast<int>(arch::lane_id());
  if constexpr (kBits == 8) {
    if (lane < num_words) words[lane] = static_cast<uint32_t>(lane_fields);  // one word per lane
  } else {
    const uint64_t next = arch::shfl_down(arch::kFullMask, lane_fields, 1);  // lane 31 gets its own: unused
    const int first_bit = lane * L::kLaneBits;
    for (int w = (first_bit + 31) / 32; 32 * w < first_bit + L::kLaneBits && w < num_words; ++w) {
      const int offset = 32 * w - first_bit;  // < 4n; bits past 4n - offset come from `next`
      words[w] = static_cast<uint32_t>((lane_fields >> offset) | (next << (L::kLaneBits - offset)));
    }
  }
}

// This lane's fields (channels 4*lane .. 4*lane + count - 1) from a tile's payload words; reads
// only words that hold them. No collective.
template <int kBits>
MOELINK_DEVICE uint64_t logfmt_load_lane(const uint32_t* words, int lane, int count) {
  using L = Logfmt<kBits>;
  const int first_bit = lane * L::kLaneBits;
  const int used_bits = count * kBits;
  const int w = first_bit / 32, offset = first_bit % 32;
  uint64_t stream = words[w];
  if (offset + used_bits > 32) stream |= static_cast<uint64_t>(words[w + 1]) << 32;
  return (stream >> offset) & ((uint64_t{1} << used_bits) - 1);
}

// Per lane, no collective: decodes `count` fields with the tile's header.
template <int kBits>
MOELINK_DEVICE void logfmt_decode_lane(uint64_t lane_fields, LogfmtHeader header, int count, CodecDType out_dtype, float (&out)[4]) {
  using L = Logfmt<kBits>;
  const LogfmtTile t = tile_from_header(header);
  for (int i = 0; i < 4; ++i) {
    out[i] = 0.0f;
    if (i >= count) continue;
    const uint32_t field = static_cast<uint32_t>(lane_fields >> (kBits * i)) & L::kFieldMask;
    const int code = static_cast<int>(field & static_cast<uint32_t>(L::kCodes));
    const uint32_t sign = (field >> (kBits - 1)) << 31;
    if (code == 0) {
      out[i] = sign ? bits_float(kQuietNanBits) : 0.0f;
      continue;
    }
    const float value = ldexp_rne(scaled_code_value(t, L::kCodes - code), t.max_binade);
    out[i] = saturate_finite(bits_float(float_bits(value) | sign), out_dtype);
  }
}

// ---- standalone kernels -----------------------------------------------------------------------

template <int kBits>
MOELINK_KERNEL void logfmt_encode_kernel(LogfmtEncodeArgs args) {
  const LogfmtRowLayout layout = logfmt_row_layout(args.hidden, kBits);
  const size_t elem = element_bytes(args.x_dtype);
  for_each_group(args.num_tokens, args.hidden, [&](const GroupWork& w) {
    float v[4];
    load4(static_cast<const char*>(args.x) + w.token * args.x_row_stride * elem, args.x_dtype, w.first, w.count, v);
    const LogfmtGroupCodes<kBits> g = logfmt_encode_group<kBits>(v);

    uint8_t* row = args.packed + w.token * args.packed_row_stride;
    const bool last = w.group == layout.num_tiles - 1;
    const int channels = last ? static_cast<int>(layout.last_channels) : kCodecGroup;
    const int num_words = (channels * kBits + 31) / 32;
    const int64_t payload = layout.payload_offset(w.group);
    logfmt_store_payload<kBits>(g.lane_fields, reinterpret_cast<uint32_t*>(row + payload), num_words);
    if (w.lane == 0) {
      float* header = reinterpret_cast<float*>(row + 8 * w.group);
      header[0] = g.header.max_abs;
      header[1] = g.header.step;
      if (last) {  // the row's padding, so that every byte of the output is defined
        for (int64_t b = 8 * layout.num_tiles; b < layout.header_bytes; ++b) row[b] = 0;
        for (int64_t b = payload + 4 * num_words; b < layout.row_bytes; ++b) row[b] = 0;
      }
    }
  });
}

template <int kBits>
MOELINK_KERNEL void logfmt_decode_kernel(LogfmtDecodeArgs args) {
  const LogfmtRowLayout layout = logfmt_row_layout(args.hidden, kBits);
  const size_t elem = element_bytes(args.out_dtype);
  for_each_group(args.num_tokens, args.hidden, [&](const GroupWork& w) {
    if (w.count == 0) return;  // no collective below
    const uint8_t* row = args.packed + w.token * args.packed_row_stride;
    const float* header = reinterpret_cast<const float*>(row + 8 * w.group);
    const uint32_t* words = reinterpret_cast<const uint32_t*>(row + layout.payload_offset(w.group));
    const uint64_t fields = logfmt_load_lane<kBits>(words, w.lane, w.count);
    float out[4];
    logfmt_decode_lane<kBits>(fields, LogfmtHeader{header[0], header[1]}, w.count, args.out_dtype, out);
    store4(static_cast<char*>(args.out) + w.token * args.out_row_stride * elem, args.out_dtype, w.first, w.count, out);
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
  with_logfmt_bits(args.bits, [&](auto bits) {
    MOELINK_LAUNCH(ctx, "logfmt_encode", logfmt_encode_kernel<decltype(bits)::value>, grid, kThreads, 0, args);
  });
}

inline void launch_logfmt_decode(const LogfmtDecodeArgs& args, const LaunchContext& ctx) {
  const unsigned grid = grid_for(args.num_tokens * logfmt_row_layout(args.hidden, args.bits).num_tiles);
  with_logfmt_bits(args.bits, [&](auto bits) {
    MOELINK_LAUNCH(ctx, "logfmt_decode", logfmt_decode_kernel<decltype(bits)::value>, grid, kThreads, 0, args);
  });
}

}  // namespace moelink::kernels::codec
