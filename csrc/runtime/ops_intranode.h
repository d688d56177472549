// Intranode normal-mode dispatch and combine (one node: every rank reaches every other rank's
// window with loads and stores). Target-neutral declarations; ops_intranode.cu is compiled by g++
// into moelink._host and by nvcc into moelink._cuda. docs/buffer-layout.md draws the layout.
//
// Blocks and warps. A call with an SM budget of `num_sms` runs a grid of exactly num_sms blocks:
// `num_channels = num_sms / 2` channels, each a sender block (even) and a receiver block (odd).
// Every block has the same fixed number of warps W (the GPU build: kGpuBlockWarps, declared in
// the kernels' __launch_bounds__; the host target may use fewer, see IntranodeShape::block_warps)
// whatever the rank count R. WarpMap says how a block's warps share the work:
//   - W >= R: each block is split into S sub-channels of R warps (S = W / R, capped so that a
//     queue keeps at least R slots); channel c's tokens are split into S contiguous *virtual
//     channels* v = c * S + sub, and warp (sub, p) serves peer p in virtual channel v. So a peer
//     gets S warps per channel ("several warps per peer"), each driving its own queue, and no two
//     warps ever share a queue.
//   - W < R (more ranks than warps, e.g. NVL72-class nodes): S = 1 and warp w serves the P =
//     ceil(R / W) peers w, w + W, w + 2W, ... one after the other.
// Receive order is by sender rank, then virtual channel (i.e. token index), so neither S nor P
// changes any result.
//
// Queues. For each (virtual channel v, sender s) the receiver's window holds a ring of
// `capacity = queue_tokens / S` slots. tail[v][s] (advanced by the sender, release) and
// head[v][s] (advanced by the receiver, release) are 64-bit counters that only grow: every call
// drains every queue it uses, so a call starts with head == tail and continues from there.
// Dispatch and combine share the counters and the slot area (combine's queues run the other
// way: the expert-side rank sends, the token's source rank receives).
//
// Why nothing deadlocks. A receiver only consumes, so a sender waiting for room always gets it
// once its receiver runs. A dispatch receiver warp that serves several queues (P > 1) never waits
// on one of them: it waits on its data doorbell (every sender of those queues bumps it after
// publishing a tail) and then drains whichever queues have data. Symmetrically a combine sender
// warp that serves several peers never waits for room in one of them: it waits on its room
// doorbell, which each of those peers' receivers bumps after releasing a head. The combine
// receiver reduces its tokens in rounds; a round reads at most `round_tokens` rows of a queue,
// and capacity >= round_tokens, so every row a round needs can be in flight at once. The
// one-copy paths (below) have no queues to fill: a one-copy dispatch sender never waits, so its
// receivers' waits (one per queue, for the final tail) all end; a one-copy combine only reads
// windows every rank finished writing before the combine's node barrier, and its closing barrier
// (every rank has finished reading) is reached by every rank without waiting on anything else.
//
// Epochs, kept in device memory (CUDA-graph safe: no per-call value comes from the host). Each
// rank's window holds its own operation counter `control.epoch` (E: operations completed on
// this window). An operation's first kernel starts with a node barrier at epoch E + 1: rank r
// stores E + 1 into barrier[r] of every peer and waits until all of its own slots reached it,
// after which no rank is still inside an earlier operation and everything past the fixed
// counters may be re-carved for this call's shapes. The operation's last kernel advances E: each
// block counts itself out in control.blocks_done and the last one stores E + 1 (release); a
// one-copy combine's last block first runs the closing barrier on exit_barrier.
//
// One-copy paths (opt-in: Buffer.dispatch/combine(zero_copy=True); DirectRecvLayout and
// CombineInputLayout below). Notify also exchanges every rank's per-destination totals
// (rank_count), so every rank knows where its rows land in each receiver's receive order
// (send_row_start) and the row capacity M every rank agrees on. A one-copy dispatch sender writes
// each row straight into the receiver's *receive region* (carved from the end of the window) at
// its final row, then publishes its queue tail once; the receiver waits for every tail and its
// outputs are views of its own receive region (valid until its next dispatch). A one-copy combine
// reads each copy of a token straight from the *combine input region* of the rank that holds it
// (at the start of the per-call area), where that rank's caller wrote its expert outputs before
// the combine; all 2C blocks reduce, none sends.
//
// Window layout (byte offsets, identical on every rank; all regions 128-byte aligned):
//   control      u64 epoch, (64 B later) u32 blocks_done, (128 B) u64 notify_rows   this rank's own
//                notify_rows: epoch of the notify whose rank_count rows this rank has written
//   barrier      u64 [R]                      epoch each peer last entered
//   notify_epoch u64 [R]                      epoch of the counts each peer last sent
//   exit_barrier u64 [R]                      epoch of the last one-copy combine each peer finished reading in
//   tail         u64 [kMaxVirtualChannels][R], 64 B apart   queue (v, s) tail, written by s
//   head         u64 [kMaxVirtualChannels][R], 64 B apart   queue (v, s) head, written by the owner
//   data_bell    u64 [kIntranodeMaxChannels][kMaxBlockWarps], 64 B apart
//                                             dispatch: bumped by senders of receiver warp w (P > 1)
//   room_bell    u64 [kIntranodeMaxChannels][kMaxBlockWarps], 64 B apart
//                                             combine: bumped by receivers of sender warp w (P > 1)
//                (one counter per cache line: different processes or GPUs write neighbours)
//   agreement    u64 [2][R][kAgreementWords]  [epoch % 2][s]: the parameter words rank s entered
//                                             that operation with (IntranodeContext::agreement),
//                                             written before its barrier store, compared after
//   --- per call, after the barrier ---
//   channel_count i32 [R][V]                  tokens sender s puts in queue (v, s)
//   expert_count  i32 [R][experts_per_rank]   (token, slot) pairs s routes to my experts
//   rank_count    i32 [R][R + 1]              [s][j]: tokens s sends to rank j; [s][R]: the one-copy
//                                             row capacity s asks for (num_worst_tokens, or 0)
//   slots: for each (v, s) a ring of `capacity` slots, stored as arrays (each 16-byte aligned):
//     row     [capacity][row_bytes]           the token's payload row
//     scales  [capacity][num_scales] 4 B      FP8 scales (dispatch; f32 or packed UE8M0), absent if 0
//     topk    [capacity][num_topk] i32        local expert ids, -1 if not mine (dispatch)
//     weights [capacity][num_topk] f32        top-k weights (0 where topk is -1)
//     src     [capacity] i32                  token index on the sender (dispatch)
//   --- one-copy regions (only for calls with zero_copy; M rows, see DirectRecvLayout) ---
//   combine input at channel_count (instead of the counts and slots, during a one-copy combine):
//     row     [M][hidden] bf16                expert outputs, written by this rank's caller
//     weights [M][num_topk] f32               their top-k weights (copied in by the combine)
//   receive region, ending at most at the window's end:
//     row     [M][row_bytes]                  received payload rows, in receive order
//     scales  [M][num_scales] 4 B
//     topk    [M][num_topk] i64               local expert ids, -1 if not mine
//     weights [M][num_topk] f32
//     src     [M] i32                         token index on its source rank
#pragma once

#include <cstddef>
#include <cstdint>

#include "arch/types.h"
#include "launch_context.h"

namespace moelink {

constexpr int kIntranodeMaxRanks = 128;          // the window table travels by value in the kernel arguments
constexpr int kIntranodeMaxChannels = 64;        // 128 SMs
constexpr int kMaxBlockWarps = 32;               // 1024 threads
constexpr int kGpuBlockWarps = 16;               // the GPU build's fixed block: 512 threads, <= 128 registers
constexpr int kMaxSubChannels = 8;               // named barriers 1..8 (one per sub-channel)
constexpr int kMaxVirtualChannels = 256;         // channels * sub-channels; the counters are sized for it
constexpr int kMaxPeersPerWarp = 8;              // R <= 8 W (128 ranks with the GPU block)
constexpr int kMaxRoundTokensPerWarp = 4;        // combine: tokens a warp reduces per round
constexpr int64_t kIntranodeCounterStride = 64;  // bytes between queue counters
constexpr int kAgreementWords = 16;              // parameter words every rank compares in the node barrier

// How the warps of a block share the work (see the header comment). Computed the same way on
// every rank and on the host, which sizes the window with it.
struct WarpMap {
  int block_warps = 0;        // W
  int sub_channels = 0;       // S
  int peers_per_warp = 0;     // P
  int capacity = 0;           // slots per (virtual channel, peer) queue = queue_tokens / S
  int group_warps = 0;        // combine receiver warps per sub-channel: min(R, W)
  int tokens_per_warp = 0;    // combine receiver: tokens per warp per round
  int round_tokens = 0;       // group_warps * tokens_per_warp (<= capacity)

  // The map a fresh dispatch uses: as many sub-channels as the block and the queues allow.
  MOELINK_HOST_DEVICE static int default_sub_channels(int ranks, int block_warps, int channels, int queue_tokens) {
    if (block_warps < ranks || ranks < 1) return 1;
    int s = block_warps / ranks;
    if (s > kMaxSubChannels) s = kMaxSubChannels;
    if (s > queue_tokens / ranks) s = queue_tokens / ranks;
    if (channels > 0 && s > kMaxVirtualChannels / channels) s = kMaxVirtualChannels / channels;
    return s < 1 ? 1 : s;
  }

  // The map for `sub_channels` (fixed by the dispatch whose handle a combine or cached dispatch
  // reuses); valid() says whether it can run.
  MOELINK_HOST_DEVICE static WarpMap of(int ranks, int block_warps, int sub_channels, int queue_tokens) {
    WarpMap m;
    m.block_warps = block_warps;
    m.sub_channels = sub_channels;
    m.peers_per_warp = block_warps >= ranks ? 1 : (ranks + block_warps - 1) / block_warps;
    m.capacity = sub_channels > 0 ? queue_tokens / sub_channels : 0;
    m.group_warps = ranks < block_warps ? ranks : block_warps;
    int k = m.group_warps > 0 ? m.capacity / m.group_warps : 0;
    m.tokens_per_warp = k > kMaxRoundTokensPerWarp ? kMaxRoundTokensPerWarp : k;
    m.round_tokens = m.group_warps * m.tokens_per_warp;
    return m;
  }

  MOELINK_HOST_DEVICE bool valid(int ranks) const {
    return block_warps >= 1 && block_warps <= kMaxBlockWarps && sub_channels >= 1 &&
           sub_channels <= kMaxSubChannels && sub_channels * ranks <= (block_warps >= ranks ? block_warps : ranks) &&
           peers_per_warp <= kMaxPeersPerWarp && tokens_per_warp >= 1;
  }
};

// The window base of every rank of the node, by local rank, passed by value in the kernel
// arguments (so no table lives in host memory the GPU would have to read).
struct WindowTable {
  void* base[kIntranodeMaxRanks];
};

struct IntranodeShape {
  int num_ranks = 0;
  int num_channels = 0;     // C = num_sms / 2
  int block_warps = 0;      // W: GPU kGpuBlockWarps; host: any value in [1, kMaxBlockWarps]
  int sub_channels = 0;     // S (WarpMap)
  int queue_tokens = 0;     // slots per (channel, peer) before the sub-channel split
  int64_t row_bytes = 0;    // payload bytes per token row, a multiple of 16
  int num_scales = 0;       // 4-byte scales per row (FP8 dispatch), else 0
  int num_topk = 0;
  int experts_per_rank = 0;

  MOELINK_HOST_DEVICE WarpMap map() const { return WarpMap::of(num_ranks, block_warps, sub_channels, queue_tokens); }
  MOELINK_HOST_DEVICE int virtual_channels() const { return num_channels * sub_channels; }
};

// Byte offsets of every region of a window for one call (see the layout above).
struct IntranodeLayout {
  int64_t control, barrier, notify_epoch, exit_barrier, tail, head, data_bell, room_bell, agreement;  // fixed
  int64_t channel_count, expert_count, rank_count;                                        // per call
  int64_t slots;                                                            // first queue's slot arrays
  int64_t queue_bytes;                                                      // bytes per (v, s) queue
  int64_t row, scales, topk, weights, src;                                  // offsets inside a queue
  int64_t total_bytes;                                                      // window bytes this call needs

  MOELINK_HOST_DEVICE static int64_t align(int64_t bytes) { return (bytes + 127) / 128 * 128; }
  MOELINK_HOST_DEVICE static int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }
  static constexpr int64_t kControlBytes = 192;
  static constexpr int64_t kBlocksDoneOffset = 64;   // inside control
  static constexpr int64_t kNotifyRowsOffset = 128;  // inside control

  MOELINK_HOST_DEVICE static IntranodeLayout of(const IntranodeShape& s) {
    IntranodeLayout l{};
    const int64_t ranks = s.num_ranks, q = s.sub_channels > 0 ? s.queue_tokens / s.sub_channels : 0;
    const int64_t bells = kIntranodeCounterStride * kIntranodeMaxChannels * kMaxBlockWarps;
    l.control = 0;
    l.barrier = kControlBytes;
    l.notify_epoch = align(l.barrier + 8 * ranks);
    l.exit_barrier = align(l.notify_epoch + 8 * ranks);
    l.tail = align(l.exit_barrier + 8 * ranks);
    l.head = align(l.tail + kIntranodeCounterStride * kMaxVirtualChannels * ranks);
    l.data_bell = align(l.head + kIntranodeCounterStride * kMaxVirtualChannels * ranks);
    l.room_bell = l.data_bell + bells;
    l.agreement = align(l.room_bell + bells);
    l.channel_count = align(l.agreement + 8 * 2 * ranks * kAgreementWords);
    l.expert_count = align(l.channel_count + 4 * ranks * s.virtual_channels());
    l.rank_count = align(l.expert_count + 4 * ranks * s.experts_per_rank);
    l.slots = align(l.rank_count + 4 * ranks * (ranks + 1));
    l.row = 0;
    l.scales = align16(l.row + q * s.row_bytes);
    l.topk = align16(l.scales + q * 4 * s.num_scales);
    l.weights = align16(l.topk + q * 4 * s.num_topk);
    l.src = align16(l.weights + q * 4 * s.num_topk);
    l.queue_bytes = align(l.src + q * 4);
    l.total_bytes = l.slots + l.queue_bytes * s.virtual_channels() * ranks;
    return l;
  }
};

// A one-copy dispatch's receive region: M rows (the same on every rank), carved from the end of a
// window of `window_bytes` (the same on every rank), so that a later combine's queues, carved from
// the start, leave it intact when the window holds both. `base` < 0: it does not fit at all.
struct DirectRecvLayout {
  int64_t base, row, scales, topk, weights, src, bytes;  // row..src: offsets from base

  MOELINK_HOST_DEVICE static DirectRecvLayout of(const IntranodeShape& s, int64_t rows, int64_t window_bytes) {
    DirectRecvLayout l{};
    l.row = 0;
    l.scales = IntranodeLayout::align16(rows * s.row_bytes);
    l.topk = IntranodeLayout::align16(l.scales + rows * 4 * s.num_scales);
    l.weights = IntranodeLayout::align16(l.topk + rows * 8 * s.num_topk);
    l.src = IntranodeLayout::align16(l.weights + rows * 4 * s.num_topk);
    l.bytes = IntranodeLayout::align(l.src + rows * 4);
    l.base = (window_bytes - l.bytes) / 128 * 128;
    if (l.base < IntranodeLayout::of(s).slots) l.base = -1;  // it would overlap the counters
    return l;
  }
};

// A one-copy combine's input region: M rows of expert outputs (s.row_bytes = hidden * 2) and their
// top-k weights, at the start of the per-call area (where a queue-based call puts its counts).
struct CombineInputLayout {
  int64_t base, row, weights, bytes;  // row, weights: offsets from base; base + bytes: its end

  MOELINK_HOST_DEVICE static CombineInputLayout of(const IntranodeShape& s, int64_t rows) {
    CombineInputLayout l{};
    l.base = IntranodeLayout::of(s).channel_count;
    l.row = 0;
    l.weights = IntranodeLayout::align16(rows * s.row_bytes);
    l.bytes = IntranodeLayout::align(l.weights + rows * 4 * s.num_topk);
    return l;
  }
};

// What every intranode kernel knows about the node.
struct IntranodeContext {
  int rank = 0;                      // this rank, in [0, num_ranks)
  IntranodeShape shape;
  WindowTable windows{};             // [num_ranks] base of each rank's window, as this rank maps it
  uint64_t* nvl_bytes = nullptr;     // counter of payload bytes sent to other ranks, or null
  // What this rank believes the operation is (op, shapes, dtypes, top-k, experts, SMs, queue
  // sizes, the handle's serial: the Python layer's words, moelink._agreement names them). The
  // operation's node barrier sends them to every peer beside the barrier store and every rank
  // compares every peer's with its own: a difference fails with DeviceAssert("moelink agreement:
  // ...") on every rank, naming both ranks and the word, before any count or row is exchanged.
  uint64_t agreement[kAgreementWords] = {};
};

// Notify: barrier, then each rank sends every peer the number of tokens per virtual channel it
// will send and its per-expert counts, and computes what it will receive.
struct NotifyArgs {
  IntranodeContext node;
  int64_t num_tokens = 0;
  const bool* is_token_in_rank = nullptr;       // [num_tokens][num_ranks]
  const int32_t* num_tokens_per_expert = nullptr;  // [num_ranks * experts_per_rank]
  int expert_alignment = 1;
  int32_t direct_rows_request = 0;              // one-copy row capacity this rank asks for (>= 0)
  // Outputs.
  int32_t* recv_channel_start = nullptr;        // [num_ranks * V + 1]: first receive row of
                                                // (sender s, virtual channel v) at s * V + v
  int32_t* recv_counts = nullptr;               // [1 + experts_per_rank]: total received rows,
                                                // then rows per local expert, aligned up
  int32_t* rank_counts = nullptr;               // [num_ranks][num_ranks + 1]: rank_count (layout above)
  int32_t* send_row_start = nullptr;            // [num_ranks * V]: first row of (destination d, my
                                                // virtual channel v) in d's receive order, at d * V + v
};

struct DispatchArgs {
  IntranodeContext node;
  bool barrier_first = false;                   // cached mode: no notify ran before
  int64_t num_tokens = 0;
  const void* x = nullptr;                      // [num_tokens][row_bytes]
  const uint32_t* x_scales = nullptr;           // [num_tokens][num_scales] 4-byte words, or null
  const int64_t* topk_idx = nullptr;            // [num_tokens][num_topk] global expert ids or -1
  const float* topk_weights = nullptr;          // [num_tokens][num_topk] or null
  const bool* is_token_in_rank = nullptr;       // [num_tokens][num_ranks]
  const int32_t* recv_channel_start = nullptr;  // from notify (or the handle)
  // Outputs, sender side.
  int32_t* send_head = nullptr;                 // [num_tokens][num_ranks]: position of the token in
                                                // queue (its virtual channel, me) of that rank, -1 if not sent
  // Outputs, receiver side (rows in receive order).
  void* recv_x = nullptr;                       // [num_recv][row_bytes]
  uint32_t* recv_x_scales = nullptr;            // [num_recv][num_scales] or null
  int64_t* recv_topk_idx = nullptr;             // [num_recv][num_topk] local expert ids or -1
  float* recv_topk_weights = nullptr;           // [num_recv][num_topk] or null
  int32_t* recv_src_idx = nullptr;              // [num_recv] token index on its source rank
  // One-copy mode: every row goes straight into its receiver's receive region (DirectRecvLayout
  // of `direct_rows` rows in windows of `window_bytes`); the recv_* outputs above are unused.
  bool direct = false;
  int64_t direct_rows = 0;                      // M, the same on every rank
  int64_t window_bytes = 0;
  const int32_t* send_row_start = nullptr;      // from notify (or the handle)
};

struct CombineArgs {
  IntranodeContext node;                        // shape.row_bytes = hidden * 2 (bf16)
  int hidden = 0;
  int64_t num_recv = 0;                         // rows this rank received in the dispatch
  const uint16_t* x = nullptr;                  // [num_recv][hidden] bf16 expert outputs
  const float* topk_weights = nullptr;          // [num_recv][num_topk] or null
  const int32_t* recv_channel_start = nullptr;  // from the dispatch's handle
  int64_t num_tokens = 0;                       // tokens this rank dispatched
  const bool* is_token_in_rank = nullptr;       // [num_tokens][num_ranks] (handle)
  const int32_t* send_head = nullptr;           // [num_tokens][num_ranks] (handle)
  const uint16_t* bias[2] = {nullptr, nullptr}; // [num_tokens][hidden] bf16, each optional
  // Outputs.
  uint16_t* combined_x = nullptr;               // [num_tokens][hidden] bf16
  float* combined_topk_weights = nullptr;       // [num_tokens][num_topk] or null
  // One-copy mode: x and topk_weights are unused; every rank's expert outputs and weights are in its
  // combine input region (CombineInputLayout of `direct_rows` rows), read where they lie.
  bool direct = false;
  int64_t direct_rows = 0;                      // M of the dispatch (the handle's)
  const int32_t* send_row_start = nullptr;      // the dispatch's (handle)
};

// `send_chunk` (num_max_nvl_chunked_send_tokens): tokens a sender queues between publications of
// its tail, >= 1 (capped at the queue capacity). Every call blocks until its kernel finished
// (host target) or is enqueued on ctx.stream (GPU target). Throws moelink::Error(kInvalidArgument)
// for a shape the kernels cannot run (the message names the field and the limit).
void intranode_notify(const NotifyArgs& args, const LaunchContext& ctx);
void intranode_dispatch(const DispatchArgs& args, const LaunchContext& ctx, int send_chunk);
void intranode_combine(const CombineArgs& args, const LaunchContext& ctx, int send_chunk);

// Dynamic shared memory a launch of each kernel takes for `shape` (the same on both targets).
size_t intranode_dispatch_smem_bytes(const IntranodeShape& shape);
size_t intranode_combine_smem_bytes(const IntranodeShape& shape);

}  // namespace moelink
