// Internode normal-mode dispatch and combine: IB once, then NVLink. Target-neutral declarations;
// ops_internode.cu is compiled by g++ into moelink._host and by nvcc into moelink._cuda.
// docs/internode.md draws the data flow, the layouts and the wire format.
//
// Ranks. N nodes of L ranks: rank r = n * L + l (node n, local index l). Rank (n, l)'s forwarder
// on node m is rank (m, l): every token crosses the network at most once per destination node,
// to the rank with its source's local index there, which fans it out over NVLink to every rank
// of its node that hosts one of the token's experts. A token's own node is reached the same way
// with the source as its own forwarder (a copy into its own scale-out window: no network).
//
// Channels. C = num_sms / 2 channels; channel c of a rank's tokens is the contiguous range
// [c * T, min((c + 1) * T, num_tokens)), T = ceil(num_tokens / C). The grid is exactly num_sms
// blocks of W warps (GPU: kGpuBlockWarps; InternodeRoles says how they split):
//   dispatch, block 2c:     RDMA senders (one stream per destination node, node order) and
//                           NVL receivers (one stream per local forwarder, local-index order);
//   dispatch, block 2c + 1: forwarders (one stream per local destination rank, local order) and
//                           one coordinator warp that returns RDMA credits to the sources;
//   combine,  block 2c:     NVL senders (expert outputs back to each local forwarder) and RDMA
//                           receivers (sum each token's node partials);
//   combine,  block 2c + 1: forwarders (sum each message's copies from the node into one partial
//                           and send it back over the network).
// A warp that owns several streams of a role serves them one after the other in index order.
//
// Order. A forwarder drains its scale-out queues in source-node order and forwards each message
// in arrival order, so a destination receives, through NVL queue (c, l), the tokens of sources
// (0, l), (1, l), ... each in token order: it places them by (source rank, channel) offsets from
// notify, so the receive order is the intranode path's, by source rank, then token index.
//
// Why nothing deadlocks (every wait is for data or for room, and queues drain in a global order):
// NVL receivers consume forwarders in local-index order, forwarders consume sources in node
// order, and RDMA receivers consume node partials per token. By induction on the local index l,
// then on the source node: the streams with l = 0 never wait on a stream with a larger index
// (receivers start with forwarder 0, forwarders with source node 0), so they complete; then those
// with l = 1; and so on. A queue needs only the minimum capacity InternodeRoles states: NVL
// queues W slots, scale-out queues W + combine_reducers (a forwarder's round and a source's
// round of combine partials must fit one queue together).
//
// Epochs and barriers. As intranode (runtime/ops_intranode.h), plus a global barrier: every
// operation starts with each rank adding 1 to signal barrier[me] of every rank of other nodes
// (through the transport, after everything it sent before) and storing its epoch into the NVL
// barrier of its node's ranks; then waiting for all of them. After it no rank is still in an
// earlier operation, and every per-call region of both windows may be re-carved.
// Agreement (docs/semantics.md, "Trust"): the barrier carries the call's parameter words
// (InternodeContext::agreement) to every rank: stored into the NVL agreement slot of each rank of
// the node before the barrier release, put into agreement_in of each rank of another node by the
// put that carries the barrier signal (one entry, no extra round trip). Every rank compares every
// rank's words with its own after the barrier; a difference fails with DeviceAssert("moelink
// agreement: rank a and rank b disagree on word w ...") on every rank (each compares with all,
// and every rank's words are out before any rank's comparison may fail). Parity: a rank can be at
// most one operation ahead of a peer still comparing (it passes barrier e + 1 only once that peer
// entered e + 1), and its staged words of e - 1 were read before the peer passed barrier e - 1.
//
// Scale-out window layout (offsets identical on every rank; regions 128-byte aligned):
//   signals (u64, transport signal ids; never re-carved, monotonic: absolute stream positions):
//     barrier[R]          +1 per operation from rank s
//     notify[R]           +1 per notify from rank s (its counts message landed before it)
//     rdma_tail[64][N]    dispatch queue (c, source node) here: messages published by the source
//     rdma_head[64][N]    dispatch queue (c, destination node) of this source: consumed by its forwarder
//     comb_tail[64][N]    combine queue (c, forwarder node) here: partials published
//     comb_head[64][N]    combine queue (c, source node) of this forwarder: consumed by the source
//   (a low-latency Buffer: its signals and persistent words, InternodeShape::reserved_head_bytes)
//   positions (u64, written only by this rank's own kernels; never re-carved): how far each of its
//   stream ends has got over all calls, the start of the next call's stream:
//     rdma_sent[64][N] (source, per destination node), rdma_taken[64][N] (forwarder, per source
//     node), comb_sent[64][N] (forwarder, per source node), comb_taken[64][N] (source, per node)
//   agreement (u64, never re-carved; double-buffered by epoch parity, as intranode):
//     agreement_in[2][R][kAgreementWords]   [epoch % 2][s]: the parameter words rank s (another
//                                           node) entered that operation with, put beside its
//                                           barrier signal (the put carries the signal)
//     agreement_out[2][kAgreementWords]     this rank's words of operation e, staged at [e % 2]
//                                           (the source of those puts)
//   per call:
//     notify_in[R]        [notify_bytes] counts message from rank s (other nodes)
//     notify_out[R]       [notify_bytes] this rank's message to rank r (staging of its put)
//     rdma_recv[C][N]     [Qr][dispatch_slot] queue (c, n_s): messages from source (n_s, my l)
//     rdma_send[C][N]     [Qr][dispatch_slot] staging of queue (c, n_d) (unused for my node)
//     comb_recv[C][N]     [Qr][partial_slot]  queue (c, n): partials from forwarder (n, my l)
//     comb_send[C][N]     [Qr][partial_slot]  staging of queue (c, n_s) (unused for my node)
// Wire format of one network message (dispatch_slot, 16-byte aligned pieces):
//     row [row_bytes] | scales [a16(4P)] 4-byte words | topk [a16(4K)] i32 global expert ids,
//     -1 for slots whose expert is not on the destination node | weights [a16(4K)] f32 (0 where
//     topk is -1) | meta [16]: i32 token index on the source, 12 bytes zero | mask
//     [a16(4 * ceil(L / 32))]: u32 words, bit j set if local rank j of the destination node gets
//     the token (the layout's is_token_in_rank: cached dispatches carry no top-k ids)
//   partial_slot: row [hidden * 2] bf16 partial sum | weights [a16(4K)] f32 partial sums
//   notify message: i32 [C] tokens to that rank per channel | i32 [C] tokens to its node per
//     channel | i32 [E] (token, slot) pairs for each of its experts, padded to 16 bytes
//
// NVL window layout (node-local; offsets identical on every rank of a node):
//   control (128 B; shared with the intranode layout: epoch, blocks_done, notify_count at 72)
//   barrier u64 [L] | notify_flag u64 [L] | nvl_tail u64 [64][L], 64 B apart | nvl_head u64 [64][L] |
//   agreement u64 [2][L][kAgreementWords] ([epoch % 2][l]: local rank l's words, stored before its
//   barrier release)
//   per call: notify_in [L][notify_bytes] (local senders' messages) |
//   queue (c, l) for each channel and local sender, a ring of Qn slots stored as arrays:
//     row [Qn][row_bytes] | scales [Qn][4P] | topk [Qn][K] i32 (local ids of the receiver) |
//     weights [Qn][K] f32 | src [Qn][2] i32 (source rank, token index)
//   (combine reuses the queues the other way: (c, j) at forwarder l carries rank j's rows.)
#pragma once

#include <cstddef>
#include <cstdint>

#include "arch/types.h"
#include "launch_context.h"
#include "runtime/ops_intranode.h"
#include "transport/scaleout_handle.h"

namespace moelink {

constexpr int kInternodeMaxChannels = 64;
constexpr int kInternodeMaxNodes = 64;
constexpr int kInternodeMaxLocalRanks = kIntranodeMaxRanks;
constexpr int kMaxForwardWarps = kMaxBlockWarps;
constexpr int64_t kNotifyCountOffset = 72;  // u64 in the control area: notifies this rank completed

struct InternodeShape {
  int num_nodes = 0;         // N
  int ranks_per_node = 0;    // L
  int num_channels = 0;      // C
  int block_warps = 0;       // W
  int nvl_queue_tokens = 0;  // Qn
  int rdma_queue_tokens = 0; // Qr
  int64_t row_bytes = 0;     // payload bytes per row (combine: hidden * 2)
  int num_scales = 0;
  int num_topk = 0;
  int experts_per_rank = 0;
  // Bytes at the start of the scale-out window that another layout of the same window owns for
  // good: a low-latency Buffer's signals and persistent words (runtime/ops_low_latency.h) follow
  // the internode signals. The positions and every per-call region start after them; 0 = none.
  int64_t reserved_head_bytes = 0;

  MOELINK_HOST_DEVICE int num_ranks() const { return num_nodes * ranks_per_node; }
};

// How the W warps of a block share the roles, and the round sizes of the reducing roles.
struct InternodeRoles {
  int rdma_senders;       // dispatch block 2c: warps [0, rdma_senders) send, the rest receive over NVL
  int nvl_receivers;
  int forwarders;         // dispatch block 2c + 1: warps [0, forwarders) forward, the last coordinates
  int combine_senders;    // combine block 2c: warps [0, combine_senders) send over NVL, the rest reduce
  int combine_reducers;   // ... RDMA receivers reducing node partials
  int tokens_per_warp;    // combine reducers (both blocks): tokens per warp per round
  int source_round;       // RDMA receivers: tokens per round = combine_reducers * tokens_per_warp
  int forward_round;      // combine forwarders: messages per round = W * tokens_per_warp

  MOELINK_HOST_DEVICE static InternodeRoles of(const InternodeShape& s) {
    InternodeRoles r{};
    const int w = s.block_warps;
    r.rdma_senders = w / 2 < s.num_nodes ? (w / 2 > 0 ? w / 2 : 1) : s.num_nodes;
    r.nvl_receivers = w - r.rdma_senders;
    r.forwarders = w - 1;
    r.combine_senders = w / 2 < s.ranks_per_node ? (w / 2 > 0 ? w / 2 : 1) : s.ranks_per_node;
    r.combine_reducers = w - r.combine_senders;
    // A forwarder writes a round of W * k partials only once the source freed room for all of it,
    // and the source frees room only at the end of its own rounds of combine_reducers * k tokens:
    // both rounds together must fit the source's queue, or each waits for the other. The NVL
    // queues only need to hold one forwarder round.
    int k = w > 0 ? s.nvl_queue_tokens / w : 0;
    const int rdma_k = w + r.combine_reducers > 0 ? s.rdma_queue_tokens / (w + r.combine_reducers) : 0;
    k = rdma_k < k ? rdma_k : k;
    r.tokens_per_warp = k > kMaxRoundTokensPerWarp ? kMaxRoundTokensPerWarp : k;
    r.source_round = r.combine_reducers * r.tokens_per_warp;
    r.forward_round = w * r.tokens_per_warp;
    return r;
  }
  // Every role has a warp, and a round fits every queue it reads from or writes into.
  MOELINK_HOST_DEVICE bool valid() const {
    return rdma_senders >= 1 && nvl_receivers >= 1 && forwarders >= 1 && combine_reducers >= 1 && tokens_per_warp >= 1;
  }
};

// Byte offsets of every region of both windows for one call (see the layout above).
struct InternodeLayout {
  // scale-out window
  int64_t num_signals;                                   // the transport's signal region
  int64_t sig_barrier, sig_notify, sig_rdma_tail, sig_rdma_head, sig_comb_tail, sig_comb_head;  // signal ids
  int64_t pos_rdma_sent, pos_rdma_taken, pos_comb_sent, pos_comb_taken;    // byte offsets of the positions
  int64_t agreement_in, agreement_out;                   // byte offsets (fixed per Buffer)
  int64_t notify_in, notify_out, rdma_recv, rdma_send, comb_recv, comb_send;  // byte offsets
  int64_t notify_bytes, dispatch_slot, partial_slot;     // sizes
  int64_t slot_scales, slot_topk, slot_weights, slot_meta, slot_mask, partial_weights;  // offsets inside a slot
  int64_t rdma_total_bytes;
  // NVL window
  int64_t nvl_barrier, nvl_notify_flag, nvl_tail, nvl_head, nvl_agreement, nvl_notify_in, nvl_queues, nvl_queue_bytes;
  int64_t q_row, q_scales, q_topk, q_weights, q_src;     // offsets inside an NVL queue
  int64_t nvl_total_bytes;

  MOELINK_HOST_DEVICE static int64_t align(int64_t b) { return (b + 127) / 128 * 128; }
  MOELINK_HOST_DEVICE static int64_t a16(int64_t b) { return (b + 15) / 16 * 16; }

  MOELINK_HOST_DEVICE static InternodeLayout of(const InternodeShape& s) {
    InternodeLayout l{};
    const int64_t n = s.num_nodes, ranks = s.num_ranks(), lr = s.ranks_per_node, c = s.num_channels;
    const int64_t qr = s.rdma_queue_tokens, qn = s.nvl_queue_tokens, k = s.num_topk;
    const int64_t counters = kInternodeMaxChannels * n;
    l.sig_barrier = 0;
    l.sig_notify = ranks;
    l.sig_rdma_tail = 2 * ranks;
    l.sig_rdma_head = l.sig_rdma_tail + counters;
    l.sig_comb_tail = l.sig_rdma_head + counters;
    l.sig_comb_head = l.sig_comb_tail + counters;
    l.num_signals = l.sig_comb_head + counters;
    l.notify_bytes = a16(4 * (2 * c + s.experts_per_rank));
    l.slot_scales = s.row_bytes;
    l.slot_topk = l.slot_scales + a16(4 * s.num_scales);
    l.slot_weights = l.slot_topk + a16(4 * k);
    l.slot_meta = l.slot_weights + a16(4 * k);
    l.slot_mask = l.slot_meta + 16;
    l.dispatch_slot = l.slot_mask + a16(4 * ((lr + 31) / 32));
    l.partial_weights = s.row_bytes;
    l.partial_slot = l.partial_weights + a16(4 * k);
    l.pos_rdma_sent = align(8 * l.num_signals > s.reserved_head_bytes ? 8 * l.num_signals : s.reserved_head_bytes);
    l.pos_rdma_taken = l.pos_rdma_sent + 8 * counters;
    l.pos_comb_sent = l.pos_rdma_taken + 8 * counters;
    l.pos_comb_taken = l.pos_comb_sent + 8 * counters;
    l.agreement_in = align(l.pos_comb_taken + 8 * counters);
    l.agreement_out = align(l.agreement_in + 8 * 2 * ranks * kAgreementWords);
    l.notify_in = align(l.agreement_out + 8 * 2 * kAgreementWords);
    l.notify_out = align(l.notify_in + ranks * l.notify_bytes);
    l.rdma_recv = align(l.notify_out + ranks * l.notify_bytes);
    l.rdma_send = align(l.rdma_recv + c * n * qr * l.dispatch_slot);
    l.comb_recv = align(l.rdma_send + c * n * qr * l.dispatch_slot);
    l.comb_send = align(l.comb_recv + c * n * qr * l.partial_slot);
    l.rdma_total_bytes = align(l.comb_send + c * n * qr * l.partial_slot);

    l.nvl_barrier = IntranodeLayout::kControlBytes;
    l.nvl_notify_flag = align(l.nvl_barrier + 8 * lr);
    l.nvl_tail = align(l.nvl_notify_flag + 8 * lr);
    l.nvl_head = align(l.nvl_tail + kIntranodeCounterStride * kInternodeMaxChannels * lr);
    l.nvl_agreement = align(l.nvl_head + kIntranodeCounterStride * kInternodeMaxChannels * lr);
    l.nvl_notify_in = align(l.nvl_agreement + 8 * 2 * lr * kAgreementWords);
    l.nvl_queues = align(l.nvl_notify_in + lr * l.notify_bytes);
    l.q_row = 0;
    l.q_scales = a16(qn * s.row_bytes);
    l.q_topk = a16(l.q_scales + qn * 4 * s.num_scales);
    l.q_weights = a16(l.q_topk + qn * 4 * k);
    l.q_src = a16(l.q_weights + qn * 4 * k);
    l.nvl_queue_bytes = align(l.q_src + qn * 8);
    l.nvl_total_bytes = l.nvl_queues + l.nvl_queue_bytes * c * lr;
    return l;
  }
};

// What every internode kernel knows.
struct InternodeContext {
  int rank = 0;                    // global rank
  InternodeShape shape;
  WindowTable nvl{};               // NVL window of every rank of this node, by local index
  transport::ScaleOut net;         // this rank's scale-out handle
  uint64_t* nvl_bytes = nullptr;   // NVL byte counter, or null
  // The call's parameter words (op, shapes, dtypes, config, the handle's serial: the Python
  // layer's words, moelink._agreement names them), compared by every rank in the global barrier.
  uint64_t agreement[kAgreementWords] = {};

  MOELINK_HOST_DEVICE int node() const { return rank / shape.ranks_per_node; }
  MOELINK_HOST_DEVICE int local() const { return rank % shape.ranks_per_node; }
};

struct InternodeNotifyArgs {
  InternodeContext ctx;
  int64_t num_tokens = 0;
  const bool* is_token_in_rank = nullptr;          // [num_tokens][R]
  const int32_t* num_tokens_per_expert = nullptr;  // [R * experts_per_rank]
  int expert_alignment = 1;
  // Outputs.
  int32_t* recv_channel_start = nullptr;  // [R * C + 1]: first receive row of (source s, channel c)
  int32_t* forward_start = nullptr;       // [C * N + 1]: first forwarded message of (channel c, source node n)
  int32_t* recv_counts = nullptr;         // [2 + experts_per_rank]: rows received, messages forwarded,
                                          // then rows per local expert, aligned up
};

struct InternodeDispatchArgs {
  InternodeContext ctx;
  bool barrier_first = false;             // cached mode: no notify ran before
  int64_t num_tokens = 0;
  const void* x = nullptr;                // [num_tokens][row_bytes]
  const uint32_t* x_scales = nullptr;     // [num_tokens][num_scales] or null
  const int64_t* topk_idx = nullptr;      // [num_tokens][num_topk] global ids or -1
  const float* topk_weights = nullptr;    // [num_tokens][num_topk] or null
  const bool* is_token_in_rank = nullptr; // [num_tokens][R]
  const int32_t* recv_channel_start = nullptr;  // from notify or the handle
  const int32_t* forward_start = nullptr;       // from notify or the handle
  // Outputs, source side.
  int32_t* rdma_send_head = nullptr;      // [num_tokens][N]: position of the token in queue
                                          // (its channel, node n) of this call, -1 if not sent there
  // Outputs, forwarder side.
  int32_t* forward_head = nullptr;        // [forwarded messages][L]: position of the message in NVL
                                          // queue (c, me) of local rank j, -1 if not sent to j
  // Outputs, receiver side (rows in receive order).
  void* recv_x = nullptr;
  uint32_t* recv_x_scales = nullptr;
  int64_t* recv_topk_idx = nullptr;       // local ids or -1
  float* recv_topk_weights = nullptr;
  int32_t* recv_src_idx = nullptr;
};

struct InternodeCombineArgs {
  InternodeContext ctx;                   // shape.row_bytes = hidden * 2
  int hidden = 0;
  const uint16_t* x = nullptr;            // [num_recv][hidden] bf16, in the dispatch's receive order
  const float* topk_weights = nullptr;    // [num_recv][num_topk] or null
  const int32_t* recv_channel_start = nullptr;  // handle
  const int32_t* forward_start = nullptr;       // handle
  const int32_t* forward_head = nullptr;        // handle
  int64_t num_tokens = 0;
  const int32_t* rdma_send_head = nullptr;      // handle
  const uint16_t* bias[2] = {nullptr, nullptr};
  // Outputs.
  uint16_t* combined_x = nullptr;
  float* combined_topk_weights = nullptr;
};

// `nvl_chunk` / `rdma_chunk`: tokens between tail publications on each link (>= 1).
void internode_notify(const InternodeNotifyArgs& args, const LaunchContext& ctx);
void internode_dispatch(const InternodeDispatchArgs& args, const LaunchContext& ctx, int nvl_chunk, int rdma_chunk);
void internode_combine(const InternodeCombineArgs& args, const LaunchContext& ctx, int nvl_chunk, int rdma_chunk);
size_t internode_combine_smem_bytes(const InternodeShape& shape);

}  // namespace moelink
