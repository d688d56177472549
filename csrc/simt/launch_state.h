// Internal state of one SIMT launch: fibers, blocks, warps, the run queue and the parked waits.
// Only csrc/simt/*.cpp include this; kernels see runtime.h through arch_host.h.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "runtime/errors.h"
#include "simt/fiber_sanitizer.h"
#include "simt/runtime.h"

namespace moelink::simt {

struct Block;

enum class FiberState : uint8_t {
  kRunnable,  // in the run queue
  kRunning,   // the fiber executing now
  kBlocked,   // at a barrier or warp collective; the last arrival makes it runnable
  kParked,    // on a data condition; the scheduler re-checks it
  kDone,      // returned from the kernel (or abandoned after a failure)
};

struct DataWait {
  const void* addr = nullptr;
  WaitCheck check = nullptr;
  arch::Cmp cmp = arch::Cmp::kEq;
  uint64_t value = 0;
  uint64_t seen = 0;  // last value observed (reported on timeout, returned on success)
  int value_bytes = 0;
  bool value_signed = false;
  arch::WaitSite site{"?"};
  uint64_t since_ns = 0;
  bool may_expire = false;  // wait_until_or_expire: at the deadline resume the fiber instead of failing the launch
  bool expired = false;     // set when such a wait reached its deadline
};

struct Fiber {
  ThreadIdentity id;
  void* sp = nullptr;       // saved stack pointer while switched out
  char* stack_low = nullptr;  // lowest byte of the stack; holds the overflow canary
  Block* block = nullptr;
  FiberState state = FiberState::kRunnable;

  DataWait wait;               // valid while kParked
  Fiber* bucket_next = nullptr;  // intrusive list of the wait bucket of wait.addr
  Fiber* bucket_prev = nullptr;
  uint32_t parked_slot = 0;    // index in Launch::parked

  uint64_t collective_result = 0;  // written by the lane that completes a warp collective
  int blocked_barrier = -1;        // barrier id while blocked on a barrier, for diagnostics
  sanitizer::Context san;          // ASan/TSan view of this fiber (empty in normal builds)
};

// One warp collective that some lanes of `mask` have reached.
struct PendingCollective {
  uint32_t mask = 0;
  uint32_t arrived = 0;
  CollectiveOp op = CollectiveOp::kSync;
  int width = 32;
  std::array<uint64_t, 32> bits{};
  std::array<int, 32> args{};
  std::array<Fiber*, 32> fibers{};
};

constexpr int kNumBarriers = 16;  // PTX: barriers 0..15 per CTA

struct Warp {
  uint32_t present = 0;  // lanes that exist (the last warp of a block may be partial)
  uint32_t exited = 0;   // lanes whose thread has returned
  std::vector<PendingCollective> pending;
  // Lanes at each named barrier in its current round: the warp arrives (counting 32 threads, as on
  // the GPU) once these and the exited lanes make up every present lane.
  std::array<uint32_t, kNumBarriers> at_barrier{};
};

struct Barrier {
  int expected = 0;  // participants of the current round; 0 while idle
  int arrived = 0;   // sync_block: threads; a named barrier: 32 per warp that has arrived
  bool whole_block = false;  // sync_block(): expected tracks threads that have not exited
  std::vector<Fiber*> waiters;
};

struct Block {
  unsigned rank = 0;
  unsigned num_threads = 0;
  unsigned exited = 0;
  void* dynamic_smem = nullptr;
  std::vector<std::pair<const void*, void*>> static_smem;  // (declaration site, storage)
  std::array<Barrier, kNumBarriers> barriers;
  std::vector<Warp> warps;
};

class Launch {
 public:
  static constexpr int kWaitBuckets = 1024;

  Launch(const LaunchConfig& config, void (*body)(void*), void* arg);
  ~Launch();
  void run();  // returns when every fiber finished; throws moelink::Error on failure

  // Fiber-side operations (called on fiber stacks).
  Fiber* current() { return current_; }
  void suspend();                     // run other fibers; returns when this one is resumed
  void make_runnable(Fiber* fiber);   // Blocked/Parked -> Runnable
  void park(Fiber* fiber);            // fiber->wait filled in; returns when satisfied
  void notify(const void* addr);
  [[noreturn]] void fail(ErrorKind kind, const std::string& message);
  [[noreturn]] void finish_current();
  void fuzz_point();
  std::string where(const Fiber& fiber) const;  // "kernel 'x' rank 0 block 1 thread 3"
  // For the first fiber to start: where the launching thread's stack bounds go (once), else null.
  sanitizer::Context* thread_context_to_capture();

  const LaunchConfig& config() const { return config_; }
  bool poisons_shared_memory() const { return random_; }
  std::vector<Block>& blocks() { return blocks_; }
  void (*body)(void*);
  void* body_arg;

 private:
  void push_runnable(Fiber* fiber);
  Fiber* pop_runnable();
  Fiber* next_fiber();  // nullptr: the launch finished or failed
  void enter(Fiber* fiber, void** save_sp, Fiber* from);  // from: nullptr = the launching thread
  void unpark(Fiber* fiber);
  void drain_dirty_buckets();
  void poll_parked();
  void back_off(unsigned idle_rounds);
  std::string describe_deadlock() const;
  static bool canary_intact(const Fiber& fiber);
  std::string overflow_message(const Fiber& fiber) const;
  std::string describe_timeout(const Fiber& expired, uint64_t now) const;
  void record_timeout(const Fiber& expired, uint64_t now) const;  // into last_timeout()
  static unsigned bucket_of(const void* addr);
  uint64_t next_random();

  LaunchConfig config_;
  std::vector<Fiber> fibers_;
  std::vector<Block> blocks_;
  std::vector<char*> stacks_;  // one per fiber, returned to the pool on destruction
  size_t live_ = 0;

  std::vector<Fiber*> runq_;  // FIFO from runq_head_ (deterministic) or random pick
  size_t runq_head_ = 0;

  std::array<Fiber*, kWaitBuckets> buckets_{};
  std::array<bool, kWaitBuckets> bucket_dirty_{};
  std::vector<unsigned> dirty_;
  std::vector<Fiber*> parked_;
  uint64_t dispatches_since_poll_ = 0;
  static constexpr unsigned kCanaryInterval = 64;  // switches between samples of a stack canary
  unsigned switches_since_canary_ = 0;
  long saved_timer_slack_ = -1;  // the thread's timer slack before back_off lowered it, or -1
  Stats stats_;

  Fiber* current_ = nullptr;
  void* scheduler_sp_ = nullptr;  // run()'s own stack while fibers run
  sanitizer::Context thread_san_;  // the launching thread as the sanitizers see it
  bool capture_thread_stack_ = false;
  std::optional<Error> error_;

  bool random_ = false;
  uint32_t fuzz_threshold_ = 0;  // switch at a memory op when next_random() < threshold
  uint64_t rng_state_ = 0;
  uint64_t timeout_ns_ = 0;
};

// Clears last_timeout() for the launch starting on this thread (diagnostics.cpp).
void reset_last_timeout();

// The launch running on this OS thread (nullptr outside a launch).
extern thread_local Launch* t_launch __attribute__((tls_model("initial-exec")));

// ---- context switching (context.cpp) -----------------------------------------------------------
// Saves the callee-saved registers and stack pointer into *save_sp and resumes `load_sp`.
extern "C" void moelink_simt_switch(void** save_sp, void* load_sp);
// Prepares a fresh stack so that switching to the returned sp enters `entry` (which never returns).
// `index` (the fiber's) only varies where in the stack's top page the first frame starts.
void* prepare_stack(char* stack_low, size_t bytes, size_t index, void (*entry)());
// Stacks of stack_bytes() each, pooled for the life of the process.
void acquire_stacks(size_t count, std::vector<char*>& out);  // appends `count` stacks
void release_stacks(std::vector<char*>& stacks);
constexpr uint64_t kStackCanary = 0x6d6f656c696e6b21ull;  // "moelink!"

}  // namespace moelink::simt
