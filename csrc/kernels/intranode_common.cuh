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

// One sender warp's end of a queue (every lane calls every member, lane 0 does the signalling).
// Tokens are written into reserve()d slots and made visible by commit(), which releases the tail
// every `send_chunk` tokens; reserve() publishes what is queued before it waits for room, so the
// receiver can always make progress.
struct QueueSender {
  Queue queue;
  uint64_t start, tail, published, head_seen;
  int send_chunk;
  int64_t slot_bytes;         // bytes a slot carries over the link, for the byte counter
  uint64_t* byte_counter;     // null when the queue is this rank's own (no link crossed)
  WaitSite room;

  MOELINK_DEVICE static QueueSender open(const IntranodeContext& node, const Queue& queue, int dst, int channel,
                                         int send_chunk, int64_t slot_bytes, const char* room_what) {
    QueueSender s;
    s.queue = queue;
    // The tail was last written by this rank (earlier calls drained the queue): it is the start.
    s.start = shfl(kFullMask, lane_id() == 0 ? ld_acquire(queue.tail) : uint64_t{0}, 0);
    s.tail = s.published = s.head_seen = s.start;
    s.send_chunk = send_chunk;
    s.slot_bytes = slot_bytes;
    s.byte_counter = dst != node.rank ? node.nvl_bytes : nullptr;
    s.room = WaitSite{room_what, node.rank, dst, channel};
    return s;
  }

  // The slot for the next token, once the receiver has freed it.
  MOELINK_DEVICE int reserve() {
    if (tail - head_seen >= static_cast<uint64_t>(queue.capacity)) {
      publish();
      const uint64_t needed = tail - static_cast<uint64_t>(queue.capacity) + 1;
      head_seen = shfl(kFullMask, lane_id() == 0 ? wait_until(queue.head, Cmp::kGe, needed, room) : uint64_t{0}, 0);
    }
    return queue.slot(tail);
  }

  MOELINK_DEVICE void commit() {
    ++tail;
    if (tail - published >= static_cast<uint64_t>(send_chunk)) publish();
  }

  MOELINK_DEVICE void publish() {
    syncwarp();  // every lane's slot writes precede lane 0's release
    if (lane_id() == 0 && tail != published) {
      st_release(queue.tail, tail);
      if (byte_counter != nullptr) atomic_add(byte_counter, (tail - published) * static_cast<uint64_t>(slot_bytes));
    }
    published = tail;
  }
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
