// The kernel side of a work-queue NIC: the binding of transport/scaleout.cuh for ScaleOutKind
// kHostNic (host target: the emulated IBGDA NIC of transport/host/nic.h consumes the ring) and
// kGin (GPU target: the ring lives in device memory and the GIN pump kernel of
// transport/nccl/gin_pump.h consumes it with ncclGin calls). The ring format (host::NicRing) and
// the producer protocol are the same on both; only the consumer differs. Target-neutral; included
// through scaleout.cuh.
//
// Why the GPU kernels post to a ring instead of calling ncclGin themselves: NCCL's device put is
// large (both backends inline: GDAKI's work-request build and PROXY's descriptor queue), and
// inlined or called out of line at every put site it made the internode kernels spill (measured
// with ptxas for sm_90: up to 492 bytes in rdma_send at the 128-register bound of a 512-thread
// block). Posting a 64-byte entry costs what the host NIC's producer costs here, and the pump,
// one small block with nothing else live, holds all of NCCL's code.
#pragma once

#include "arch/arch.cuh"
#include "transport/host/nic.h"
#include "transport/scaleout_handle.h"

namespace moelink::transport::nic {

namespace detail {

MOELINK_DEVICE host::NicRing* nic_ring(const ScaleOut& so) {
  MOELINK_DEVICE_CHECK((so.kind == ScaleOutKind::kHostNic || so.kind == ScaleOutKind::kGin) && so.queue != nullptr,
                       "scale-out: rank %d has no NIC work queue (kind %d)", so.rank, static_cast<int>(so.kind));
  return static_cast<host::NicRing*>(so.queue);
}

MOELINK_DEVICE void check_range(const ScaleOut& so, int peer, uint64_t offset, uint64_t bytes, const char* what) {
  MOELINK_DEVICE_CHECK(peer >= 0 && peer < so.num_ranks, "scale-out %s: rank %d outside [0, %d)", what, peer,
                       so.num_ranks);
  MOELINK_DEVICE_CHECK(offset <= so.window_bytes && bytes <= so.window_bytes - offset && offset % 16 == 0,
                       "scale-out %s to rank %d: bytes [%llu, +%llu) outside the %llu-byte window or misaligned", what,
                       peer, static_cast<unsigned long long>(offset), static_cast<unsigned long long>(bytes),
                       static_cast<unsigned long long>(so.window_bytes));
}

MOELINK_DEVICE void check_signal(const ScaleOut& so, int64_t id) {
  MOELINK_DEVICE_CHECK(id >= 0 && static_cast<uint64_t>(id) < so.num_signals, "scale-out signal %lld outside [0, %u)",
                       static_cast<long long>(id), so.num_signals);
}

// Claims the next ring position, waits for its slot to be free, fills it in and rings the doorbell.
MOELINK_DEVICE void post(const ScaleOut& so, uint32_t op, int peer, uint64_t dst_offset, uint64_t src_offset,
                         uint64_t bytes, const SignalAdd& signal) {
  host::NicRing* ring = nic_ring(so);
  const uint64_t entries = ring->entries;
  const uint64_t position = arch::atomic_add(&ring->reserved, uint64_t{1});
  if (position >= entries) {
    arch::wait_until(&ring->completed, arch::Cmp::kGe, position + 1 - entries,
                     arch::WaitSite{"scale-out put: room in this rank's NIC work queue", so.rank, peer});
  }
  host::NicWqe& wqe = ring->slots[position & (entries - 1)];
  wqe.op = op;
  wqe.peer = peer;
  wqe.dst_offset = dst_offset;
  wqe.src_offset = src_offset;
  wqe.bytes = bytes;
  wqe.signal_id = signal.id;
  wqe.signal_add = signal.add;
  wqe.posted_ns = arch::globaltimer_ns();
  arch::st_release(&wqe.seq, position + 1);  // the entry, and the source bytes before it, are the NIC's
#if !defined(__CUDACC__)
  host::nic_ring_doorbell(ring);  // the host NIC thread may sleep on it; the GPU pump polls
#endif
}

}  // namespace detail

MOELINK_DEVICE void put(const ScaleOut& so, int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
                        const SignalAdd& signal) {
  const char* source = static_cast<const char*>(src);
  MOELINK_DEVICE_CHECK(source >= so.window && source <= so.window + so.window_bytes,
                       "scale-out put to rank %d: the source is not in this rank's scale-out window", peer);
  const uint64_t src_offset = static_cast<uint64_t>(source - so.window);
  MOELINK_DEVICE_CHECK(bytes > 0 && bytes % 16 == 0, "scale-out put to rank %d: %llu bytes (a positive multiple of 16)",
                       peer, static_cast<unsigned long long>(bytes));
  detail::check_range(so, peer, dst_offset, bytes, "put");
  detail::check_range(so, so.rank, src_offset, bytes, "put source");
  if (signal.id >= 0) detail::check_signal(so, signal.id);
  detail::post(so, host::kNicPut | (signal.id >= 0 ? host::kNicSignal : 0u), peer, dst_offset, src_offset, bytes, signal);
}

MOELINK_DEVICE void signal(const ScaleOut& so, int peer, int64_t id, uint64_t add) {
  MOELINK_DEVICE_CHECK(peer >= 0 && peer < so.num_ranks, "scale-out signal: rank %d outside [0, %d)", peer, so.num_ranks);
  detail::check_signal(so, id);
  detail::post(so, host::kNicSignal, peer, 0, 0, 0, SignalAdd{id, add});
}

MOELINK_DEVICE uint64_t wait_signal(const ScaleOut& so, int64_t id, arch::Cmp cmp, uint64_t value,
                                    const arch::WaitSite& site) {
  detail::check_signal(so, id);
  return arch::wait_until(reinterpret_cast<const uint64_t*>(so.window) + id, cmp, value, site);
}

// The NIC finished every entry posted so far (this thread's among them): their sources are free.
MOELINK_DEVICE void flush(const ScaleOut& so) {
  host::NicRing* ring = detail::nic_ring(so);
  arch::wait_until(&ring->completed, arch::Cmp::kGe, arch::ld_relaxed(&ring->reserved),
                   arch::WaitSite{"scale-out flush: the NIC to read this rank's sources", so.rank});
}

// Own signal word, for protocols that read it without waiting (e.g. a start value).
MOELINK_DEVICE const uint64_t* signal_address(const ScaleOut& so, int64_t id) {
  detail::check_signal(so, id);
  return reinterpret_cast<const uint64_t*>(so.window) + id;
}

}  // namespace moelink::transport::nic
