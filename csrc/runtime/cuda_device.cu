// Device bring-up for the GPU target (see cuda_device.h).
#include "runtime/cuda_device.h"

#include <cuda_runtime.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
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
  std::vector<const void*> symbols;
  std::vector<bool> ready;  // indexed by device
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
void install_wait_timeout(const std::vector<const void*>& symbols) {
  const uint64_t timeout_ns = static_cast<uint64_t>(wait_timeout_seconds() * 1e9);
  RelaxedCaptureMode relaxed;
  cudaStream_t stream = nullptr;
  check(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
  cudaError_t err = cudaSuccess;
  for (const void* symbol : symbols) {
    err = cudaMemcpyToSymbolAsync(symbol, &timeout_ns, sizeof(timeout_ns), 0,
                                  cudaMemcpyHostToDevice, stream);
    if (err != cudaSuccess) break;
  }
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  check(err, "installing the wait deadline (cudaMemcpyToSymbolAsync)");
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
  install_wait_timeout(r.symbols);
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
