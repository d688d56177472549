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
// The portable log2/exp2 live in codec_logfmt_math.cuh.
//
// Device functions, in the two forms of codec_common.cuh:
//   LogfmtGroupCodes<n> logfmt_encode_group<n>(const float (&v)[4])                    [warp]
//       All 32 lanes, lane l holding channels 4l .. 4l+3 of one tile: the lane's 4 fields
//       (4n bits) and the tile header (max and min reductions).
//   void logfmt_store_payload<n>(uint64_t lane_fields, uint32_t* words, int num_words) [warp]
//   uint64_t logfmt_load_lane<n>(const uint32_t* words, int lane, int count)          [lane]
//   void logfmt_decode_lane<n>(fields, LogfmtHeader, int count, out_dtype, float (&out)[4]) [lane]
//   LogfmtHeader logfmt_encode_tile<n>(const In* x, int count, uint8_t* payload)     [lane]
//       One lane, one tile read from memory (In = uint16_t bf16 bits or float): writes
//       ceil(count * n / 8) payload bytes. No collective.
//   void logfmt_decode_tile<n>(const uint8_t* payload, int count, LogfmtHeader, Out* out) [lane]
#pragma once

#include <cstdint>

#include "kernels/codec_common.cuh"
#include "kernels/codec_logfmt_math.cuh"

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

MOELINK_CODEC_INLINE LogfmtTile tile_from_header(LogfmtHeader h) {
  const uint32_t mb = float_bits(h.max_abs);
  const Binade b = normalize(mb != 0 ? mb : 0x3F800000u);
  return {b.exponent, bits_float((127u << 23) | b.frac), h.step};
}

// Decoded value of `steps_down` codes below the top, divided by 2**max_binade: in (2**-34, 2).
MOELINK_CODEC_INLINE float scaled_code_value(const LogfmtTile& t, int steps_down) {
  return rn_mul(t.max_frac, exp2_nonpos(rn_mul(static_cast<float>(-steps_down), t.step)));
}

// ---- one tile from inside a warp --------------------------------------------------------------

template <int kBits>
struct LogfmtGroupCodes {
  uint64_t lane_fields;  // field i of this lane (channel 4*lane + i) at bits [kBits*i, kBits*(i+1))
  LogfmtHeader header;   // the same on every lane
};

// Field of one element (float32 bits) in a tile. kGraded: the tile's step s is nonzero (a
// tile-uniform test, made once per tile so that the per-element code is straight-line and a loop
// over a lane's channels vectorises on the host); with s = 0 every nonzero element gets code K.
template <int kBits, bool kGraded>
MOELINK_CODEC_INLINE uint32_t logfmt_encode_element(uint32_t bits, const LogfmtTile& t, Log2Split top, float inv_step) {
  using L = Logfmt<kBits>;
  const uint32_t mag = bits & kAbsMask;
  const bool finite = mag < kInfBits;
  const bool nonzero = mag != 0;
  const Binade a = normalize(finite && nonzero ? mag : 0x3F800000u);
  // a < 2**(b_M - 34) <= M * 2**-34 while v_1 / 2 >= M * 2**-33.0001: code 0 for certain, and
  // past this test every value below is normal once scaled by 2**-b_M.
  const bool tiny = a.exponent <= t.max_binade - 35;
  int code = L::kCodes;
  if constexpr (kGraded) {
    const Log2Split la = log2_split(a);
    // Steps below the top, from the portable logs; floor() picks the bracketing pair of codes.
    const float delta = rn_mul(rn_add(static_cast<float>(top.e - la.e), rn_sub(top.l, la.l)), inv_step);
    // floor of a non-negative value below K - 1: truncation (clamped first, so it never overflows)
    const float clamped = delta < static_cast<float>(L::kCodes - 1) ? (delta > 0.0f ? delta : 0.0f)
                                                                    : static_cast<float>(L::kCodes - 1);
    const int d = static_cast<int>(clamped);
    const int upper = L::kCodes - d;
    const float w_upper = scaled_code_value(t, d);
    const float w_next = scaled_code_value(t, d + 1);  // d + 1 <= K: still inside exp2_nonpos's range
    // w(code 0) = 0. A product by 1 or 0 (exact) rather than a select: it keeps w_next's evaluation
    // unconditional, so the compiler cannot sink it into a branch it would then not if-convert.
    const float w_lower = rn_mul(w_next, upper > 1 ? 1.0f : 0.0f);
    const float midpoint = rn_mul(rn_add(w_lower, w_upper), 0.5f);
    const int scaled_exp = tiny ? 1 : a.exponent - t.max_binade + 127;
    const float a_scaled = bits_float((static_cast<uint32_t>(scaled_exp) << 23) | a.frac);
    code = a_scaled >= midpoint ? upper : upper - 1;
  }
  const uint32_t field = code == 0 ? 0u : (((bits >> 31) << (kBits - 1)) | static_cast<uint32_t>(code));
  return !finite ? L::kNonFinite : (nonzero && !tiny ? field : 0u);
}

template <int kBits>
MOELINK_CODEC_INLINE uint32_t logfmt_encode_element(uint32_t bits, const LogfmtTile& t, Log2Split top, float inv_step) {
  return t.step != 0.0f ? logfmt_encode_element<kBits, true>(bits, t, top, inv_step)
                        : logfmt_encode_element<kBits, false>(bits, t, top, inv_step);
}

// The header of a tile from its finite nonzero max and min magnitudes (float32 bits; max 0 when
// there is none), and what encoding its elements needs.
struct LogfmtTileState {
  LogfmtHeader header;
  LogfmtTile tile;
  Log2Split top;
  float inv_step;
};

template <int kBits>
MOELINK_CODEC_INLINE LogfmtTileState logfmt_tile_state(uint32_t max_bits, uint32_t min_bits) {
  using L = Logfmt<kBits>;
  LogfmtTileState st;
  st.header = {0.0f, 0.0f};
  st.top = {0, 0.0f};
  if (max_bits != 0) {
    st.top = log2_split(normalize(max_bits));
    const Log2Split bottom = log2_split(normalize(min_bits));
    float range = rn_add(static_cast<float>(st.top.e - bottom.e), rn_sub(st.top.l, bottom.l));
    range = range < 0.0f ? 0.0f : (range > 32.0f ? 32.0f : range);  // min >= max - 32
    st.header = {bits_float(max_bits), rn_div(range, static_cast<float>(L::kCodes - 1))};
  }
  st.tile = tile_from_header(st.header);
  st.inv_step = st.tile.step > 0.0f ? rn_div(1.0f, st.tile.step) : 0.0f;
  return st;
}

// All 32 lanes must call (max/min are warp reductions). v: this lane's four channels.
template <int kBits>
MOELINK_CODEC_INLINE LogfmtGroupCodes<kBits> logfmt_encode_group(const float (&v)[4]) {
  uint32_t lane_max = 0, lane_min = kInfBits;
  for (int i = 0; i < 4; ++i) {
    const uint32_t mag = float_bits(v[i]) & kAbsMask;
    if (!is_finite_bits(mag) || mag == 0) continue;
    lane_max = mag > lane_max ? mag : lane_max;
    lane_min = mag < lane_min ? mag : lane_min;
  }
  const uint32_t max_bits = arch::warp_reduce_max(arch::kFullMask, lane_max);
  const uint32_t min_bits = arch::warp_reduce_min(arch::kFullMask, lane_min);
  const LogfmtTileState st = logfmt_tile_state<kBits>(max_bits, min_bits);
  LogfmtGroupCodes<kBits> out;
  out.header = st.header;
  out.lane_fields = 0;
  for (int i = 0; i < 4; ++i)
    out.lane_fields |= static_cast<uint64_t>(logfmt_encode_element<kBits>(float_bits(v[i]), st.tile, st.top, st.inv_step))
                       << (kBits * i);
  return out;
}

// Writes payload words [0, num_words) of a tile (num_words = ceil(channels * n / 32)). Lane l's
// fields are stream bits [4n*l, 4n*(l+1)) and 32 <= 4n <= 40, so each word starts inside exactly
// one lane's range and ends at the latest inside the next lane's: the lane where a word starts
// writes it, with its right neighbour's fields from one shuffle. All 32 lanes must call.
template <int kBits>
MOELINK_CODEC_INLINE void logfmt_store_payload(uint64_t lane_fields, uint32_t* words, int num_words) {
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
MOELINK_CODEC_INLINE uint64_t logfmt_load_lane(const uint32_t* words, int lane, int count) {
  using L = Logfmt<kBits>;
  const int first_bit = lane * L::kLaneBits;
  const int used_bits = count * kBits;
  const int w = first_bit / 32, offset = first_bit % 32;
  uint64_t stream = words[w];
  if (offset + used_bits > 32) stream |= static_cast<uint64_t>(words[w + 1]) << 32;
  return (stream >> offset) & ((uint64_t{1} << used_bits) - 1);
}

// Decoded value of one field (NaN for the non-finite marker), saturated to the output's range.
template <int kBits>
MOELINK_CODEC_INLINE float logfmt_decode_field(uint32_t field, const LogfmtTile& t, uint32_t out_max_bits) {
  using L = Logfmt<kBits>;
  const int code = static_cast<int>(field & static_cast<uint32_t>(L::kCodes));
  const uint32_t sign = (field >> (kBits - 1)) << 31;
  const uint32_t value = float_bits(ldexp_rne(scaled_code_value(t, L::kCodes - code), t.max_binade)) | sign;
  return bits_float(code != 0 ? saturate_bits(value, out_max_bits) : (sign != 0 ? kQuietNanBits : 0u));
}

// Per lane, no collective: decodes `count` fields with the tile's header.
template <int kBits>
MOELINK_CODEC_INLINE void logfmt_decode_lane(uint64_t lane_fields, LogfmtHeader header, int count, CodecDType out_dtype, float (&out)[4]) {
  using L = Logfmt<kBits>;
  const LogfmtTile t = tile_from_header(header);
  const uint32_t top = out_dtype == CodecDType::kBFloat16 ? kBf16MaxBits : kF32MaxBits;
  for (int i = 0; i < 4; ++i) {
    const uint32_t field = static_cast<uint32_t>(lane_fields >> (kBits * i)) & L::kFieldMask;
    out[i] = i < count ? logfmt_decode_field<kBits>(field, t, top) : 0.0f;
  }
}

// ---- one tile by one lane (owned form) ---------------------------------------------------------

// Eight n-bit fields are n whole bytes of the tile's bit stream: stored / loaded 8 at a time.
template <int kBits>
MOELINK_CODEC_INLINE void store_fields8(const uint32_t* f, uint8_t* dst, int bytes) {
  uint64_t lo = 0;
  uint32_t hi = 0;
  for (int j = 0; j < 8; ++j) {
    const int at = kBits * j;
    if (at < 64) lo |= static_cast<uint64_t>(f[j]) << at;
    if (at >= 64) hi |= f[j] << ((at - 64) & 31);
    else if (at + kBits > 64) hi |= f[j] >> ((64 - at) & 31);
  }
  for (int b = 0; b < bytes; ++b) dst[b] = static_cast<uint8_t>(b < 8 ? lo >> (8 * b) : hi >> ((8 * b - 64) & 31));
}

template <int kBits>
MOELINK_CODEC_INLINE void load_fields8(const uint8_t* src, int bytes, uint32_t* f) {
  uint64_t lo = 0;
  uint32_t hi = 0;
  for (int b = 0; b < bytes; ++b) {
    if (b < 8) lo |= static_cast<uint64_t>(src[b]) << (8 * b);
    else hi |= static_cast<uint32_t>(src[b]) << ((8 * b - 64) & 31);
  }
  for (int j = 0; j < 8; ++j) {
    const int at = kBits * j;
    uint64_t v = at < 64 ? lo >> (at & 63) : static_cast<uint64_t>(hi) >> ((at - 64) & 31);
    if (at < 64 && at + kBits > 64) v |= static_cast<uint64_t>(hi) << ((64 - at) & 63);
    f[j] = static_cast<uint32_t>(v) & Logfmt<kBits>::kFieldMask;
  }
}

// Fields of x[0, count) packed into a tile's payload, kLogfmtChunk at a time (a multiple of 8:
// whole bytes): the field computation is one straight loop the host vectorises, the packing a
// short scalar one. The GPU runs the warp form; its (unused) lane form keeps a small chunk so
// that the kernel's register allocation does not grow for it.
#if defined(__CUDACC__)
constexpr int kLogfmtChunk = 8;
#else
constexpr int kLogfmtChunk = 32;
#endif

template <int kBits, bool kGraded, typename In>
MOELINK_CODEC_INLINE void logfmt_encode_fields(const In* x, int count, const LogfmtTileState& st, uint8_t* payload) {
  int c = 0;
  for (; c + kLogfmtChunk <= count; c += kLogfmtChunk) {
    uint32_t f[kLogfmtChunk];
    for (int j = 0; j < kLogfmtChunk; ++j)
      f[j] = logfmt_encode_element<kBits, kGraded>(float_bits(load_channel(x, c + j)), st.tile, st.top, st.inv_step);
    for (int k = 0; k < kLogfmtChunk / 8; ++k) store_fields8<kBits>(f + 8 * k, payload + (c / 8 + k) * kBits, kBits);
  }
  for (; c < count; c += 8) {  // the last partial chunk, 8 fields at a time
    uint32_t f[8];
    for (int j = 0; j < 8; ++j)
      f[j] = c + j < count ? logfmt_encode_element<kBits, kGraded>(float_bits(load_channel(x, c + j)), st.tile, st.top,
                                                                   st.inv_step)
                           : 0u;
    const int left = ((count - c) * kBits + 7) / 8;
    store_fields8<kBits>(f, payload + c / 8 * kBits, left < kBits ? left : kBits);
  }
}

// Per lane, no collective: encodes channels x[0, count) (one tile, 1 <= count <= 128; In is
// uint16_t for bf16 bits or float), writes the tile's ceil(count * n / 8) payload bytes and
// returns its header.
template <int kBits, typename In>
MOELINK_CODEC_INLINE LogfmtHeader logfmt_encode_tile(const In* x, int count, uint8_t* payload) {
  // max and min magnitude over finite nonzero elements: plain signed max/min reductions (the
  // magnitude bits fit an int), which vectorise.
  int32_t max_bits = 0, min_bits = static_cast<int32_t>(kInfBits);
  for (int i = 0; i < count; ++i) {
    const int32_t mag = static_cast<int32_t>(float_bits(load_channel(x, i)) & kAbsMask);
    const bool counted = mag < static_cast<int32_t>(kInfBits) && mag != 0;
    const int32_t for_max = counted ? mag : 0;
    const int32_t for_min = counted ? mag : static_cast<int32_t>(kInfBits);
    max_bits = max_bits > for_max ? max_bits : for_max;
    min_bits = min_bits < for_min ? min_bits : for_min;
  }
  const LogfmtTileState st = logfmt_tile_state<kBits>(static_cast<uint32_t>(max_bits), static_cast<uint32_t>(min_bits));
  if (st.tile.step != 0.0f) logfmt_encode_fields<kBits, true>(x, count, st, payload);
  else logfmt_encode_fields<kBits, false>(x, count, st, payload);
  return st.header;
}

// Per lane, no collective: decodes a tile's count channels into out[0, count) (Out: uint16_t for
// bf16 bits, or float). Reads only the tile's ceil(count * n / 8) payload bytes.
template <int kBits, typename Out>
MOELINK_CODEC_INLINE void logfmt_decode_tile(const uint8_t* payload, int count, LogfmtHeader header, Out* out) {
  const LogfmtTile t = tile_from_header(header);
  const uint32_t top = out_max_bits(out);
  int c = 0;
  for (; c + kLogfmtChunk <= count; c += kLogfmtChunk) {
    uint32_t f[kLogfmtChunk];
    for (int k = 0; k < kLogfmtChunk / 8; ++k) load_fields8<kBits>(payload + (c / 8 + k) * kBits, kBits, f + 8 * k);
    for (int j = 0; j < kLogfmtChunk; ++j) store_channel(out, c + j, logfmt_decode_field<kBits>(f[j], t, top));
  }
  for (; c < count; c += 8) {
    uint32_t f[8];
    const int left = ((count - c) * kBits + 7) / 8;
    load_fields8<kBits>(payload + c / 8 * kBits, left < kBits ? left : kBits, f);
    for (int j = 0; j < 8; ++j)
      if (c + j < count) store_channel(out, c + j, logfmt_decode_field<kBits>(f[j], t, top));
  }
}

}  // namespace moelink::kernels::codec
