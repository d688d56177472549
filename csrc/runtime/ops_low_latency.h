// Low-latency dispatch and combine (DeepEP's low-latency mode): every transfer a GPU-initiated
// put through the scale-out transport (transport/scaleout.cuh), fixed-shape buffers, two halves
// used alternately, no host synchronisation and no per-call state from the host. Target-neutral
// declarations; ops_low_latency.cu is compiled by g++ into moelink._host and by nvcc into
// moelink._cuda. docs/low-latency.md draws the protocol; this header is the authority for every
// size and offset.
//
// Ranks, experts. R ranks, rank r hosts the EL = E / R experts [r * EL, (r + 1) * EL). T =
// num_max_dispatch_tokens_per_rank, H = hidden (a multiple of 128), K = top-k (1..32).
//
// Paths. A message to rank d goes through transport::put (GIN-shaped, with a signal add), also
// when d is on this node or d is this rank, unless the Buffer allows NVLink for low latency: then
// the ranks of this node (this one included) are reached with stores into their scale-out
// windows, mapped in this process (LowLatencyContext::node_windows), and release adds on their
// signal words. A signal word has one kind of writer: its only writer is one peer, which always
// takes the same path to this rank.
//
// Calls and halves. Every dispatch and every combine is one *call*. This rank counts the calls it
// started in its own window (own word `calls`, advanced by the last block of the call's send
// half); call c uses half c % 2 of every region below. Nothing about the half comes from the host,
// so a CUDA graph replays correctly whatever it captured. Rules the protocol rests on (Python
// enforces the first two): every rank issues the same calls in the same order; a call's receive
// half (its hook) runs before this rank's next call; every call exchanges something with every rank
// (dispatch: one counts message per rank; combine: one "done" signal per rank besides the rows).
// Then no rank is ever more than one call ahead of another: rank s's call c + 1 receive needs rank
// r's call c + 1 send, which r issued after finishing call c's receive. So call c + 2 (same half
// as c) never writes into a region a peer still reads for call c, nor overwrites a staging area
// whose put of call c its NIC has not read yet (every put of call c landed, since its receiver
// waited for it, before any rank could start call c + 2).
//
// Signals (monotonic adds only, as GIN: never set, never reset). Ids from shape.signal_base:
//   count[2][R]    at signal_base +      h*R + s   +1 per dispatch of half h from rank s (its counts message landed)
//   tokens[2][R]   at signal_base + 2R + h*R + s   +1 per token message from s (each put carries its own add)
//   comb[2][R]     at signal_base + 4R + h*R + s   +1 per combine row from s, +1 "done" per combine of half h
//   barrier[R]     at signal_base + 6R + s         +1 per clean_low_latency_buffer of rank s
// The count protocol per half: a receiver keeps, in its own words, how far it consumed each
// signal (seen_*[h][s]); a dispatch waits count >= seen + 1, reads the counts message, checks it,
// then waits tokens >= seen_tokens + (tokens announced). A combine waits comb >= seen_comb +
// (rows this rank sent to s in the dispatch) + 1. The last block of the receive half advances the
// seen words by exactly what was consumed; a value above what is due fails with DeviceAssert
// naming the peer (a rank two calls ahead, or a faulty peer).
//
// Own words (this rank's kernels only; at shape.own_offset, persistent):
//   0    u64 calls           LL calls started (send halves that completed)
//   8    u64 cleans          clean barriers completed
//   64   u32 blocks_done     last-block accounting of the running kernel (0 between kernels)
//   128  u64 seen_count[2][R], seen_tokens[2][R], seen_comb[2][R]
//   128 + 48R  u64 verdict[R]   shrink mode: block 0's decision on source s for the running call,
//                               2 * (call + 1) + (1 if s is masked for it); the other blocks wait for it
//   128 + 56R  i32 mask[R]      shrink mode: 1 = rank s is masked (DeepEP's mask buffer): no message
//                               goes to it, none is awaited from it. Written by this rank's kernels
//                               (a wait for s expired) and by the host between calls (update/clean)
//
// Shrink mode (LowLatencyContext::shrink, Buffer(enable_shrink=True)). A rank p is *masked* for
// this rank when mask[p] != 0 or mask[this rank] != 0 (a rank masked in its own mask is out of the
// group: it talks to no one). Masked ranks get no message (counts, tokens, rows, "done", barrier)
// and none is awaited from them; their seen words stay where they were. A wait for an unmasked
// peer that reaches the deadline (arch::wait_until_or_expire) sets mask[p] = 1 and the call goes
// on as if p were masked from the start of its receive half: recv count 0 from p, p's rows
// dropped from the combine (slots whose expert lives on a masked rank add nothing). A dispatch
// gives (token, k) of a masked destination the slot kLowLatencyMaskedSlot (not sent). In the
// receive halves block 0 alone decides each source (counts, then every token, or the rows and
// "done") and publishes verdict[s]; the other blocks follow it, so every block of the grid agrees.
//
// Scale-out window (the same offsets on every rank):
//   [0, 8 * signal_base)          the internode layout's signals (multi-node Buffers), then LL signals,
//   own words,                    then (multi-node) the internode positions: InternodeShape::reserved_head_bytes
//   [data_base, +half_bytes)      half 0; [data_base + half_bytes, +half_bytes) half 1 (fixed per Buffer,
//                                 so calls of different shapes never overlap another call's half)
// A half, as a dispatch lays it out (offsets from the half's base, regions 128-byte aligned):
//   disp_send  [T][msg]                staging of this rank's messages (one per token; the source of its puts)
//   count_out  [R][count_bytes]        staging of the counts messages
//   disp_recv  [EL][R][T][msg]         slot (e, s, i): i-th message from rank s for local expert e
//   count_in   [R][count_bytes]        counts message from rank s
// ... and as a combine lays it out:
//   comb_send  [EL][R*T][H] bf16       staging of the expert outputs (get_next_low_latency_combine_buffer
//                                      is this region of the next call's half: zero-copy combine)
//   comb_recv  [T*K][comb_msg]         slot t*K + k: the row returned for (token t, top-k slot k)
//   comb_enc   [EL][R*T][comb_msg]     LogFMT rows encoded from comb_send (zero-copy LogFMT only)
// Message (msg bytes, pieces 16-byte aligned): payload [payload_bytes] | scales [scale_bytes] |
//   meta [16]: i32 token index on the source, f32 NVFP4 tensor scale g (else 0), 8 bytes 0 |
//   topk [a16(4K)] i32 the token's global expert ids (the receiver finds its k there) |
//   [weights [a16(4K)] f32, with carry_weights only]
// Counts message (count_bytes = 16 + a16(4 EL)): i32 sender rank, u32 fingerprint of the call's
//   shape (fingerprint()), i32 messages to this rank, i32 0 | i32 [EL] messages per local expert.
// Slots are claimed per destination expert with atomics on claims[h][e] (LowLatencyContext::
// claims, a zeroed device array); every call zeroes claims[next half] for the call after it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "arch/types.h"
#include "launch_context.h"
#include "runtime/ops_internode.h"
#include "runtime/ops_intranode.h"
#include "transport/scaleout_handle.h"

namespace moelink {

constexpr int kLowLatencyMaxTopk = 32;
constexpr int kLowLatencySendPhase = 1;
constexpr int kLowLatencyRecvPhase = 2;
constexpr int kLowLatencySignalKinds = 7;  // count[2], tokens[2], comb[2], barrier: each R signals
constexpr int64_t kLowLatencyOwnFixedBytes = 128;
// Own words after the fixed ones, per rank: seen_* (6 u64), verdict (u64), mask (i32).
constexpr int64_t kLowLatencyOwnBytesPerRank = 8 * 6 + 8 + 4;
// send_slots value of a (token, k) whose expert's rank is masked (shrink mode): not sent, and
// combined as nothing; -1 stays "no expert" (topk_idx -1).
constexpr int32_t kLowLatencyMaskedSlot = -2;

// Payload formats. Dispatch: any; combine: kBf16 or kLogfmt*.
enum class LowLatencyFormat : int32_t {
  kBf16 = 0,       // bf16 rows as given
  kFp8 = 1,        // E4M3 + float32 scale per 128 channels (amax / 448)
  kFp8Pow2 = 2,    // E4M3 + float32 power-of-two scale (round_scale)
  kFp8Ue8m0 = 3,   // E4M3 + UE8M0 exponents packed four per int32 (use_ue8m0)
  kMxfp8 = 4,      // E4M3 + UE8M0 byte per 32 channels (OCP MX, floor rule)
  kNvfp4 = 5,      // E2M1 + E4M3 scale per 16 channels + float32 tensor scale
  kLogfmt8 = 6,
  kLogfmt9 = 7,
  kLogfmt10 = 8,
};

MOELINK_HOST_DEVICE bool is_logfmt(LowLatencyFormat f) {
  return f == LowLatencyFormat::kLogfmt8 || f == LowLatencyFormat::kLogfmt9 || f == LowLatencyFormat::kLogfmt10;
}
MOELINK_HOST_DEVICE int logfmt_bits_of(LowLatencyFormat f) {
  return f == LowLatencyFormat::kLogfmt8 ? 8 : (f == LowLatencyFormat::kLogfmt9 ? 9 : 10);
}

// Where the low-latency regions of a Buffer's scale-out window are (constant per Buffer).
struct LowLatencyWindow {
  int64_t signal_base = 0;    // first LL signal id
  int64_t num_signals = 0;    // the transport's signal region: internode signals + LL signals
  int64_t own_offset = 0;     // byte offset of the own words
  int64_t reserved_head = 0;  // bytes the LL layout owns for good at the start (InternodeShape::reserved_head_bytes)
  int64_t data_base = 0;      // byte offset of half 0
  int64_t half_bytes = 0;     // bytes of each half

  MOELINK_HOST_DEVICE static int64_t align(int64_t b) { return (b + 127) / 128 * 128; }

  // `num_nodes > 1`: the internode layout shares the window (its signals first, its positions
  // after the LL words). `window_bytes` may be 0 (a size query): half_bytes is then 0.
  MOELINK_HOST_DEVICE static LowLatencyWindow of(int num_nodes, int ranks_per_node, int64_t window_bytes) {
    LowLatencyWindow w;
    const int64_t ranks = static_cast<int64_t>(num_nodes) * ranks_per_node;
    InternodeShape in{};
    in.num_nodes = num_nodes;
    in.ranks_per_node = ranks_per_node;
    in.num_channels = 1;
    in.block_warps = 2;
    in.nvl_queue_tokens = 2;
    in.rdma_queue_tokens = 2;
    in.row_bytes = 16;
    w.signal_base = num_nodes > 1 ? InternodeLayout::of(in).num_signals : 0;
    w.num_signals = w.signal_base + kLowLatencySignalKinds * ranks;
    w.own_offset = align(8 * w.num_signals);
    w.reserved_head = w.own_offset + align(kLowLatencyOwnFixedBytes + kLowLatencyOwnBytesPerRank * ranks);
    in.reserved_head_bytes = w.reserved_head;
    w.data_base = num_nodes > 1 ? InternodeLayout::of(in).notify_in : w.reserved_head;
    w.half_bytes = window_bytes > w.data_base ? (window_bytes - w.data_base) / 2 / 128 * 128 : 0;
    return w;
  }
};

// One call's shape (identical on every rank for a call; checked through the fingerprint).
struct LowLatencyShape {
  int num_ranks = 0;        // R
  int ranks_per_node = 0;   // L (NVLink reach)
  int num_max_tokens = 0;   // T
  int hidden = 0;           // H, a multiple of 128
  int num_experts = 0;      // E, a multiple of R
  int num_topk = 0;         // K, 1..32
  LowLatencyFormat format = LowLatencyFormat::kBf16;  // the call's payload format
  bool carry_weights = false;  // dispatch messages carry the token's top-k weights
  bool zero_copy = false;      // combine: the rows are already in comb_send
  int block_warps = 0;
  LowLatencyWindow window;

  MOELINK_HOST_DEVICE int experts_per_rank() const { return num_ranks > 0 ? num_experts / num_ranks : 0; }
  MOELINK_HOST_DEVICE int num_groups() const { return hidden / 128; }

  // Identifies the call's parameters: ranks whose counts messages disagree fail loudly.
  MOELINK_HOST_DEVICE uint32_t fingerprint() const {
    const int64_t fields[8] = {num_ranks, num_max_tokens, hidden, num_experts, num_topk,
                               static_cast<int64_t>(format), carry_weights ? 1 : 0, window.half_bytes};
    uint32_t h = 2166136261u;
    for (int i = 0; i < 8; ++i) {
      for (int b = 0; b < 8; ++b) {
        h ^= static_cast<uint32_t>((fields[i] >> (8 * b)) & 0xFF);
        h *= 16777619u;
      }
    }
    return h;
  }
};

// Byte offsets of one call's regions inside a half, and the wire formats' sizes.
struct LowLatencyLayout {
  int64_t payload_bytes, scale_bytes;              // one message's payload and scales
  int64_t msg_scales, msg_meta, msg_topk, msg_weights, msg_bytes;  // offsets inside a message, its size
  int64_t count_bytes;
  int64_t disp_send, count_out, disp_recv, count_in, dispatch_bytes;
  int64_t comb_msg, comb_send, comb_recv, comb_enc, combine_bytes;

  MOELINK_HOST_DEVICE static int64_t align(int64_t b) { return (b + 127) / 128 * 128; }
  MOELINK_HOST_DEVICE static int64_t a16(int64_t b) { return (b + 15) / 16 * 16; }

  // LogFMT-n row bytes for a hidden size that is a multiple of 128 (kernels/codec_logfmt.cuh).
  MOELINK_HOST_DEVICE static int64_t logfmt_row_bytes(int64_t hidden, int bits) {
    const int64_t tiles = hidden / 128;
    return a16(8 * tiles) + 16 * bits * tiles;
  }
  MOELINK_HOST_DEVICE static int64_t payload_of(LowLatencyFormat f, int64_t hidden) {
    switch (f) {
      case LowLatencyFormat::kBf16: return 2 * hidden;
      case LowLatencyFormat::kNvfp4: return hidden / 2;
      case LowLatencyFormat::kLogfmt8: case LowLatencyFormat::kLogfmt9: case LowLatencyFormat::kLogfmt10:
        return logfmt_row_bytes(hidden, logfmt_bits_of(f));
      default: return hidden;  // FP8 / MXFP8 codes
    }
  }
  MOELINK_HOST_DEVICE static int64_t scales_of(LowLatencyFormat f, int64_t hidden) {
    const int64_t groups = hidden / 128;
    switch (f) {
      case LowLatencyFormat::kFp8: case LowLatencyFormat::kFp8Pow2: return 4 * groups;
      case LowLatencyFormat::kFp8Ue8m0: return 4 * ((groups + 3) / 4);
      case LowLatencyFormat::kMxfp8: return hidden / 32;
      case LowLatencyFormat::kNvfp4: return hidden / 16;
      default: return 0;
    }
  }

  MOELINK_HOST_DEVICE static LowLatencyLayout of(const LowLatencyShape& s) {
    LowLatencyLayout l{};
    const int64_t t = s.num_max_tokens, r = s.num_ranks, el = s.experts_per_rank(), k = s.num_topk;
    l.payload_bytes = payload_of(s.format, s.hidden);
    l.scale_bytes = scales_of(s.format, s.hidden);
    l.msg_scales = a16(l.payload_bytes);
    l.msg_meta = l.msg_scales + a16(l.scale_bytes);
    l.msg_topk = l.msg_meta + 16;
    l.msg_weights = l.msg_topk + a16(4 * k);
    l.msg_bytes = l.msg_weights + (s.carry_weights ? a16(4 * k) : 0);
    l.count_bytes = 16 + a16(4 * el);
    l.disp_send = 0;
    l.count_out = align(l.disp_send + t * l.msg_bytes);
    l.disp_recv = align(l.count_out + r * l.count_bytes);
    l.count_in = align(l.disp_recv + el * r * t * l.msg_bytes);
    l.dispatch_bytes = align(l.count_in + r * l.count_bytes);
    l.comb_msg = is_logfmt(s.format) ? logfmt_row_bytes(s.hidden, logfmt_bits_of(s.format)) : 2 * s.hidden;
    l.comb_send = 0;
    l.comb_recv = align(el * r * t * 2 * s.hidden);
    l.comb_enc = align(l.comb_recv + t * k * l.comb_msg);
    l.combine_bytes = align(l.comb_enc + (s.zero_copy && is_logfmt(s.format) ? el * r * t * l.comb_msg : 0));
    return l;
  }
};

// What every low-latency kernel knows.
struct LowLatencyContext {
  int rank = 0;
  LowLatencyShape shape;
  transport::ScaleOut net;        // this rank's scale-out transport
  bool use_nvlink = false;        // ranks of this node through node_windows
  WindowTable node_windows{};     // scale-out window of every rank of this node, by local index
  uint64_t* nvl_bytes = nullptr;  // bytes stored into other ranks' windows over NVLink, or null
  uint32_t* claims = nullptr;     // [2][claim_capacity] slot claims per global expert, zero between calls
  int64_t claim_capacity = 0;     // >= num_experts
  int codec_split = 0;            // CodecLaneSplit: 0 as the target suggests, 1 always the warp (GPU) form
  bool shrink = false;            // shrink mode: masked ranks are skipped, an expired wait masks its peer

  MOELINK_HOST_DEVICE bool same_node(int peer) const {
    return peer / shape.ranks_per_node == rank / shape.ranks_per_node;
  }
  MOELINK_HOST_DEVICE bool direct(int peer) const { return use_nvlink && same_node(peer); }
};

struct LowLatencyDispatchArgs {
  LowLatencyContext ctx;
  int phases = kLowLatencySendPhase | kLowLatencyRecvPhase;
  int64_t num_tokens = 0;
  const uint16_t* x = nullptr;            // [num_tokens][H] bf16
  const int64_t* topk_idx = nullptr;      // [num_tokens][K] global expert ids or -1
  const float* topk_weights = nullptr;    // [num_tokens][K] (carry_weights only)
  const float* global_scale = nullptr;    // NVFP4: [1] this rank's encode scale g
  const int32_t* cached_slots = nullptr;  // [num_tokens][K]: replay a dispatch's slots (autograd), or null
  bool scale_by_weight = false;           // bf16 + carry_weights: the receiver stores w * row
  // Sender side.
  int32_t* send_slots = nullptr;          // [num_tokens][K] receive slot of (token, k), -1 if no expert,
                                          // kLowLatencyMaskedSlot if its rank is masked (shrink)
  int32_t* send_counts = nullptr;         // [R] messages sent to each rank
  // Receiver side (rows of local expert e at [e][0, recv_count[e]), by source rank).
  void* recv_x = nullptr;                 // [EL][R*T][payload]: bf16 (also LogFMT, decoded), codes, packed
  void* recv_scales = nullptr;            // FP8: [EL][G][R*T] f32 or [EL][ceil(G/4)][R*T] i32 (token-major);
                                          // MXFP8: [EL][R*T][H/32] u8; NVFP4: [EL][R*T][H/16] e4m3
  float* recv_global_scale = nullptr;     // NVFP4: [EL][R*T] the source's g
  int32_t* recv_count = nullptr;          // [EL]
  int32_t* src_info = nullptr;            // [EL][R*T] token * K + k on the source
  int64_t* layout_range = nullptr;        // [EL][R] count | begin << 32
  int32_t* cumulative_recv_stats = nullptr;  // [EL] += recv_count, or null
  int64_t* wait_cost_stats = nullptr;        // [R] += ns waited for each source, or null
};

struct LowLatencyCombineArgs {
  LowLatencyContext ctx;                  // shape.format: kBf16 or kLogfmt*; shape.zero_copy
  int phases = kLowLatencySendPhase | kLowLatencyRecvPhase;
  const uint16_t* x = nullptr;            // [EL][R*T][H] bf16 expert outputs (null with zero_copy)
  const int32_t* src_info = nullptr;      // handle [EL][R*T]
  const int64_t* layout_range = nullptr;  // handle [EL][R]
  int64_t num_tokens = 0;
  const int64_t* topk_idx = nullptr;      // [num_tokens][K]; -1 skips a slot
  const float* topk_weights = nullptr;    // [num_tokens][K]
  const int32_t* send_slots = nullptr;    // handle [num_tokens][K]
  const int32_t* send_counts = nullptr;   // handle [R]: rows each rank returns
  uint16_t* combined_x = nullptr;         // [num_tokens][H] bf16
  uint16_t* slot_values = nullptr;        // [num_tokens][K][H] the returned rows, or null (autograd)
  int64_t* wait_cost_stats = nullptr;     // [R] += ns, or null
};

struct LowLatencyCleanArgs {
  LowLatencyContext ctx;
};

// Every call blocks until its kernel finished (host target) or is enqueued on ctx.stream (GPU).
// `num_blocks`: the grid (cooperative: every block resident). Throws moelink::Error
// (kInvalidArgument) for a context the kernels cannot run.
void low_latency_dispatch(const LowLatencyDispatchArgs& args, const LaunchContext& ctx, int num_blocks);
void low_latency_combine(const LowLatencyCombineArgs& args, const LaunchContext& ctx, int num_blocks);
void low_latency_clean(const LowLatencyCleanArgs& args, const LaunchContext& ctx);

}  // namespace moelink
