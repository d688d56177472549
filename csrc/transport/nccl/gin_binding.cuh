// The GPU target's scale-out binding on NCCL GIN (docs/gpu-transport.md §2): the calls of
// transport/scaleout.cuh made with ncclGin put / signal / flush on a symmetric window, selected
// at run time by ScaleOutKind::kGin (scaleout.cuh dispatches). GPU-only; header-only like NCCL's
// device API (nccl_device.h, no -rdc, nothing linked).
//
// Mapping (every call is made by one thread, ncclCoopThread):
//   put(peer, dst, src, bytes, {id, add})
//       gin.put(world team, peer, window, dst, window, src - own window, bytes,
//               ncclGin_StrongVASignalAdd{window, 8 * id, add} or ncclGin_None, ...,
//               given = thread, required = system): the payload may have been written by other
//       lanes or by NVLink peers, so NCCL releases at system scope before the NIC reads it.
//       Puts above kGinMaxPutBytes are split (the signal rides on the last piece).
//   signal(peer, id, add)    gin.signal(world team, peer, ncclGin_StrongVASignalAdd{...})
//   wait_signal(id, ...)     arch::wait_until on this rank's own signal word (a VA signal is a
//                            plain u64 of the window): moelink's deadline, abort flag and record.
//   flush()                  gin.flush in slices of kFlushSliceCycles, moelink's deadline and the
//                            abort flag checked between slices; on expiry the AbortRecord names
//                            the flush (NCCL's own flush timeout counts clock64 cycles, not ns).
// Strong signals throughout: a signal seen means every earlier put of the same context to the same
// peer has landed, which is ordering rule 1 of scaleout.cuh because a thread always posts through
// its block's context (context = block % ginContextCount). Blocks own their context
// (NCCL_GIN_RESOURCE_SHARING_CTA) when the grid has no more blocks than contexts, else they share
// it GPU-wide (NCCL_GIN_RESOURCE_SHARING_GPU).
//
// Peers. moelink passes global ranks; NCCL's world team has the same numbering (moelink's
// communicator is built with the group's ranks). A RAIL connection (connection_stride = LSA size)
// connects only the ranks with this rank's LSA index: NCCL would silently send to that rank of the
// peer's node (it divides the world rank by the stride), so any other peer is refused
// (DeviceAssert). FULL connections reach every rank.
//
// Credits: before every call, gin_state.h's accounting (flush with moelink's deadline when the
// queue could be full), so no NCCL call spins on a full queue. Once a wait of this process has
// timed out (arch::aborted()), a call that would have to wait for credits returns without
// posting: the kernels drain and their results are discarded.
#pragma once

#if !defined(__CUDACC__)
#error "gin_binding.cuh is GPU-only: host builds use transport/host/nic_device.h through scaleout.cuh"
#endif

#include "arch/arch.cuh"
#include "transport/nccl/gin_state.h"
#include "transport/scaleout_handle.h"

#if MOELINK_HAVE_NCCL
#include <nccl_device.h>
#endif

namespace moelink::transport::gin {

#if MOELINK_HAVE_NCCL

using nccl::GinDeviceState;

// One slice of a flush: ~0.5 ms at Hopper's clocks, so a deadline is noticed within a slice.
inline constexpr uint64_t kFlushSliceCycles = uint64_t{1} << 20;

namespace detail {

MOELINK_DEVICE const GinDeviceState& state(const ScaleOut& so) {
  MOELINK_DEVICE_CHECK(so.kind == ScaleOutKind::kGin && so.queue != nullptr,
                       "scale-out: rank %d has no GIN state (kind %d)", so.rank, static_cast<int>(so.kind));
  const GinDeviceState& st = *static_cast<const GinDeviceState*>(so.queue);
  MOELINK_DEVICE_CHECK(st.magic == nccl::kGinStateMagic && st.version == nccl::kGinStateVersion && st.rank == so.rank &&
                           st.window_bytes == so.window_bytes,
                       "scale-out: the GIN state of rank %d is not this rank's (magic %llx, version %u, rank %d)", so.rank,
                       static_cast<unsigned long long>(st.magic), st.version, st.rank);
  return st;
}

// The GIN peer (connection) index of global rank `peer`; see "Peers" above.
MOELINK_DEVICE uint32_t gin_peer(const GinDeviceState& st, int peer) {
  MOELINK_DEVICE_CHECK(peer >= 0 && peer < st.num_ranks, "scale-out (GIN): rank %d outside [0, %d)", peer, st.num_ranks);
  const int stride = st.connection_stride;
  MOELINK_DEVICE_CHECK(stride == 1 || peer % stride == st.rank % stride,
                       "scale-out (GIN): rank %d cannot reach rank %d over a RAIL connection (LSA index %d, not %d): "
                       "only ranks with the same LSA index are connected",
                       st.rank, peer, peer % stride, st.rank % stride);
  return static_cast<uint32_t>(peer / stride);
}

MOELINK_DEVICE int context_of(const GinDeviceState& st) { return static_cast<int>(arch::block_rank() % st.context_count); }

MOELINK_DEVICE ncclGinResourceSharingMode sharing_of(const GinDeviceState& st) {
  return arch::num_blocks() <= st.context_count ? NCCL_GIN_RESOURCE_SHARING_CTA : NCCL_GIN_RESOURCE_SHARING_GPU;
}

MOELINK_DEVICE void check_range(const ScaleOut& so, int peer, uint64_t offset, uint64_t bytes, const char* what) {
  MOELINK_DEVICE_CHECK(offset <= so.window_bytes && bytes <= so.window_bytes - offset && offset % 16 == 0 && bytes % 16 == 0,
                       "scale-out %s (GIN) to rank %d: bytes [%llu, +%llu) outside the %llu-byte window or misaligned",
                       what, peer, static_cast<unsigned long long>(offset), static_cast<unsigned long long>(bytes),
                       static_cast<unsigned long long>(so.window_bytes));
}

MOELINK_DEVICE void check_signal(const ScaleOut& so, int64_t id) {
  MOELINK_DEVICE_CHECK(id >= 0 && static_cast<uint64_t>(id) < so.num_signals, "scale-out signal %lld outside [0, %u)",
                       static_cast<long long>(id), so.num_signals);
}

// Flushes `context` with moelink's deadline: true once every descriptor posted on it before the
// call was consumed, false if a wait of this process timed out (now or during the flush: the
// flush's own expiry fills the AbortRecord naming `peer`, the rank whose queue needed room).
MOELINK_DEVICE_NOINLINE bool flush_context(const ScaleOut& so, const GinDeviceState& st, int context, int peer,
                                           uint64_t awaited, uint64_t seen, const char* what) {
  const ncclGin gin(st.comm, context, sharing_of(st));
  const uint64_t start = arch::globaltimer_ns();
  for (;;) {
    if (gin.flush(ncclCoopThread{}, ::cuda::memory_order_acquire, ncclGin_None{}, kFlushSliceCycles) == ncclSuccess) {
      return true;
    }
    if (arch::aborted()) return false;
    const uint64_t waited = arch::globaltimer_ns() - start;
    if (waited > arch::detail::g_wait_timeout_ns) {
      arch::detail::record_timeout(arch::WaitSite{what, so.rank, peer, context}, static_cast<uint32_t>(arch::Cmp::kGe),
                                   false, awaited, seen, waited);
      return false;
    }
  }
}

// Room for `need` descriptors on (context, gin peer p): true when the call may post (it then adds
// them to `posted`), false when the process has aborted and the call must not post.
MOELINK_DEVICE bool reserve(const ScaleOut& so, const GinDeviceState& st, int context, uint32_t p, int peer,
                            uint32_t need) {
  const uint64_t index = static_cast<uint64_t>(context) * st.gin_peers + p;
  uint64_t* posted = st.posted + index;
  uint64_t* consumed = st.consumed + index;
  const int64_t budget =
      nccl::gin_put_budget(st.queue_depth, nccl::gin_posters(arch::num_warps(), arch::num_blocks(), st.context_count));
  MOELINK_DEVICE_CHECK(budget >= static_cast<int64_t>(nccl::kGinMaxDescriptorsPerCall),
                       "scale-out (GIN): a queue depth of %u descriptors leaves no room for %u warps x %u blocks on %u "
                       "contexts: ask for a deeper queue or more contexts, or lower num_sms",
                       st.queue_depth, arch::num_warps(), arch::num_blocks(), st.context_count);
  const uint64_t now = arch::ld_relaxed<arch::Scope::kGpu>(posted);
  const uint64_t done = arch::ld_relaxed<arch::Scope::kGpu>(consumed);
  if (static_cast<int64_t>(now - done) + need <= budget) return true;
  if (!flush_context(so, st, context, peer, now, done, "scale-out (GIN) put: room in the queue (flush)")) return false;
  arch::atomic_max<arch::Scope::kGpu>(consumed, now);
  return true;
}

MOELINK_DEVICE uint64_t* posted_of(const GinDeviceState& st, int context, uint32_t p) {
  return st.posted + static_cast<uint64_t>(context) * st.gin_peers + p;
}

// The NCCL calls alone, out of line: what the kernel's registers must make room for at a call.
MOELINK_DEVICE_NOINLINE void post_put(const GinDeviceState& st, int context, int peer, uint64_t dst_offset,
                                      uint64_t src_offset, uint64_t bytes, int64_t signal_id, uint64_t signal_add) {
  const ncclGin gin(st.comm, context, sharing_of(st));
  if (signal_id >= 0) {
    gin.put(ncclTeamWorld(st.comm), peer, st.window, dst_offset, st.window, src_offset, bytes,
            ncclGin_StrongVASignalAdd{st.window, static_cast<size_t>(8 * signal_id), signal_add}, ncclGin_None{},
            ncclCoopThread{}, ncclGin_None{}, ::cuda::thread_scope_thread, ::cuda::thread_scope_system);
  } else {
    gin.put(ncclTeamWorld(st.comm), peer, st.window, dst_offset, st.window, src_offset, bytes, ncclGin_None{},
            ncclGin_None{}, ncclCoopThread{}, ncclGin_None{}, ::cuda::thread_scope_thread, ::cuda::thread_scope_system);
  }
}

MOELINK_DEVICE_NOINLINE void post_signal(const GinDeviceState& st, int context, int peer, int64_t id, uint64_t add) {
  const ncclGin gin(st.comm, context, sharing_of(st));
  gin.signal(ncclTeamWorld(st.comm), peer, ncclGin_StrongVASignalAdd{st.window, static_cast<size_t>(8 * id), add},
             ncclCoopThread{}, ncclGin_None{}, ::cuda::thread_scope_thread, ::cuda::thread_scope_system);
}

MOELINK_DEVICE void put(const ScaleOut& so, int peer, uint64_t dst_offset, uint64_t src_offset, uint64_t bytes,
                        int64_t signal_id, uint64_t signal_add) {
  const GinDeviceState& st = state(so);
  const uint32_t p = gin_peer(st, peer);
  const int context = context_of(st);
  while (bytes > 0) {
    const uint64_t piece = bytes < nccl::kGinMaxPutBytes ? bytes : nccl::kGinMaxPutBytes;
    const bool with_signal = piece == bytes && signal_id >= 0;
    const uint32_t need = nccl::gin_descriptors(piece, with_signal);
    if (!reserve(so, st, context, p, peer, need)) return;
    post_put(st, context, peer, dst_offset, src_offset, piece, with_signal ? signal_id : -1, signal_add);
    arch::atomic_add<arch::Scope::kGpu>(posted_of(st, context, p), uint64_t{need});
    dst_offset += piece;
    src_offset += piece;
    bytes -= piece;
  }
}

MOELINK_DEVICE void signal(const ScaleOut& so, int peer, int64_t id, uint64_t add) {
  const GinDeviceState& st = state(so);
  const uint32_t p = gin_peer(st, peer);
  const int context = context_of(st);
  const uint32_t need = nccl::gin_descriptors(0, true);
  if (!reserve(so, st, context, p, peer, need)) return;
  post_signal(st, context, peer, id, add);
  arch::atomic_add<arch::Scope::kGpu>(posted_of(st, context, p), uint64_t{need});
}

MOELINK_DEVICE_NOINLINE void flush(const ScaleOut& so) {
  const GinDeviceState& st = state(so);
  flush_context(so, st, context_of(st), -1, 0, 0, "scale-out (GIN) flush: the NIC to read this rank's sources");
}

}  // namespace detail

MOELINK_DEVICE void put(const ScaleOut& so, int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
                        SignalAdd signal_add) {
  const char* source = static_cast<const char*>(src);
  MOELINK_DEVICE_CHECK(source >= so.window && source <= so.window + so.window_bytes,
                       "scale-out put to rank %d: the source is not in this rank's scale-out window", peer);
  const uint64_t src_offset = static_cast<uint64_t>(source - so.window);
  MOELINK_DEVICE_CHECK(bytes > 0, "scale-out put to rank %d: 0 bytes", peer);
  detail::check_range(so, peer, dst_offset, bytes, "put");
  detail::check_range(so, so.rank, src_offset, bytes, "put source");
  if (signal_add.id >= 0) detail::check_signal(so, signal_add.id);
  detail::put(so, peer, dst_offset, src_offset, bytes, signal_add.id, signal_add.add);
  if (so.rdma_bytes != nullptr) arch::atomic_add<arch::Scope::kGpu>(so.rdma_bytes, bytes);
}

MOELINK_DEVICE void signal(const ScaleOut& so, int peer, int64_t id, uint64_t add) {
  detail::check_signal(so, id);
  detail::signal(so, peer, id, add);
}

MOELINK_DEVICE const uint64_t* signal_address(const ScaleOut& so, int64_t id) {
  detail::check_signal(so, id);
  return reinterpret_cast<const uint64_t*>(so.window) + id;
}

MOELINK_DEVICE uint64_t wait_signal(const ScaleOut& so, int64_t id, arch::Cmp cmp, uint64_t value,
                                    const arch::WaitSite& site) {
  return arch::wait_until<arch::Scope::kSys>(signal_address(so, id), cmp, value, site);
}

MOELINK_DEVICE void flush(const ScaleOut& so) { detail::flush(so); }

#else  // !MOELINK_HAVE_NCCL: a ScaleOut of kind kGin cannot be made without NCCL; refuse it plainly.

namespace detail {
MOELINK_DEVICE void unavailable(const ScaleOut& so) {
  MOELINK_DEVICE_CHECK(false, "scale-out (GIN) on rank %d: moelink._cuda was built without NCCL headers", so.rank);
}
}  // namespace detail

MOELINK_DEVICE void put(const ScaleOut& so, int, uint64_t, const void*, uint64_t, SignalAdd) { detail::unavailable(so); }
MOELINK_DEVICE void signal(const ScaleOut& so, int, int64_t, uint64_t) { detail::unavailable(so); }
MOELINK_DEVICE const uint64_t* signal_address(const ScaleOut& so, int64_t id) {
  detail::unavailable(so);
  return reinterpret_cast<const uint64_t*>(so.window) + id;
}
MOELINK_DEVICE uint64_t wait_signal(const ScaleOut& so, int64_t id, arch::Cmp cmp, uint64_t value,
                                    const arch::WaitSite& site) {
  return arch::wait_until<arch::Scope::kSys>(signal_address(so, id), cmp, value, site);
}
MOELINK_DEVICE void flush(const ScaleOut& so) { detail::unavailable(so); }

#endif  // MOELINK_HAVE_NCCL

}  // namespace moelink::transport::gin
