// The scale-out transport: what a kernel may call to reach a rank of another node. Shaped like
// NCCL's GPU-initiated networking (GIN, NCCL >= 2.28: ncclGin put / signal / flush, with "VA"
// signals that are plain words of the window), so that the same kernels run over
//   - the host target's emulated IBGDA NIC (transport/host/nic.h): the calling thread writes a
//     work-queue entry into a ring and rings a doorbell, the rank's NIC thread executes it;
//   - the one-GPU proof's device loopback (transport/proof/loopback.cuh): every rank's window is
//     in one address space, the calling thread copies and signals itself;
//   - NCCL GIN on a real cluster (docs/gpu-transport.md §2; GDAKI = IBGDA, or the proxy
//     backend): kernels post the same work-queue entries as on the host, into a ring in device
//     memory that the GIN pump kernel (transport/nccl/gin_pump.h) turns into ncclGin calls.
// Kernels include this header and arch.cuh only; nothing in a kernel knows which binding runs.
// No kernel ever holds a pointer into another node's memory: these calls are the only way across.
//
// Addressing. Every rank has one scale-out window of the same size (its "RDMA buffer"). Offsets
// are byte offsets into it. Its first `num_signals * 8` bytes are the signals: signal `id` is the
// u64 at offset 8 * id, zero when the window is created, changed only by signal adds (from any
// rank, through the transport) and read by its owner with wait_signal. A kernel lays out the rest
// of the window as it likes (the same layout on every rank).
//
// The calls (every one is made by ONE thread; `so` is the ScaleOut handle (scaleout_handle.h) the
// host put in the kernel's arguments, the same for every call of a kernel):
//   put(so, peer, dst_offset, src, bytes, signal = {})
//       Copies [src, src + bytes) into peer's window at dst_offset. `src` must lie in this rank's
//       own window (GIN moves between registered windows; a kernel stages data there first) and
//       be complete before the call: written by this thread, or ordered to it (syncwarp, block
//       barrier, or the acquire of a wait). bytes > 0, a multiple of 16; offsets 16-byte aligned.
//       With signal = {id, add} the peer's signal `id` grows by `add` once the bytes are there.
//   signal(so, peer, id, add)      adds `add` to peer's signal `id` (a put of no bytes).
//   wait_signal(so, id, cmp, value, site) -> u64
//       arch::wait_until on this rank's own signal `id`: acquire, deadlined (MOELINK_TIMEOUT_S),
//       CommTimeout naming `site` on expiry. Signals are monotonic counters in moelink's
//       protocols: waits compare with the running total the waiter expects.
//   flush(so)   returns once every put this thread issued has read its source, so the source
//               may be overwritten. It does not mean the bytes arrived (GIN's flush is local too).
//
// Ordering (what a signal guarantees):
//   1. A signal issued by a thread, bundled with a put or separate, becomes visible to the peer
//      only after every byte of every put that thread issued earlier *to the same peer* is
//      visible there (NCCL's "strong" signals; per (context, peer) on GIN, and a thread always
//      uses one context). The waiter's acquire then makes those bytes visible to it.
//   2. Nothing else is ordered: puts to different peers, or from different threads, may land in
//      any order, and a put without a later signal may land at any time before the kernel's end.
//   3. Signals are adds only (GIN has no set, CAS or fetch): a sender that must "set" adds the
//      difference from what it last sent, and is then that signal's only writer.
// Limits: bytes, offsets and signal ids are range-checked against the window by every binding;
// a violation fails the launch (DeviceAssert). Every wait inside a binding (ring room, flush) has
// the same deadline as wait_until and names the rank.
#pragma once

#include "arch/arch.cuh"
#include "transport/scaleout_handle.h"

namespace moelink::transport {

// A remote signal add bundled with a put: `id` < 0 means none.
struct SignalAdd {
  int64_t id = -1;
  uint64_t add = 0;
};

}  // namespace moelink::transport

// Every build has two bindings and picks one per call from the handle's kind, a branch that is
// uniform across a kernel: the work-queue NIC (kHostNic on the host target, kGin on the GPU) and
// the proof's loopback (kLoopback, both targets).
#include "transport/host/nic_device.h"
#include "transport/proof/loopback.cuh"

namespace moelink::transport {

MOELINK_DEVICE bool uses_loopback(const ScaleOut& so) { return so.kind == ScaleOutKind::kLoopback; }

MOELINK_DEVICE void put(const ScaleOut& so, int peer, uint64_t dst_offset, const void* src, uint64_t bytes,
                        SignalAdd signal = {}) {
  if (uses_loopback(so)) {
    loopback::put(so, peer, dst_offset, src, bytes, signal);
  } else {
    nic::put(so, peer, dst_offset, src, bytes, signal);
  }
}

MOELINK_DEVICE void signal(const ScaleOut& so, int peer, int64_t id, uint64_t add) {
  if (uses_loopback(so)) {
    loopback::signal(so, peer, id, add);
  } else {
    nic::signal(so, peer, id, add);
  }
}

MOELINK_DEVICE uint64_t wait_signal(const ScaleOut& so, int64_t id, arch::Cmp cmp, uint64_t value,
                                    const arch::WaitSite& site) {
  return uses_loopback(so) ? loopback::wait_signal(so, id, cmp, value, site) : nic::wait_signal(so, id, cmp, value, site);
}

MOELINK_DEVICE void flush(const ScaleOut& so) {
  if (uses_loopback(so)) {
    loopback::flush(so);
  } else {
    nic::flush(so);
  }
}

MOELINK_DEVICE const uint64_t* signal_address(const ScaleOut& so, int64_t id) {
  return uses_loopback(so) ? loopback::signal_address(so, id) : nic::signal_address(so, id);
}

}  // namespace moelink::transport
