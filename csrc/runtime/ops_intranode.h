// Intranode normal-mode dispatch and combine (one node: every rank reaches every other rank's
// window with loads and stores). Target-neutral declarations; ops_intranode.cu is compiled by g++
// into moelink._host and by nvcc into moelink._cuda. docs/buffer-layout.md draws the layout.
//
// Channels. A call with an SM budget of `num_sms` runs `num_channels = num_sms / 2` channels;
// channel c owns the contiguous token range [c * T, min((c + 1) * T, num_tokens)) with
// T = ceil(num_tokens / num_channels). Each channel is one sender block and one receiver block
// (even and odd blocks of a grid of exactly num_sms blocks), and each block has one warp per rank
// of the node, so a warp talks to exactly one peer (which is what makes the queues deadlock-free:
// no warp ever waits on one peer while another peer waits on it).
//
// Queues. For each (channel c, sender s) the receiver's window holds a ring of `queue_tokens`
// slots. tail[c][s] (advanced by the sender, release) and head[c][s] (advanced by the receiver,
// release) are 64-bit counters that only grow: every call drains every queue it uses, so a call
// starts with head == tail and continues from there. Dispatch and combine share the counters and
// the slot area (combine's queues run the other way: the expert-side rank sends, the token's
// source rank receives).
//
// Epochs. Every operation begins with a node barrier: rank r stores the operation's epoch (a
// per-Buffer call counter, equal on all ranks) into barrier[r] of every peer's window and waits
// until all of its own barrier slots reached it. After the barrier no rank is still inside an
// earlier operation, so everything past the counters may be re-carved for this call's shapes.
//
// Window layout (byte offsets, identical on every rank; all regions 128-byte aligned):
//   barrier      u64 [num_ranks]                      epoch each peer last entered
//   notify_epoch u64 [num_ranks]                      epoch of the counts each peer last sent
//   tail         u64 [max_channels][num_ranks], 64 B apart   queue (c, s) tail, written by s
//   head         u64 [max_channels][num_ranks], 64 B apart   queue (c, s) head, written by the owner
//                (one counter per cache line: different processes or GPUs write neighbours)
//   --- per call, after the barrier ---
//   channel_count i32 [num_ranks][num_channels]       tokens sender s puts in queue (c, s)
//   expert_count  i32 [num_ranks][experts_per_rank]   (token, slot) pairs s routes to my experts
//   slots: for each (c, s) a ring of queue_tokens slots, stored as arrays (each 16-byte aligned):
//     row     [queue_tokens][row_bytes]               the token's payload row
//     scales  [queue_tokens][num_scales] f32          FP8 scales (dispatch), absent if 0
//     topk    [queue_tokens][num_topk] i32            local expert ids, -1 if not mine (dispatch)
//     weights [queue_tokens][num_topk] f32            top-k weights (0 where topk is -1)
//     src     [queue_tokens] i32                      token index on the sender (dispatch)
#pragma once

#include <cstddef>
#include <cstdint>

#include "arch/types.h"
#include "launch_context.h"

namespace moelink {

constexpr int kIntranodeMaxRanks = 32;      // one warp per peer in a 1024-thread block
constexpr int kIntranodeMaxChannels = 64;   // 128 SMs; counters are sized for it
constexpr int64_t kIntranodeCounterStride = 64;  // bytes between queue counters

struct IntranodeShape {
  int num_ranks = 0;
  int num_channels = 0;
  int queue_tokens = 0;     // ring capacity per (channel, sender), in tokens
  int64_t row_bytes = 0;    // payload bytes per token row, a multiple of 16
  int num_scales = 0;       // f32 scales per row (FP8 dispatch), else 0
  int num_topk = 0;
  int experts_per_rank = 0;
};

// Byte offsets of every region of a window for one call (see the layout above).
struct IntranodeLayout {
  int64_t barrier, notify_epoch, tail, head;  // fixed
  int64_t channel_count, expert_count;        // per call
  int64_t slots;                              // first queue's slot arrays
  int64_t queue_bytes;                        // bytes per (channel, sender) queue
  int64_t row, scales, topk, weights, src;    // offsets inside a queue
  int64_t total_bytes;                        // window bytes this call needs

  MOELINK_HOST_DEVICE static int64_t align(int64_t bytes) { return (bytes + 127) / 128 * 128; }
  MOELINK_HOST_DEVICE static int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

  MOELINK_HOST_DEVICE static IntranodeLayout of(const IntranodeShape& s) {
    IntranodeLayout l{};
    const int64_t ranks = s.num_ranks, q = s.queue_tokens;
    l.barrier = 0;
    l.notify_epoch = align(l.barrier + 8 * ranks);
    l.tail = align(l.notify_epoch + 8 * ranks);
    l.head = align(l.tail + kIntranodeCounterStride * kIntranodeMaxChannels * ranks);
    l.channel_count = align(l.head + kIntranodeCounterStride * kIntranodeMaxChannels * ranks);
    l.expert_count = align(l.channel_count + 4 * ranks * s.num_channels);
    l.slots = align(l.expert_count + 4 * ranks * s.experts_per_rank);
    l.row = 0;
    l.scales = align16(l.row + q * s.row_bytes);
    l.topk = align16(l.scales + q * 4 * s.num_scales);
    l.weights = align16(l.topk + q * 4 * s.num_topk);
    l.src = align16(l.weights + q * 4 * s.num_topk);
    l.queue_bytes = align(l.src + q * 4);
    l.total_bytes = l.slots + l.queue_bytes * s.num_channels * ranks;
    return l;
  }
};

// What every intranode kernel knows about the node.
struct IntranodeContext {
  int rank = 0;                      // this rank, in [0, num_ranks)
  IntranodeShape shape;
  void* const* windows = nullptr;    // [num_ranks] base of each rank's window, mapped here
  uint64_t epoch = 0;                // this operation's epoch (> 0)
  uint64_t* nvl_bytes = nullptr;     // counter of payload bytes sent to other ranks, or null
};

// Notify: barrier, then each rank sends every peer the number of tokens per channel it will
// send and its per-expert counts, and computes what it will receive.
struct NotifyArgs {
  IntranodeContext node;
  int64_t num_tokens = 0;
  const bool* is_token_in_rank = nullptr;       // [num_tokens][num_ranks]
  const int32_t* num_tokens_per_expert = nullptr;  // [num_ranks * experts_per_rank]
  int expert_alignment = 1;
  // Outputs.
  int32_t* recv_channel_start = nullptr;        // [num_ranks * num_channels + 1]: first receive
                                                // row of (sender s, channel c) at s * C + c
  int32_t* recv_counts = nullptr;               // [1 + experts_per_rank]: total received rows,
                                                // then rows per local expert, aligned up
};

struct DispatchArgs {
  IntranodeContext node;
  bool barrier_first = false;                   // cached mode: no notify ran before
  int64_t num_tokens = 0;
  const void* x = nullptr;                      // [num_tokens][row_bytes]
  const float* x_scales = nullptr;              // [num_tokens][num_scales] or null
  const int64_t* topk_idx = nullptr;            // [num_tokens][num_topk] global expert ids or -1
  const float* topk_weights = nullptr;          // [num_tokens][num_topk] or null
  const bool* is_token_in_rank = nullptr;       // [num_tokens][num_ranks]
  const int32_t* recv_channel_start = nullptr;  // from notify (or the handle)
  // Outputs, sender side.
  int32_t* send_head = nullptr;                 // [num_tokens][num_ranks]: slot of the token in
                                                // queue (its channel, me) of that rank, -1 if not sent
  // Outputs, receiver side (rows in receive order).
  void* recv_x = nullptr;                       // [num_recv][row_bytes]
  float* recv_x_scales = nullptr;               // [num_recv][num_scales] or null
  int64_t* recv_topk_idx = nullptr;             // [num_recv][num_topk] local expert ids or -1
  float* recv_topk_weights = nullptr;           // [num_recv][num_topk] or null
  int32_t* recv_src_idx = nullptr;              // [num_recv] token index on its source rank
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
};

// `send_chunk` (num_max_nvl_chunked_send_tokens): tokens a sender queues between publications of
// its tail, in [1, queue_tokens]. Every call blocks until its kernel finished (host target) or
// is enqueued on ctx.stream (GPU target).
void intranode_notify(const NotifyArgs& args, const LaunchContext& ctx);
void intranode_dispatch(const DispatchArgs& args, const LaunchContext& ctx, int send_chunk);
void intranode_combine(const CombineArgs& args, const LaunchContext& ctx, int send_chunk);

}  // namespace moelink
