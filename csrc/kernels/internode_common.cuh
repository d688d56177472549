// Pieces every internode kernel shares: window addressing, the global barrier, the epoch, and the
// sending end of a scale-out queue. The layouts are documented in runtime/ops_internode.h.
#pragma once

#include "kernels/intranode_common.cuh"
#include "runtime/ops_internode.h"
#include "transport/scaleout.cuh"

namespace moelink::kernels::internode {

using namespace arch;
using intranode::kGpuBlockThreads;
using intranode::Queue;
using intranode::QueueSender;
using intranode::TokenRange;
using intranode::WarpLanes;
using intranode::BlockWorkers;

MOELINK_DEVICE TokenRange channel_tokens(int64_t num_tokens, int channels, int c) {
  return intranode::channel_tokens(num_tokens, channels, c);
}

// `offset` bytes into the NVL window of local rank `local`.
template <typename T>
MOELINK_DEVICE T* nvl_at(const InternodeContext& ctx, int local, int64_t offset) {
  return reinterpret_cast<T*>(static_cast<char*>(ctx.nvl.base[local]) + offset);
}

// `offset` bytes into this rank's own scale-out window.
template <typename T>
MOELINK_DEVICE T* net_at(const InternodeContext& ctx, int64_t offset) {
  return reinterpret_cast<T*>(ctx.net.window + offset);
}

// Own signal word `id` (this rank's kernels may read it, and add to it for a local stream).
MOELINK_DEVICE uint64_t* own_signal(const InternodeContext& ctx, int64_t id) {
  return const_cast<uint64_t*>(transport::signal_address(ctx.net, id));
}

// Adds `add` to signal `id` of `peer`: through the transport for another node, directly for
// this rank itself (its own forwarder); never for another rank of the node (not a stream here).
MOELINK_DEVICE void signal_add(const InternodeContext& ctx, int peer, int64_t id, uint64_t add) {
  if (peer == ctx.rank) {
    red_add_release(own_signal(ctx, id), add);
  } else {
    transport::signal(ctx.net, peer, id, add);
  }
}

// Counter arrays of the layouts: [64][N] indexed by (channel, node).
MOELINK_DEVICE int64_t stream_index(const InternodeContext& ctx, int c, int node) {
  return static_cast<int64_t>(c) * ctx.shape.num_nodes + node;
}
MOELINK_DEVICE uint64_t* position_at(const InternodeContext& ctx, int64_t region, int c, int node) {
  return net_at<uint64_t>(ctx, region) + stream_index(ctx, c, node);
}

MOELINK_DEVICE uint64_t operation_epoch(const InternodeContext& ctx) {
  return ld_relaxed(nvl_at<uint64_t>(ctx, ctx.local(), 0)) + 1;
}

// The calling thread's index among its block's working threads (work_lanes of every warp) and how
// many there are, as BlockWorkers::of. With every lane working (the GPU, random schedules) that is
// the thread's own index, said directly so the compiler need not derive it from the lane's rank
// (a popcount it cannot fold: the notify kernel took 8 registers more).
MOELINK_DEVICE BlockWorkers block_workers(const WarpLanes& lanes) {
  if (lanes.count == kWarpSize) {
    return {static_cast<int>(thread_rank()), static_cast<int>(num_warps()) * kWarpSize};
  }
  return BlockWorkers::of(lanes);
}

// Every block returns once every rank of every node has entered operation `epoch`. Ranks of this
// node meet through their NVL windows (as intranode); ranks of other nodes through signals, each
// posted after everything this rank sent in earlier operations. The call's agreement words ride
// along (runtime/ops_internode.h, "Agreement"): block 0 sends them with its barrier stores and
// signals, then compares every rank's with its own once that rank's barrier store or signal is in.
// Not inlined, and it computes the layout itself: the dispatch kernel's body is at the register
// bound (sm_90), and this way nothing of it is live across the barrier; it runs once per operation.
MOELINK_DEVICE_NOINLINE void global_barrier(const InternodeContext& ctx, uint64_t epoch, const char* what) {
  const InternodeLayout layout = InternodeLayout::of(ctx.shape);
  const InternodeShape& s = ctx.shape;
  const int ranks = s.num_ranks(), lr = s.ranks_per_node, me_node = ctx.node();
  // Called by at least the working lanes of every warp (work_lanes; the rest may have left): the
  // per-rank loops run over the block's working threads (every thread on the GPU, one per warp on
  // the host), and sync_block counts a warp whose idle lanes left as arrived.
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  const BlockWorkers workers = block_workers(lanes);
  const bool works = lanes.mine();
  const int64_t parity = static_cast<int64_t>(epoch & 1u);
  constexpr int64_t kWordBytes = 8 * kAgreementWords;
  if (block_rank() == 0) {
    // A put's source must lie in this rank's own scale-out window: stage the words there first.
    uint64_t* staged = net_at<uint64_t>(ctx, layout.agreement_out + parity * kWordBytes);
    // (One thread, constant indices: a per-thread index into the kernel's parameters would make
    // the compiler copy them to local memory. Thread 0 is always a working lane.)
    if (thread_rank() == 0) {
      for (int w = 0; w < kAgreementWords; ++w) staged[w] = ctx.agreement[w];
    }
    sync_block();
    for (int r = workers.index; works && r < ranks; r += workers.count) {
      if (r / lr == me_node) {
        uint64_t* slot = nvl_at<uint64_t>(ctx, r % lr, layout.nvl_agreement + (parity * lr + ctx.local()) * kWordBytes);
        for (int w = 0; w < kAgreementWords; ++w) slot[w] = ctx.agreement[w];
        st_release(nvl_at<uint64_t>(ctx, r % lr, layout.nvl_barrier) + ctx.local(), epoch);  // orders the words too
      } else {
        // The signal lands after the words (ordering rule 1 of the transport).
        transport::put(ctx.net, r, static_cast<uint64_t>(layout.agreement_in + (parity * ranks + ctx.rank) * kWordBytes),
                       staged, static_cast<uint64_t>(kWordBytes), transport::SignalAdd{layout.sig_barrier + ctx.rank, 1});
      }
    }
  }
  // Every rank has this rank's words before any thread may fail a comparison (a failed check ends
  // the launch: ranks it had not reached yet would wait for it until their deadline).
  sync_block();
  for (int r = workers.index; works && r < ranks; r += workers.count) {
    const bool local = r / lr == me_node;
    const WaitSite site{what, ctx.rank, r};
    if (local) {
      wait_until(nvl_at<uint64_t>(ctx, ctx.local(), layout.nvl_barrier) + r % lr, Cmp::kGe, epoch, site);
    } else {
      transport::wait_signal(ctx.net, layout.sig_barrier + r, Cmp::kGe, epoch, site);
    }
    // Block 0 compares; the other blocks only wait (what they read from peers is range-checked
    // where it is used).
    if (block_rank() != 0) continue;
    const uint64_t* theirs =
        local ? nvl_at<const uint64_t>(ctx, ctx.local(), layout.nvl_agreement + (parity * lr + r % lr) * kWordBytes)
              : net_at<const uint64_t>(ctx, layout.agreement_in + (parity * ranks + r) * kWordBytes);
    for (int w = 0; w < kAgreementWords; ++w) {
      const uint64_t value = theirs[w];
      MOELINK_DEVICE_CHECK(value == ctx.agreement[w],
                           "moelink agreement: rank %d and rank %d disagree on word %d (%llu here, %llu there)", ctx.rank,
                           r, w, static_cast<unsigned long long>(ctx.agreement[w]), static_cast<unsigned long long>(value));
    }
  }
  sync_block();
}

// Called by at least the working lanes of every warp of every block at the end of an operation's
// last kernel (thread 0, which always works, counts the block): the last block stores `epoch` as
// completed (the NVL control area, as intranode).
MOELINK_DEVICE void end_operation(const InternodeContext& ctx, uint64_t epoch) {
  sync_block();
  if (thread_rank() == 0) {
    uint32_t* blocks_done = nvl_at<uint32_t>(ctx, ctx.local(), IntranodeLayout::kBlocksDoneOffset);
    fence<Scope::kGpu>();
    if (atomic_add<Scope::kGpu>(blocks_done, 1u) == num_blocks() - 1) {
      st_relaxed<Scope::kGpu>(blocks_done, 0u);
      st_release<Scope::kGpu>(nvl_at<uint64_t>(ctx, ctx.local(), 0), epoch);
    }
  }
}

// The sending end of a scale-out stream (dispatch messages, combine partials), one warp's.
// Slot k of the stream lives at `slots + (k % capacity) * slot_bytes`: for another node, this
// rank's staging ring, from which a put copies published slots into the peer's ring at
// `remote_ring`; for this rank's own node, the receiving ring itself. Every publication is one
// put per contiguous run of slots, carrying the tail signal (ordering rule 1 of the transport:
// the signal lands after the bytes). Room comes back as the head signal in this rank's window.
// Every working lane of the warp (`lanes`, work_lanes) calls every member; the leader waits, puts
// and signals (so the puts and their signals come from one thread: ordering rule 1).
struct NetSender {
  char* slots;
  int64_t remote_ring;   // byte offset of the receiving ring in the peer's window
  int peer;
  bool local;
  int64_t tail_signal;   // signal id of the tail at the receiver
  const uint64_t* head;  // own signal word: slots the receiver has consumed (absolute)
  uint64_t* position;    // own position word: slots this stream ever published (absolute)
  uint64_t start, tail, published, head_seen;
  int capacity, chunk;
  int64_t slot_bytes;
  WaitSite room;
  uint32_t lanes;        // the lanes that call the members (WarpLanes::mask)

  MOELINK_DEVICE static NetSender open(const InternodeContext& ctx, int peer, char* slots, int64_t remote_ring,
                                       int64_t tail_signal, int64_t head_signal, uint64_t* position, int capacity,
                                       int chunk, int64_t slot_bytes, const char* room_what, int channel,
                                       uint32_t lanes) {
    NetSender s;
    s.lanes = lanes;
    s.slots = slots;
    s.remote_ring = remote_ring;
    s.peer = peer;
    s.local = peer == ctx.rank;
    s.tail_signal = tail_signal;
    s.head = transport::signal_address(ctx.net, head_signal);
    s.position = position;
    s.start = s.from_leader(s.leads() ? ld_relaxed(position) : uint64_t{0});
    s.tail = s.published = s.head_seen = s.start;
    s.capacity = capacity;
    s.chunk = chunk < capacity ? chunk : capacity;
    s.slot_bytes = slot_bytes;
    s.room = WaitSite{room_what, ctx.rank, peer, channel};
    return s;
  }

  MOELINK_DEVICE bool leads() const { return elect_one(lanes); }
  MOELINK_DEVICE uint64_t from_leader(uint64_t v) const { return shfl(lanes, v, lowest_bit(lanes)); }

  MOELINK_DEVICE char* slot(uint64_t position) const {
    return slots + static_cast<int64_t>(position % static_cast<uint64_t>(capacity)) * slot_bytes;
  }

  // The slot for the next message, once the receiver has freed it (publishing first).
  MOELINK_DEVICE char* reserve(const InternodeContext& ctx) {
    if (tail - head_seen >= static_cast<uint64_t>(capacity)) {
      publish(ctx);
      const uint64_t needed = tail - static_cast<uint64_t>(capacity) + 1;
      head_seen = from_leader(leads() ? wait_until(head, Cmp::kGe, needed, room) : uint64_t{0});
      // The head is the receiver's signal: past the tail it would free slots never filled.
      MOELINK_DEVICE_CHECK(head_seen <= tail, "internode queue: rank %d released head %llu past this rank's tail %llu",
                           peer, static_cast<unsigned long long>(head_seen), static_cast<unsigned long long>(tail));
    }
    return slot(tail);
  }

  MOELINK_DEVICE void commit(const InternodeContext& ctx) {
    ++tail;
    if (tail - published >= static_cast<uint64_t>(chunk)) publish(ctx);
  }

  MOELINK_DEVICE void publish(const InternodeContext& ctx) {
    syncwarp(lanes);  // every working lane's slot writes precede the leader's put (or release)
    if (leads() && tail != published) {
      if (local) {
        red_add_release(own_signal(ctx, tail_signal), tail - published);
      } else {
        for (uint64_t from = published; from < tail;) {  // one put per contiguous run of the ring
          const uint64_t first = from % static_cast<uint64_t>(capacity);
          const uint64_t run_end = first + (tail - from) < static_cast<uint64_t>(capacity) ? first + (tail - from)
                                                                                           : static_cast<uint64_t>(capacity);
          const uint64_t count = run_end - first;
          transport::put(ctx.net, peer, static_cast<uint64_t>(remote_ring + static_cast<int64_t>(first) * slot_bytes),
                         slots + static_cast<int64_t>(first) * slot_bytes, count * static_cast<uint64_t>(slot_bytes),
                         transport::SignalAdd{tail_signal, count});
          from += count;
        }
      }
    }
    published = tail;
  }

  // Publishes the rest and records where the stream ends (the next call's start).
  MOELINK_DEVICE void finish(const InternodeContext& ctx) {
    publish(ctx);
    if (leads()) st_relaxed(position, tail);
  }
};

}  // namespace moelink::kernels::internode
