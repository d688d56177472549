// The GIN binding's plain data and rules, shared by the g++-compiled host side
// (gin_transport.cpp: creates and uploads the state) and the nvcc-compiled pump kernel
// (gin_pump.cu: reads it); docs/gpu-transport.md §2.
//
// How a GPU put reaches the network. Kernels post work-queue entries (host::NicWqe) into this
// rank's ring (host::NicRing, in device memory) exactly as the host target's kernels do for the
// emulated NIC (transport/host/nic_device.h). The pump, one warp of its own grid launched beside
// every internode kernel on a pump stream (gin_pump.h), consumes the ring in order and turns each
// entry into ncclGin calls on one context:
//   put (+ signal)   gin.put(team, peer, window, dst, window, src, bytes,
//                            ncclGin_StrongVASignalAdd{window, 8 * id, add} | ncclGin_None,
//                            ncclGin_None, ncclCoopThread, ncclGin_None,
//                            given = thread, required = system)
//   signal           gin.signal(team, peer, ncclGin_StrongVASignalAdd{...}, ...)
//   stop             (posted by the launcher after the kernel) flush, publish, leave
// and publishes ring->completed (release) after a gin.flush covering the entries: the kernels'
// flush() (wait for completed >= reserved) then means "the NIC read every source", as on the
// host. Signals live in the window (the first num_signals u64 of it, VA signals): the kernels'
// wait_signal stays moelink's own deadlined wait_until on their own window.
//
// Ordering. One consumer, one context, in ring order, strong signals: a signal seen at a peer
// means every put the ring held before it to that peer has settled there, which is stronger than
// scaleout.cuh's rule 1 (a thread's earlier puts to that peer).
//
// Teams. A peer with this rank's LSA index (the once-per-node path: rank (n, l) to (m, l), all
// of the internode data queues) is addressed through ncclTeamRail with team rank m; any other
// peer through ncclTeamWorld with its global rank. A RAIL connection (ginConnectionStride = LSA
// size) connects only the former, so the pump refuses the latter there: NCCL would silently send
// to rank (m, my l) instead (impl/gin__funcs.h divides the world rank by the stride). moelink's
// internode kernels also signal every rank of other nodes (the global barrier, notify), so a
// Buffer asks for FULL (gin_plan: all_to_all); RAIL serves callers whose traffic is
// once-per-node only.
//
// Credits. NCCL's put spins without a deadline when its queue is full (PROXY: postGfd loops on
// the queue indices; GDAKI: send-queue availability), so the pump never lets more than
// gin_flush_threshold(queue_depth) descriptors be outstanding on its context: it flushes first,
// with moelink's deadline (sliced: NCCL's flush timeout counts clock64 cycles). A dead proxy or
// NIC then ends as a CommTimeout naming the pump, not a hang.
//
// GinDeviceState, field by field (device memory, written once by the host before any pump):
//   magic, version       kGinStateMagic / kGinStateVersion: the pump refuses anything else
//   rank, num_ranks      this rank and the communicator's size (= moelink's global ranks)
//   lsa_size             NCCL's LSA team size (ranks per physical node)
//   connection_stride    1 (FULL) or lsa_size (RAIL): ncclDevComm::ginConnectionStride
//   context_count        GIN contexts the device communicator has (the pump uses context 0)
//   queue_depth          descriptors NCCL's queue holds per (context, peer): the requested
//                        ncclDevCommRequirements::ginQueueDepth
//   num_signals          u64 signals at the start of the window
//   window_bytes         bytes of the window the kernels lay out (offsets are checked against it)
//   rdma_bytes           the window's u64 byte counter (payload bytes put), or null
//   window               the window's device handle (ncclWindow_t: symmetric, names every rank's)
//   comm                 the ncclDevComm ncclDevCommCreate filled in (by value, in device memory:
//                        ncclGin keeps a reference to it)
#pragma once

#include <cstdint>

#include "arch/types.h"
#include "transport/nccl/nccl_headers.h"

namespace moelink::transport::nccl {

inline constexpr uint64_t kGinStateMagic = 0x4e49474b4e494c4dull;  // "MLINKGIN"
inline constexpr uint32_t kGinStateVersion = 2;
// The op bit of the entry the launcher posts after a kernel: the pump's signal to finish.
inline constexpr uint32_t kGinPumpStop = 0x80000000u;
// The pump hands NCCL at most this many bytes per put: PROXY splits larger puts into 1 GiB
// descriptors (gin_proxy.h, DataChunkSize), which the credit count must see.
inline constexpr uint64_t kGinMaxPutBytes = uint64_t{1} << 30;
// Queue depth moelink asks for (ncclDevCommRequirements::ginQueueDepth); NCCL's own default is 0.
inline constexpr int kGinDefaultQueueDepth = 1024;
inline constexpr int kGinMinQueueDepth = 8;
// Work-queue entries of the ring the kernels post to (a power of two).
inline constexpr uint32_t kGinRingEntries = 4096;

// ncclGinConnectionType_t / ncclGinType_t values (nccl_device/core.h), spelled without the
// headers so the plan below is testable in every build.
enum class GinConnection : int32_t { kNone = 0, kFull = 1, kRail = 2 };
enum class GinType : int32_t { kNone = 0, kProxy = 2, kGdaki = 3 };

// Descriptors an entry takes on PROXY (the most of either backend): one per 1 GiB piece of data,
// plus one for a VA signal (its own descriptor after the data).
MOELINK_HOST_DEVICE uint64_t gin_descriptors(uint64_t bytes, bool with_signal) {
  return (bytes + kGinMaxPutBytes - 1) / kGinMaxPutBytes + (with_signal ? 1u : 0u);
}

// Outstanding descriptors after which the pump flushes before posting more: room for the largest
// single entry the ring can hold below the queue depth.
MOELINK_HOST_DEVICE int64_t gin_flush_threshold(uint32_t queue_depth) {
  return static_cast<int64_t>(queue_depth) - 2;
}

// What the host asks NCCL for, decided from moelink's shape alone (gin_plan).
struct GinPlan {
  GinConnection connection = GinConnection::kNone;
  int queue_depth = 0;
  int context_count = 1;
  const char* why = "";  // why this connection type, for messages and docs
};

#if MOELINK_HAVE_NCCL

struct GinDeviceState {
  uint64_t magic;
  uint32_t version;
  int32_t rank;
  int32_t num_ranks;
  int32_t lsa_size;
  int32_t connection_stride;
  uint32_t context_count;
  uint32_t queue_depth;
  uint32_t num_signals;
  uint64_t window_bytes;
  uint64_t* rdma_bytes;
  ncclWindow_t window;
  ncclDevComm comm;
};

#endif  // MOELINK_HAVE_NCCL

}  // namespace moelink::transport::nccl
