// Device bring-up for the GPU target: is a GPU usable, and is the wait deadline installed on it.
//
// Declared without any CUDA type so that g++-compiled files (the pybind11 module) can include it;
// defined in cuda_device.cu. Part of moelink._cuda only.
#pragma once

#include "runtime/abort_record.h"

namespace moelink::cuda {

// Number of CUDA devices; 0 when there is no driver or no device. Never throws: this is what
// `moelink._cuda.device_count()` returns on a CPU-only machine.
int device_count() noexcept;

// Called by MOELINK_LAUNCH before every launch. Returns the current device. The first call per
// device installs the wait deadline (MOELINK_TIMEOUT_S) in every registered timeout symbol.
// Throws moelink::Error(kGpuUnavailable) when no device is usable, with CUDA's reason, and
// moelink::Error(kCudaError) when a CUDA call fails. Safe to call during CUDA graph capture.
int ensure_device_ready();

// Each nvcc translation unit owns a copy of the `__device__` deadline variable that wait_until
// reads (no -rdc, so a device variable cannot be shared between TUs); arch_cuda.cuh registers
// the host shadow of that copy here during static initialisation.
void register_wait_timeout_symbol(const void* device_symbol);

// Same for the device pointer to the process's AbortRecord (runtime/abort_record.h), which
// ensure_device_ready allocates once per process (mapped, pinned host memory) and installs.
void register_abort_record_symbol(const void* device_symbol);

// The process's AbortRecord as the host sees it, or nullptr before the first launch. The host
// reads it without synchronising: `published` (acquire) says the other fields are complete.
const AbortRecord* abort_record() noexcept;
// Forgets a recorded abort (after the host raised it), so later kernels run normally again.
void clear_abort_record() noexcept;

// The wait deadline in seconds: MOELINK_TIMEOUT_S when it is a positive number, else 100.
double wait_timeout_seconds();

// CUDA runtime version moelink was linked with (static cudart), e.g. 13000.
int runtime_version() noexcept;
// Installed driver's CUDA version, 0 when there is no driver.
int driver_version() noexcept;

}  // namespace moelink::cuda
