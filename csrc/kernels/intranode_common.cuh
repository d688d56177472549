// Pieces every intranode kernel shares: window addressing, queues, channels, the node barrier.
// The layout they address is documented in runtime/ops_intranode.h.
#pragma once

#include "arch/arch.cuh"
#include "runtime/ops_intranode.h"

namespace moelink::kernels::intranode {

using namespace arch;

// Threads per block: one warp per rank of the node.
MOELINK_HOST_DEVICE int block_threads(int num_ranks) { return 32 * num_ranks; }

// `offset` bytes into the window of `owner`.
template <typename T>
MOELINK_DEVICE T* window_at(const IntranodeContext& node, int owner, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(node.windows[owner]) + offset);
}

// The queue that `sender` fills for channel `channel` in the window of `owner` (the receiver).
struct Queue {
  uint64_t* tail;  // written by the sender
  uint64_t* head;  // written by the owner
  char* base;      // slot arrays (layout.row, .scales, ...)
  int capacity;

  MOELINK_DEVICE static Queue of(const IntranodeContext& node, const IntranodeLayout& layout, int owner, int channel,
                                 int sender) {
    const int ranks = node.shape.num_ranks;
    Queue q;
    const int64_t counter = (static_cast<int64_t>(channel) * ranks + sender) * kIntranodeCounterStride;
    q.tail = window_at<uint64_t>(node, owner, layout.tail + counter);
    q.head = window_at<uint64_t>(node, owner, layout.head + counter);
    q.base = window_at<char>(node, owner, layout.slots + (static_cast<int64_t>(channel) * ranks + sender) * layout.queue_bytes);
    q.capacity = node.shape.queue_tokens;
    return q;
  }
  MOELINK_DEVICE int slot(uint64_t position) const { return static_cast<int>(position % static_cast<uint64_t>(capacity)); }
};

struct TokenRange {
  int64_t begin, end;
};

// Channel `channel`'s contiguous share of `num_tokens`.
MOELINK_DEVICE TokenRange channel_tokens(int64_t num_tokens, int num_channels, int channel) {
  const int64_t per_channel = (num_tokens + num_channels - 1) / num_channels;
  const int64_t begin = per_channel * channel < num_tokens ? per_channel * channel : num_tokens;
  const int64_t end = begin + per_channel < num_tokens ? begin + per_channel : num_tokens;
  return {begin, end};
}

// Every block of the calling kernel returns once every rank of the node has entered the operation
// with epoch `node.epoch`, i.e. has finished every earlier operation on these windows.
MOELINK_DEVICE void node_barrier(const IntranodeContext& node, const IntranodeLayout& layout, const char* what) {
  const int peer = static_cast<int>(thread_rank());
  const int ranks = node.shape.num_ranks;
  if (block_rank() == 0 && peer < ranks) {
    st_release(window_at<uint64_t>(node, peer, layout.barrier) + node.rank, node.epoch);
  }
  if (peer < ranks) {
    wait_until(window_at<uint64_t>(node, node.rank, layout.barrier) + peer, Cmp::kGe, node.epoch,
               WaitSite{what, node.rank, peer});
  }
  sync_block();
}

}  // namespace moelink::kernels::intranode
