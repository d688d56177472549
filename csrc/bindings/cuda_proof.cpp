// moelink._cuda.proof: the CUDA plumbing of the one-GPU proof (python/moelink/proof/), which runs
// N ranks as N streams of one process on one GPU. Nothing here launches a moelink kernel: the
// harness calls the ordinary bindings (moelink._cuda.intranode, ...) with these streams and with
// windows carved out of one cudaMalloc, so the kernels run exactly as they do for a Buffer.
//
//   memory    malloc/free (cudaMalloc: plain device memory, never managed), memset, copies
//             between device memory and host memory (a CPU tensor's data_ptr()), synchronous.
//   streams   non-blocking streams (one per rank), a non-blocking completion query, events.
//   graphs    stream capture. probe_begin/probe_end capture what one rank's call would launch
//             without running it and report each kernel's grid, block, dynamic shared memory and
//             the blocks one SM holds at once (cudaOccupancyMaxActiveBlocksPerMultiprocessor), so
//             the harness can refuse a set of grids that cannot all be resident at once (the
//             ranks' grids wait on each other) with a message instead of a timeout. The same
//             capture, across every rank's stream, gives a graph to replay (the benchmark, and a
//             check that the kernels are CUDA-graph safe).
//   device    the properties the harness sizes grids with.
// Pointers and handles are integers. Every call checks its CUDA result and raises
// moelink.errors.CudaError with CUDA's name and text (GPUUnavailable without a usable device).
#include <cuda_runtime.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "runtime/cuda_device.h"

namespace moelink::bindings {

namespace {

void check(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // a non-sticky error must not fail the next unrelated call
  throw Error(ErrorKind::kCudaError, "proof: " + what + " failed: " + cudaGetErrorName(err) + " (" +
                                         cudaGetErrorString(err) + ")");
}

// cudaMemset on device memory and cudaMemcpy from pageable host memory may return before the
// device has finished (the DMA from the staging buffer is still in flight); both run on the legacy
// stream, which the harness's non-blocking streams do not wait for. Waiting for the legacy stream
// makes them complete before a kernel on any stream can read the bytes.
void settle(const std::string& what) { check(cudaStreamSynchronize(cudaStreamLegacy), what + " (cudaStreamSynchronize)"); }

template <typename T>
T* handle(uintptr_t h) {
  return reinterpret_cast<T*>(h);
}

int attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  check(cudaDeviceGetAttribute(&value, attr, device), "cudaDeviceGetAttribute");
  return value;
}

py::dict device_info() {
  const int device = cuda::ensure_device_ready();
  cudaDeviceProp prop{};
  check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  py::dict d;
  d["device"] = device;
  d["name"] = std::string(prop.name);
  d["total_bytes"] = static_cast<uint64_t>(prop.totalGlobalMem);
  d["cc"] = std::to_string(attribute(cudaDevAttrComputeCapabilityMajor, device)) + "." +
            std::to_string(attribute(cudaDevAttrComputeCapabilityMinor, device));
  d["sm_count"] = attribute(cudaDevAttrMultiProcessorCount, device);
  d["max_threads_per_sm"] = attribute(cudaDevAttrMaxThreadsPerMultiProcessor, device);
  d["registers_per_sm"] = attribute(cudaDevAttrMaxRegistersPerMultiprocessor, device);
  d["smem_per_sm"] = attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  d["smem_per_block_optin"] = attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  d["l2_bytes"] = attribute(cudaDevAttrL2CacheSize, device);
  d["cooperative_launch"] = attribute(cudaDevAttrCooperativeLaunch, device) != 0;
  d["concurrent_kernels"] = attribute(cudaDevAttrConcurrentKernels, device) != 0;
  d["unified_addressing"] = attribute(cudaDevAttrUnifiedAddressing, device) != 0;
  d["driver_version"] = cuda::driver_version();
  d["runtime_version"] = cuda::runtime_version();
  return d;
}

// What one captured kernel node would launch, and how many of its blocks fit one SM.
py::dict kernel_entry(cudaGraphNode_t node) {
  cudaKernelNodeParams params{};
  check(cudaGraphKernelNodeGetParams(node, &params), "cudaGraphKernelNodeGetParams");
  const unsigned threads = params.blockDim.x * params.blockDim.y * params.blockDim.z;
  const unsigned blocks = params.gridDim.x * params.gridDim.y * params.gridDim.z;
  int per_sm = 0;
  check(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, params.func, static_cast<int>(threads),
                                                      params.sharedMemBytes),
        "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
  cudaFuncAttributes attrs{};
  check(cudaFuncGetAttributes(&attrs, params.func), "cudaFuncGetAttributes");
  const char* name = nullptr;
  if (cudaFuncGetName(&name, params.func) != cudaSuccess || name == nullptr) {
    cudaGetLastError();
    name = "?";
  }
  cudaLaunchAttributeValue cooperative{};
  bool is_cooperative = false;
  if (cudaGraphKernelNodeGetAttribute(node, cudaLaunchAttributeCooperative, &cooperative) == cudaSuccess) {
    is_cooperative = cooperative.cooperative != 0;
  } else {
    cudaGetLastError();
  }
  py::dict d;
  d["name"] = std::string(name);
  d["grid_blocks"] = blocks;
  d["block_threads"] = threads;
  d["dynamic_smem_bytes"] = static_cast<uint64_t>(params.sharedMemBytes);
  d["registers"] = attrs.numRegs;
  d["local_bytes"] = static_cast<uint64_t>(attrs.localSizeBytes);
  d["blocks_per_sm"] = per_sm;
  d["cooperative"] = is_cooperative;
  return d;
}

py::list graph_kernels(cudaGraph_t graph) {
  size_t count = 0;
  check(cudaGraphGetNodes(graph, nullptr, &count), "cudaGraphGetNodes");
  std::vector<cudaGraphNode_t> nodes(count);
  if (count > 0) check(cudaGraphGetNodes(graph, nodes.data(), &count), "cudaGraphGetNodes");
  py::list kernels;
  for (cudaGraphNode_t node : nodes) {
    cudaGraphNodeType type;
    check(cudaGraphNodeGetType(node, &type), "cudaGraphNodeGetType");
    if (type == cudaGraphNodeTypeKernel) kernels.append(kernel_entry(node));
  }
  return kernels;
}

}  // namespace

void bind_cuda_proof(py::module_& parent) {
  py::module_ m = parent.def_submodule("proof", "CUDA plumbing of the one-GPU proof (python/moelink/proof/).");

  m.def("device_info", &device_info, "Properties of the current device the harness sizes grids with.");

  // ---- memory ----
  m.def(
      "malloc",
      [](size_t bytes) {
        cuda::ensure_device_ready();
        void* p = nullptr;
        check(cudaMalloc(&p, bytes > 0 ? bytes : 1), "cudaMalloc(" + std::to_string(bytes) + " bytes)");
        return reinterpret_cast<uintptr_t>(p);
      },
      py::arg("bytes"), "cudaMalloc; returns the device address (256-byte aligned).");
  m.def("free", [](uintptr_t p) { check(cudaFree(handle<void>(p)), "cudaFree"); }, py::arg("ptr"));
  m.def(
      "memset",
      [](uintptr_t p, int value, size_t bytes) {
        check(cudaMemset(handle<void>(p), value, bytes), "cudaMemset");
        settle("cudaMemset");
      },
      py::arg("ptr"), py::arg("value"), py::arg("bytes"), "Returns once the bytes are set on the device.",
      release_gil());
  m.def(
      "copy",
      [](uintptr_t dst, uintptr_t src, size_t bytes) {
        if (bytes == 0) return;
        check(cudaMemcpy(handle<void>(dst), handle<const void>(src), bytes, cudaMemcpyDefault), "cudaMemcpy");
        settle("cudaMemcpy");
      },
      py::arg("dst"), py::arg("src"), py::arg("bytes"),
      "cudaMemcpy with cudaMemcpyDefault (unified addressing picks the direction): device memory and host "
      "memory (a CPU tensor's data_ptr()) in any combination; returns once the bytes are in place. It "
      "does not wait for the non-blocking streams the harness launches on: synchronise those first.",
      release_gil());

  // ---- streams and events ----
  m.def(
      "stream_create",
      []() {
        cuda::ensure_device_ready();
        cudaStream_t s = nullptr;
        check(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
        return reinterpret_cast<uintptr_t>(s);
      },
      "A non-blocking stream (never synchronises with the legacy stream).");
  m.def("stream_destroy", [](uintptr_t s) { check(cudaStreamDestroy(handle<CUstream_st>(s)), "cudaStreamDestroy"); },
        py::arg("stream"));
  m.def(
      "stream_done",
      [](uintptr_t s) {
        const cudaError_t err = cudaStreamQuery(handle<CUstream_st>(s));
        if (err == cudaErrorNotReady) {
          cudaGetLastError();
          return false;
        }
        check(err, "cudaStreamQuery");
        return true;
      },
      py::arg("stream"), "True once everything queued on the stream finished; raises if a kernel failed.");
  m.def("stream_synchronize",
        [](uintptr_t s) { check(cudaStreamSynchronize(handle<CUstream_st>(s)), "cudaStreamSynchronize"); },
        py::arg("stream"), release_gil());
  m.def(
      "device_synchronize", []() { check(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); },
      "Waits for the whole device; raises CudaError when the context holds a sticky error (a trap, a fault).",
      release_gil());
  m.def(
      "event_create",
      []() {
        cudaEvent_t e = nullptr;
        check(cudaEventCreate(&e), "cudaEventCreate");
        return reinterpret_cast<uintptr_t>(e);
      },
      "A timing event.");
  m.def("event_destroy", [](uintptr_t e) { check(cudaEventDestroy(handle<CUevent_st>(e)), "cudaEventDestroy"); },
        py::arg("event"));
  m.def(
      "event_record",
      [](uintptr_t e, uintptr_t s) { check(cudaEventRecord(handle<CUevent_st>(e), handle<CUstream_st>(s)), "cudaEventRecord"); },
      py::arg("event"), py::arg("stream"));
  m.def(
      "stream_wait_event",
      [](uintptr_t s, uintptr_t e) {
        check(cudaStreamWaitEvent(handle<CUstream_st>(s), handle<CUevent_st>(e), 0), "cudaStreamWaitEvent");
      },
      py::arg("stream"), py::arg("event"));
  m.def(
      "event_elapsed_ms",
      [](uintptr_t start, uintptr_t end) {
        float ms = 0;
        check(cudaEventElapsedTime(&ms, handle<CUevent_st>(start), handle<CUevent_st>(end)), "cudaEventElapsedTime");
        return ms;
      },
      py::arg("start"), py::arg("end"), "Milliseconds between two completed events.");

  // ---- stream capture, graphs and the launch probe ----
  m.def(
      "capture_begin",
      [](uintptr_t s) {
        cuda::ensure_device_ready();  // one-time set-up outside the capture
        check(cudaStreamBeginCapture(handle<CUstream_st>(s), cudaStreamCaptureModeRelaxed), "cudaStreamBeginCapture");
      },
      py::arg("stream"),
      "Starts capturing `stream` (relaxed mode): work queued on it, and on streams that wait on its events, "
      "is recorded into a graph instead of running.");
  m.def(
      "capture_end",
      [](uintptr_t s) {
        cudaGraph_t graph = nullptr;
        check(cudaStreamEndCapture(handle<CUstream_st>(s), &graph), "cudaStreamEndCapture");
        return reinterpret_cast<uintptr_t>(graph);
      },
      py::arg("stream"), "Ends the capture; returns the graph (free it with graph_destroy).");
  m.def("graph_kernels", [](uintptr_t g) { return graph_kernels(handle<CUgraph_st>(g)); }, py::arg("graph"),
        "Every kernel node of the graph: name, grid_blocks, block_threads, dynamic_smem_bytes, registers, "
        "local_bytes, blocks_per_sm (occupancy API), cooperative.");
  m.def("graph_destroy", [](uintptr_t g) { check(cudaGraphDestroy(handle<CUgraph_st>(g)), "cudaGraphDestroy"); },
        py::arg("graph"));
  m.def(
      "graph_instantiate",
      [](uintptr_t g) {
        cudaGraphExec_t exec = nullptr;
        check(cudaGraphInstantiate(&exec, handle<CUgraph_st>(g), 0), "cudaGraphInstantiate");
        return reinterpret_cast<uintptr_t>(exec);
      },
      py::arg("graph"));
  m.def(
      "graph_launch",
      [](uintptr_t exec, uintptr_t s) {
        check(cudaGraphLaunch(handle<CUgraphExec_st>(exec), handle<CUstream_st>(s)), "cudaGraphLaunch");
      },
      py::arg("exec"), py::arg("stream"));
  m.def("graph_exec_destroy",
        [](uintptr_t exec) { check(cudaGraphExecDestroy(handle<CUgraphExec_st>(exec)), "cudaGraphExecDestroy"); },
        py::arg("exec"));
}

}  // namespace moelink::bindings
