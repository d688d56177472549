// The host side of the GIN binding (contract: gin_transport.h).
#include "transport/nccl/gin_transport.h"

#include <cstddef>
#include <string>

#include "runtime/errors.h"
#include "transport/host/nic.h"
#include "transport/nccl/gin_pump.h"

#if MOELINK_HAVE_NCCL
#include <cuda_runtime.h>
#endif

namespace moelink::transport::nccl {

namespace {

[[noreturn]] void bad(const std::string& name, const std::string& expected, long long got) {
  throw Error(ErrorKind::kInvalidArgument, name + ": expected " + expected + ", got " + std::to_string(got));
}

}  // namespace

GinPlan plan_gin(int num_ranks, int lsa_size, int ranks_per_node, bool all_to_all, int queue_depth) {
  if (num_ranks < 2) bad("num_ranks", "at least 2 (a scale-out transport connects ranks of several nodes)", num_ranks);
  if (lsa_size < 1 || num_ranks % lsa_size != 0) {
    bad("lsa_size", "a divisor of num_ranks = " + std::to_string(num_ranks) + " (NCCL's LSA team size)", lsa_size);
  }
  if (ranks_per_node < 1 || lsa_size % ranks_per_node != 0) {
    bad("ranks_per_node", "a divisor of the LSA team size " + std::to_string(lsa_size), ranks_per_node);
  }
  if (num_ranks / ranks_per_node < 2) {
    bad("ranks_per_node", "at most num_ranks / 2 = " + std::to_string(num_ranks / 2) + " (two nodes or more)",
        ranks_per_node);
  }
  if (queue_depth < kGinMinQueueDepth || queue_depth > (1 << 16)) {
    bad("queue_depth", "a GIN queue depth in [" + std::to_string(kGinMinQueueDepth) + ", 65536]", queue_depth);
  }
  GinPlan plan;
  plan.queue_depth = queue_depth;
  plan.context_count = 1;
  if (ranks_per_node < lsa_size) {
    // Posing as smaller nodes inside one LSA team: the "remote" peers share this rank's physical
    // node and LSA indices differ, which only a FULL connection reaches.
    plan.connection = GinConnection::kFull;
    plan.why = "moelink's nodes are smaller than NCCL's LSA team: peers on other moelink nodes have other LSA indices";
  } else if (all_to_all) {
    plan.connection = GinConnection::kFull;
    plan.why = "the kernels signal every rank of other nodes (internode barrier and notify)";
  } else {
    plan.connection = GinConnection::kRail;
    plan.why = "once-per-node traffic only: each rank reaches the ranks with its LSA index";
  }
  return plan;
}

#if MOELINK_HAVE_NCCL

namespace {

void check_cuda(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();
  throw Error(ErrorKind::kCudaError, what + " failed: " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
}

const char* gin_type_name(int type) {
  switch (type) {
    case 0: return "none";
    case 2: return "PROXY";
    case 3: return "GDAKI";
    case 4: return "GPI";
    case 5: return "EFA_GDA";
  }
  return "unknown";
}

}  // namespace

GinPlan check_gin(const Windows& windows, uint32_t num_signals, int ranks_per_node, bool all_to_all, int queue_depth,
                  int* gin_type) {
  const LsaTeam lsa = windows.lsa_team();
  const GinPlan plan = plan_gin(windows.num_ranks(), lsa.size, ranks_per_node, all_to_all, queue_depth);
  if (num_signals == 0 || uint64_t{8} * num_signals > windows.data_bytes()) {
    bad("num_signals", "at least 1 and at most data_bytes / 8 = " + std::to_string(windows.data_bytes() / 8), num_signals);
  }
  const ncclCommProperties_t& props = windows.properties();
  const bool rail = plan.connection == GinConnection::kRail;
  const int type = static_cast<int>(rail ? props.railedGinType : props.ginType);
  if (type == NCCL_GIN_TYPE_NONE) {
    throw Error(ErrorKind::kNcclError,
                windows.where("GIN transport") + ": NCCL offers no GIN backend for a " + (rail ? "RAIL" : "FULL") +
                    " connection (ginType " + gin_type_name(props.ginType) + ", railedGinType " +
                    gin_type_name(props.railedGinType) + "): it needs an RDMA NIC usable by NCCL, GDAKI "
                    "(mlx5, GPUDirect) or the proxy backend; NCCL_DEBUG=INFO says why it chose none");
  }
  if (gin_type != nullptr) *gin_type = type;
  return plan;
}

GinTransport::GinTransport(Windows& windows, uint32_t num_signals, int ranks_per_node, bool all_to_all,
                           int queue_depth, double timeout_s)
    : windows_(windows), num_signals_(num_signals) {
  plan_ = check_gin(windows, num_signals, ranks_per_node, all_to_all, queue_depth, &gin_type_);
  const LsaTeam lsa = windows.lsa_team();
  const Library& lib = windows.library();
  const bool rail = plan_.connection == GinConnection::kRail;
  try {
    ncclDevCommRequirements_t reqs = NCCL_DEV_COMM_REQUIREMENTS_INITIALIZER;
    reqs.ginForceEnable = true;
    reqs.ginContextCount = plan_.context_count;
    reqs.ginConnectionType = rail ? NCCL_GIN_CONNECTION_RAIL : NCCL_GIN_CONNECTION_FULL;
    reqs.ginQueueDepth = plan_.queue_depth;
    reqs.ginSignalCount = 0;   // VA signals in the window only
    reqs.ginCounterCount = 0;
    const ncclResult_t created = lib.ncclDevCommCreate(windows.comm(), &reqs, &dev_comm_);
    if (created != ncclSuccess && created != ncclInProgress) {
      throw Error(error_kind(created), failure_message(&lib, windows.comm(), created, windows.where("ncclDevCommCreate")));
    }
    windows.wait_ready("GIN device communicator (ncclDevCommCreate)", timeout_s);
    have_dev_comm_ = true;
    const int expected_stride = rail ? lsa.size : 1;
    if (dev_comm_.ginConnectionCount < 1 || dev_comm_.ginContextCount < 1 ||
        dev_comm_.ginConnectionStride != expected_stride || dev_comm_.lsaSize != lsa.size) {
      throw Error(ErrorKind::kNcclError,
                  windows.where("ncclDevCommCreate") + ": the device communicator has " +
                      std::to_string(dev_comm_.ginConnectionCount) + " GIN connections, " +
                      std::to_string(dev_comm_.ginContextCount) + " contexts, stride " +
                      std::to_string(dev_comm_.ginConnectionStride) + " (expected >= 1, >= 1, " +
                      std::to_string(expected_stride) + ")");
    }

    GinDeviceState state{};
    state.magic = kGinStateMagic;
    state.version = kGinStateVersion;
    state.rank = windows.rank();
    state.num_ranks = windows.num_ranks();
    state.lsa_size = lsa.size;
    state.connection_stride = expected_stride;
    state.context_count = dev_comm_.ginContextCount;
    state.queue_depth = static_cast<uint32_t>(plan_.queue_depth);
    state.num_signals = num_signals;
    state.window_bytes = windows.data_bytes();
    state.rdma_bytes = reinterpret_cast<uint64_t*>(windows.counter_ptr(1));
    state.window = windows.window();
    state.comm = dev_comm_;
    check_cuda(cudaMalloc(&state_, sizeof(state)), windows.where("cudaMalloc(GIN state)"));
    check_cuda(cudaMemcpy(state_, &state, sizeof(state), cudaMemcpyHostToDevice), windows.where("cudaMemcpy(GIN state)"));

    const size_t ring_bytes = offsetof(host::NicRing, slots) + sizeof(host::NicWqe) * kGinRingEntries;
    check_cuda(cudaMalloc(&ring_, ring_bytes), windows.where("cudaMalloc(GIN ring)"));
    check_cuda(cudaMemset(ring_, 0, ring_bytes), windows.where("cudaMemset(GIN ring)"));
    host::NicRing header{};
    header.entries = kGinRingEntries;
    header.rank = windows.rank();
    header.num_signals = num_signals;
    header.window_bytes = windows.data_bytes();
    check_cuda(cudaMemcpy(ring_, &header, offsetof(host::NicRing, slots), cudaMemcpyHostToDevice),
               windows.where("cudaMemcpy(GIN ring header)"));

    cudaStream_t stream = nullptr;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), windows.where("cudaStreamCreate(pump)"));
    stream_ = stream;
    for (void*& event : events_) {
      cudaEvent_t e = nullptr;
      check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), windows.where("cudaEventCreate(pump)"));
      event = e;
    }
    register_gin_pump(ring_, GinPumpTarget{state_, reinterpret_cast<uintptr_t>(stream_), events_[0], events_[1]});
  } catch (...) {
    release(nullptr);
    closed_ = true;
    throw;
  }
}

GinTransport::~GinTransport() {
  if (!closed_) release(nullptr);
}

void GinTransport::release(std::string* first_error) noexcept {
  const auto note = [&](const std::string& what) {
    if (first_error != nullptr && first_error->empty()) *first_error = what;
  };
  if (ring_ != nullptr) unregister_gin_pump(ring_);
  if (have_dev_comm_ && windows_.state() == Windows::State::kRegistered) {
    const Library& lib = windows_.library();
    const ncclResult_t result = lib.ncclDevCommDestroy(windows_.comm(), &dev_comm_);
    if (result != ncclSuccess) note(failure_message(&lib, nullptr, result, windows_.where("ncclDevCommDestroy")));
  }
  have_dev_comm_ = false;
  for (void*& event : events_) {
    if (event != nullptr && cudaEventDestroy(static_cast<cudaEvent_t>(event)) != cudaSuccess) note("cudaEventDestroy");
    event = nullptr;
  }
  if (stream_ != nullptr && cudaStreamDestroy(static_cast<cudaStream_t>(stream_)) != cudaSuccess) note("cudaStreamDestroy");
  stream_ = nullptr;
  for (void** p : {&ring_, &state_}) {
    if (*p != nullptr && cudaFree(*p) != cudaSuccess) note("cudaFree");
    *p = nullptr;
  }
  cudaGetLastError();
}

void GinTransport::close() {
  if (closed_) return;
  std::string error;
  release(&error);
  closed_ = true;
  if (!error.empty()) throw Error(ErrorKind::kNcclError, "GIN transport close: " + error);
}

#endif  // MOELINK_HAVE_NCCL

}  // namespace moelink::transport::nccl
