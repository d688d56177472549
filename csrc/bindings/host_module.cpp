// moelink._host: the SIMT host runtime and the host build of every kernel.
#include "bindings/common.h"

namespace moelink::bindings {
void bind_codecs(py::module_& m);
void bind_layout(py::module_& m);
void bind_intranode(py::module_& m);
void bind_internode(py::module_& m);
void bind_low_latency(py::module_& m);
void bind_selftest(py::module_& m);
void bind_simt(py::module_& m);
void bind_transport(py::module_& m);
void bind_nic(py::module_& m);
}  // namespace moelink::bindings

PYBIND11_MODULE(_host, m) {
  using namespace moelink::bindings;
  m.doc() = "moelink host target: kernels run on the CPU under the SIMT runtime";
  m.attr("TARGET") = "host";
  register_errors(m);
  bind_simt(m);
  bind_layout(m);
  bind_selftest(m);
  bind_intranode(m);
  bind_internode(m);
  bind_low_latency(m);
  bind_codecs(m);
  bind_transport(m);
  bind_nic(m);
}
