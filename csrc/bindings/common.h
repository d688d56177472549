// Shared by every binding file: error translation and pointer conventions.
//
// Pointers cross the Python boundary as integers (tensor.data_ptr()); the Python layer owns the
// tensors, validates them and keeps them alive for the duration of the call. Every call that runs
// a kernel releases the GIL, so other Python threads (and the rank's NIC thread) keep going.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "runtime/errors.h"
#include "runtime/launch_context.h"

namespace moelink::bindings {

namespace py = pybind11;

// Maps moelink::Error onto moelink.errors.<Kind> (imported once, when the module loads).
void register_errors(py::module_& m);

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

inline LaunchContext context(uintptr_t stream, int rank) {
  LaunchContext ctx;
  ctx.stream = stream;
  ctx.rank = rank;
  return ctx;
}

// The keyword arguments every kernel-launching binding ends with.
#define MOELINK_CONTEXT_ARGS py::arg("stream") = 0, py::arg("rank") = -1

using release_gil = py::call_guard<py::gil_scoped_release>;

}  // namespace moelink::bindings
