// SIMT host runtime: runs CUDA kernels on the CPU, one fiber per CUDA thread.
//
// A launch runs on the calling OS thread. Every thread of every block becomes a fiber with its own
// stack (all blocks are co-resident, as a grid sized to the SM budget is on the GPU), and a
// cooperative scheduler switches between fibers only at synchronisation points:
//   - block barriers and warp collectives block the fiber until the last participant arrives,
//     which makes the waiters runnable again (no polling);
//   - spin-waits (arch::wait_until) park the fiber on a *data* condition (address, comparison,
//     value). The scheduler re-checks a parked condition when a local primitive store touches the
//     address (notify_store), and polls every parked condition when nothing is runnable (writes
//     from other processes or the emulated NIC cannot notify) or after enough dispatches.
// With no runnable fiber and nothing satisfied, the scheduler backs off (pause, yield, then short
// sleeps) so that the other ranks' processes get the cores. Every parked wait has a deadline.
//
// Kernels never call this header directly: arch_host.h maps the arch.cuh contract onto it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "arch/types.h"

namespace moelink::simt {

struct Dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr Dim3() = default;
  constexpr Dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr unsigned volume() const { return x * y * z; }
};

// Identity of the fiber that is running; arch_host.h reads it through t_identity.
struct ThreadIdentity {
  Dim3 thread_idx, block_idx, block_dim, grid_dim;
  unsigned thread_rank = 0;  // linear thread index in its block
  unsigned block_rank = 0;   // linear block index in the grid
  unsigned num_threads = 0;  // threads per block
  unsigned num_blocks = 0;   // blocks in the grid
  unsigned lane = 0;         // thread_rank % 32
  unsigned warp = 0;         // thread_rank / 32
};

// The running fiber's identity, or nullptr outside a launch. Initial-exec TLS: one load.
extern thread_local ThreadIdentity* t_identity __attribute__((tls_model("initial-exec")));
// Nonzero when the random schedule injects extra switches at memory primitives.
extern thread_local int t_fuzz_memory_ops __attribute__((tls_model("initial-exec")));
// Nonzero under a random schedule: lane_range and work_lanes split work as the GPU does (every
// lane a worker, interleaved items) instead of the host's one fiber per warp (arch.cuh).
extern thread_local int t_gpu_lane_split __attribute__((tls_model("initial-exec")));

struct LaunchConfig {
  const char* kernel_name = "?";
  Dim3 grid;
  Dim3 block;
  size_t dynamic_smem_bytes = 0;
  int rank = -1;  // for messages only
};

// Runs `body(arg)` as every thread of the grid and returns when all have finished. Throws
// moelink::Error: kCommTimeout (a wait reached its deadline), kDeviceAssert (a device check or a
// C++ exception inside the kernel), kDeadlock (no thread can ever make progress),
// kInvalidArgument (bad launch shape, or a launch from inside a launch).
void launch(const LaunchConfig& config, void (*body)(void*), void* arg);

// ---- runtime settings (process-wide) ---------------------------------------------------------

// Deadline of every wait, in seconds; initially MOELINK_TIMEOUT_S or 100.
void set_wait_timeout(double seconds);
double wait_timeout();

// "deterministic" (FIFO, the default) or "random:<seed>[:<p>]": pick a random runnable fiber at
// every switch and, with probability p (default 0.125), switch at each memory primitive. Launch k
// of the process uses seed + k, so a failing run replays exactly. Initially MOELINK_SIMT_SCHEDULE.
void set_schedule(const std::string& spec);
std::string schedule();

struct Stats {
  uint64_t launches = 0;
  uint64_t fibers = 0;          // fibers created
  uint64_t switches = 0;        // scheduler -> fiber switches
  uint64_t parked_waits = 0;    // waits that could not be satisfied at once
  uint64_t polls = 0;           // sweeps over all parked waits
  uint64_t idle_sleeps = 0;     // back-off sleeps while everything waited on other processes
};
Stats stats();

// The facts of the last wait timeout (kCommTimeout) of a launch on the calling OS thread, structured
// for the layers that turn a timeout into a root cause (moelink._host_windows); valid == false if
// the thread's latest launch did not time out.
struct TimeoutInfo {
  bool valid = false;
  std::string kernel;
  int rank = -1;      // the launch's rank, else the wait site's
  int peer = -1;      // the expired wait's peer, -1 if it named none
  int channel = -1;
  std::string what;   // the wait site's description
  uint64_t waited_ns = 0;
  std::vector<int> peers_waited;  // distinct peers of every wait parked at that moment, ascending
};
TimeoutInfo last_timeout();

// Fiber stack size in bytes (MOELINK_SIMT_STACK_KB, default 64 KiB).
size_t stack_bytes();

// ---- fiber-side entry points, used by arch_host.h --------------------------------------------

// Gives up the CPU to the other runnable fibers; the caller stays runnable.
void yield();
// The random schedule's switch injection point (called only when t_fuzz_memory_ops != 0).
void fuzz_point();

// A primitive store/atomic wrote `addr`: parked waits on that address are re-checked.
void notify_store(const void* addr);

// Type-erased data wait. `check` loads `addr` with acquire semantics, writes the value it saw to
// `*seen` (widened to 64 bits) and says whether the condition holds. Returns the satisfying value.
using WaitCheck = bool (*)(const void* addr, arch::Cmp cmp, uint64_t value, uint64_t* seen);
uint64_t park_until(const void* addr, WaitCheck check, arch::Cmp cmp, uint64_t value,
                    int value_bytes, bool value_signed, const arch::WaitSite& site);
// The same wait, but one that reaches the deadline (MOELINK_TIMEOUT_S) resumes the caller instead
// of failing the launch: returns false then (`*seen` the last value observed), true with the
// satisfying value in `*seen` otherwise (arch::wait_until_or_expire).
bool park_until_or_expire(const void* addr, WaitCheck check, arch::Cmp cmp, uint64_t value, int value_bytes,
                          bool value_signed, const arch::WaitSite& site, uint64_t* seen);

// Block barrier `id` with `count` participating threads; count < 0 means "every thread of the
// block that has not exited" (sync_block). arrive_only: count the caller without waiting.
void block_barrier(int id, int count, bool arrive_only);

enum class CollectiveOp : uint8_t {
  kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll,
  kSumI32, kSumU32, kSumI64, kSumU64, kSumF32, kSumF64,
  kMinI32, kMinU32, kMinI64, kMinU64, kMinF32, kMinF64,
  kMaxI32, kMaxU32, kMaxI64, kMaxU64, kMaxF32, kMaxF64,
};
// Warp collective over the lanes of `mask`. `bits` is the caller's operand (raw bits), `arg` the
// source lane / delta / lane mask of a shuffle, `width` its segment width. Returns raw bits.
uint64_t warp_collective(uint32_t mask, CollectiveOp op, uint64_t bits, int arg, int width);
// Lanes of the caller's warp that exist and have not exited.
uint32_t active_mask();

// Fails the launch with kDeviceAssert: the message gets the kernel, block and thread appended.
[[noreturn]] void device_fail(const std::string& message);

// Shared memory of the running fiber's block.
void* dynamic_smem();
// The static shared array declared at `site` (one per declaration, per block), `bytes` long.
void* static_smem(const void* site, size_t bytes, size_t align);

uint64_t now_ns();

}  // namespace moelink::simt
