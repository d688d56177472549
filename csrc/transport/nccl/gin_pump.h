// Launching the GIN pump beside a kernel that uses a ScaleOut of kind kGin (gin_state.h says what
// the pump does). Host code, GPU build only (nvcc TUs: ops_internode.cu, gin_pump.cu).
//
// with_gin_pump(net, ctx, launch) around every launch of a kernel that may post to the ring:
//   1. an event recorded on ctx.stream; the rank's pump stream waits for it (the pump must not
//      start before the work the kernel depends on, e.g. an earlier operation's pump);
//   2. the pump kernel (one warp) on the pump stream;
//   3. launch() on ctx.stream (the caller's kernel);
//   4. the stop kernel on ctx.stream (one thread posts the stop entry after everything the
//      kernel posted); ctx.stream then waits for the pump's completion event, so whatever follows
//      on ctx.stream sees every put handed to the NIC and every flush done.
// If launch() throws, 4 still runs, so the pump never outlives its operation. Nothing waits on
// the host; under CUDA-graph capture both streams join the capture through the events (the pump
// stream forks from and joins back into ctx.stream).
//
// Co-residency: the pump needs one SM while the cooperative internode grid runs; a grid that
// takes every SM leaves the pump unscheduled and the kernel's first flush() times out naming
// "scale-out flush" (CommTimeout), never a hang. Keep num_sms below the SM count.
//
// Registry: GinTransport (gin_transport.h) registers each ring with its device state and pump
// stream; with_gin_pump finds them by the ring's address (net.queue). An unregistered ring is an
// InvalidArgument naming the rank.
#pragma once

#include <cstdint>

#include "runtime/launch_context.h"
#include "transport/scaleout_handle.h"

namespace moelink::transport::nccl {

struct GinPumpTarget {
  const void* state = nullptr;  // device address of the GinDeviceState
  uintptr_t stream = 0;         // cudaStream_t of the pump
  void* start_event = nullptr;  // cudaEvent_t (timing disabled)
  void* done_event = nullptr;
};

void register_gin_pump(const void* ring, const GinPumpTarget& target);
void unregister_gin_pump(const void* ring) noexcept;
bool gin_pump_registered(const void* ring) noexcept;

// Steps 1-2 and 4 above; exposed for with_gin_pump and the tests.
void start_gin_pump(const ScaleOut& net, const LaunchContext& ctx);
void stop_gin_pump(const ScaleOut& net, const LaunchContext& ctx);

template <typename Launch>
void with_gin_pump(const ScaleOut& net, const LaunchContext& ctx, Launch&& launch) {
  if (net.kind != ScaleOutKind::kGin) {
    launch();
    return;
  }
  start_gin_pump(net, ctx);
  try {
    launch();
  } catch (...) {
    stop_gin_pump(net, ctx);
    throw;
  }
  stop_gin_pump(net, ctx);
}

}  // namespace moelink::transport::nccl
