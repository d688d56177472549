// Pieces every intranode kernel shares: window addressing, the warp map, queues, the node
// barrier and the epoch kept in device memory. The layout they address is documented in
// runtime/ops_intranode.h.
#pragma once

#include "arch/arch.cuh"
#include "runtime/ops_intranode.h"

namespace moelink::kernels::intranode {

using namespace arch;

// The GPU build's block size; every intranode kernel declares it in __launch_bounds__, so ptxas
// budgets registers for it (<= 128 per thread) and a launch never over-subscribes an SM.
constexpr int kGpuBlockThreads = kGpuBlockWarps * kWarpSize;

// `offset` bytes into the window of `owner`.
template <typename T>
MOELINK_DEVICE T* window_at(const IntranodeContext& node, int owner, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(node.windows.base[owner]) + offset);
}

// One counter per cache line: `index` of an array of them at `offset` in `owner`'s window.
MOELINK_DEVICE uint64_t* counter_at(const IntranodeContext& node, int owner, int64_t offset, int64_t index) {
  return window_at<uint64_t>(node, owner, offset + index * kIntranodeCounterStride);
}

// What one warp does (WarpMap in ops_intranode.h): sub-channel `sub` (-1: nothing) and the peers
// first_peer, first_peer + peer_stride, ... below num_ranks.
struct WarpRole {
  int sub, first_peer, peer_stride;
  MOELINK_DEVICE bool idle() const { return sub < 0; }
};

MOELINK_DEVICE WarpRole warp_role(const WarpMap& map, int ranks, int warp) {
  if (map.peers_per_warp > 1) return {0, warp, map.block_warps};
  if (warp >= map.sub_channels * ranks) return {-1, 0, 0};
  return {warp / ranks, warp % ranks, ranks};
}

// The warp (of the same sub-channel's block on every rank) that serves `peer`: the index of its
// doorbell.
MOELINK_DEVICE int warp_of_peer(const WarpMap& map, int ranks, int sub, int peer) {
  return map.peers_per_warp > 1 ? peer % map.block_warps : sub * ranks + peer;
}

// The queue that `sender` fills for virtual channel `v` in the window of `owner` (the receiver).
struct Queue {
  uint64_t* tail;  // written by the sender
  uint64_t* head;  // written by the owner
  char* base;      // slot arrays (layout.row, .scales, ...)
  int capacity;

  MOELINK_DEVICE static Queue of(const IntranodeContext& node, const IntranodeLayout& layout, int owner, int v,
                                 int sender) {
    const int ranks = node.shape.num_ranks;
    const int64_t index = static_cast<int64_t>(v) * ranks + sender;
    Queue q;
    q.tail = counter_at(node, owner, layout.tail, index);
    q.head = counter_at(node, owner, layout.head, index);
    q.base = window_at<char>(node, owner, layout.slots + index * layout.queue_bytes);
    q.capacity = node.shape.map().capacity;
    return q;
  }
  MOELINK_DEVICE int slot(uint64_t position) const { return static_cast<int>(position % static_cast<uint64_t>(capacity)); }
};

// The lanes of a warp that do its work (arch.cuh: work_lanes): every lane on the GPU, one fiber
// on the host. `leader` is the lowest of them, the one that signals; `rank` the caller's index
// among them and `count` how many there are, for splitting a loop by hand.
struct WarpLanes {
  uint32_t mask;
  int leader, rank, count;
  MOELINK_DEVICE static WarpLanes of(uint32_t mask) {
    const unsigned lane = lane_id();
    return {mask, lowest_bit(mask), popcount(mask & ((1u << lane) - 1u)), popcount(mask)};
  }
  MOELINK_DEVICE bool mine() const { return (mask >> lane_id()) & 1u; }
  MOELINK_DEVICE bool leads() const { return static_cast<int>(lane_id()) == leader; }
  // The rank among the workers of lane `lane` (one of them).
  MOELINK_DEVICE int rank_of(int lane) const { return popcount(mask & ((1u << lane) - 1u)); }
  // The leader's value of `v`, on every worker.
  template <typename T>
  MOELINK_DEVICE T from_leader(T v) const { return shfl(mask, v, leader); }
};

// One sender warp's end of a queue (every working lane calls every member, the leader signals).
// Tokens are written into reserve()d slots and made visible by commit(), which releases the tail
// every `send_chunk` tokens; reserve() publishes what is queued before it waits for room, so the
// receiver can always make progress. With a doorbell, every publication also bumps it (the
// receiver warp serves several queues and waits on the doorbell instead of one tail).
struct QueueSender {
  Queue queue;
  uint64_t start, tail, published, head_seen;
  int send_chunk;
  int64_t slot_bytes;         // bytes a slot carries over the link, for the byte counter
  uint64_t* byte_counter;     // null when the queue is this rank's own (no link crossed)
  uint64_t* doorbell;         // the receiver warp's data doorbell, or null
  WaitSite room;
  uint32_t lanes;             // the lanes that call the members (WarpLanes::mask)

  MOELINK_DEVICE static QueueSender open(const IntranodeContext& node, const Queue& queue, int dst, int v,
                                         int send_chunk, int64_t slot_bytes, uint64_t* doorbell,
                                         const char* room_what, uint32_t lanes = kFullMask) {
    return open(node.rank, dst != node.rank ? node.nvl_bytes : nullptr, queue, dst, v, send_chunk, slot_bytes,
                doorbell, room_what, lanes);
  }
  // The same for any queue in a node's windows: `byte_counter` null when no link is crossed.
  MOELINK_DEVICE static QueueSender open(int rank, uint64_t* byte_counter, const Queue& queue, int dst, int v,
                                         int send_chunk, int64_t slot_bytes, uint64_t* doorbell,
                                         const char* room_what, uint32_t lanes = kFullMask) {
    QueueSender s;
    s.queue = queue;
    s.lanes = lanes;
    // The tail was last written by this rank (earlier calls drained the queue): it is the start.
    s.start = s.from_leader(s.leads() ? ld_acquire(queue.tail) : uint64_t{0});
    s.tail = s.published = s.head_seen = s.start;
    s.send_chunk = send_chunk < queue.capacity ? send_chunk : queue.capacity;
    s.slot_bytes = slot_bytes;
    s.byte_counter = byte_counter;
    s.doorbell = doorbell;
    s.room = WaitSite{room_what, rank, dst, v};
    return s;
  }

  MOELINK_DEVICE bool leads() const { return elect_one(lanes); }
  MOELINK_DEVICE uint64_t from_leader(uint64_t v) const { return shfl(lanes, v, lowest_bit(lanes)); }
  MOELINK_DEVICE bool full() const { return tail - head_seen >= static_cast<uint64_t>(queue.capacity); }

  // The slot for the next token, once the receiver has freed it.
  MOELINK_DEVICE int reserve() {
    if (full()) {
      publish();
      const uint64_t needed = tail - static_cast<uint64_t>(queue.capacity) + 1;
      head_seen = from_leader(leads() ? wait_until(queue.head, Cmp::kGe, needed, room) : uint64_t{0});
      // The head is the receiver's word: past the tail it would free slots never filled.
      MOELINK_DEVICE_CHECK(head_seen <= tail, "queue: rank %d released head %llu past this rank's tail %llu", room.peer,
                           static_cast<unsigned long long>(head_seen), static_cast<unsigned long long>(tail));
    }
    return queue.slot(tail);
  }

  // Whether a slot is free now, without waiting (for warps that serve several queues).
  MOELINK_DEVICE bool has_room() {
    if (full()) head_seen = from_leader(leads() ? ld_acquire(queue.head) : uint64_t{0});
    MOELINK_DEVICE_CHECK(head_seen <= tail, "queue: rank %d released head %llu past this rank's tail %llu", room.peer,
                         static_cast<unsigned long long>(head_seen), static_cast<unsigned long long>(tail));
    return !full();
  }

  MOELINK_DEVICE void commit() {
    ++tail;
    if (tail - published >= static_cast<uint64_t>(send_chunk)) publish();
  }

  MOELINK_DEVICE void publish() {
    syncwarp(lanes);  // every working lane's slot writes precede the leader's release
    if (leads() && tail != published) {
      st_release(queue.tail, tail);
      if (doorbell != nullptr) red_add_release(doorbell, uint64_t{1});
      if (byte_counter != nullptr) atomic_add(byte_counter, (tail - published) * static_cast<uint64_t>(slot_bytes));
    }
    published = tail;
  }
};

struct TokenRange {
  int64_t begin, end;
};

// Virtual channel `v`'s contiguous share of `num_tokens` (V = C * S virtual channels).
MOELINK_DEVICE TokenRange channel_tokens(int64_t num_tokens, int num_channels, int v) {
  const int64_t per_channel = (num_tokens + num_channels - 1) / num_channels;
  const int64_t begin = per_channel * v < num_tokens ? per_channel * v : num_tokens;
  const int64_t end = begin + per_channel < num_tokens ? begin + per_channel : num_tokens;
  return {begin, end};
}

// The epoch of the operation this kernel belongs to: one past what this rank's window says it
// completed (the op's last kernel advances it, see end_operation).
MOELINK_DEVICE uint64_t operation_epoch(const IntranodeContext& node, const IntranodeLayout& layout) {
  return ld_relaxed(window_at<uint64_t>(node, node.rank, layout.control)) + 1;
}

// A thread's index among the working threads of its block (the work_lanes of every warp) and how
// many there are: the block's threads on the GPU, one per warp on the host.
struct BlockWorkers {
  int index, count;
  MOELINK_DEVICE static BlockWorkers of(const WarpLanes& lanes) {
    return {static_cast<int>(warp_id()) * lanes.count + lanes.rank, static_cast<int>(num_warps()) * lanes.count};
  }
};

// Every block of the calling kernel returns once every rank of the node has entered operation
// `epoch`, i.e. has finished every earlier operation on these windows. Called by at least the
// working lanes (work_lanes) of every warp; lanes that have left are fine.
MOELINK_DEVICE void node_barrier(const IntranodeContext& node, const IntranodeLayout& layout, uint64_t epoch,
                                 const char* what) {
  const int ranks = node.shape.num_ranks;
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  if (lanes.mine()) {
    const BlockWorkers workers = BlockWorkers::of(lanes);
    // Parameter words travel beside the barrier (double-buffered by epoch parity: a rank can be at
    // most one operation ahead of a peer still comparing, see ops_intranode.h).
    const int64_t parity = static_cast<int64_t>(epoch & 1u) * ranks;
    if (block_rank() == 0) {
      for (int peer = workers.index; peer < ranks; peer += workers.count) {
        uint64_t* mine = window_at<uint64_t>(node, peer, layout.agreement) + (parity + node.rank) * kAgreementWords;
        for (int w = 0; w < kAgreementWords; ++w) mine[w] = node.agreement[w];
        st_release(window_at<uint64_t>(node, peer, layout.barrier) + node.rank, epoch);  // orders the words too
      }
    }
  }
  // Every peer has this rank's store before any thread may fail a comparison (a failed check
  // ends the launch: peers it had not reached yet would wait for it until their deadline).
  sync_block();
  if (lanes.mine()) {
    const BlockWorkers workers = BlockWorkers::of(lanes);
    const int64_t parity = static_cast<int64_t>(epoch & 1u) * ranks;
    for (int peer = workers.index; peer < ranks; peer += workers.count) {
      wait_until(window_at<uint64_t>(node, node.rank, layout.barrier) + peer, Cmp::kGe, epoch,
                 WaitSite{what, node.rank, peer});
      // Block 0 compares, after its own stores (the sync_block above); the other blocks only wait
      // (everything they read from peers is range-checked where it is used).
      if (block_rank() != 0) continue;
      const uint64_t* theirs = window_at<const uint64_t>(node, node.rank, layout.agreement) + (parity + peer) * kAgreementWords;
      for (int w = 0; w < kAgreementWords; ++w) {
        const uint64_t value = theirs[w];
        MOELINK_DEVICE_CHECK(value == node.agreement[w],
                             "moelink agreement: rank %d and rank %d disagree on word %d (%llu here, %llu there)",
                             node.rank, peer, w, static_cast<unsigned long long>(node.agreement[w]),
                             static_cast<unsigned long long>(value));
      }
    }
  }
  sync_block();
}

// Called by every remaining thread of every block at the end of an operation's last kernel: the
// last block to get here stores `epoch` as completed, so the next operation's kernels see it. With
// `exit_what` (a one-copy combine, whose peers read this rank's window), that block first waits
// until every rank of the node has finished reading (exit_barrier): only then may a caller write
// its window again.
MOELINK_DEVICE void end_operation(const IntranodeContext& node, const IntranodeLayout& layout, uint64_t epoch,
                                  const char* exit_what = nullptr) {
  sync_block();
  if (thread_rank() == 0) {
    uint32_t* blocks_done = window_at<uint32_t>(node, node.rank, layout.control + IntranodeLayout::kBlocksDoneOffset);
    fence<Scope::kGpu>();  // this block's work before its count
    if (atomic_add<Scope::kGpu>(blocks_done, 1u) == num_blocks() - 1) {
      st_relaxed<Scope::kGpu>(blocks_done, 0u);
      if (exit_what != nullptr) {
        fence<Scope::kSys>();  // every block's reads of peer windows, before the peers learn of them
        const int ranks = node.shape.num_ranks;
        for (int peer = 0; peer < ranks; ++peer) st_release(window_at<uint64_t>(node, peer, layout.exit_barrier) + node.rank, epoch);
        for (int peer = 0; peer < ranks; ++peer) {
          wait_until(window_at<uint64_t>(node, node.rank, layout.exit_barrier) + peer, Cmp::kGe, epoch,
                     WaitSite{exit_what, node.rank, peer});
        }
      }
      st_release<Scope::kGpu>(window_at<uint64_t>(node, node.rank, layout.control), epoch);
    }
  }
}

}  // namespace moelink::kernels::intranode
