// Controls of the SIMT host runtime, exposed as moelink._host.simt (wrapped by moelink.runtime).
#include <pybind11/stl.h>

#include "bindings/common.h"
#include "simt/runtime.h"

namespace moelink::bindings {

void bind_simt(py::module_& parent) {
  py::module_ m = parent.def_submodule("simt", "SIMT host runtime controls (csrc/simt/runtime.h).");
  m.def("set_wait_timeout", &simt::set_wait_timeout, py::arg("seconds"),
        "Deadline of every spin-wait in seconds (initially MOELINK_TIMEOUT_S or 100).");
  m.def("wait_timeout", &simt::wait_timeout);
  m.def("set_schedule", &simt::set_schedule, py::arg("spec"),
        "'deterministic' or 'random:<seed>[:<p>]' (initially MOELINK_SIMT_SCHEDULE).");
  m.def("schedule", &simt::schedule);
  m.def("stack_bytes", &simt::stack_bytes);
  m.def(
      "last_timeout",
      []() -> py::object {
        const simt::TimeoutInfo t = simt::last_timeout();
        if (!t.valid) return py::none();
        py::dict d;
        d["kernel"] = t.kernel;
        d["rank"] = t.rank;
        d["peer"] = t.peer;
        d["channel"] = t.channel;
        d["what"] = t.what;
        d["waited_s"] = static_cast<double>(t.waited_ns) / 1e9;
        d["peers_waited"] = t.peers_waited;
        return d;
      },
      "The facts of the calling thread's last launch if it timed out (kernel, rank, peer, channel, what, waited_s, "
      "peers_waited), else None.");
  m.def("stats", [] {
    const simt::Stats s = simt::stats();
    py::dict d;
    d["launches"] = s.launches;
    d["fibers"] = s.fibers;
    d["switches"] = s.switches;
    d["parked_waits"] = s.parked_waits;
    d["polls"] = s.polls;
    d["idle_sleeps"] = s.idle_sleeps;
    return d;
  });
}

}  // namespace moelink::bindings
