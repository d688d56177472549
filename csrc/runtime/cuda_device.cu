// Device bring-up for the GPU target (see cuda_device.h).
#include "runtime/cuda_device.h"

#include <cuda_runtime.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/errors.h"

namespace moelink::cuda {
namespace {

constexpr double kDefaultTimeoutS = 100.0;

std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // do not leave the error behind for the next unrelated check
    throw Error(ErrorKind::kCudaError, std::string(what) + " failed: " + describe(err));
  }
}

// Registered deadline symbols and the devices on which they hold the configured value.
struct Registry {
  std::mutex mutex;
  std::vector<const void*> symbols;        // g_wait_timeout_ns of every TU
  std::vector<const void*> abort_symbols;  // g_abort_record of every TU
  std::vector<bool> ready;                 // indexed by device
  AbortRecord* abort_host = nullptr;       // mapped pinned memory, one per process
  AbortRecord* abort_device = nullptr;     // the same memory as the device addresses it
};

Registry& registry() {
  static Registry instance;  // constructed on first use: registration runs in static init
  return instance;
}

// Empty when a device is usable, else the reason. Evaluated once: the driver does not appear
// while a process runs.
const std::string& unavailable_reason() {
  static const std::string reason = [] {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return "no usable CUDA device: cudaGetDeviceCount failed with " + describe(err) +
             ". The GPU target needs an NVIDIA driver and GPU; on a CPU-only machine use the host "
             "target (moelink._host).";
    }
    if (count == 0) return std::string("no usable CUDA device: the driver reports 0 devices");
    return std::string();
  }();
  return reason;
}

// Restores the caller's stream-capture mode on scope exit. Relaxed mode lets the one-time
// set-up below run even when the first launch on a device happens while a graph is captured.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCaptureMode() { cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

// Writes the deadline into every registered symbol on the current device. A private
// non-blocking stream keeps the copies out of the legacy stream, which would synchronise with
// (and break) a capture in progress on another stream.
void install_wait_symbols(Registry& r) {
  const uint64_t timeout_ns = static_cast<uint64_t>(wait_timeout_seconds() * 1e9);
  RelaxedCaptureMode relaxed;
  if (r.abort_host == nullptr) {
    // Portable: every device of the process maps it; the record is process-wide.
    void* host = nullptr;
    check(cudaHostAlloc(&host, sizeof(AbortRecord), cudaHostAllocMapped | cudaHostAllocPortable),
          "cudaHostAlloc (abort record)");
    std::memset(host, 0, sizeof(AbortRecord));
    void* device = nullptr;
    check(cudaHostGetDevicePointer(&device, host, 0), "cudaHostGetDevicePointer (abort record)");
    r.abort_host = static_cast<AbortRecord*>(host);
    r.abort_device = static_cast<AbortRecord*>(device);
  }
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  cudaError_t err = cudaSuccess;
  for (const void* symbol : r.symbols) {
    err = cudaMemcpyToSymbolAsync(symbol, &timeout_ns, sizeof(timeout_ns), 0,
                                  cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) break;
  }
  for (size_t i = 0; err == cudaSuccess && i < r.abort_symbols.size(); ++i) {
    err = cudaMemcpyToSymbolAsync(r.abort_symbols[i], &r.abort_device, sizeof(r.abort_device), 0,
                                  cudaMemcpyHostToDevice, stream);
  }
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  check(err, "installing the wait deadline and abort record (cudaMemcpyToSymbolAsync)");
}

}  // namespace

int device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return count;
}

int ensure_device_ready() {
  if (!unavailable_reason().empty()) throw Error(ErrorKind::kGpuUnavailable, unavailable_reason());
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");

  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  const size_t index = static_cast<size_t>(device);
  if (index < r.ready.size() && r.ready[index]) return device;
  install_wait_symbols(r);
  if (r.ready.size() <= index) r.ready.resize(index + 1, false);
  r.ready[index] = true;
  return device;
}

void register_wait_timeout_symbol(const void* device_symbol) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.symbols.push_back(device_symbol);
  r.ready.assign(r.ready.size(), false);  // a late registrant must be written on every device
}

void register_abort_record_symbol(const void* device_symbol) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  r.abort_symbols.push_back(device_symbol);
  r.ready.assign(r.ready.size(), false);
}

const AbortRecord* abort_record() noexcept { return registry().abort_host; }

void clear_abort_record() noexcept {
  AbortRecord* record = registry().abort_host;
  if (record == nullptr) return;
  __atomic_store_n(&record->published, 0u, __ATOMIC_RELAXED);
  std::memset(record->what, 0, sizeof record->what);
  __atomic_store_n(&record->state, 0u, __ATOMIC_RELEASE);
}

double wait_timeout_seconds() {
  static const double seconds = [] {
    const char* text = std::getenv("MOELINK_TIMEOUT_S");
    if (text == nullptr || *text == '\0') return kDefaultTimeoutS;
    char* end = nullptr;
    errno = 0;
    const double value = std::strtod(text, &end);
    // Upper bound keeps the nanosecond count inside uint64_t (~584 years).
    if (errno != 0 || *end != '\0' || !std::isfinite(value) || value <= 0 || value > 1e9) {
      std::fprintf(stderr, "moelink: ignoring MOELINK_TIMEOUT_S=\"%s\" (want seconds > 0); using %g\n",
                   text, kDefaultTimeoutS);
      return kDefaultTimeoutS;
    }
    return value;
  }();
  return seconds;
}

int runtime_version() noexcept {
  int version = 0;
  if (cudaRuntimeGetVersion(&version) != cudaSuccess) cudaGetLastError();
  return version;
}

int driver_version() noexcept {
  int version = 0;  // cudaDriverGetVersion reports 0 (and succeeds) when no driver is installed
  if (cudaDriverGetVersion(&version) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return version;
}

}  // namespace moelink::cuda
