// Types shared by both implementations of arch.cuh and by the SIMT runtime (which must not
// include arch.cuh itself: arch_host.h includes the runtime).
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define MOELINK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MOELINK_HOST_DEVICE inline
#endif

namespace moelink::arch {

enum class Scope { kBlock, kGpu, kSys };
enum class Cmp { kEq, kNe, kGe, kGt, kLe, kLt };

constexpr int kWarpSize = 32;
constexpr uint32_t kFullMask = 0xffffffffu;

struct WaitSite {
  const char* what;  // static text, e.g. "dispatch: receiver queue tail"
  int rank = -1;     // rank running the kernel
  int peer = -1;     // rank whose write is awaited
  int channel = -1;  // channel (or block) the wait belongs to
};

// 16 bytes moved by one load or store (arch.cuh: load16, store16): eight bf16, four floats.
struct alignas(16) Vec16 {
  uint32_t w[4];
};

// Shared memory warp_bulk_copy needs per warp (two 3 KiB halves and two mbarriers on the GPU;
// allocated on the host too, so dynamic shared memory sizes agree on both targets).
inline constexpr size_t kBulkHalfBytes = 3072;  // 32 warps x a stage fit Hopper's 227 KiB
inline constexpr size_t kBulkStageBytes = 2 * kBulkHalfBytes + 128;

// A lane's share of a work split (arch.cuh: lane_range).
struct LaneRange {
  int64_t begin, end, step;
};

template <typename T>
MOELINK_HOST_DEVICE constexpr bool compare(T observed, Cmp cmp, T value) {
  switch (cmp) {
    case Cmp::kEq: return observed == value;
    case Cmp::kNe: return observed != value;
    case Cmp::kGe: return observed >= value;
    case Cmp::kGt: return observed > value;
    case Cmp::kLe: return observed <= value;
    case Cmp::kLt: return observed < value;
  }
  return false;
}

// Index of the lowest set bit of a nonzero word.
MOELINK_HOST_DEVICE int lowest_bit(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __ffs(bits) - 1;
#else
  return __builtin_ctz(bits);
#endif
}

MOELINK_HOST_DEVICE int popcount(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __popc(bits);
#else
  return __builtin_popcount(bits);
#endif
}

constexpr const char* cmp_text(Cmp cmp) {
  switch (cmp) {
    case Cmp::kEq: return "==";
    case Cmp::kNe: return "!=";
    case Cmp::kGe: return ">=";
    case Cmp::kGt: return ">";
    case Cmp::kLe: return "<=";
    case Cmp::kLt: return "<";
  }
  return "?";
}

}  // namespace moelink::arch

