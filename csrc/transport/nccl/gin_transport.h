// The host side of the GIN binding: one rank's device communicator (ncclDevComm with GIN), its
// work-queue ring and pump resources, on an NCCL window that moelink lays out as a scale-out
// window (transport/scaleout.cuh: signals first). gin_state.h documents the device side;
// docs/gpu-transport.md §2 the design. GPU build only (moelink._cuda.nccl.GinTransport).
//
// Setup (GinTransport's constructor; collective, like the window registration before it):
//   1. plan_gin(...): the connection type, queue depth and context count from moelink's shape
//      alone (no NCCL call: testable anywhere);
//   2. the communicator's properties must offer a GIN backend for that connection
//      (ginType for FULL, railedGinType for RAIL, != NCCL_GIN_TYPE_NONE), else NcclError naming
//      what NCCL reported and what to check (NIC, GDAKI/proxy, NCCL_GIN_* settings);
//   3. ncclDevCommCreate with ginForceEnable, the planned connection type, ginContextCount 1,
//      ginQueueDepth, VA and strong signals required (the defaults), no indexed signals or
//      counters; polled with the deadline (the communicator is non-blocking); then the devComm's
//      ginConnectionCount >= 1 and its stride must match the plan;
//   4. device memory: the GinDeviceState (devComm by value) and the ring (host::NicRing of
//      kGinRingEntries entries, header filled, slots zero); a non-blocking pump stream and two
//      events; the ring is registered for with_gin_pump (gin_pump.h).
// Any failure undoes the steps before it (ncclDevCommDestroy, frees) and throws; an NCCL failure
// also aborts the windows' communicator (Windows::wait_ready's rule), since peers may be inside
// the collective.
//
// Teardown: close() after the caller synchronised every stream that ran an internode kernel:
// unregister, ncclDevCommDestroy, free, destroy stream and events, in that order; errors are
// reported (thrown) once everything was attempted. The destructor closes best effort. The
// windows (Windows) must outlive the transport and are closed by their owner afterwards.
//
// Errors: as nccl_windows.h (kNcclError / kCommTimeout / kCudaError / kInvalidArgument).
#pragma once

#include <cstdint>
#include <string>

#include "transport/nccl/gin_state.h"
#include "transport/nccl/nccl_windows.h"

namespace moelink::transport::nccl {

// Step 1. `all_to_all`: the kernels signal ranks with another LSA index on other nodes (the
// internode barrier and notify do): FULL; else RAIL (once-per-node traffic only). Throws
// kInvalidArgument naming the argument for a shape NCCL or moelink cannot serve.
GinPlan plan_gin(int num_ranks, int lsa_size, int ranks_per_node, bool all_to_all, int queue_depth);

#if MOELINK_HAVE_NCCL

// Steps 1-2 alone, local (no collective): the plan, the signal count against the window, and a
// GIN backend for the planned connection; returns the plan and NCCL's backend (ncclGinType_t),
// throws as the constructor would. moelink._gin runs it on every rank and exchanges the outcomes
// before any rank enters ncclDevCommCreate, so a rank that cannot take part never leaves the
// others waiting in the collective until its deadline.
GinPlan check_gin(const Windows& windows, uint32_t num_signals, int ranks_per_node, bool all_to_all, int queue_depth,
                  int* gin_type);

class GinTransport {
 public:
  GinTransport(Windows& windows, uint32_t num_signals, int ranks_per_node, bool all_to_all, int queue_depth,
               double timeout_s);
  GinTransport(const GinTransport&) = delete;
  GinTransport& operator=(const GinTransport&) = delete;
  ~GinTransport();

  const GinPlan& plan() const { return plan_; }
  int gin_type() const { return gin_type_; }                      // ncclGinType_t NCCL chose
  uintptr_t ring_ptr() const { return reinterpret_cast<uintptr_t>(ring_); }  // ScaleOut::queue
  uintptr_t state_ptr() const { return reinterpret_cast<uintptr_t>(state_); }
  uint32_t num_signals() const { return num_signals_; }
  bool closed() const { return closed_; }
  void close();

 private:
  void release(std::string* first_error) noexcept;

  Windows& windows_;
  GinPlan plan_;
  uint32_t num_signals_;
  int gin_type_ = 0;
  bool closed_ = false;
  bool have_dev_comm_ = false;
  ncclDevComm dev_comm_{};
  void* state_ = nullptr;
  void* ring_ = nullptr;
  void* stream_ = nullptr;
  void* events_[2] = {nullptr, nullptr};
};

#endif  // MOELINK_HAVE_NCCL

}  // namespace moelink::transport::nccl
