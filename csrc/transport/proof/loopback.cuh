// The scale-out binding of the one-GPU proof (docs/gpu-proof.md): every rank runs on the same GPU
// (or, on the host target, in the same process), so every rank's scale-out window is in one
// address space and a "network" put is
// the calling thread's own copy into the peer's window, followed by a release add on its signal
// word. It still goes through the interface of transport/scaleout.cuh (kernels cannot tell) and
// counts the bytes it moves, so the byte-counter proofs hold on the GPU too. Selected at run time
// by ScaleOutKind::kLoopback: scaleout.cuh dispatches between it and the work-queue binding
// (transport/host/nic_device.h) on both targets, so the proof's internode path runs the same
// loopback on the host target in CI.
#pragma once

#include "arch/arch.cuh"
#include "transport/scaleout_handle.h"

namespace moelink::transport::loopback {

namespace detail {

// The device table of every rank's window (ScaleOutKind::kLoopback).
MOELINK_DEVICE char* peer_window(const ScaleOut& so, int peer) {
  MOELINK_DEVICE_CHECK(so.kind == ScaleOutKind::kLoopback && so.queue != nullptr,
                       "scale-out: rank %d has no loopback table (kind %d)", so.rank, static_cast<int>(so.kind));
  return static_cast<char* const*>(so.queue)[peer];
}

MOELINK_DEVICE void check_peer_range(const ScaleOut& so, int peer, uint64_t offset, uint64_t bytes) {
  MOELINK_DEVICE_CHECK(peer >= 0 && peer < so.num_ranks && offset <= so.window_bytes && bytes <= so.window_bytes - offset &&
                           offset % 16 == 0 && bytes % 16 == 0,
                       "scale-out put: rank %d, bytes [%llu, +%llu) outside the window or misaligned", peer,
                       static_cast<unsigned long long>(offset), static_cast<unsigned long long>(bytes));
}

MOELINK_DEVICE uint64_t* signal_word(const ScaleOut& so, int peer, int64_t id) {
  MOELINK_DEVICE_CHECK(id >= 0 && static_cast<uint64_t>(id) < so.num_signals, "scale-out signal %lld outside [0, %u)",
                       static_cast<long long>(id), so.num_signals);
  return reinterpret_cast<uint64_t*>(peer_window(so, peer)) + id;
}

}  // namespace detail

MOELINK_DEVICE void signal(const ScaleOut& so, int peer, int64_t id, uint64_t add) {
  MOELINK_DEVICE_CHECK(peer >= 0 && peer < so.num_ranks, "scale-out signal: rank %d outside [0, %d)", peer, so.num_ranks);
  // Release at system scope: this thread's earlier copies (every earlier put) land first.
  arch::red_add_release<arch::Scope::kSys>(detail::signal_word(so, peer, id), add);
}

MOELINK_DEVICE void put(const ScaleOut& so, int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
                        const SignalAdd& signal_add) {
  detail::check_peer_range(so, peer, dst_offset, bytes);
  const char* source = static_cast<const char*>(src);
  MOELINK_DEVICE_CHECK(source >= so.window && source + bytes <= so.window + so.window_bytes,
                       "scale-out put to rank %d: the source is not in this rank's scale-out window", peer);
  char* dst = detail::peer_window(so, peer) + dst_offset;
  for (uint64_t i = 0; i < bytes; i += 16) arch::store16(dst + i, arch::load16(source + i));
  if (so.rdma_bytes != nullptr) arch::atomic_add<arch::Scope::kGpu>(so.rdma_bytes, bytes);
  if (signal_add.id >= 0) signal(so, peer, signal_add.id, signal_add.add);
}

MOELINK_DEVICE uint64_t wait_signal(const ScaleOut& so, int64_t id, arch::Cmp cmp, uint64_t value,
                                    const arch::WaitSite& site) {
  return arch::wait_until<arch::Scope::kSys>(detail::signal_word(so, so.rank, id), cmp, value, site);
}

MOELINK_DEVICE void flush(const ScaleOut&) {}  // puts copy synchronously: their sources are free at once

MOELINK_DEVICE const uint64_t* signal_address(const ScaleOut& so, int64_t id) { return detail::signal_word(so, so.rank, id); }

}  // namespace moelink::transport::loopback
