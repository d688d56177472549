// The GIN pump's device code: one thread consumes this rank's work queue (host::NicRing in device
// memory, filled by the kernels through transport/host/nic_device.h) and turns each entry into
// ncclGin calls. The protocol, teams, ordering and credits are documented in gin_state.h.
// GPU-only, header-only like NCCL's device API (nccl_device.h: no -rdc, nothing linked);
// included by gin_pump.cu alone, so no moelink kernel carries NCCL's registers.
#pragma once

#if !defined(__CUDACC__)
#error "gin_binding.cuh is GPU-only"
#endif

#include "arch/arch.cuh"
#include "transport/host/nic.h"
#include "transport/nccl/gin_state.h"

#if MOELINK_HAVE_NCCL
#include <nccl_device.h>

namespace moelink::transport::gin {

using nccl::GinDeviceState;

// One slice of a flush: ~0.5 ms at Hopper's clocks, so a deadline is noticed within a slice.
inline constexpr uint64_t kFlushSliceCycles = uint64_t{1} << 20;
// Entries between publications of `completed` while the ring never runs dry.
inline constexpr uint64_t kPublishEvery = 256;

struct Pump {
  const GinDeviceState& st;
  host::NicRing* ring;
  int64_t outstanding = 0;  // descriptors posted since the last completed flush

  MOELINK_DEVICE ncclGin gin() const { return ncclGin(st.comm, 0, NCCL_GIN_RESOURCE_SHARING_CTA); }

  // Flushes the context with moelink's deadline: false once a wait of this process timed out
  // (now, or earlier anywhere: the flush's own expiry fills the AbortRecord naming the pump).
  MOELINK_DEVICE_NOINLINE bool flush(int peer) {
    const ncclGin g = gin();
    const uint64_t start = arch::globaltimer_ns();
    for (;;) {
      if (g.flush(ncclCoopThread{}, ::cuda::memory_order_acquire, ncclGin_None{}, kFlushSliceCycles) == ncclSuccess) {
        outstanding = 0;
        return true;
      }
      if (arch::aborted()) return false;
      const uint64_t waited = arch::globaltimer_ns() - start;
      if (waited > arch::detail::g_wait_timeout_ns) {
        arch::detail::record_timeout(arch::WaitSite{"gin pump: ncclGin flush (the NIC or proxy to read this rank's "
                                                    "sources)", st.rank, peer, -1},
                                     static_cast<uint32_t>(arch::Cmp::kGe), false, 0, 0, waited);
        return false;
      }
    }
  }

  // The team and team rank that reach global rank `peer` (gin_state.h, "Teams"): the rail team
  // for a rank with this rank's LSA index (the once-per-node path), the world team otherwise,
  // which only a FULL connection reaches.
  MOELINK_DEVICE int address(int peer, ncclTeam& team) const {
    MOELINK_DEVICE_CHECK(peer >= 0 && peer < st.num_ranks, "gin pump (rank %d): peer %d outside [0, %d)", st.rank, peer,
                         st.num_ranks);
    if (peer % st.lsa_size == st.rank % st.lsa_size) {
      team = ncclTeamRail(st.comm);
      return peer / st.lsa_size;
    }
    MOELINK_DEVICE_CHECK(st.connection_stride == 1,
                         "gin pump: rank %d cannot reach rank %d over a RAIL connection (LSA index %d, not %d)",
                         st.rank, peer, peer % st.lsa_size, st.rank % st.lsa_size);
    team = ncclTeamWorld(st.comm);
    return peer;
  }

  MOELINK_DEVICE void check(const host::NicWqe& e) const {
    const bool has_signal = (e.op & host::kNicSignal) != 0;
    const uint64_t bytes = (e.op & host::kNicPut) ? e.bytes : 0;
    MOELINK_DEVICE_CHECK(e.dst_offset <= st.window_bytes && bytes <= st.window_bytes - e.dst_offset &&
                             e.src_offset <= st.window_bytes && bytes <= st.window_bytes - e.src_offset,
                         "gin pump (rank %d): entry to rank %d outside the %llu-byte window", st.rank, e.peer,
                         static_cast<unsigned long long>(st.window_bytes));
    MOELINK_DEVICE_CHECK(!has_signal || (e.signal_id >= 0 && static_cast<uint64_t>(e.signal_id) < st.num_signals),
                         "gin pump (rank %d): signal %lld outside [0, %u)", st.rank,
                         static_cast<long long>(e.signal_id), st.num_signals);
  }

  // Posts one entry; false if the process aborted (nothing more may be posted).
  MOELINK_DEVICE_NOINLINE bool post(const host::NicWqe& e) {
    check(e);
    const ncclGin g = gin();
    ncclTeam t;
    const int p = address(e.peer, t);
    const bool has_signal = (e.op & host::kNicSignal) != 0;
    const ncclGin_StrongVASignalAdd sig{st.window, static_cast<size_t>(8 * e.signal_id), e.signal_add};
    if ((e.op & host::kNicPut) == 0) {
      if (outstanding + 1 > nccl::gin_flush_threshold(st.queue_depth) && !flush(e.peer)) return false;
      g.signal(t, p, sig, ncclCoopThread{}, ncclGin_None{}, ::cuda::thread_scope_thread, ::cuda::thread_scope_system);
      outstanding += 1;
      return true;
    }
    uint64_t dst = e.dst_offset, src = e.src_offset, left = e.bytes;
    while (left > 0) {
      const uint64_t piece = left < nccl::kGinMaxPutBytes ? left : nccl::kGinMaxPutBytes;
      const bool last = piece == left;
      const int64_t need = static_cast<int64_t>(nccl::gin_descriptors(piece, last && has_signal));
      if (outstanding + need > nccl::gin_flush_threshold(st.queue_depth) && !flush(e.peer)) return false;
      // The payload was written by the kernel's threads (or NVLink peers) and published to this
      // thread by the entry's release/acquire: NCCL releases at system scope before the NIC reads.
      if (last && has_signal) {
        g.put(t, p, st.window, dst, st.window, src, piece, sig, ncclGin_None{}, ncclCoopThread{}, ncclGin_None{},
              ::cuda::thread_scope_thread, ::cuda::thread_scope_system);
      } else {
        g.put(t, p, st.window, dst, st.window, src, piece, ncclGin_None{}, ncclGin_None{}, ncclCoopThread{},
              ncclGin_None{}, ::cuda::thread_scope_thread, ::cuda::thread_scope_system);
      }
      outstanding += need;
      dst += piece;
      src += piece;
      left -= piece;
    }
    if (st.rdma_bytes != nullptr) arch::atomic_add<arch::Scope::kGpu>(st.rdma_bytes, e.bytes);
    return true;
  }
};

// The pump's loop (one thread): entries from ring->completed on, until the stop entry.
MOELINK_DEVICE void run_pump(const GinDeviceState& st, host::NicRing* ring) {
  MOELINK_DEVICE_CHECK(st.magic == nccl::kGinStateMagic && st.version == nccl::kGinStateVersion,
                       "gin pump: not a GIN state (magic %llx, version %u)", static_cast<unsigned long long>(st.magic),
                       st.version);
  Pump pump{st, ring};
  const uint64_t entries = ring->entries;
  uint64_t position = arch::ld_acquire<arch::Scope::kGpu>(&ring->completed);
  for (;;) {
    host::NicWqe* slot = &ring->slots[position & (entries - 1)];
    // Publish what is done whenever the ring runs dry, so kernels waiting in flush() move on.
    if (arch::ld_relaxed<arch::Scope::kGpu>(&slot->seq) < position + 1) {
      if (pump.outstanding > 0 && !pump.flush(-1)) return;
      arch::st_release<arch::Scope::kGpu>(&ring->completed, position);
    }
    arch::wait_until<arch::Scope::kGpu>(&slot->seq, arch::Cmp::kGe, position + 1,
                                        arch::WaitSite{"gin pump: the next work-queue entry", st.rank});
    if (arch::aborted()) return;
    const host::NicWqe entry = *slot;
    if (entry.op & nccl::kGinPumpStop) {
      if (pump.outstanding > 0 && !pump.flush(-1)) return;
      arch::st_release<arch::Scope::kGpu>(&ring->completed, position + 1);
      return;
    }
    if (!pump.post(entry)) return;
    ++position;
    // Also publish every kPublishEvery entries while the ring stays full, so a kernel waiting in
    // flush() (or for ring room) does not wait for the ring to run dry.
    if (position % kPublishEvery == 0) {
      if (pump.outstanding > 0 && !pump.flush(-1)) return;
      arch::st_release<arch::Scope::kGpu>(&ring->completed, position);
    }
  }
}

}  // namespace moelink::transport::gin

#endif  // MOELINK_HAVE_NCCL
