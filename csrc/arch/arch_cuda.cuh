// moelink device primitives, GPU half: the contract is in arch.cuh, which includes this file under
// nvcc. Everything here is `__device__ __forceinline__`; MOELINK_LAUNCH is in runtime/cuda_launch.cuh.
//
// Memory operations are inline PTX with the scope spelled out, using generic addressing so the
// same primitive works on global, peer (NVLink) and shared memory. PTX references below are to the
// PTX ISA: "Memory Consistency Model" (ch. 8) and the ld/st/atom/red/fence/bar instructions (9.7).
#pragma once

#if !defined(__CUDACC__)
#error "arch_cuda.cuh is the nvcc half of arch/arch.cuh: include arch/arch.cuh instead"
#endif

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "runtime/abort_record.h"
#include "runtime/cuda_device.h"

// ---------------------------------------------------------------------------------------------
// Qualifiers and shared memory

#define MOELINK_DEVICE __device__ __forceinline__
#define MOELINK_DEVICE_NOINLINE __device__ __noinline__
#define MOELINK_KERNEL __global__
#define MOELINK_LAUNCH_BOUNDS(threads) __launch_bounds__(threads, 1)

// The dimensions are a variadic tail so that `[f(a, b)]` survives macro argument splitting.
#define MOELINK_SHARED(T, name, ...) __shared__ T name __VA_ARGS__

#define MOELINK_DYNAMIC_SMEM(T, name) \
  T* name = reinterpret_cast<T*>(::moelink::arch::detail::dynamic_smem_base())

namespace moelink::arch {
namespace detail {

// One extern array for the whole TU (every extern __shared__ array aliases the start of the
// launch's dynamic shared memory); its declared alignment asks the toolchain to place that start
// on a 128-byte boundary, as the contract promises.
MOELINK_DEVICE unsigned char* dynamic_smem_base() {
  extern __shared__ __align__(128) unsigned char moelink_dynamic_smem[];
  return moelink_dynamic_smem;
}

template <typename T>
inline constexpr bool kIsWord = std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                (sizeof(T) == 4 || sizeof(T) == 8);

template <typename T>
using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Identity. Unsigned, as on the host target (so `thread_rank() - 1` means the same on both).
// Warps are cut from the linear thread index, so %laneid == thread_rank() % 32.

MOELINK_DEVICE unsigned thread_rank() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
MOELINK_DEVICE unsigned block_rank() {
  return blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
}
MOELINK_DEVICE unsigned num_threads() { return blockDim.x * blockDim.y * blockDim.z; }
MOELINK_DEVICE unsigned num_blocks() { return gridDim.x * gridDim.y * gridDim.z; }
MOELINK_DEVICE unsigned lane_id() {
  unsigned lane;
  asm("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
}
MOELINK_DEVICE unsigned warp_id() { return thread_rank() / kWarpSize; }
MOELINK_DEVICE unsigned num_warps() { return (num_threads() + kWarpSize - 1) / kWarpSize; }

// ---------------------------------------------------------------------------------------------
// Memory operations
//
// PTX spells the scope inside the instruction and an asm template must be a string literal, so
// the scope switch is a macro: `if constexpr` on the template parameter S keeps exactly one asm
// statement. OUTS and INS are parenthesised operand lists. Every statement clobbers "memory":
// besides ordering, that tells the compiler the asm reads/writes *p, so a plain store to the same
// address cannot be moved across a relaxed load of it.
#define MOELINK_UNPAREN(...) __VA_ARGS__
#define MOELINK_SCOPED_ASM(S, HEAD, TAIL, OUTS, INS)                                           \
  do {                                                                                         \
    if constexpr ((S) == ::moelink::arch::Scope::kBlock) {                                     \
      asm volatile(HEAD ".cta" TAIL : MOELINK_UNPAREN OUTS : MOELINK_UNPAREN INS : "memory");  \
    } else if constexpr ((S) == ::moelink::arch::Scope::kGpu) {                                \
      asm volatile(HEAD ".gpu" TAIL : MOELINK_UNPAREN OUTS : MOELINK_UNPAREN INS : "memory");  \
    } else {                                                                                   \
      asm volatile(HEAD ".sys" TAIL : MOELINK_UNPAREN OUTS : MOELINK_UNPAREN INS : "memory");  \
    }                                                                                          \
  } while (0)

#define MOELINK_REQUIRE_WORD(T, what) \
  static_assert(detail::kIsWord<T>, what ": T must be a 32- or 64-bit integer type")

// Scoped loads and stores, one line each in the tables below. Values are moved as .b32/.b64 bit
// patterns. A stored value is not deduced (type_identity), so `st_release(u64_ptr, 1)` compiles.
#define MOELINK_DEFINE_LOAD(NAME, HEAD)                                                          \
  template <Scope S = Scope::kSys, typename T>                                                   \
  MOELINK_DEVICE T NAME(const T* p) {                                                            \
    MOELINK_REQUIRE_WORD(T, #NAME);                                                              \
    detail::Bits<T> v;                                                                           \
    if constexpr (sizeof(T) == 4)                                                                \
      MOELINK_SCOPED_ASM(S, HEAD, ".b32 %0, [%1];", ("=r"(v)), ("l"(p)));                        \
    else                                                                                         \
      MOELINK_SCOPED_ASM(S, HEAD, ".b64 %0, [%1];", ("=l"(v)), ("l"(p)));                        \
    return static_cast<T>(v);                                                                    \
  }
#define MOELINK_DEFINE_STORE(NAME, HEAD)                                                         \
  template <Scope S = Scope::kSys, typename T>                                                   \
  MOELINK_DEVICE void NAME(T* p, std::type_identity_t<T> value) {                                \
    MOELINK_REQUIRE_WORD(T, #NAME);                                                              \
    const auto v = static_cast<detail::Bits<T>>(value);                                          \
    if constexpr (sizeof(T) == 4)                                                                \
      MOELINK_SCOPED_ASM(S, HEAD, ".b32 [%0], %1;", (), ("l"(p), "r"(v)));                       \
    else                                                                                         \
      MOELINK_SCOPED_ASM(S, HEAD, ".b64 [%0], %1;", (), ("l"(p), "l"(v)));                       \
  }

MOELINK_DEFINE_LOAD(ld_acquire, "ld.acquire")
MOELINK_DEFINE_LOAD(ld_relaxed, "ld.relaxed")
MOELINK_DEFINE_STORE(st_release, "st.release")
MOELINK_DEFINE_STORE(st_relaxed, "st.relaxed")
#undef MOELINK_DEFINE_LOAD
#undef MOELINK_DEFINE_STORE

// ld.volatile/st.volatile have the memory-model semantics of .relaxed.sys (PTX ISA, ld and st:
// "volatile ... same memory synchronization semantics as .relaxed.sys"), and are never cached in
// registers or elided by the compiler. No scope to spell, so no table.
template <typename T>
MOELINK_DEVICE T ld_volatile(const T* p) {
  MOELINK_REQUIRE_WORD(T, "ld_volatile");
  detail::Bits<T> v;
  if constexpr (sizeof(T) == 4) asm volatile("ld.volatile.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  else asm volatile("ld.volatile.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return static_cast<T>(v);
}

template <typename T>
MOELINK_DEVICE void st_volatile(T* p, std::type_identity_t<T> value) {
  MOELINK_REQUIRE_WORD(T, "st_volatile");
  const auto v = static_cast<detail::Bits<T>>(value);
  if constexpr (sizeof(T) == 4) asm volatile("st.volatile.b32 [%0], %1;" :: "l"(p), "r"(v) : "memory");
  else asm volatile("st.volatile.b64 [%0], %1;" :: "l"(p), "l"(v) : "memory");
}

// Read-modify-writes, one line each in the table below. The PTX type suffix depends on width
// and, for min/max, on signedness (add and exch are sign-agnostic in two's complement).
#define MOELINK_DEFINE_RMW(NAME, HEAD, OP, S32, U32, S64, U64)                                   \
  template <Scope S = Scope::kSys, typename T>                                                   \
  MOELINK_DEVICE T NAME(T* p, std::type_identity_t<T> value) {                                   \
    MOELINK_REQUIRE_WORD(T, #NAME);                                                              \
    detail::Bits<T> old;                                                                         \
    const auto v = static_cast<detail::Bits<T>>(value);                                          \
    if constexpr (sizeof(T) == 4 && std::is_signed_v<T>)                                         \
      MOELINK_SCOPED_ASM(S, HEAD, OP S32 " %0, [%1], %2;", ("=r"(old)), ("l"(p), "r"(v)));        \
    else if constexpr (sizeof(T) == 4)                                                           \
      MOELINK_SCOPED_ASM(S, HEAD, OP U32 " %0, [%1], %2;", ("=r"(old)), ("l"(p), "r"(v)));        \
    else if constexpr (std::is_signed_v<T>)                                                      \
      MOELINK_SCOPED_ASM(S, HEAD, OP S64 " %0, [%1], %2;", ("=l"(old)), ("l"(p), "l"(v)));        \
    else                                                                                         \
      MOELINK_SCOPED_ASM(S, HEAD, OP U64 " %0, [%1], %2;", ("=l"(old)), ("l"(p), "l"(v)));        \
    return static_cast<T>(old);                                                                  \
  }

//                 name                PTX head        op       s32     u32     s64     u64
MOELINK_DEFINE_RMW(atomic_add,         "atom.relaxed", ".add",  ".u32", ".u32", ".u64", ".u64")
MOELINK_DEFINE_RMW(atomic_exch,        "atom.relaxed", ".exch", ".b32", ".b32", ".b64", ".b64")
MOELINK_DEFINE_RMW(atomic_min,         "atom.relaxed", ".min",  ".s32", ".u32", ".s64", ".u64")
MOELINK_DEFINE_RMW(atomic_max,         "atom.relaxed", ".max",  ".s32", ".u32", ".s64", ".u64")
MOELINK_DEFINE_RMW(atomic_add_release, "atom.release", ".add",  ".u32", ".u32", ".u64", ".u64")
#undef MOELINK_DEFINE_RMW

template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE T atomic_cas(T* p, std::type_identity_t<T> expected, std::type_identity_t<T> desired) {
  MOELINK_REQUIRE_WORD(T, "atomic_cas");
  detail::Bits<T> old;
  const auto e = static_cast<detail::Bits<T>>(expected);
  const auto d = static_cast<detail::Bits<T>>(desired);
  if constexpr (sizeof(T) == 4)
    MOELINK_SCOPED_ASM(S, "atom.relaxed", ".cas.b32 %0, [%1], %2, %3;", ("=r"(old)), ("l"(p), "r"(e), "r"(d)));
  else
    MOELINK_SCOPED_ASM(S, "atom.relaxed", ".cas.b64 %0, [%1], %2, %3;", ("=l"(old)), ("l"(p), "l"(e), "l"(d)));
  return static_cast<T>(old);
}

// `red` is `atom` without the returned value: the SM does not wait for the old value, which is
// what a signal-and-move-on (e.g. bumping a peer's tail counter) wants.
template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE void red_add_release(T* p, std::type_identity_t<T> value) {
  MOELINK_REQUIRE_WORD(T, "red_add_release");
  const auto v = static_cast<detail::Bits<T>>(value);
  if constexpr (sizeof(T) == 4) MOELINK_SCOPED_ASM(S, "red.release", ".add.u32 [%0], %1;", (), ("l"(p), "r"(v)));
  else MOELINK_SCOPED_ASM(S, "red.release", ".add.u64 [%0], %1;", (), ("l"(p), "l"(v)));
}

template <Scope S = Scope::kSys>
MOELINK_DEVICE void fence() {
  MOELINK_SCOPED_ASM(S, "fence.acq_rel", ";", (), ());
}

#undef MOELINK_SCOPED_ASM
#undef MOELINK_UNPAREN

// ---------------------------------------------------------------------------------------------
// Time

MOELINK_DEVICE uint64_t globaltimer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// ---------------------------------------------------------------------------------------------
// Failure

namespace detail {

// Out of line, like every failure path here: printf packs its arguments into a local-memory
// buffer, and that stack frame belongs in the cold function, not in every kernel that checks.
template <typename... Args>
__device__ __noinline__ void device_check_failed(const char* fmt, Args... args) {
  printf(fmt, args...);
  __trap();
}

}  // namespace detail

// The message matches the host target's DeviceAssert: condition, formatted text, site.
// `fmt` must be a string literal (it is pasted into the format).
#define MOELINK_DEVICE_CHECK(cond, fmt, ...)                                                    \
  do {                                                                                          \
    if (!(cond)) {                                                                              \
      ::moelink::arch::detail::device_check_failed(                                             \
          "MOELINK_DEVICE_CHECK(%s) failed: " fmt " (%s:%d, block %u, thread %u)\n",             \
          #cond __VA_OPT__(, ) __VA_ARGS__, __FILE__, __LINE__, ::moelink::arch::block_rank(),  \
          ::moelink::arch::thread_rank());                                                      \
    }                                                                                           \
  } while (0)

// ---------------------------------------------------------------------------------------------
// Waiting
//
// A poll is a relaxed load: an acquire load invalidates the SM's L1 on every iteration, which
// costs the other warps of the SM their cached lines. Once the condition holds, one acquire load
// of the same word makes everything its writer released visible (and is re-checked, so a word
// that moved on between the two loads is simply polled again). A wait past its deadline claims
// the process's AbortRecord (runtime/abort_record.h) and returns; once the record is claimed,
// every wait returns at once with a value satisfying its condition, so every grid drains in
// bounded time and the host raises CommTimeout without the CUDA context being destroyed.

namespace detail {
namespace {

// The deadline and the abort record every wait_until in this TU reads. Without -rdc each nvcc TU
// has its own copy; each copy registers its host shadow at load time and cuda_device.cu writes
// MOELINK_TIMEOUT_S and the record's device address into all of them once per device. The
// initialisers keep a wait bounded (and trapping, with no record to fill) even before that.
__device__ uint64_t g_wait_timeout_ns = 100ull * 1000 * 1000 * 1000;
__device__ ::moelink::AbortRecord* g_abort_record = nullptr;
[[maybe_unused]] const bool g_wait_symbols_registered =
    (::moelink::cuda::register_wait_timeout_symbol(&g_wait_timeout_ns),
     ::moelink::cuda::register_abort_record_symbol(&g_abort_record), true);

}  // namespace

// Polls between deadline (and abort) checks: reading %globaltimer and the mapped host record
// on every 64th poll costs nothing measurable and still notices expiry within microseconds.
constexpr uint32_t kPollsPerDeadlineCheck = 64;

template <typename T>
MOELINK_DEVICE T satisfying(Cmp cmp, T value) {
  switch (cmp) {
    case Cmp::kNe: case Cmp::kGt: return static_cast<T>(value + 1);
    case Cmp::kLt: return static_cast<T>(value - 1);
    default: return value;  // kEq, kGe, kLe
  }
}

MOELINK_DEVICE bool aborted() {
  const ::moelink::AbortRecord* record = g_abort_record;
  return record != nullptr && ld_volatile(&record->state) != 0;
}

// Out of line: the record-filling path belongs in a cold function, not in every kernel.
__device__ __noinline__ inline void record_timeout(WaitSite site, uint32_t cmp, bool is_signed, uint64_t awaited,
                                                   uint64_t last, uint64_t waited_ns) {
  ::moelink::AbortRecord* record = g_abort_record;
  if (record == nullptr) {  // no record installed (a kernel launched outside moelink's launcher)
    printf("moelink: wait timed out: %s (rank %d, peer %d, channel %d)\n", site.what ? site.what : "?", site.rank,
           site.peer, site.channel);
    __trap();
  }
  if (atomic_cas<Scope::kSys>(&record->state, 0u, 1u) != 0u) return;  // another wait got there first
  record->rank = site.rank;
  record->peer = site.peer;
  record->channel = site.channel;
  record->block = block_rank();
  record->thread = thread_rank();
  record->awaited = awaited;
  record->last = last;
  record->waited_ns = waited_ns;
  record->cmp = cmp;
  record->is_signed = is_signed ? 1u : 0u;
  const char* what = site.what ? site.what : "(unnamed wait)";
  int i = 0;
  for (; i + 1 < static_cast<int>(sizeof record->what) && what[i] != '\0'; ++i) record->what[i] = what[i];
  record->what[i] = '\0';
  st_release<Scope::kSys>(&record->published, 1u);
}

template <Scope S, typename T>
__device__ __noinline__ T wait_slow(const T* p, Cmp cmp, T value, WaitSite site) {
  const uint64_t start = globaltimer_ns();
  const uint64_t timeout_ns = g_wait_timeout_ns;
  for (uint32_t polls = 1;; ++polls) {
    if (compare<T>(ld_relaxed<S>(p), cmp, value)) {
      const T seen = ld_acquire<S>(p);
      if (compare<T>(seen, cmp, value)) return seen;
    }
    if (polls % kPollsPerDeadlineCheck == 0) {
      if (aborted()) return satisfying(cmp, value);
      const uint64_t waited = globaltimer_ns() - start;
      if (waited > timeout_ns) {
        record_timeout(site, static_cast<uint32_t>(cmp), std::is_signed_v<T>, static_cast<uint64_t>(value),
                       static_cast<uint64_t>(ld_relaxed<S>(p)), waited);
        return satisfying(cmp, value);
      }
    }
  }
}

// wait_until_or_expire's slow path: the same polling, but the deadline makes it give up (false)
// instead of claiming the AbortRecord. Once another wait claimed the record it returns true with a
// satisfying value, like every wait (the caller checks aborted()).
template <Scope S, typename T>
__device__ __noinline__ bool wait_or_expire_slow(const T* p, Cmp cmp, T value, T* seen) {
  const uint64_t start = globaltimer_ns();
  const uint64_t timeout_ns = g_wait_timeout_ns;
  for (uint32_t polls = 1;; ++polls) {
    if (compare<T>(ld_relaxed<S>(p), cmp, value)) {
      const T got = ld_acquire<S>(p);
      if (compare<T>(got, cmp, value)) {
        *seen = got;
        return true;
      }
    }
    if (polls % kPollsPerDeadlineCheck == 0) {
      if (aborted()) {
        *seen = satisfying(cmp, value);
        return true;
      }
      if (globaltimer_ns() - start > timeout_ns) {
        *seen = ld_relaxed<S>(p);
        return false;
      }
    }
  }
}

}  // namespace detail

MOELINK_DEVICE bool aborted() { return detail::aborted(); }

template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE bool wait_until_or_expire(const T* p, Cmp cmp, std::type_identity_t<T> value, WaitSite site, T* seen) {
  MOELINK_REQUIRE_WORD(T, "wait_until_or_expire");
  (void)site;  // an expiry is the caller's to report (nothing is recorded)
  const T got = ld_acquire<S>(p);
  if (compare<T>(got, cmp, value)) {
    *seen = got;
    return true;
  }
  return detail::wait_or_expire_slow<S, T>(p, cmp, value, seen);
}

template <Scope S = Scope::kSys, typename T>
MOELINK_DEVICE T wait_until(const T* p, Cmp cmp, std::type_identity_t<T> value, WaitSite site) {
  MOELINK_REQUIRE_WORD(T, "wait_until");
  const T seen = ld_acquire<S>(p);
  if (compare<T>(seen, cmp, value)) return seen;  // already there: one acquire, no clock read
  return detail::wait_slow<S, T>(p, cmp, value, site);
}

// ---------------------------------------------------------------------------------------------
// Warp collectives (sm_70+ *_sync intrinsics: mask names the participating lanes)

MOELINK_DEVICE void syncwarp(uint32_t mask = kFullMask) { __syncwarp(mask); }

namespace detail {

// Shuffles any trivially copyable value of <= 8 bytes as one or two 32-bit words, which is also
// what the hardware does for 64-bit types.
template <typename T, typename Shuffle>
MOELINK_DEVICE T shuffle_words(T v, Shuffle&& shuffle) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8,
                "warp shuffles move trivially copyable values of at most 8 bytes");
  uint32_t words[2] = {0, 0};
  memcpy(words, &v, sizeof(T));
  words[0] = shuffle(words[0]);
  if constexpr (sizeof(T) > 4) words[1] = shuffle(words[1]);
  memcpy(&v, words, sizeof(T));
  return v;
}

}  // namespace detail

template <typename T>
MOELINK_DEVICE T shfl(uint32_t mask, T v, int src_lane, int width = kWarpSize) {
  return detail::shuffle_words(v, [&](uint32_t w) { return __shfl_sync(mask, w, src_lane, width); });
}
template <typename T>
MOELINK_DEVICE T shfl_xor(uint32_t mask, T v, int lane_mask, int width = kWarpSize) {
  return detail::shuffle_words(v, [&](uint32_t w) { return __shfl_xor_sync(mask, w, lane_mask, width); });
}
template <typename T>
MOELINK_DEVICE T shfl_up(uint32_t mask, T v, unsigned delta, int width = kWarpSize) {
  return detail::shuffle_words(v, [&](uint32_t w) { return __shfl_up_sync(mask, w, delta, width); });
}
template <typename T>
MOELINK_DEVICE T shfl_down(uint32_t mask, T v, unsigned delta, int width = kWarpSize) {
  return detail::shuffle_words(v, [&](uint32_t w) { return __shfl_down_sync(mask, w, delta, width); });
}

MOELINK_DEVICE uint32_t ballot(uint32_t mask, bool pred) { return __ballot_sync(mask, pred); }
MOELINK_DEVICE bool any(uint32_t mask, bool pred) { return __any_sync(mask, pred) != 0; }
MOELINK_DEVICE bool all(uint32_t mask, bool pred) { return __all_sync(mask, pred) != 0; }
MOELINK_DEVICE uint32_t activemask() { return __activemask(); }

namespace detail {

struct Sum { template <typename T> MOELINK_DEVICE T operator()(T a, T b) const { return a + b; } };
struct Min { template <typename T> MOELINK_DEVICE T operator()(T a, T b) const { return b < a ? b : a; } };
struct Max { template <typename T> MOELINK_DEVICE T operator()(T a, T b) const { return a < b ? b : a; } };

// Full warp: xor butterfly (offsets 16, 8, 4, 2, 1). Each step combines x and y on one lane and
// y and x on its partner; both are bitwise equal, so every lane ends with the same bits, floats
// included. A partial mask cannot use the butterfly (a partner outside the mask returns an
// undefined value), so it folds the member lanes in ascending lane order instead.
template <typename T, typename Op>
MOELINK_DEVICE T warp_reduce(uint32_t mask, T v, Op op) {
  static_assert(std::is_arithmetic_v<T> && (sizeof(T) == 4 || sizeof(T) == 8),
                "warp_reduce_*: T must be a 32- or 64-bit integer or floating-point type");
  if (mask == kFullMask) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(mask, v, offset));
    return v;
  }
  T acc = shfl(mask, v, __ffs(mask) - 1);
  for (uint32_t rest = mask & (mask - 1); rest != 0; rest &= rest - 1)
    acc = op(acc, shfl(mask, v, __ffs(rest) - 1));
  return acc;
}

// sm_80+ has a single-instruction warp reduction (redux.sync) for 32-bit integers, any mask.
template <typename T>
inline constexpr bool kHasRedux = std::is_integral_v<T> && sizeof(T) == 4;

}  // namespace detail

template <typename T>
MOELINK_DEVICE T warp_reduce_sum(uint32_t mask, T v) {
#if __CUDA_ARCH__ >= 800
  if constexpr (detail::kHasRedux<T>) return static_cast<T>(__reduce_add_sync(mask, v));
#endif
  return detail::warp_reduce(mask, v, detail::Sum{});
}
template <typename T>
MOELINK_DEVICE T warp_reduce_min(uint32_t mask, T v) {
#if __CUDA_ARCH__ >= 800
  if constexpr (detail::kHasRedux<T>) return static_cast<T>(__reduce_min_sync(mask, v));
#endif
  return detail::warp_reduce(mask, v, detail::Min{});
}
template <typename T>
MOELINK_DEVICE T warp_reduce_max(uint32_t mask, T v) {
#if __CUDA_ARCH__ >= 800
  if constexpr (detail::kHasRedux<T>) return static_cast<T>(__reduce_max_sync(mask, v));
#endif
  return detail::warp_reduce(mask, v, detail::Max{});
}

// ---------------------------------------------------------------------------------------------
// Block synchronisation. `bar.sync` is the .aligned form of barrier.sync (PTX ISA, bar): every
// thread of a warp that takes part must execute the same bar instruction, which the contract's
// "n is a multiple of 32" (whole warps) implies. Barrier 0 is __syncthreads'.

MOELINK_DEVICE void sync_block() { __syncthreads(); }
MOELINK_DEVICE void bar_sync(int id, int n) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory");
}
MOELINK_DEVICE void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}

// ---------------------------------------------------------------------------------------------
// Work split: interleaved, so consecutive lanes touch consecutive items (coalesced).

MOELINK_DEVICE LaneRange lane_range(uint32_t mask, int64_t count) {
  const unsigned lane = lane_id();
  return {static_cast<int64_t>(__popc(mask & ((1u << lane) - 1u))), count, static_cast<int64_t>(__popc(mask))};
}
MOELINK_DEVICE bool elect_one(uint32_t mask) { return lane_id() == static_cast<unsigned>(__ffs(mask) - 1); }
// Every lane works: the split stays interleaved and coalesced.
MOELINK_DEVICE uint32_t work_lanes(uint32_t mask) { return mask; }

#undef MOELINK_REQUIRE_WORD

}  // namespace moelink::arch

// 16-byte vectors and bulk movement (load16, store16, warp_copy, warp_bulk_copy), in their own file.
#include "arch/arch_cuda_bulk.cuh"

// MOELINK_LAUNCH: host-side glue, in its own file.
#include "runtime/cuda_launch.cuh"
