// moelink._host.transport.HostNic: the emulated IBGDA NIC of one rank (csrc/transport/host/nic.h).
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "transport/host/host_windows.h"
#include "transport/host/nic.h"

namespace moelink::bindings {

void bind_nic(py::module_& m) {
  using transport::host::HostNic;
  using transport::host::HostWindows;
  py::module_ t = m.attr("transport").cast<py::module_>();
  py::class_<HostNic>(t, "HostNic",
                      "One rank's emulated NIC: a work queue kernels post to and a thread that executes it "
                      "(csrc/transport/host/nic.h). Close it before its windows.")
      .def(py::init([](HostWindows& windows, size_t entries, uint32_t num_signals, double gbps, double latency_us) {
             return new HostNic(windows, entries, num_signals, transport::host::NicShaping{gbps, latency_us});
           }),
           py::arg("windows"), py::arg("entries"), py::arg("num_signals"), py::arg("gbps") = 0.0,
           py::arg("latency_us") = 0.0, py::keep_alive<1, 2>())
      .def_property_readonly("ring_ptr", [](const HostNic& nic) { return reinterpret_cast<uintptr_t>(nic.ring()); })
      .def_property_readonly("num_signals", &HostNic::num_signals)
      .def_property_readonly("entries_done", &HostNic::entries_done)
      .def_property_readonly("is_closed", &HostNic::is_closed)
      .def_property_readonly("busy_ns", &HostNic::busy_ns, "ns spent delivering since reset_busy()")
      .def("reset_busy", &HostNic::reset_busy)
      .def("error", &HostNic::error, "Empty, or why the NIC stopped consuming its queue.")
      .def("wait_idle", &HostNic::wait_idle, py::arg("timeout_s"),
           "Waits until every entry posted so far is done; False on timeout or a stopped NIC.", release_gil())
      .def("close", &HostNic::close, "Stops and joins the NIC thread. Idempotent.", release_gil());
}

}  // namespace moelink::bindings
