// Pieces every low-latency kernel shares: addressing of the window (runtime/ops_low_latency.h
// documents it), the delivery of a message to a peer (a transport put, or NVLink stores into a
// mapped window of this node), the last-block bookkeeping that advances the own words, and the
// clean barrier.
#pragma once

#include "arch/arch.cuh"
#include "runtime/ops_low_latency.h"
#include "transport/scaleout.cuh"

namespace moelink::kernels::low_latency {

using namespace arch;

// The GPU build's block: every low-latency kernel declares it in __launch_bounds__.
constexpr int kGpuBlockThreads = kGpuBlockWarps * kWarpSize;

enum SignalKind : int { kCountSignal = 0, kTokenSignal = 1, kCombineSignal = 2 };

// Signal id of kind `kind`, half `h`, from (or, at the receiver, for) rank `s`.
MOELINK_DEVICE int64_t signal_id(const LowLatencyContext& c, int kind, int h, int s) {
  const int64_t r = c.shape.num_ranks;
  return c.shape.window.signal_base + (2 * kind + h) * r + s;
}
MOELINK_DEVICE int64_t barrier_signal(const LowLatencyContext& c, int s) {
  return c.shape.window.signal_base + 6 * static_cast<int64_t>(c.shape.num_ranks) + s;
}

// Byte offset (from the window's start) of half `h`.
MOELINK_DEVICE int64_t half_offset(const LowLatencyContext& c, int h) {
  return c.shape.window.data_base + h * c.shape.window.half_bytes;
}

// `offset` bytes into this rank's own scale-out window.
template <typename T = char>
MOELINK_DEVICE T* own_at(const LowLatencyContext& c, int64_t offset) {
  return reinterpret_cast<T*>(c.net.window + offset);
}

// Own words (ops_low_latency.h): calls, cleans, blocks_done, seen_*[kind][h][s].
MOELINK_DEVICE uint64_t* calls_word(const LowLatencyContext& c) { return own_at<uint64_t>(c, c.shape.window.own_offset); }
MOELINK_DEVICE uint64_t* cleans_word(const LowLatencyContext& c) {
  return own_at<uint64_t>(c, c.shape.window.own_offset + 8);
}
MOELINK_DEVICE uint32_t* blocks_done_word(const LowLatencyContext& c) {
  return own_at<uint32_t>(c, c.shape.window.own_offset + 64);
}
MOELINK_DEVICE uint64_t* seen_word(const LowLatencyContext& c, int kind, int h, int s) {
  const int64_t r = c.shape.num_ranks;
  return own_at<uint64_t>(c, c.shape.window.own_offset + kLowLatencyOwnFixedBytes + 8 * ((2 * kind + h) * r + s));
}

// The call a kernel belongs to: the one starting now (a send half), or the one whose send half
// ran last (a receive half alone: a hook). It works on half call % 2; shrink-mode verdicts name it.
MOELINK_DEVICE uint64_t call_number(const LowLatencyContext& c, int phases) {
  const uint64_t calls = ld_relaxed(calls_word(c));
  return (phases & kLowLatencySendPhase) ? calls : calls - 1;
}

// ---- shrink mode (ops_low_latency.h: "Shrink mode") ------------------------------------------------

MOELINK_DEVICE uint64_t* verdict_word(const LowLatencyContext& c, int s) {
  return own_at<uint64_t>(c, c.shape.window.own_offset + kLowLatencyOwnFixedBytes + 48 * int64_t{c.shape.num_ranks} + 8 * s);
}
MOELINK_DEVICE int32_t* mask_word(const LowLatencyContext& c, int s) {
  return own_at<int32_t>(c, c.shape.window.own_offset + kLowLatencyOwnFixedBytes + 56 * int64_t{c.shape.num_ranks} + 4 * s);
}

// True if this rank neither sends to `peer` nor waits for it (always false outside shrink mode).
MOELINK_DEVICE bool is_masked(const LowLatencyContext& c, int peer) {
  if (!c.shrink) return false;
  return ld_relaxed(mask_word(c, peer)) != 0 || ld_relaxed(mask_word(c, c.rank)) != 0;
}

// is_masked as one value for every lane of the warp (lane 0 reads; the mask may change meanwhile).
MOELINK_DEVICE bool warp_masked(const LowLatencyContext& c, int peer) {
  if (!c.shrink) return false;
  return shfl(kFullMask, lane_id() == 0 ? is_masked(c, peer) : false, 0);
}

// Source `s` is live for call `call`: its verdict (block 0's decision, published before) says so.
MOELINK_DEVICE bool live_source(const LowLatencyContext& c, uint64_t call, int s) {
  return !c.shrink || ld_relaxed(verdict_word(c, s)) == 2 * (call + 1);
}

// Block 0's thread that decided source `s` publishes it (after every read of s's data).
MOELINK_DEVICE void publish_verdict(const LowLatencyContext& c, uint64_t call, int s, bool live) {
  st_release<Scope::kGpu>(verdict_word(c, s), 2 * (call + 1) + (live ? 0u : 1u));
}

// The other blocks: wait until block 0 decided every source of this call (each block, all threads).
// Block 0 may spend two deadlines on one source before it decides (its counts message arrives just
// before the deadline, then its tokens never do), so a follower outlasts that: two waits that may
// expire, then the one that fails the launch (CommTimeout: block 0 itself is stuck). One deadline
// would expire with block 0's and fail the call instead of masking the dead peer.
MOELINK_DEVICE void follow_verdicts(const LowLatencyContext& c, uint64_t call, const char* what) {
  const uint64_t decided = 2 * (call + 1);
  for (int s = static_cast<int>(thread_rank()); s < c.shape.num_ranks; s += static_cast<int>(num_threads())) {
    uint64_t* word = verdict_word(c, s);
    const WaitSite site{what, c.rank, s};
    uint64_t seen = 0;
    if (wait_until_or_expire<Scope::kGpu>(word, Cmp::kGe, decided, site, &seen)) continue;
    if (wait_until_or_expire<Scope::kGpu>(word, Cmp::kGe, decided, site, &seen)) continue;
    wait_until<Scope::kGpu>(word, Cmp::kGe, decided, site);
  }
}

// Base of `peer`'s scale-out window as this process maps it (a rank of this node, NVLink path).
MOELINK_DEVICE char* peer_window(const LowLatencyContext& c, int peer) {
  return static_cast<char*>(c.node_windows.base[peer % c.shape.ranks_per_node]);
}

// Adds 1 to signal `id` of `peer` (one thread): a release add into its mapped window on the
// NVLink path, else a transport signal.
MOELINK_DEVICE void signal_peer(const LowLatencyContext& c, int peer, int64_t id) {
  if (c.direct(peer)) {
    red_add_release<Scope::kSys>(reinterpret_cast<uint64_t*>(peer_window(c, peer)) + id, uint64_t{1});
  } else {
    transport::signal(c.net, peer, id, 1);
  }
}

// Moves `bytes` from `src` to offset `dst_offset` of `peer`'s window, then adds 1 to its signal
// `id` (which lands after the bytes). Every lane of the warp calls; `src` is complete for every
// lane (the caller's syncwarp). The transport needs `src` in this rank's own window; the NVLink
// path also takes read-only input (`src_is_input`: a caller's tensor).
MOELINK_DEVICE void deliver(const LowLatencyContext& c, int peer, int64_t dst_offset, const char* src, int64_t bytes,
                            int64_t id, bool src_is_input = false) {
  if (c.direct(peer)) {
    char* base = peer_window(c, peer);
    if (src_is_input) warp_copy_input(kFullMask, base + dst_offset, src, static_cast<size_t>(bytes));
    else warp_copy(kFullMask, base + dst_offset, src, static_cast<size_t>(bytes));
    syncwarp();  // every lane's stores precede lane 0's release
    if (lane_id() == 0) {
      red_add_release<Scope::kSys>(reinterpret_cast<uint64_t*>(base) + id, uint64_t{1});
      if (peer != c.rank && c.nvl_bytes != nullptr) atomic_add(c.nvl_bytes, static_cast<uint64_t>(bytes));
    }
  } else if (lane_id() == 0) {
    transport::put(c.net, peer, static_cast<uint64_t>(dst_offset), src, static_cast<uint64_t>(bytes),
                   transport::SignalAdd{id, 1});
  }
}

// Waits (one thread) until this rank's signal `id` reached `expected`, the exact running total
// it is due: more means a peer ran ahead of the protocol or wrote garbage. Returns false once a
// wait of this process timed out (GPU: every wait returns at once; leave).
MOELINK_DEVICE bool await_signal(const LowLatencyContext& c, int64_t id, uint64_t expected, const char* what, int peer) {
  const uint64_t got = transport::wait_signal(c.net, id, Cmp::kGe, expected, WaitSite{what, c.rank, peer});
  if (aborted()) return false;
  MOELINK_DEVICE_CHECK(got == expected, "%s: rank %d: signal %lld from rank %d is %llu, %llu was due (a peer ahead of "
                       "the protocol, or a faulty one)", what, c.rank, static_cast<long long>(id), peer,
                       static_cast<unsigned long long>(got), static_cast<unsigned long long>(expected));
  return true;
}

// Shrink mode: await_signal for an unmasked peer that may be dead. Returns false, having masked
// `peer` (mask[peer] = 1), if the wait reached its deadline; true once the signal is exactly due
// (or, on the GPU, once another wait aborted the process: check aborted()).
MOELINK_DEVICE bool await_or_mask(const LowLatencyContext& c, int64_t id, uint64_t expected, const char* what, int peer) {
  uint64_t got = 0;
  if (!wait_until_or_expire(transport::signal_address(c.net, id), Cmp::kGe, expected, WaitSite{what, c.rank, peer}, &got)) {
    atomic_exch(mask_word(c, peer), 1);
    return false;
  }
  if (aborted()) return true;
  MOELINK_DEVICE_CHECK(got == expected, "%s: rank %d: signal %lld from rank %d is %llu, %llu was due (a peer ahead of "
                       "the protocol, or a faulty one)", what, c.rank, static_cast<long long>(id), peer,
                       static_cast<unsigned long long>(got), static_cast<unsigned long long>(expected));
  return true;
}

// True on every thread of the block that counts itself out last among the grid's blocks (which
// then sees what the others wrote before); blocks_done is back at 0 afterwards. Every thread of
// every block calls it once, at the end of the kernel.
MOELINK_DEVICE bool last_block(const LowLatencyContext& c) {
  MOELINK_SHARED(int32_t, is_last, [1]);
  sync_block();
  if (thread_rank() == 0) {
    uint32_t* done = blocks_done_word(c);
    fence<Scope::kGpu>();  // this block's work before its count
    const bool last = atomic_add<Scope::kGpu>(done, 1u) == num_blocks() - 1;
    if (last) {
      st_relaxed<Scope::kGpu>(done, 0u);
      fence<Scope::kGpu>();  // the other blocks' work before what the last one does
    }
    is_last[0] = last ? 1 : 0;
  }
  sync_block();
  return is_last[0] != 0;
}

// The call's send half is complete on this rank: the next call uses the other half.
MOELINK_DEVICE void advance_calls(const LowLatencyContext& c) {
  if (thread_rank() == 0) st_release<Scope::kGpu>(calls_word(c), ld_relaxed(calls_word(c)) + 1);
}

// Zeroes the slot claims of the half the next call uses (every call does it for its successor).
MOELINK_DEVICE void clean_next_claims(const LowLatencyContext& c, int h) {
  if (block_rank() != 0) return;
  uint32_t* next = c.claims + (h ^ 1) * c.claim_capacity;
  for (int64_t i = thread_rank(); i < c.claim_capacity; i += num_threads()) next[i] = 0;
}

// Global warp index and count of the grid.
MOELINK_DEVICE int global_warp() { return static_cast<int>(block_rank() * num_warps() + warp_id()); }
MOELINK_DEVICE int global_warps() { return static_cast<int>(num_blocks() * num_warps()); }

// clean_low_latency_buffer: every rank signals every rank, then waits for all of them; after it
// no rank is still in an earlier operation on the window. One block.
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) clean_kernel(LowLatencyCleanArgs args) {
  const LowLatencyContext& c = args.ctx;
  const int ranks = c.shape.num_ranks;
  const uint64_t expected = ld_relaxed(cleans_word(c)) + 1;
  const char* what = "low-latency clean: barrier (rank has not entered the clean)";
  for (int p = static_cast<int>(thread_rank()); p < ranks; p += static_cast<int>(num_threads())) {
    if (!is_masked(c, p)) signal_peer(c, p, barrier_signal(c, c.rank));
  }
  for (int p = static_cast<int>(thread_rank()); p < ranks; p += static_cast<int>(num_threads())) {
    if (!c.shrink) await_signal(c, barrier_signal(c, p), expected, what, p);
    else if (!is_masked(c, p)) await_or_mask(c, barrier_signal(c, p), expected, what, p);
  }
  sync_block();
  if (thread_rank() == 0) st_relaxed(cleans_word(c), expected);
}

}  // namespace moelink::kernels::low_latency
