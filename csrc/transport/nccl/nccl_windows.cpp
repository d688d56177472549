// GPU windows through NCCL (contract and layout in nccl_windows.h).
#include "transport/nccl/nccl_windows.h"

#if MOELINK_HAVE_NCCL

#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <thread>

#include "runtime/cuda_device.h"

namespace moelink::transport::nccl {
namespace {

std::string cuda_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // do not leave it for the caller's next CUDA call
  throw Error(ErrorKind::kCudaError, what + " failed: " + cuda_text(err));
}

// Makes `device` current for the scope and restores the caller's device afterwards (NCCL and
// cudaMem* act on the current device; the caller's choice is not ours to change).
class DeviceScope {
 public:
  DeviceScope(int device, const std::string& where) {
    if (cudaGetDevice(&previous_) != cudaSuccess) {
      cudaGetLastError();
      previous_ = -1;
    }
    if (previous_ != device) check_cuda(cudaSetDevice(device), where + ": cudaSetDevice(" + std::to_string(device) + ")");
    restore_ = previous_ >= 0 && previous_ != device;
  }
  // Best effort, for paths that must not throw (abort, destructor).
  explicit DeviceScope(int device) noexcept {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device && cudaSetDevice(device) != cudaSuccess) cudaGetLastError();
    restore_ = previous_ >= 0 && previous_ != device;
  }
  ~DeviceScope() {
    if (restore_ && cudaSetDevice(previous_) != cudaSuccess) cudaGetLastError();
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = -1;
  bool restore_ = false;
};

// A private non-blocking stream: work on it neither waits for nor delays the legacy stream.
class PrivateStream {
 public:
  explicit PrivateStream(const std::string& where) {
    check_cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), where + ": cudaStreamCreateWithFlags");
  }
  ~PrivateStream() { cudaStreamDestroy(stream_); }
  PrivateStream(const PrivateStream&) = delete;
  PrivateStream& operator=(const PrivateStream&) = delete;
  cudaStream_t get() const { return stream_; }
  void sync(const std::string& where) const { check_cuda(cudaStreamSynchronize(stream_), where + ": cudaStreamSynchronize"); }

 private:
  cudaStream_t stream_ = nullptr;
};

std::string seconds_text(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%g", seconds);
  return text;
}

}  // namespace

const char* state_name(Windows::State state) {
  switch (state) {
    case Windows::State::kCreated: return "created";
    case Windows::State::kCommReady: return "communicator ready";
    case Windows::State::kAllocated: return "allocated";
    case Windows::State::kRegistered: return "registered";
    case Windows::State::kClosed: return "closed";
    case Windows::State::kAborted: return "aborted";
  }
  return "?";
}

Windows::Windows(const Library& lib, int rank, int num_ranks, int device)
    : lib_(lib), rank_(rank), num_ranks_(num_ranks), device_(device),
      config_ NCCL_CONFIG_INITIALIZER, properties_ NCCL_COMM_PROPERTIES_INITIALIZER {
  if (num_ranks < 1) throw Error(ErrorKind::kInvalidArgument, "num_ranks: expected >= 1, got " + std::to_string(num_ranks));
  if (rank < 0 || rank >= num_ranks) {
    throw Error(ErrorKind::kInvalidArgument, "rank: expected in [0, " + std::to_string(num_ranks) + "), got " + std::to_string(rank));
  }
  const int devices = ::moelink::cuda::device_count();
  if (devices == 0) {
    throw Error(ErrorKind::kGpuUnavailable, "nccl windows need a CUDA device, and none is usable here (no driver or no GPU); "
                                            "the host target (gloo group, CPU tensors) needs none");
  }
  if (device < 0 || device >= devices) {
    throw Error(ErrorKind::kInvalidArgument, "device: expected a CUDA device index in [0, " + std::to_string(devices) +
                                                 "), got " + std::to_string(device));
  }
}

Windows::~Windows() {
  if (state_ != State::kClosed) abort();
}

std::string Windows::where(const std::string& step) const {
  return "nccl windows (rank " + std::to_string(rank_) + " of " + std::to_string(num_ranks_) + ", device " +
         std::to_string(device_) + "): " + step;
}

void Windows::require(State expected, const char* step) const {
  if (state_ == expected) return;
  throw Error(ErrorKind::kInvalidArgument, where(step) + ": expected state '" + state_name(expected) + "', got '" +
                                               state_name(state_) + "'");
}

void Windows::fail(ncclResult_t result, const std::string& step) {
  // The message is built before the abort, while NCCL's last-error text still belongs to us.
  const std::string message = failure_message(&lib_, comm_, result, where(step));
  abort();
  throw Error(error_kind(result), message);
}

void Windows::wait_ready(const std::string& step, double timeout_s) {
  using clock = std::chrono::steady_clock;
  const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(std::chrono::duration<double>(timeout_s));
  auto pause = std::chrono::microseconds(50);
  for (;;) {
    ncclResult_t state = ncclInProgress;
    const ncclResult_t queried = lib_.ncclCommGetAsyncError(comm_, &state);
    if (queried != ncclSuccess) fail(queried, step + ": ncclCommGetAsyncError");
    if (state == ncclSuccess) return;
    if (state != ncclInProgress) fail(state, step);
    if (clock::now() >= deadline) {
      abort();
      throw Error(ErrorKind::kCommTimeout,
                  where(step) + " did not complete within " + seconds_text(timeout_s) +
                      " s; the communicator was aborted. A peer may not have reached this step, or NCCL's "
                      "bootstrap cannot connect the ranks (see NCCL_SOCKET_IFNAME, NCCL_DEBUG=INFO)");
    }
    std::this_thread::sleep_for(pause);
    pause = std::min(pause * 2, decltype(pause)(10000));
  }
}

void Windows::init_communicator(const ncclUniqueId& id, double timeout_s) {
  require(State::kCreated, "init_communicator");
  if (!(timeout_s > 0) || !std::isfinite(timeout_s)) {
    throw Error(ErrorKind::kInvalidArgument, "timeout_s: expected a positive number of seconds, got " + seconds_text(timeout_s));
  }
  DeviceScope scope(device_, where("init_communicator"));
  config_.blocking = 0;  // returns at once; completion is polled with our deadline, abortable
  config_.commName = "moelink-windows";
  ncclComm_t comm = nullptr;
  const ncclResult_t result = lib_.ncclCommInitRankConfig(&comm, num_ranks_, id, rank_, &config_);
  comm_ = comm;
  if (result != ncclSuccess && result != ncclInProgress) fail(result, "ncclCommInitRankConfig");
  if (comm_ == nullptr) fail(ncclInternalError, "ncclCommInitRankConfig returned no communicator");
  wait_ready("communicator initialisation (ncclCommInitRankConfig)", timeout_s);
  state_ = State::kCommReady;
  check_communicator();
}

void Windows::check_communicator() {
  int count = -1, user_rank = -1, device = -1;
  ncclResult_t result;
  if ((result = lib_.ncclCommCount(comm_, &count)) != ncclSuccess) fail(result, "ncclCommCount");
  if ((result = lib_.ncclCommUserRank(comm_, &user_rank)) != ncclSuccess) fail(result, "ncclCommUserRank");
  if ((result = lib_.ncclCommCuDevice(comm_, &device)) != ncclSuccess) fail(result, "ncclCommCuDevice");
  if ((result = lib_.ncclCommQueryProperties(comm_, &properties_)) != ncclSuccess) fail(result, "ncclCommQueryProperties");
  std::string problem;
  if (count != num_ranks_ || user_rank != rank_ || device != device_) {
    problem = "the communicator reports rank " + std::to_string(user_rank) + " of " + std::to_string(count) +
              " on device " + std::to_string(device);
  } else if (!properties_.deviceApiSupport) {
    problem = "NCCL reports no device-API (symmetric memory) support on this communicator: it needs CUDA VMM "
              "(NCCL_CUMEM_ENABLE=1, the default) and load/store access between the GPUs of a node";
  }
  if (!problem.empty()) {
    const std::string message = where("communicator check") + ": " + problem;
    abort();
    throw Error(ErrorKind::kNcclError, message);
  }
}

void Windows::allocate(std::size_t data_bytes) {
  require(State::kCommReady, "allocate");
  if (data_bytes == 0) throw Error(ErrorKind::kInvalidArgument, "data_bytes: expected > 0, got 0");
  if (data_bytes > (std::size_t(1) << 48)) {
    throw Error(ErrorKind::kInvalidArgument, "data_bytes: expected at most 2^48, got " + std::to_string(data_bytes));
  }
  data_bytes_ = (data_bytes + kWindowAlignment - 1) / kWindowAlignment * kWindowAlignment;
  const std::string step = "allocate(" + std::to_string(window_bytes()) + " bytes)";
  DeviceScope scope(device_, where(step));
  void* memory = nullptr;
  check(lib_, comm_, lib_.ncclMemAlloc(&memory, window_bytes()), where(step + ": ncclMemAlloc"));
  local_ = memory;
  state_ = State::kAllocated;
  if (reinterpret_cast<uintptr_t>(memory) % kWindowAlignment != 0) {
    throw Error(ErrorKind::kNcclError, where(step) + ": ncclMemAlloc returned an address that is not " +
                                           std::to_string(kWindowAlignment) + "-byte aligned");
  }
  // ncclMemAlloc does not clear memory, and the kernels' flags and counters start at zero.
  PrivateStream stream(where(step));
  check_cuda(cudaMemsetAsync(memory, 0, window_bytes(), stream.get()), where(step + ": cudaMemsetAsync"));
  stream.sync(where(step));
}

void Windows::register_window(double timeout_s) {
  require(State::kAllocated, "register_window");
  DeviceScope scope(device_, where("register_window"));
  window_ = nullptr;
  const ncclResult_t result =
      lib_.ncclCommWindowRegister(comm_, local_, window_bytes(), &window_, NCCL_WIN_COLL_SYMMETRIC);
  if (result != ncclSuccess && result != ncclInProgress) fail(result, "ncclCommWindowRegister");
  wait_ready("window registration (ncclCommWindowRegister)", timeout_s);
  if (window_ == nullptr) {
    // NCCL returns success without a window when the communicator lacks symmetric support.
    const std::string message = where("ncclCommWindowRegister") + " registered no window (no symmetric-memory support)";
    abort();
    throw Error(ErrorKind::kNcclError, message);
  }
  state_ = State::kRegistered;
  collect_lsa_pointers();
}

void Windows::collect_lsa_pointers() {
  const ncclTeam_t team = lib_.ncclTeamLsa(comm_);
  lsa_ = {team.rank, team.nRanks, team.stride};
  // moelink's nodes are runs of consecutive ranks with local rank = rank % ranks_per_node; NCCL
  // builds its LSA team the same way (a run of the same size on every rank). Refuse anything else
  // rather than hand the kernels a table whose order they would misread.
  if (lsa_.size < 1 || num_ranks_ % lsa_.size != 0 || lsa_.stride != 1 || lsa_.rank != rank_ % lsa_.size) {
    const std::string message =
        where("ncclTeamLsa") + ": unsupported LSA team {rank " + std::to_string(lsa_.rank) + ", size " +
        std::to_string(lsa_.size) + ", stride " + std::to_string(lsa_.stride) + "}: moelink needs consecutive ranks, " +
        "the same count on every node, with LSA rank = rank % size";
    abort();
    throw Error(ErrorKind::kNcclError, message);
  }
  lsa_ptrs_.assign(static_cast<std::size_t>(lsa_.size), 0);
  for (int peer = 0; peer < lsa_.size; ++peer) {
    void* base = nullptr;
    const ncclResult_t result = lib_.ncclGetLsaDevicePointer(window_, 0, peer, &base);
    if (result != ncclSuccess) fail(result, "ncclGetLsaDevicePointer(lsa rank " + std::to_string(peer) + ")");
    if (base == nullptr || reinterpret_cast<uintptr_t>(base) % kWindowAlignment != 0) {
      const std::string message = where("ncclGetLsaDevicePointer(lsa rank " + std::to_string(peer) + ")") +
                                  ": got a null or misaligned pointer";
      abort();
      throw Error(ErrorKind::kNcclError, message);
    }
    lsa_ptrs_[static_cast<std::size_t>(peer)] = reinterpret_cast<uintptr_t>(base);
  }
}

const ncclCommProperties_t& Windows::properties() const {
  if (state_ == State::kCreated || state_ == State::kClosed || state_ == State::kAborted) {
    throw Error(ErrorKind::kInvalidArgument, where("properties") + ": no communicator (state '" + state_name(state_) + "')");
  }
  return properties_;
}

LsaTeam Windows::lsa_team() const {
  require(State::kRegistered, "lsa_team");
  return lsa_;
}

std::vector<uintptr_t> Windows::lsa_window_ptrs() const {
  require(State::kRegistered, "lsa_window_ptrs");
  return lsa_ptrs_;
}

ncclComm_t Windows::comm() const {
  require(State::kRegistered, "comm");
  return comm_;
}

ncclWindow_t Windows::window() const {
  require(State::kRegistered, "window");
  return window_;
}

uintptr_t Windows::local_ptr() const {
  require(State::kRegistered, "local_ptr");
  return reinterpret_cast<uintptr_t>(local_);
}

uintptr_t Windows::counter_ptr(int link) const {
  require(State::kRegistered, "counter_ptr");
  if (link != 0 && link != 1) throw Error(ErrorKind::kInvalidArgument, "link: expected 0 (nvl) or 1 (rdma), got " + std::to_string(link));
  // Through this rank's own LSA mapping, the address every kernel access to the window uses.
  return lsa_ptrs_[static_cast<std::size_t>(lsa_.rank)] + data_bytes_ + kCounterOffset[link];
}

uint64_t Windows::read_counter(int link) const {
  const auto* counter = reinterpret_cast<const void*>(counter_ptr(link));
  DeviceScope scope(device_, where("read_counter"));
  PrivateStream stream(where("read_counter"));
  uint64_t value = 0;
  check_cuda(cudaMemcpyAsync(&value, counter, sizeof(value), cudaMemcpyDeviceToHost, stream.get()),
             where("read_counter: cudaMemcpyAsync"));
  stream.sync(where("read_counter"));
  return value;
}

void Windows::reset_counters() {
  require(State::kRegistered, "reset_counters");
  DeviceScope scope(device_, where("reset_counters"));
  PrivateStream stream(where("reset_counters"));
  for (int link = 0; link < 2; ++link) {
    check_cuda(cudaMemsetAsync(reinterpret_cast<void*>(counter_ptr(link)), 0, sizeof(uint64_t), stream.get()),
               where("reset_counters: cudaMemsetAsync"));
  }
  stream.sync(where("reset_counters"));
}

void Windows::close(double timeout_s) {
  if (state_ == State::kClosed || state_ == State::kAborted) return;
  try {
    DeviceScope scope(device_, where("close"));
    ncclResult_t result;
    if (window_ != nullptr) {
      if ((result = lib_.ncclCommWindowDeregister(comm_, window_)) != ncclSuccess) fail(result, "close: ncclCommWindowDeregister");
      window_ = nullptr;
    }
    if (local_ != nullptr) {
      if ((result = lib_.ncclMemFree(local_)) != ncclSuccess) fail(result, "close: ncclMemFree");
      local_ = nullptr;
    }
    if (comm_ != nullptr) {
      result = lib_.ncclCommFinalize(comm_);
      if (result != ncclSuccess && result != ncclInProgress) fail(result, "close: ncclCommFinalize");
      wait_ready("close: ncclCommFinalize", timeout_s);
      if ((result = lib_.ncclCommDestroy(comm_)) != ncclSuccess) fail(result, "close: ncclCommDestroy");
      comm_ = nullptr;
    }
    lsa_ptrs_.clear();
    state_ = State::kClosed;
  } catch (...) {
    abort();  // whatever is left goes the way that never waits
    throw;
  }
}

void Windows::abort() noexcept {
  if (state_ == State::kClosed || state_ == State::kAborted) return;
  DeviceScope scope(device_);
  if (comm_ != nullptr) {
    // Deregistering is local (it unmaps the peers' memory from this process) and drops NCCL's
    // reference on our allocation, so the ncclMemFree below can release it. Only a completed
    // registration: one still in flight belongs to NCCL's thread until the abort stops it.
    if (window_ != nullptr && state_ == State::kRegistered) lib_.ncclCommWindowDeregister(comm_, window_);
    lib_.ncclCommAbort(comm_);
  }
  if (local_ != nullptr) lib_.ncclMemFree(local_);
  comm_ = nullptr;
  window_ = nullptr;
  local_ = nullptr;
  lsa_ptrs_.clear();
  state_ = State::kAborted;
}

}  // namespace moelink::transport::nccl

#endif  // MOELINK_HAVE_NCCL
