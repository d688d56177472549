#include "transport/host/nic.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <new>

#include "runtime/errors.h"
#include "transport/host/host_windows.h"

namespace moelink::transport::host {

namespace {

uint64_t monotonic_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

void futex_wait(uint32_t* word, uint32_t expected, long timeout_ns) {
  timespec timeout{0, timeout_ns};
  syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, expected, &timeout, nullptr, 0);
}

void futex_wake(uint32_t* word) { syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0); }

// Until `deadline_ns`: spin briefly, then give the core away (4 ranks share 2 cores here).
void wait_until_time(uint64_t deadline_ns) {
  for (uint64_t now = monotonic_ns(); now < deadline_ns; now = monotonic_ns()) {
    const uint64_t left = deadline_ns - now;
    if (left > 50000) {
      timespec pause{0, static_cast<long>(left - 20000)};
      nanosleep(&pause, nullptr);
    } else {
      sched_yield();
    }
  }
}

}  // namespace

void nic_ring_doorbell(NicRing* ring) {
  __atomic_fetch_add(&ring->doorbell, 1u, __ATOMIC_SEQ_CST);
  // Dekker with the NIC thread's "set nic_sleeping, re-check the entry": both sides seq_cst.
  if (__atomic_load_n(&ring->nic_sleeping, __ATOMIC_SEQ_CST) != 0) futex_wake(&ring->doorbell);
}

HostNic::HostNic(HostWindows& windows, size_t entries, uint32_t num_signals, NicShaping shaping)
    : windows_(windows), shaping_(shaping) {
  size_t n = 64;
  while (n < entries) n *= 2;
  if (static_cast<uint64_t>(num_signals) * 8 > windows.data_bytes()) {
    throw Error(ErrorKind::kInvalidArgument, "HostNic: " + std::to_string(num_signals) +
                                                 " signals do not fit the " + std::to_string(windows.data_bytes()) +
                                                 "-byte scale-out window");
  }
  const size_t bytes = offsetof(NicRing, slots) + n * sizeof(NicWqe);
  void* memory = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
  if (memory == nullptr) throw std::bad_alloc();
  std::memset(memory, 0, bytes);
  ring_ = static_cast<NicRing*>(memory);
  ring_->entries = static_cast<uint32_t>(n);
  ring_->rank = windows.rank();
  ring_->num_signals = num_signals;
  ring_->window_bytes = windows.data_bytes();
  thread_ = new std::thread([this] { run(); });
  // Named before the constructor returns, so that ps/top/gdb (and tests counting NIC threads in
  // /proc/self/task/*/comm) find it.
  pthread_setname_np(thread_->native_handle(), kThreadName);
}

HostNic::~HostNic() {
  close();
  std::free(ring_);
}

void HostNic::close() noexcept {
  if (thread_ == nullptr) return;
  stop_.store(true, std::memory_order_seq_cst);
  futex_wake(&ring_->doorbell);
  thread_->join();
  delete thread_;
  thread_ = nullptr;
}

std::string HostNic::error() const {
  if (__atomic_load_n(&ring_->failed, __ATOMIC_ACQUIRE) == 0) return std::string();
  return error_;
}

bool HostNic::wait_idle(double timeout_s) const {
  const uint64_t posted = __atomic_load_n(&ring_->reserved, __ATOMIC_ACQUIRE);
  const uint64_t deadline = monotonic_ns() + static_cast<uint64_t>(timeout_s * 1e9);
  while (__atomic_load_n(&ring_->completed, __ATOMIC_ACQUIRE) < posted) {
    if (__atomic_load_n(&ring_->failed, __ATOMIC_ACQUIRE) != 0 || thread_ == nullptr || monotonic_ns() > deadline) return false;
    sched_yield();
  }
  return true;
}

bool HostNic::execute(const NicWqe& w) {
  const int peer = w.peer;
  try {
    if (w.op & kNicPut) {
      std::byte* dst = windows_.nic_ptr(peer, w.dst_offset, w.bytes);
      const std::byte* src = windows_.nic_ptr(windows_.rank(), w.src_offset, w.bytes);
      if (shaping_.latency_us > 0) wait_until_time(w.posted_ns + static_cast<uint64_t>(shaping_.latency_us * 1e3));
      if (shaping_.gbps > 0) {
        const uint64_t now = monotonic_ns();
        const uint64_t start = busy_until_ns_ > now ? busy_until_ns_ : now;
        busy_until_ns_ = start + static_cast<uint64_t>(static_cast<double>(w.bytes) / shaping_.gbps);
        wait_until_time(busy_until_ns_);
      }
      std::memcpy(dst, src, w.bytes);
      windows_.add_bytes(LinkClass::kRdma, w.bytes);
    }
    if (w.op & kNicSignal) {
      if (w.signal_id < 0 || static_cast<uint64_t>(w.signal_id) >= ring_->num_signals) {
        throw Error(ErrorKind::kInvalidArgument, "signal id " + std::to_string(w.signal_id) + " outside [0, " +
                                                     std::to_string(ring_->num_signals) + ")");
      }
      auto* word = reinterpret_cast<uint64_t*>(windows_.nic_ptr(peer, static_cast<size_t>(w.signal_id) * 8, 8));
      // Release: the bytes of this and every earlier put reach the waiter with the signal.
      __atomic_fetch_add(word, w.signal_add, __ATOMIC_RELEASE);
    }
  } catch (const std::exception& e) {
    error_ = "emulated NIC of rank " + std::to_string(windows_.rank()) + ": refused an entry for peer " +
             std::to_string(peer) + ": " + e.what();
    __atomic_store_n(&ring_->failed, 1u, __ATOMIC_RELEASE);
    return false;
  }
  return true;
}

void HostNic::run() {
  const uint64_t mask = ring_->entries - 1;
  uint64_t next = __atomic_load_n(&ring_->completed, __ATOMIC_ACQUIRE);
  unsigned idle = 0;
  while (!stop_.load(std::memory_order_acquire)) {
    NicWqe& entry = ring_->slots[next & mask];
    if (__atomic_load_n(&entry.seq, __ATOMIC_ACQUIRE) == next + 1) {
      idle = 0;
      const uint64_t began = monotonic_ns();
      const bool done = __atomic_load_n(&ring_->failed, __ATOMIC_RELAXED) == 0 && execute(entry);
      busy_ns_.fetch_add(monotonic_ns() - began, std::memory_order_relaxed);
      if (!done) {
        // A refused entry stops the NIC: what follows may depend on it. Kernels waiting for its
        // signals time out naming their peer; the Python layer reports error().
        futex_wait(&ring_->doorbell, __atomic_load_n(&ring_->doorbell, __ATOMIC_RELAXED), 1000000);
        continue;
      }
      ++next;
      __atomic_store_n(&ring_->completed, next, __ATOMIC_RELEASE);
      continue;
    }
    // Nothing to do: spin a little for latency, then yield, then sleep on the doorbell (with a
    // timeout, so a lost wake-up costs a millisecond, never a hang).
    ++idle;
    if (idle < 64) {
      for (int i = 0; i < 16; ++i) __builtin_ia32_pause();
    } else if (idle < 256) {
      sched_yield();
    } else {
      const uint32_t bell = __atomic_load_n(&ring_->doorbell, __ATOMIC_SEQ_CST);
      __atomic_store_n(&ring_->nic_sleeping, 1u, __ATOMIC_SEQ_CST);
      if (__atomic_load_n(&entry.seq, __ATOMIC_SEQ_CST) != next + 1 && !stop_.load(std::memory_order_seq_cst)) {
        futex_wait(&ring_->doorbell, bell, 1000000);
      }
      __atomic_store_n(&ring_->nic_sleeping, 0u, __ATOMIC_SEQ_CST);
      idle = 64;  // after a wake-up, yield for a while before sleeping again
    }
  }
}

}  // namespace moelink::transport::host
