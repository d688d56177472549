// The launch: fibers, the scheduler loop, data waits with deadlines, and schedule fuzzing.
#include <sched.h>
#include <sys/prctl.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "simt/launch_state.h"
#include "simt/settings.h"

namespace moelink::simt {

thread_local ThreadIdentity* t_identity = nullptr;
thread_local int t_fuzz_memory_ops = 0;
thread_local int t_gpu_lane_split = 0;
thread_local Launch* t_launch = nullptr;

namespace {


constexpr unsigned kMaxThreadsPerBlock = 1024;           // as on every CUDA GPU
constexpr size_t kMaxDynamicSmemBytes = 227 * 1024;      // Hopper's per-block opt-in maximum
constexpr uint64_t kMinPollInterval = 256;               // dispatches between sweeps of parked waits

// Fresh fibers start here, on their own stack.
void fiber_entry() {
  Launch* launch = t_launch;
  sanitizer::started(launch->thread_context_to_capture());
  std::string failure;
  try {
    launch->body(launch->body_arg);
  } catch (const std::exception& e) {
    failure = std::string("C++ exception escaped the kernel: ") + e.what();
  } catch (...) {
    failure = "unknown C++ exception escaped the kernel";
  }
  // Fail outside the catch block: the C++ runtime's list of caught exceptions is per OS thread,
  // and a fiber abandoned inside a handler would leave an entry in it for good.
  if (!failure.empty()) launch->fail(ErrorKind::kDeviceAssert, failure);
  launch->finish_current();
}

}  // namespace

void on_thread_exit(Launch& launch, Fiber& fiber);  // collectives.cpp

Launch::Launch(const LaunchConfig& config, void (*body_fn)(void*), void* arg)
    : body(body_fn), body_arg(arg), config_(config) {
  const unsigned threads = config.block.volume();
  const unsigned num_blocks = config.grid.volume();
  auto invalid = [&](const std::string& what) {
    return Error(ErrorKind::kInvalidArgument, std::string("launch of kernel '") + config.kernel_name + "': " + what);
  };
  if (threads == 0 || threads > kMaxThreadsPerBlock)
    throw invalid("block size must be in [1, 1024] threads, got " + std::to_string(threads));
  if (num_blocks == 0) throw invalid("grid must have at least one block");
  if (config.dynamic_smem_bytes > kMaxDynamicSmemBytes)
    throw invalid("dynamic shared memory must be <= 232448 bytes, got " + std::to_string(config.dynamic_smem_bytes));
  if (t_launch != nullptr) throw invalid("a kernel cannot launch a kernel on the host target");

  const Settings settings = current_settings();
  timeout_ns_ = settings.timeout_ns;
  random_ = settings.random;
  if (random_) {
    rng_state_ = settings.seed + next_launch_index() * 0x9e3779b97f4a7c15ull;
    fuzz_threshold_ = static_cast<uint32_t>(settings.fuzz_probability * 4294967295.0);
  }

  const unsigned warps_per_block = (threads + 31) / 32;
  blocks_.resize(num_blocks);
  fibers_.resize(static_cast<size_t>(threads) * num_blocks);
  runq_.reserve(fibers_.size());
  parked_.reserve(64);
  const size_t smem_bytes = (config.dynamic_smem_bytes + 127) & ~size_t{127};
  for (unsigned b = 0; b < num_blocks; ++b) {
    Block& block = blocks_[b];
    block.rank = b;
    block.num_threads = threads;
    block.warps.resize(warps_per_block);
    for (unsigned w = 0; w < warps_per_block; ++w) {
      unsigned lanes = std::min(32u, threads - w * 32);
      block.warps[w].present = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1);
    }
    if (smem_bytes > 0) {
      block.dynamic_smem = std::aligned_alloc(128, smem_bytes);
      // Shared memory starts uninitialised on the GPU; the random schedule poisons it so that a
      // kernel reading before writing fails in CI instead of reading convenient zeros.
      std::memset(block.dynamic_smem, random_ ? 0xa5 : 0, smem_bytes);
    }
  }
  const size_t stack_size = stack_bytes();
  acquire_stacks(fibers_.size(), stacks_);
  for (size_t i = 0; i < fibers_.size(); ++i) {
    Fiber& fiber = fibers_[i];
    const unsigned b = static_cast<unsigned>(i / threads), t = static_cast<unsigned>(i % threads);
    ThreadIdentity& id = fiber.id;
    id.block_dim = config.block;
    id.grid_dim = config.grid;
    id.thread_idx = Dim3(t % config.block.x, (t / config.block.x) % config.block.y, t / (config.block.x * config.block.y));
    id.block_idx = Dim3(b % config.grid.x, (b / config.grid.x) % config.grid.y, b / (config.grid.x * config.grid.y));
    id.thread_rank = t;
    id.block_rank = b;
    id.num_threads = threads;
    id.num_blocks = num_blocks;
    id.lane = t % 32;
    id.warp = t / 32;
    fiber.block = &blocks_[b];
    fiber.stack_low = stacks_[i];
    fiber.sp = prepare_stack(fiber.stack_low, stack_size, i, &fiber_entry);
    sanitizer::create(fiber.san, fiber.stack_low, stack_size);
    runq_.push_back(&fiber);
  }
  live_ = fibers_.size();
}

Launch::~Launch() {
  for (Fiber& fiber : fibers_) sanitizer::destroy(fiber.san);
  for (Block& block : blocks_) {
    std::free(block.dynamic_smem);
    for (auto& entry : block.static_smem) std::free(entry.second);
  }
  release_stacks(stacks_);
}

void Launch::run() {
  reset_last_timeout();
  t_launch = this;
  t_fuzz_memory_ops = (random_ && fuzz_threshold_ > 0) ? 1 : 0;
  t_gpu_lane_split = random_ ? 1 : 0;
  // The main stack only starts the first fiber; from then on each fiber that stops picks its
  // successor and switches to it directly. Control comes back here once every fiber finished,
  // or a failure stopped the launch.
  sanitizer::adopt_thread(thread_san_);
  capture_thread_stack_ = true;
  if (Fiber* first = next_fiber()) {
    enter(first, &scheduler_sp_, nullptr);
  }
  t_launch = nullptr;
  t_identity = nullptr;
  t_fuzz_memory_ops = 0;
  t_gpu_lane_split = 0;
  if (saved_timer_slack_ > 0) prctl(PR_SET_TIMERSLACK, static_cast<unsigned long>(saved_timer_slack_), 0, 0, 0);
  // Every stack's canary once more (suspend() samples them, see there).
  for (const Fiber& fiber : fibers_) {
    if (!error_ && !canary_intact(fiber)) error_.emplace(ErrorKind::kDeviceAssert, overflow_message(fiber));
  }
  stats_.launches = 1;
  stats_.fibers = fibers_.size();
  add_stats(stats_);
  if (error_) throw *error_;
}

Fiber* Launch::next_fiber() {
  unsigned idle_rounds = 0;
  while (live_ > 0 && !error_) {
    if (!dirty_.empty()) drain_dirty_buckets();
    bool idle = runq_head_ == runq_.size();
    const uint64_t poll_interval = std::max<uint64_t>(kMinPollInterval, 4 * parked_.size());
    if (!parked_.empty() && (idle || dispatches_since_poll_ >= poll_interval)) {
      poll_parked();
      ++stats_.polls;
      dispatches_since_poll_ = 0;
      if (error_) break;
      idle = runq_head_ == runq_.size();
    }
    if (idle) {
      if (parked_.empty()) {
        error_.emplace(ErrorKind::kDeadlock, describe_deadlock());
        break;
      }
      if (idle_rounds >= 256) ++stats_.idle_sleeps;
      back_off(idle_rounds++);
      continue;
    }
    ++dispatches_since_poll_;
    ++stats_.switches;
    return pop_runnable();
  }
  return nullptr;
}

void Launch::enter(Fiber* fiber, void** save_sp, Fiber* from) {
  current_ = fiber;
  fiber->state = FiberState::kRunning;
  t_identity = &fiber->id;
  sanitizer::Context& self = from != nullptr ? from->san : thread_san_;
  sanitizer::before_switch(self, from != nullptr && from->state == FiberState::kDone, fiber->san);
  moelink_simt_switch(save_sp, fiber->sp);
  sanitizer::resumed(self);  // `from` again (a finished fiber never gets here)
}

sanitizer::Context* Launch::thread_context_to_capture() {
  if (!capture_thread_stack_) return nullptr;
  capture_thread_stack_ = false;
  return &thread_san_;
}

bool Launch::canary_intact(const Fiber& fiber) {
  uint64_t canary;
  std::memcpy(&canary, fiber.stack_low, sizeof canary);
  return canary == kStackCanary;
}

std::string Launch::overflow_message(const Fiber& fiber) const {
  return where(fiber) + ": fiber stack overflow (raise MOELINK_SIMT_STACK_KB, now " +
         std::to_string(stack_bytes() / 1024) + ")";
}

void Launch::suspend() {
  Fiber* self = current_;
  // The canary sits at the bottom of the stack, a page (and usually a cache miss) away from the
  // frames in use: reading it at every switch cost about a tenth of a dispatch. It is read at one
  // switch in kCanaryInterval, whenever a fiber finishes, and for every fiber at the end of the
  // launch, so an overflow still fails the launch, a little later.
  if (__builtin_expect(++switches_since_canary_ >= kCanaryInterval || self->state == FiberState::kDone, 0)) {
    switches_since_canary_ = 0;
    if (!canary_intact(*self) && !error_) error_.emplace(ErrorKind::kDeviceAssert, overflow_message(*self));
  }
  Fiber* next = next_fiber();
  if (next == self) {  // it yielded and nothing else can run
    self->state = FiberState::kRunning;
    return;
  }
  if (next == nullptr) {
    // Finished or failed: back to run(), and no fiber of this launch ever resumes.
    sanitizer::before_switch(self->san, /*from_exits=*/true, thread_san_);
    moelink_simt_switch(&self->sp, scheduler_sp_);
    return;
  }
  enter(next, &self->sp, self);
  // Resumed: whoever switched here has made this fiber current again.
}

void Launch::push_runnable(Fiber* fiber) {
  fiber->state = FiberState::kRunnable;
  runq_.push_back(fiber);
}

void Launch::make_runnable(Fiber* fiber) { push_runnable(fiber); }

Fiber* Launch::pop_runnable() {
  if (random_) {
    size_t pick = runq_head_ + next_random() % (runq_.size() - runq_head_);
    std::swap(runq_[pick], runq_[runq_head_]);
  }
  Fiber* fiber = runq_[runq_head_++];
  if (runq_head_ == runq_.size()) {
    runq_.clear();
    runq_head_ = 0;
  } else if (runq_head_ >= 4096 && runq_head_ * 2 >= runq_.size()) {
    runq_.erase(runq_.begin(), runq_.begin() + static_cast<std::ptrdiff_t>(runq_head_));
    runq_head_ = 0;
  }
  return fiber;
}

unsigned Launch::bucket_of(const void* addr) {
  // Fibonacci hashing of the 8-byte word: neighbouring counters land in different buckets.
  return static_cast<unsigned>(((reinterpret_cast<uintptr_t>(addr) >> 3) * 0x9e3779b97f4a7c15ull) >> 54);
}

void Launch::park(Fiber* fiber) {
  fiber->wait.since_ns = now_ns();
  ++stats_.parked_waits;
  const unsigned bucket = bucket_of(fiber->wait.addr);
  fiber->bucket_prev = nullptr;
  fiber->bucket_next = buckets_[bucket];
  if (fiber->bucket_next) fiber->bucket_next->bucket_prev = fiber;
  buckets_[bucket] = fiber;
  fiber->parked_slot = static_cast<uint32_t>(parked_.size());
  parked_.push_back(fiber);
  fiber->state = FiberState::kParked;
  suspend();
}

void Launch::unpark(Fiber* fiber) {
  if (fiber->bucket_prev) {
    fiber->bucket_prev->bucket_next = fiber->bucket_next;
  } else {
    buckets_[bucket_of(fiber->wait.addr)] = fiber->bucket_next;
  }
  if (fiber->bucket_next) fiber->bucket_next->bucket_prev = fiber->bucket_prev;
  Fiber* last = parked_.back();
  parked_[fiber->parked_slot] = last;
  last->parked_slot = fiber->parked_slot;
  parked_.pop_back();
  push_runnable(fiber);
}

void Launch::notify(const void* addr) {
  const unsigned bucket = bucket_of(addr);
  if (buckets_[bucket] != nullptr && !bucket_dirty_[bucket]) {
    bucket_dirty_[bucket] = true;
    dirty_.push_back(bucket);
  }
}

void Launch::drain_dirty_buckets() {
  for (unsigned bucket : dirty_) {
    bucket_dirty_[bucket] = false;
    for (Fiber* fiber = buckets_[bucket]; fiber != nullptr;) {
      Fiber* next = fiber->bucket_next;
      DataWait& w = fiber->wait;
      if (w.check(w.addr, w.cmp, w.value, &w.seen)) unpark(fiber);
      fiber = next;
    }
  }
  dirty_.clear();
}

void Launch::poll_parked() {
  const uint64_t now = now_ns();
  for (size_t i = parked_.size(); i-- > 0;) {
    Fiber* fiber = parked_[i];
    DataWait& w = fiber->wait;
    if (w.check(w.addr, w.cmp, w.value, &w.seen)) {
      unpark(fiber);
    } else if (now - w.since_ns > timeout_ns_ && w.may_expire) {
      w.expired = true;  // wait_until_or_expire: the fiber gives up on this wait and carries on
      unpark(fiber);
    } else if (now - w.since_ns > timeout_ns_) {
      error_.emplace(ErrorKind::kCommTimeout, describe_timeout(*fiber, now));
      record_timeout(*fiber, now);
      return;
    }
  }
}

void Launch::back_off(unsigned idle_rounds) {
  // Everything here waits on another process (or the NIC thread). Spin briefly for latency, then
  // give the core away: on a 2-core machine running 4 ranks the writer may need this very core.
  if (idle_rounds < 16) {
    for (int i = 0; i < 32; ++i) __builtin_ia32_pause();
  } else if (idle_rounds < 256) {
    sched_yield();
  } else {
    // Linux stretches every sleep by the thread's timer slack (50 us by default), which would make
    // each of these sleeps cost a whole peer's step in latency. Lower it for the rest of this
    // launch (it is per thread; run() restores it).
    if (saved_timer_slack_ < 0) {
      saved_timer_slack_ = prctl(PR_GET_TIMERSLACK, 0, 0, 0, 0);
      if (saved_timer_slack_ >= 0) prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);  // 1 us
    }
    const unsigned doublings = std::min(5u, (idle_rounds - 256) / 64);
    timespec pause{0, static_cast<long>(2000u << doublings)};  // 2 us .. 64 us
    nanosleep(&pause, nullptr);
  }
}

void Launch::fail(ErrorKind kind, const std::string& message) {
  if (!error_) error_.emplace(kind, where(*current_) + ": " + message);
  current_->state = FiberState::kDone;
  suspend();  // with an error set, control returns to run(), which never resumes this fiber
  __builtin_unreachable();
}

void Launch::finish_current() {
  Fiber* fiber = current_;
  fiber->state = FiberState::kDone;
  --live_;
  on_thread_exit(*this, *fiber);
  suspend();
  __builtin_unreachable();
}

uint64_t Launch::next_random() {
  // splitmix64: tiny, and good enough to shuffle a schedule.
  uint64_t z = (rng_state_ += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void Launch::fuzz_point() {
  if (static_cast<uint32_t>(next_random()) < fuzz_threshold_) {
    push_runnable(current_);
    suspend();
  }
}

// ---- runtime.h entry points --------------------------------------------------------------------

void launch(const LaunchConfig& config, void (*body_fn)(void*), void* arg) {
  Launch state(config, body_fn, arg);
  state.run();
}

void yield() {
  Launch* launch = t_launch;
  if (launch == nullptr) return;
  launch->make_runnable(launch->current());
  launch->suspend();
}

void fuzz_point() {
  if (t_launch != nullptr) t_launch->fuzz_point();
}

void notify_store(const void* addr) {
  if (t_launch != nullptr) t_launch->notify(addr);
}

namespace {

// Parks the calling fiber on a data wait; returns its DataWait once the fiber runs again.
DataWait& park_on(const char* what, const void* addr, WaitCheck check, arch::Cmp cmp, uint64_t value,
                  int value_bytes, bool value_signed, const arch::WaitSite& site, bool may_expire) {
  Launch* launch = t_launch;
  if (launch == nullptr) throw Error(ErrorKind::kInvalidArgument, std::string(what) + " called outside a kernel");
  Fiber* fiber = launch->current();
  DataWait& w = fiber->wait;
  w.addr = addr;
  w.check = check;
  w.cmp = cmp;
  w.value = value;
  w.value_bytes = value_bytes;
  w.value_signed = value_signed;
  w.site = site;
  w.may_expire = may_expire;
  w.expired = false;
  launch->park(fiber);
  return w;
}

}  // namespace

uint64_t park_until(const void* addr, WaitCheck check, arch::Cmp cmp, uint64_t value, int value_bytes,
                    bool value_signed, const arch::WaitSite& site) {
  return park_on("arch::wait_until", addr, check, cmp, value, value_bytes, value_signed, site, false).seen;
}

bool park_until_or_expire(const void* addr, WaitCheck check, arch::Cmp cmp, uint64_t value, int value_bytes,
                          bool value_signed, const arch::WaitSite& site, uint64_t* seen) {
  DataWait& w = park_on("arch::wait_until_or_expire", addr, check, cmp, value, value_bytes, value_signed, site, true);
  w.may_expire = false;
  *seen = w.seen;
  return !w.expired;
}

[[noreturn]] void device_fail(const std::string& message) {
  if (t_launch == nullptr) throw Error(ErrorKind::kDeviceAssert, message);
  t_launch->fail(ErrorKind::kDeviceAssert, message);
}

void* dynamic_smem() { return t_launch->current()->block->dynamic_smem; }

void* static_smem(const void* site, size_t bytes, size_t align) {
  Launch* launch = t_launch;
  Block& block = *launch->current()->block;
  for (auto& entry : block.static_smem)
    if (entry.first == site) return entry.second;
  const size_t alignment = std::max<size_t>(align, 16);
  const size_t rounded = (bytes + alignment - 1) / alignment * alignment;
  void* storage = std::aligned_alloc(alignment, rounded);
  std::memset(storage, launch->poisons_shared_memory() ? 0xa5 : 0, rounded);
  block.static_smem.emplace_back(site, storage);
  return storage;
}

uint64_t now_ns() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<uint64_t>(ts.tv_sec) * 1000000000ull + static_cast<uint64_t>(ts.tv_nsec);
}

}  // namespace moelink::simt
