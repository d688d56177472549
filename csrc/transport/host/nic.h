// The host target's emulated IBGDA NIC: the scale-out binding of transport/scaleout.cuh.
//
// As with InfiniBand GPUDirect Async, the kernel's own threads drive the NIC: a thread that puts
// writes a work-queue entry (WQE) into a ring in host memory and rings a doorbell; nothing in the
// kernel's control path calls into the CPU side. One NIC thread per rank (a C++ thread that
// HostNic starts and joins) consumes the ring strictly in order: for a put it copies the bytes
// from this rank's scale-out window into the destination rank's window, then applies the put's
// signal, if any, as a release add on the destination's signal word; then it marks the entry
// complete. One ring, one consumer, in order: everything a rank posts reaches each peer in FIFO
// order, which is stronger than the interface's ordering rule 1 asks.
//
// The NIC maps every rank's scale-out window (HostWindows with nic_maps_remote); kernels map only
// their own (and, for low latency over NVLink, their node's). A peer that dies cannot stall the
// NIC: it only ever writes into memory it has mapped, and waits only on its own ring (with a stop
// flag), so close() always joins within milliseconds.
//
// Ring layout (in this process's memory; `entries` a power of two):
//   0     u64      reserved      positions handed out: a producer claims one with an atomic add
//   64    u64      completed     entries the NIC finished (release): their sources are free
//   128   u32      doorbell      bumped after every published entry (a futex word)
//   132   u32      nic_sleeping  1 while the NIC thread sleeps on the doorbell
//   136   u32      failed        1 once the NIC refused an entry (then it stops consuming)
//   192   u32      entries, i32 rank, u32 num_signals, u32 reserved; u64 window_bytes
//   256   NicWqe   slots[entries]
// NicWqe (64 bytes, one cache line): u64 seq (0, or position + 1 once the producer filled the
// entry: release), u32 op (bit 0 put, bit 1 signal), i32 peer, u64 dst_offset, u64 src_offset,
// u64 bytes, i64 signal_id, u64 signal_add, u64 posted_ns (the latency shaping's clock).
//
// Shaping (MOELINK_HOST_NIC_GBPS, MOELINK_HOST_NIC_LATENCY_US, read by the Python layer): the NIC
// delivers an entry no earlier than `latency` after it was posted, and keeps a bandwidth budget:
// entry k's bytes are not delivered before the previous entries' bytes / rate have elapsed.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>

namespace moelink::transport::host {

class HostWindows;

enum NicOp : uint32_t { kNicPut = 1u, kNicSignal = 2u };

struct alignas(64) NicWqe {
  uint64_t seq;
  uint32_t op;
  int32_t peer;
  uint64_t dst_offset;
  uint64_t src_offset;
  uint64_t bytes;
  int64_t signal_id;
  uint64_t signal_add;
  uint64_t posted_ns;
};
static_assert(sizeof(NicWqe) == 64);

struct alignas(64) NicRing {
  uint64_t reserved;
  uint8_t pad0[56];
  uint64_t completed;
  uint8_t pad1[56];
  uint32_t doorbell;
  uint32_t nic_sleeping;
  uint32_t failed;
  uint8_t pad2[52];
  uint32_t entries;
  int32_t rank;
  uint32_t num_signals;
  uint32_t reserved1;
  uint64_t window_bytes;
  uint8_t pad3[40];
  NicWqe slots[1];  // [entries]
};
static_assert(offsetof(NicRing, completed) == 64 && offsetof(NicRing, doorbell) == 128 &&
              offsetof(NicRing, entries) == 192 && offsetof(NicRing, slots) == 256);

// Wakes the NIC thread if it sleeps on the doorbell; called by a producer after it published an
// entry and bumped the doorbell. A plain load of a flag in the common case (the NIC is awake
// while work flows); a futex wake only when it went to sleep.
void nic_ring_doorbell(NicRing* ring);

struct NicShaping {
  double gbps = 0;        // bytes per ns = gbps; 0 = as fast as memcpy
  double latency_us = 0;  // one-way delivery latency added to every entry
};

class HostNic {
 public:
  static constexpr const char* kThreadName = "moelink-nic";  // the NIC thread's name (<= 15 chars)
  // `windows`: every rank's scale-out window mapped (nic_maps_remote); it must outlive close().
  // `entries`: ring size (rounded up to a power of two, >= 64). `num_signals`: the signal region
  // at the start of every window. Starts the NIC thread.
  HostNic(HostWindows& windows, size_t entries, uint32_t num_signals, NicShaping shaping);
  HostNic(const HostNic&) = delete;
  HostNic& operator=(const HostNic&) = delete;
  ~HostNic();  // close()

  NicRing* ring() const { return ring_; }
  uint32_t num_signals() const { return ring_->num_signals; }
  // Stops and joins the NIC thread (it finishes no further entry). Idempotent, no-throw.
  void close() noexcept;
  bool is_closed() const { return thread_ == nullptr; }
  // Empty, or why the NIC stopped (an entry outside a window, ...).
  std::string error() const;
  uint64_t entries_done() const { return __atomic_load_n(&ring_->completed, __ATOMIC_ACQUIRE); }
  // Waits until the NIC finished every entry posted so far (a kernel's last puts and signals may
  // still be in flight when it returns); false if `timeout_s` passed first or the NIC stopped.
  bool wait_idle(double timeout_s) const;
  // Nanoseconds the NIC spent delivering entries (copies, signals and shaping waits) since the
  // last reset: the time the network part of an operation took, for the benchmark's split by link.
  uint64_t busy_ns() const { return busy_ns_.load(std::memory_order_relaxed); }
  void reset_busy() { busy_ns_.store(0, std::memory_order_relaxed); }

 private:
  void run();
  bool execute(const NicWqe& wqe);

  HostWindows& windows_;
  NicShaping shaping_;
  NicRing* ring_ = nullptr;
  std::thread* thread_ = nullptr;
  std::atomic<bool> stop_{false};
  std::string error_;
  uint64_t busy_until_ns_ = 0;
  std::atomic<uint64_t> busy_ns_{0};
};

}  // namespace moelink::transport::host
