// Host implementation of arch.cuh: C++ atomics for memory operations, the SIMT runtime for
// everything that synchronises threads. Included only through arch.cuh, never by kernels.
//
// x86-64 is stronger than the PTX model (loads are not reordered with other loads, stores not with
// stores), so a missing acquire or release can pass here and fail on the GPU: docs/simt.md lists
// what the host target does and does not model.
#pragma once

#include <cstdio>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

#include "runtime/errors.h"
#include "runtime/launch_context.h"
#include "simt/runtime.h"

#define MOELINK_DEVICE inline
#define MOELINK_DEVICE_NOINLINE inline
#define MOELINK_KERNEL
#define MOELINK_LAUNCH_BOUNDS(threads)

// CUDA qualifiers that kernel code may spell directly.
#ifndef __device__
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#endif

// The CUDA built-in variables, per fiber.
#define threadIdx (::moelink::simt::t_identity->thread_idx)
#define blockIdx (::moelink::simt::t_identity->block_idx)
#define blockDim (::moelink::simt::t_identity->block_dim)
#define gridDim (::moelink::simt::t_identity->grid_dim)

// `T name dims`, one per block: a reference to storage the runtime allocates per block and per
// declaration site (the address of a function-local static identifies the site).
#define MOELINK_SHARED(T, name, ...)                                                             \
  static const char moelink_smem_site_##name = 0;                                                \
  T(&name) __VA_ARGS__ = *reinterpret_cast<T(*) __VA_ARGS__>(::moelink::simt::static_smem(       \
      &moelink_smem_site_##name, sizeof(T __VA_ARGS__), alignof(T)))

#define MOELINK_DYNAMIC_SMEM(T, name) T* name = static_cast<T*>(::moelink::simt::dynamic_smem())

#define MOELINK_DEVICE_CHECK(cond, ...)                                     \
  do {                                                                      \
    if (!(cond)) ::moelink::arch::detail::check_failed(#cond, __VA_ARGS__); \
  } while (0)

namespace moelink::arch {

namespace detail {

template <typename... A>
[[noreturn]] inline void check_failed(const char* condition, const char* fmt, A... args) {
  char text[512];
  if constexpr (sizeof...(A) == 0) {
    std::snprintf(text, sizeof text, "%s", fmt);
  } else {
    std::snprintf(text, sizeof text, fmt, args...);
  }
  simt::device_fail(std::string("MOELINK_DEVICE_CHECK(") + condition + ") failed: " + text);
}

inline void memory_op() {
  if (__builtin_expect(simt::t_fuzz_memory_ops != 0, 0)) simt::fuzz_point();
}

template <typename T>
constexpr void check_word() {
  static_assert(std::is_integral_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "arch memory operations take 32- or 64-bit integers");
}

template <typename T>
bool check_wait(const void* addr, Cmp cmp, uint64_t value, uint64_t* seen) {
  T observed = __atomic_load_n(static_cast<const T*>(addr), __ATOMIC_ACQUIRE);
  *seen = static_cast<uint64_t>(observed);
  return compare<T>(observed, cmp, static_cast<T>(value));
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "warp operands are <= 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
T collective(uint32_t mask, simt::CollectiveOp op, T v, int arg = 0, int width = kWarpSize) {
  return from_bits<T>(simt::warp_collective(mask, op, to_bits(v), arg, width));
}

// Picks the reduction op for T from the (i32, u32, i64, u64, f32, f64) family starting at `base`.
template <typename T>
simt::CollectiveOp reduce_op(simt::CollectiveOp base) {
  int offset;
  if constexpr (std::is_same_v<T, float>) offset = 4;
  else if constexpr (std::is_same_v<T, double>) offset = 5;
  else if constexpr (std::is_integral_v<T> && sizeof(T) == 4) offset = std::is_signed_v<T> ? 0 : 1;
  else if constexpr (std::is_integral_v<T> && sizeof(T) == 8) offset = std::is_signed_v<T> ? 2 : 3;
  else static_assert(sizeof(T) == 0, "warp_reduce_* takes 32/64-bit integers, float or double");
  return static_cast<simt::CollectiveOp>(static_cast<int>(base) + offset);
}

}  // namespace detail

// ---- identity ----------------------------------------------------------------------------------
MOELINK_DEVICE unsigned thread_rank() { return simt::t_identity->thread_rank; }
MOELINK_DEVICE unsigned block_rank() { return simt::t_identity->block_rank; }
MOELINK_DEVICE unsigned num_threads() { return simt::t_identity->num_threads; }
MOELINK_DEVICE unsigned num_blocks() { return simt::t_identity->num_blocks; }
MOELINK_DEVICE unsigned lane_id() { return simt::t_identity->lane; }
MOELINK_DEVICE unsigned warp_id() { return simt::t_identity->warp; }
MOELINK_DEVICE unsigned num_warps() { return (simt::t_identity->num_threads + kWarpSize - 1) / kWarpSize; }

// ---- memory operations -------------------------------------------------------------------------
// Scope does not change the host code: every fiber of a process shares one OS thread, and other
// processes are reached through the same coherent memory, so system scope is the strongest needed.
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE T ld_acquire(const T* p) {
  detail::check_word<T>();
  detail::memory_op();
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE T ld_relaxed(const T* p) {
  detail::check_word<T>();
  detail::memory_op();
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}
template <typename T>
MOELINK_DEVICE T ld_volatile(const T* p) {
  detail::check_word<T>();
  detail::memory_op();
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE void st_release(T* p, std::type_identity_t<T> v) {
  detail::check_word<T>();
  detail::memory_op();
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
  simt::notify_store(p);
}
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE void st_relaxed(T* p, std::type_identity_t<T> v) {
  detail::check_word<T>();
  detail::memory_op();
  __atomic_store_n(p, v, __ATOMIC_RELAXED);
  simt::notify_store(p);
}
template <typename T>
MOELINK_DEVICE void st_volatile(T* p, std::type_identity_t<T> v) {
  detail::check_word<T>();
  detail::memory_op();
  __atomic_store_n(p, v, __ATOMIC_RELAXED);
  simt::notify_store(p);
}

#define MOELINK_HOST_RMW(name, builtin, order)                  \
  template <Scope S = Scope::kSys, typename T>                  \
  MOELINK_DEVICE T name(T* p, std::type_identity_t<T> v) {    \
    detail::check_word<T>();                                    \
    detail::memory_op();                                        \
    T old = builtin(p, v, order);                               \
    simt::notify_store(p);                                      \
    return old;                                                 \
  }
MOELINK_HOST_RMW(atomic_add, __atomic_fetch_add, __ATOMIC_RELAXED)
MOELINK_HOST_RMW(atomic_add_release, __atomic_fetch_add, __ATOMIC_RELEASE)
MOELINK_HOST_RMW(atomic_exch, __atomic_exchange_n, __ATOMIC_RELAXED)
#undef MOELINK_HOST_RMW

template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE T atomic_min(T* p, std::type_identity_t<T> v) {
  detail::check_word<T>();
  detail::memory_op();
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  simt::notify_store(p);
  return old;
}
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE T atomic_max(T* p, std::type_identity_t<T> v) {
  detail::check_word<T>();
  detail::memory_op();
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  simt::notify_store(p);
  return old;
}
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE T atomic_cas(T* p, std::type_identity_t<T> expected, std::type_identity_t<T> desired) {
  detail::check_word<T>();
  detail::memory_op();
  __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
  simt::notify_store(p);
  return expected;  // the old value, whether or not the exchange happened
}
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE void red_add_release(T* p, std::type_identity_t<T> v) {
  atomic_add_release<S>(p, v);
}
template <Scope S = Scope::kSys>
MOELINK_DEVICE void fence() {
  detail::memory_op();
  __atomic_thread_fence(__ATOMIC_ACQ_REL);
}

// ---- waiting -----------------------------------------------------------------------------------
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE T wait_until(const T* p, Cmp cmp, std::type_identity_t<T> value, const WaitSite& site) {
  detail::check_word<T>();
  detail::memory_op();
  T observed = __atomic_load_n(p, __ATOMIC_ACQUIRE);
  if (compare<T>(observed, cmp, value)) return observed;
  return static_cast<T>(simt::park_until(p, &detail::check_wait<T>, cmp, static_cast<uint64_t>(value),
                                         sizeof(T), std::is_signed_v<T>, site));
}

template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE bool wait_until_or_expire(const T* p, Cmp cmp, std::type_identity_t<T> value, const WaitSite& site,
                                         T* seen) {
  detail::check_word<T>();
  detail::memory_op();
  T observed = __atomic_load_n(p, __ATOMIC_ACQUIRE);
  if (compare<T>(observed, cmp, value)) {
    *seen = observed;
    return true;
  }
  uint64_t last = 0;
  const bool met = simt::park_until_or_expire(p, &detail::check_wait<T>, cmp, static_cast<uint64_t>(value), sizeof(T),
                                              std::is_signed_v<T>, site, &last);
  *seen = static_cast<T>(last);
  return met;
}

MOELINK_DEVICE bool aborted() { return false; }  // a timeout ends the whole launch on the host

// ---- warp collectives --------------------------------------------------------------------------
MOELINK_DEVICE void syncwarp(uint32_t mask = kFullMask) {
  simt::warp_collective(mask, simt::CollectiveOp::kSync, 0, 0, kWarpSize);
}
template <typename T>
MOELINK_DEVICE T shfl(uint32_t mask, T v, int src_lane, int width = kWarpSize) {
  return detail::collective(mask, simt::CollectiveOp::kShflIdx, v, src_lane, width);
}
template <typename T>
MOELINK_DEVICE T shfl_xor(uint32_t mask, T v, int lane_mask, int width = kWarpSize) {
  return detail::collective(mask, simt::CollectiveOp::kShflXor, v, lane_mask, width);
}
template <typename T>
MOELINK_DEVICE T shfl_up(uint32_t mask, T v, unsigned delta, int width = kWarpSize) {
  return detail::collective(mask, simt::CollectiveOp::kShflUp, v, static_cast<int>(delta), width);
}
template <typename T>
MOELINK_DEVICE T shfl_down(uint32_t mask, T v, unsigned delta, int width = kWarpSize) {
  return detail::collective(mask, simt::CollectiveOp::kShflDown, v, static_cast<int>(delta), width);
}
MOELINK_DEVICE uint32_t ballot(uint32_t mask, bool pred) {
  return static_cast<uint32_t>(simt::warp_collective(mask, simt::CollectiveOp::kBallot, pred, 0, kWarpSize));
}
MOELINK_DEVICE bool any(uint32_t mask, bool pred) {
  return simt::warp_collective(mask, simt::CollectiveOp::kAny, pred, 0, kWarpSize) != 0;
}
MOELINK_DEVICE bool all(uint32_t mask, bool pred) {
  return simt::warp_collective(mask, simt::CollectiveOp::kAll, pred, 0, kWarpSize) != 0;
}
MOELINK_DEVICE uint32_t activemask() { return simt::active_mask(); }

// One collective on the host (the GPU's xor butterfly, in the same order, so float sums agree
// bit for bit on a full warp).
template <typename T>
MOELINK_DEVICE T warp_reduce_sum(uint32_t mask, T v) {
  return detail::collective(mask, detail::reduce_op<T>(simt::CollectiveOp::kSumI32), v);
}
template <typename T>
MOELINK_DEVICE T warp_reduce_min(uint32_t mask, T v) {
  return detail::collective(mask, detail::reduce_op<T>(simt::CollectiveOp::kMinI32), v);
}
template <typename T>
MOELINK_DEVICE T warp_reduce_max(uint32_t mask, T v) {
  return detail::collective(mask, detail::reduce_op<T>(simt::CollectiveOp::kMaxI32), v);
}

// ---- block synchronisation ---------------------------------------------------------------------
MOELINK_DEVICE void sync_block() { simt::block_barrier(0, -1, false); }
MOELINK_DEVICE void bar_sync(int id, int num_threads) { simt::block_barrier(id, num_threads, false); }
MOELINK_DEVICE void bar_arrive(int id, int num_threads) { simt::block_barrier(id, num_threads, true); }

// ---- 16-byte vectors and bulk movement ----------------------------------------------------------
MOELINK_DEVICE Vec16 load16(const void* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
MOELINK_DEVICE Vec16 load16_input(const void* p) { return load16(p); }
MOELINK_DEVICE void store16(void* p, const Vec16& v) { std::memcpy(p, &v, sizeof v); }

MOELINK_DEVICE void warp_copy(uint32_t mask, void* dst, const void* src, size_t bytes) {
  detail::memory_op();
  if (lane_id() == static_cast<unsigned>(__builtin_ctz(mask))) std::memcpy(dst, src, bytes);
}
MOELINK_DEVICE void warp_copy_input(uint32_t mask, void* dst, const void* src, size_t bytes) {
  warp_copy(mask, dst, src, bytes);
}

struct BulkStage {};
MOELINK_DEVICE BulkStage bulk_stage(void*) { return {}; }
MOELINK_DEVICE void warp_bulk_copy(uint32_t mask, BulkStage&, void* dst, const void* src, size_t bytes) {
  warp_copy(mask, dst, src, bytes);
}

// ---- work split --------------------------------------------------------------------------------
// Contiguous chunks: every fiber runs on one OS thread, so a lane's chunk is streamed in order
// before the next lane runs (arch.cuh: lane_range).
MOELINK_DEVICE LaneRange lane_range(uint32_t mask, int64_t count) {
  const unsigned lane = lane_id();
  const int64_t lanes = __builtin_popcount(mask);
  const int64_t rank = __builtin_popcount(mask & ((1u << lane) - 1u));
  if (__builtin_expect(simt::t_gpu_lane_split != 0, 0)) return {rank, count, lanes};  // random schedules: as the GPU
  const int64_t chunk = (count + lanes - 1) / lanes;
  const int64_t begin = rank * chunk < count ? rank * chunk : count;
  const int64_t end = begin + chunk < count ? begin + chunk : count;
  return {begin, end, 1};
}
MOELINK_DEVICE bool elect_one(uint32_t mask) { return lane_id() == static_cast<unsigned>(__builtin_ctz(mask)); }
// One fiber does a warp's work (its collectives then complete without a switch); every lane under a
// random schedule, so tests also run the GPU's split (arch.cuh: work_lanes).
MOELINK_DEVICE uint32_t work_lanes(uint32_t mask) {
  return __builtin_expect(simt::t_gpu_lane_split != 0, 0) ? mask : mask & (0u - mask);
}

// ---- time --------------------------------------------------------------------------------------
MOELINK_DEVICE uint64_t globaltimer_ns() { return simt::now_ns(); }

}  // namespace moelink::arch

// ---- launching ---------------------------------------------------------------------------------
namespace moelink::simt::detail {

template <typename... Params>
struct KernelCall {
  void (*kernel)(Params...);
  std::tuple<std::decay_t<Params>...> args;
  static void run(void* self) {
    auto* call = static_cast<KernelCall*>(self);
    std::apply([call](const auto&... a) { call->kernel(a...); }, call->args);
  }
};

template <typename... Params, typename... Args>
void launch_kernel(const LaunchContext& ctx, const char* name, void (*kernel)(Params...),
                   unsigned grid_blocks, unsigned block_threads, size_t smem, Args&&... args) {
  KernelCall<Params...> call{kernel, {std::forward<Args>(args)...}};
  LaunchConfig config;
  config.kernel_name = name;
  config.grid = Dim3(grid_blocks);
  config.block = Dim3(block_threads);
  config.dynamic_smem_bytes = smem;
  config.rank = ctx.rank;
  launch(config, &KernelCall<Params...>::run, &call);
}

}  // namespace moelink::simt::detail

// Variadic after the name, so a kernel template with several arguments (`k<A, B>`) passes whole.
#define MOELINK_LAUNCH(ctx, name, ...) ::moelink::simt::detail::launch_kernel((ctx), (name), __VA_ARGS__)
// Every block of a host launch is co-resident: cooperative launches need nothing more.
#define MOELINK_LAUNCH_COOPERATIVE(ctx, name, ...) ::moelink::simt::detail::launch_kernel((ctx), (name), __VA_ARGS__)
