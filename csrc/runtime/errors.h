// C++ exceptions the extension throws; csrc/bindings/common.h maps each kind onto the Python class
// of the same name in moelink.errors. Both targets use them; nothing here depends on CUDA.
#pragma once

#include <stdexcept>
#include <string>

namespace moelink {

enum class ErrorKind {
  kInvalidArgument,  // -> moelink.errors.InvalidArgument (a C++-side validation failed)
  kCommTimeout,      // -> moelink.errors.CommTimeout (a wait reached its deadline)
  kDeviceAssert,     // -> moelink.errors.DeviceAssert (MOELINK_DEVICE_CHECK failed)
  kDeadlock,         // -> moelink.errors.Deadlock (host launch can never finish)
  kGpuUnavailable,   // -> moelink.errors.GPUUnavailable (no driver, no device)
  kCudaError,        // -> moelink.errors.CudaError (a CUDA API call failed; the CUDA error text)
  kNcclUnavailable,  // -> moelink.errors.NcclUnavailable (libnccl missing, unloadable, too old)
  kNcclError,        // -> moelink.errors.NcclError (an NCCL call failed; NCCL's result and text)
};

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

}  // namespace moelink
