// The GIN pump kernel, the stop kernel and their launcher (contract: gin_pump.h, gin_state.h).
#include "transport/nccl/gin_pump.h"

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>

#include "arch/arch.cuh"
#include "runtime/errors.h"
#include "transport/nccl/gin_binding.cuh"
#include "transport/scaleout.cuh"

namespace moelink::transport::nccl {

namespace kernels {

#if MOELINK_HAVE_NCCL
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(32) gin_pump_kernel(const GinDeviceState* state, host::NicRing* ring) {
  if (arch::thread_rank() == 0) gin::run_pump(*state, ring);
}
#endif

// One thread posts the stop entry; it follows everything the previous kernel on the stream posted.
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(32) gin_stop_kernel(ScaleOut net) {
  if (arch::thread_rank() == 0) nic::detail::post(net, kGinPumpStop, net.rank, 0, 0, 0, SignalAdd{});
}

}  // namespace kernels

namespace {

std::mutex g_mutex;
std::map<const void*, GinPumpTarget>& registry() {
  static auto* pumps = new std::map<const void*, GinPumpTarget>();  // never destroyed (exit order)
  return *pumps;
}

GinPumpTarget find(const ScaleOut& net) {
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = registry().find(net.queue);
  if (it == registry().end()) {
    throw Error(ErrorKind::kInvalidArgument, "scale-out (GIN) on rank " + std::to_string(net.rank) +
                                                 ": the work queue is not one of a live GIN transport (destroyed?)");
  }
  return it->second;
}

void check(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw Error(ErrorKind::kCudaError, "gin pump: " + what + " failed: " + cudaGetErrorName(err) + " (" +
                                         cudaGetErrorString(err) + ")");
}

}  // namespace

void register_gin_pump(const void* ring, const GinPumpTarget& target) {
  std::lock_guard<std::mutex> lock(g_mutex);
  registry()[ring] = target;
}

void unregister_gin_pump(const void* ring) noexcept {
  std::lock_guard<std::mutex> lock(g_mutex);
  registry().erase(ring);
}

bool gin_pump_registered(const void* ring) noexcept {
  std::lock_guard<std::mutex> lock(g_mutex);
  return registry().count(ring) != 0;
}

void start_gin_pump(const ScaleOut& net, const LaunchContext& ctx) {
#if MOELINK_HAVE_NCCL
  const GinPumpTarget target = find(net);
  auto caller = reinterpret_cast<cudaStream_t>(ctx.stream);
  auto pump = reinterpret_cast<cudaStream_t>(target.stream);
  check(cudaEventRecord(static_cast<cudaEvent_t>(target.start_event), caller), "cudaEventRecord(start)");
  check(cudaStreamWaitEvent(pump, static_cast<cudaEvent_t>(target.start_event), 0), "cudaStreamWaitEvent(start)");
  LaunchContext on_pump{target.stream, ctx.rank};
  MOELINK_LAUNCH(on_pump, "gin_pump", kernels::gin_pump_kernel, 1, 32, 0,
                 static_cast<const GinDeviceState*>(target.state), static_cast<host::NicRing*>(net.queue));
#else
  (void)net;
  (void)ctx;
  throw Error(ErrorKind::kNcclUnavailable, "scale-out (GIN): moelink._cuda was built without NCCL headers");
#endif
}

void stop_gin_pump(const ScaleOut& net, const LaunchContext& ctx) {
  const GinPumpTarget target = find(net);
  MOELINK_LAUNCH(ctx, "gin_stop", kernels::gin_stop_kernel, 1, 32, 0, net);
  auto pump = reinterpret_cast<cudaStream_t>(target.stream);
  check(cudaEventRecord(static_cast<cudaEvent_t>(target.done_event), pump), "cudaEventRecord(done)");
  check(cudaStreamWaitEvent(reinterpret_cast<cudaStream_t>(ctx.stream), static_cast<cudaEvent_t>(target.done_event), 0),
        "cudaStreamWaitEvent(done)");
}

}  // namespace moelink::transport::nccl
