// The scale-out transport's handle as kernel arguments carry it: plain data, identical for every
// translation unit (the g++-compiled bindings fill it, nvcc- or g++-compiled kernels use it), so
// it is not a binding's own type. transport/scaleout.cuh documents the calls made with it.
#pragma once

#include <cstdint>

namespace moelink::transport {

enum class ScaleOutKind : int32_t {
  kNone = 0,      // no scale-out window (one node)
  kHostNic = 1,   // host target: `queue` is this rank's host::NicRing
  kLoopback = 2,  // one-GPU proof (both targets): `queue` is a table of every rank's window
                  // (char* [num_ranks]) in memory the kernels can read
  kGin = 3,       // NCCL GIN (GPU target): `queue` is this rank's host::NicRing in device memory,
                  // consumed by the GIN pump kernel (transport/nccl/gin_pump.h); `window` is this
                  // rank's own scale-out window (an NCCL symmetric window) through its LSA pointer
};

struct ScaleOut {
  int32_t rank = -1;            // this rank (global)
  int32_t num_ranks = 0;
  ScaleOutKind kind = ScaleOutKind::kNone;
  uint32_t num_signals = 0;     // signals at the start of every window (u64 each)
  char* window = nullptr;       // this rank's own scale-out window
  uint64_t window_bytes = 0;
  void* queue = nullptr;        // binding-specific, see ScaleOutKind
  uint64_t* rdma_bytes = nullptr;  // loopback, GIN: bytes this rank put (the host NIC counts itself)
};

}  // namespace moelink::transport
