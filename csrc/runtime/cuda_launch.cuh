// MOELINK_LAUNCH for the GPU target (contract: arch/arch.cuh). Host code, included at the end of
// arch_cuda.cuh so that every launcher sees it; compiled by nvcc only.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>
#include <utility>

#include "runtime/cuda_device.h"
#include "runtime/errors.h"
#include "runtime/launch_context.h"

namespace moelink::arch {

namespace detail {

inline void check_launch(cudaError_t err, const char* kernel_name, const char* call) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // clear it: a failed launch must not fail the caller's next CUDA call
  throw Error(ErrorKind::kCudaError, std::string(kernel_name) + ": " + call + " failed: " +
                                         cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                                         ")");
}

}  // namespace detail

// Dynamic shared memory beyond 48 KiB must be opted into per kernel (CUDA programming guide,
// "Shared Memory"); the attribute is per device, so it is set on every such launch (a cheap call).
template <bool kCooperative = false, typename... Params, typename... Args>
inline void launch(const LaunchContext& ctx, const char* name, void (*kernel)(Params...),
                   unsigned grid_blocks, unsigned block_threads, size_t dynamic_smem_bytes,
                   Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "MOELINK_LAUNCH: the number of arguments differs from the kernel's parameters");
  ::moelink::cuda::ensure_device_ready();
  if (dynamic_smem_bytes > 48 * 1024) {
    detail::check_launch(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              static_cast<int>(dynamic_smem_bytes)),
                         name, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(grid_blocks);
  config.blockDim = dim3(block_threads);
  config.dynamicSmemBytes = dynamic_smem_bytes;
  config.stream = reinterpret_cast<cudaStream_t>(ctx.stream);
  cudaLaunchAttribute attribute = {};
  if constexpr (kCooperative) {
    attribute.id = cudaLaunchAttributeCooperative;
    attribute.val.cooperative = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  cudaError_t err;
  if constexpr (sizeof...(Params) == 0) {
    err = cudaLaunchKernelExC(&config, reinterpret_cast<const void*>(kernel), nullptr);
  } else {
    err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);  // converts to Params
  }
  const cudaError_t pending = cudaGetLastError();
  const cudaError_t failed = err != cudaSuccess ? err : pending;
  if (kCooperative && failed == cudaErrorCooperativeLaunchTooLarge) {
    throw Error(ErrorKind::kInvalidArgument,
                std::string(name) + ": a grid of " + std::to_string(grid_blocks) + " blocks of " +
                    std::to_string(block_threads) + " threads cannot be resident on this GPU at once, and its "
                    "blocks wait on each other: lower num_sms (Buffer.set_num_sms / Config.num_sms)");
  }
  detail::check_launch(failed, name, "launch");
}

}  // namespace moelink::arch

// The kernel may be a template-id with commas (`k<A, B>`): taking it inside the variadic tail
// keeps those commas out of macro argument splitting.
#define MOELINK_LAUNCH(ctx, name, ...) ::moelink::arch::launch<false>((ctx), (name), __VA_ARGS__)
#define MOELINK_LAUNCH_COOPERATIVE(ctx, name, ...) ::moelink::arch::launch<true>((ctx), (name), __VA_ARGS__)
