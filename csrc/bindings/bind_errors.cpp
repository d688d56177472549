#include <pybind11/pybind11.h>

#include "bindings/common.h"

namespace moelink::bindings {

namespace {

const char* python_name(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument: return "InvalidArgument";
    case ErrorKind::kCommTimeout: return "CommTimeout";
    case ErrorKind::kDeviceAssert: return "DeviceAssert";
    case ErrorKind::kDeadlock: return "Deadlock";
    case ErrorKind::kGpuUnavailable: return "GPUUnavailable";
    case ErrorKind::kCudaError: return "CudaError";
    case ErrorKind::kNcclUnavailable: return "NcclUnavailable";
    case ErrorKind::kNcclError: return "NcclError";
  }
  return "MoelinkError";
}

}  // namespace

void register_errors(py::module_& m) {
  // Held for the life of the process: translators run after module objects may be gone.
  static py::module_* errors = new py::module_(py::module_::import("moelink.errors"));
  (void)m;
  py::register_exception_translator([](std::exception_ptr pending) {
    try {
      if (pending) std::rethrow_exception(pending);
    } catch (const Error& e) {
      py::object cls = errors->attr(python_name(e.kind()));
      PyErr_SetString(cls.ptr(), e.what());
    }
  });
}

}  // namespace moelink::bindings
