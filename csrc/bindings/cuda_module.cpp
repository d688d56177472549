// moelink._cuda: the GPU build of every kernel. Imports on a machine without a driver or GPU
// (cudart is linked statically and libcuda is only looked for when a CUDA call is made);
// there, device_count() is 0 and a kernel call raises moelink.errors.GPUUnavailable.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <string>

#include "bindings/common.h"
#include "runtime/cuda_device.h"

// Written by setup.py; the fallbacks keep the file compilable on its own.
#ifndef MOELINK_BUILD_CUDA_ARCHS
#define MOELINK_BUILD_CUDA_ARCHS ""
#endif
#ifndef MOELINK_BUILD_NVCC_VERSION
#define MOELINK_BUILD_NVCC_VERSION ""
#endif
#ifndef MOELINK_BUILD_NCCL_HOME
#define MOELINK_BUILD_NCCL_HOME ""
#endif

namespace moelink::bindings {

// Every bind_*.cpp is compiled into both modules; a family is exposed here once its kernels are
// meant to run on the GPU. Both modules can be loaded in one process, so a py::class_ in a
// bind_*.cpp must be py::module_local() (else the second import fails: "already registered").
void bind_codecs(py::module_& m);
void bind_intranode(py::module_& m);
void bind_internode(py::module_& m);
void bind_low_latency(py::module_& m);
void bind_layout(py::module_& m);
void bind_nccl(py::module_& m);  // cuda_nccl.cpp: GPU only, not a bind_*.cpp
void bind_cuda_abort(py::module_& m);  // cuda_abort.cpp: the GPU AbortRecord
void bind_cuda_proof(py::module_& m);  // cuda_proof.cpp: the one-GPU proof's streams and memory
void bind_selftest(py::module_& m);

namespace {

// setup.py ships the ptxas report of this build beside the module file.
std::string ptxas_report() {
  py::object module_file = py::module_::import("moelink._cuda").attr("__file__");
  py::object report = py::module_::import("pathlib").attr("Path")(module_file).attr("with_name")(
      "_ptxas_report.txt");
  if (!report.attr("is_file")().cast<bool>()) return std::string();
  return report.attr("read_text")().cast<std::string>();
}

py::dict build_info() {
  py::dict info;
  py::list archs;
  const std::string arch_list = MOELINK_BUILD_CUDA_ARCHS;
  for (size_t start = 0; start < arch_list.size();) {
    const size_t end = std::min(arch_list.find(',', start), arch_list.size());
    archs.append(arch_list.substr(start, end - start));
    start = end + 1;
  }
  const std::string nccl_home = MOELINK_BUILD_NCCL_HOME;
  info["archs"] = archs;
  info["nvcc_version"] = MOELINK_BUILD_NVCC_VERSION;
  info["nccl_found"] = !nccl_home.empty();
  info["nccl_include"] = nccl_home.empty() ? py::object(py::none()) : py::str(nccl_home + "/include");
  info["cudart_version"] = moelink::cuda::runtime_version();
  info["driver_version"] = moelink::cuda::driver_version();
  info["wait_timeout_s"] = moelink::cuda::wait_timeout_seconds();
  return info;
}

}  // namespace
}  // namespace moelink::bindings

PYBIND11_MODULE(_cuda, m) {
  using namespace moelink::bindings;
  m.doc() = "moelink GPU target: kernels compiled by nvcc, launched on CUDA streams";
  m.attr("TARGET") = "cuda";
  register_errors(m);
  m.def("device_count", &moelink::cuda::device_count,
        "Number of CUDA devices; 0 when there is no driver or no device. Never raises.");
  m.def("ptxas_report", &ptxas_report,
        "ptxas resource report (-Xptxas -v) of every .cu file of this build; '' if not shipped.");
  m.def("build_info", &build_info,
        "How this module was built: archs, nvcc_version, nccl_found/nccl_include, plus the "
        "cudart and driver versions (0 = no driver) and the wait deadline in seconds.");
  bind_layout(m);
  bind_selftest(m);
  bind_intranode(m);
  bind_internode(m);
  bind_low_latency(m);
  bind_codecs(m);
  bind_nccl(m);
  bind_cuda_abort(m);
  bind_cuda_proof(m);
}
