// What every launcher needs to know about where and for whom a kernel runs.
#pragma once

#include <cstdint>

namespace moelink {

struct LaunchContext {
  // cudaStream_t on the GPU target (0 = the legacy default stream); ignored on the host target,
  // where a launch runs to completion on the calling thread before it returns.
  uintptr_t stream = 0;
  // The calling rank, for diagnostics only (wait-timeout and assert messages). -1 = unknown.
  int rank = -1;
};

}  // namespace moelink
