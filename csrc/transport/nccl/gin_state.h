// The device-side state of the GIN binding (transport/nccl/gin_binding.cuh): what the host puts
// in device memory once per Buffer, and the ScaleOut handle (scaleout_handle.h, kind kGin) points
// to with `queue`. Plain data, shared by the g++-compiled host side (gin_transport.cpp fills and
// uploads it) and the nvcc-compiled kernels (which read it); docs/gpu-transport.md §2.
//
// GinDeviceState, field by field (device memory, written once by the host before any kernel):
//   magic, version       kGinStateMagic / kGinStateVersion: the binding refuses anything else
//   rank, num_ranks      this rank and the communicator's size (= moelink's global ranks)
//   context_count        GIN contexts of the device communicator (ncclDevComm::ginContextCount)
//   queue_depth          descriptors NCCL's queue holds per (context, peer): the requested
//                        ncclDevCommRequirements::ginQueueDepth
//   connection_stride    1 for a FULL connection (every rank reachable), the LSA size for a RAIL
//                        connection (only ranks with this rank's LSA index); ncclDevComm's
//                        ginConnectionStride
//   gin_peers            num_ranks / connection_stride: peers per context
//   window_bytes         bytes of the scale-out window (the data the kernels lay out)
//   posted, consumed     u64 [context_count][gin_peers] in device memory, zero at creation: the
//                        credit accounting (below). posted counts descriptors this rank handed to
//                        NCCL per (context, peer); consumed is a lower bound of how many of them
//                        NCCL's queue released (the posted count seen before a flush that
//                        completed). Both only grow.
//   window               the scale-out window's device handle (ncclWindow_t, symmetric: it
//                        names every rank's window; NCCL resolves the peer's remote key)
//   comm                 the ncclDevComm that ncclDevCommCreate filled in (by value: ncclGin
//                        keeps a reference to it, which must point to device memory)
//
// Credit accounting (why: NCCL's put spins without a deadline when its queue is full, PROXY's
// postGfd `while (queueSize <= idx - ci) {}`, GDAKI's send-queue availability check). Before a
// put or signal of `need` descriptors (gin_descriptors) to gin peer p on context c, the caller
// checks posted - consumed + need <= gin_put_budget(...); if not, it flushes context c (with
// moelink's deadline, so a dead proxy or NIC ends in CommTimeout) and sets consumed to the posted
// count it saw before flushing. Other threads of the same context may be between their own check
// and their post: the budget leaves them room (gin_put_budget). posted grows after each post.
#pragma once

#include <cstdint>

#include "arch/types.h"
#include "transport/nccl/nccl_headers.h"

namespace moelink::transport::nccl {

inline constexpr uint64_t kGinStateMagic = 0x4e49474b4e494c4dull;  // "MLINKGIN"
inline constexpr uint32_t kGinStateVersion = 1;
// The binding hands NCCL at most this many bytes per put call: PROXY splits larger puts into
// 1 GiB descriptors (gin_proxy.h, DataChunkSize), and one call must stay within the credit count.
inline constexpr uint64_t kGinMaxPutBytes = uint64_t{1} << 30;
// Descriptors one call may take: a put with a VA signal is two on PROXY (the VA signal is its
// own descriptor) and at most two work requests on GDAKI (write, then the atomic).
inline constexpr uint32_t kGinMaxDescriptorsPerCall = 2;
// Queue depth the host asks for when the caller gives none (ncclDevCommRequirements::ginQueueDepth).
inline constexpr int kGinDefaultQueueDepth = 1024;

// ncclGinConnectionType_t values (nccl_device/core.h), spelled without the NCCL headers.
enum class GinConnection : int32_t { kFull = 1, kRail = 2 };

// Descriptors a put of `bytes` (<= kGinMaxPutBytes) with or without a bundled signal takes, or a
// signal alone (bytes == 0).
MOELINK_HOST_DEVICE uint32_t gin_descriptors(uint64_t bytes, bool with_signal) {
  return (bytes > 0 ? 1u : 0u) + (with_signal ? 1u : 0u);
}

// How many descriptors may be outstanding on one (context, peer) before a poster must flush, when
// `posters` threads may post to it concurrently (each may be between its check and its post with
// kGinMaxDescriptorsPerCall descriptors); below kGinMaxDescriptorsPerCall the queue is too shallow
// for that many posters.
MOELINK_HOST_DEVICE int64_t gin_put_budget(uint32_t queue_depth, int64_t posters) {
  return static_cast<int64_t>(queue_depth) - (posters - 1) * static_cast<int64_t>(kGinMaxDescriptorsPerCall);
}

// Threads that may post to one (context, peer) at once: one per warp (a binding call is made by
// one lane) of every block that shares the context.
MOELINK_HOST_DEVICE int64_t gin_posters(int64_t warps_per_block, int64_t blocks, int64_t contexts) {
  const int64_t blocks_per_context = contexts > 0 ? (blocks + contexts - 1) / contexts : blocks;
  return warps_per_block * blocks_per_context;
}

#if MOELINK_HAVE_NCCL

struct GinDeviceState {
  uint64_t magic;
  uint32_t version;
  int32_t rank;
  int32_t num_ranks;
  uint32_t context_count;
  uint32_t queue_depth;
  int32_t connection_stride;
  uint32_t gin_peers;
  uint32_t reserved;
  uint64_t window_bytes;
  uint64_t* posted;
  uint64_t* consumed;
  ncclWindow_t window;
  ncclDevComm comm;
};

#endif  // MOELINK_HAVE_NCCL

}  // namespace moelink::transport::nccl
