// moelink._cuda.nccl: the GIN transport (csrc/transport/nccl/gin_transport.h) and its plan.
// Added to the nccl submodule by bind_nccl. plan_gin and the constants exist in every build (they
// need no NCCL call); GinTransport only with NCCL headers. Python side: moelink._gin.
#include <pybind11/stl.h>

#include <string>

#include "bindings/common.h"
#include "transport/nccl/gin_pump.h"
#include "transport/nccl/gin_transport.h"

namespace moelink::bindings {

namespace {

namespace nccl = ::moelink::transport::nccl;

const char* connection_name(nccl::GinConnection c) {
  switch (c) {
    case nccl::GinConnection::kFull: return "full";
    case nccl::GinConnection::kRail: return "rail";
    case nccl::GinConnection::kNone: break;
  }
  return "none";
}

py::dict plan_dict(const nccl::GinPlan& plan) {
  py::dict d;
  d["connection"] = connection_name(plan.connection);
  d["queue_depth"] = plan.queue_depth;
  d["context_count"] = plan.context_count;
  d["why"] = std::string(plan.why);
  return d;
}

}  // namespace

void bind_gin(py::module_& m) {
  m.attr("SCALE_OUT_KIND_GIN") = static_cast<int>(transport::ScaleOutKind::kGin);
  m.attr("GIN_RING_ENTRIES") = nccl::kGinRingEntries;
  m.attr("GIN_DEFAULT_QUEUE_DEPTH") = nccl::kGinDefaultQueueDepth;
  m.attr("GIN_MIN_QUEUE_DEPTH") = nccl::kGinMinQueueDepth;
  m.def(
      "plan_gin",
      [](int num_ranks, int lsa_size, int ranks_per_node, bool all_to_all, int queue_depth) {
        return plan_dict(nccl::plan_gin(num_ranks, lsa_size, ranks_per_node, all_to_all, queue_depth));
      },
      py::kw_only(), py::arg("num_ranks"), py::arg("lsa_size"), py::arg("ranks_per_node"), py::arg("all_to_all"),
      py::arg("queue_depth") = nccl::kGinDefaultQueueDepth,
      "What the GIN transport asks NCCL for (connection, queue depth, contexts, why); InvalidArgument if it cannot.");
  m.def("gin_descriptors", &nccl::gin_descriptors, py::arg("bytes"), py::arg("with_signal"),
        "Descriptors one work-queue entry takes on NCCL's PROXY backend (the credit count).");
  m.def("gin_flush_threshold", &nccl::gin_flush_threshold, py::arg("queue_depth"));
  m.def(
      "_gin_pump_registered", [](uintptr_t ring) { return nccl::gin_pump_registered(reinterpret_cast<const void*>(ring)); },
      py::arg("ring"), "Test hook: whether a ring is registered for with_gin_pump.");

#if MOELINK_HAVE_NCCL
  m.def(
      "check_gin",
      [](const nccl::Windows& windows, uint32_t num_signals, int ranks_per_node, bool all_to_all, int queue_depth) {
        int type = 0;
        py::dict d = plan_dict(nccl::check_gin(windows, num_signals, ranks_per_node, all_to_all, queue_depth, &type));
        d["gin_type"] = type;
        return d;
      },
      py::arg("windows"), py::arg("num_signals"), py::arg("ranks_per_node"), py::arg("all_to_all"),
      py::arg("queue_depth"), "The GIN transport's local checks (no collective): its plan and NCCL's backend.");
  using G = nccl::GinTransport;
  py::class_<G>(m, "GinTransport", py::module_local(),
                "One rank's GIN device communicator, work queue and pump (csrc/transport/nccl/gin_transport.h).")
      .def(py::init([](nccl::Windows& windows, uint32_t num_signals, int ranks_per_node, bool all_to_all,
                       int queue_depth, double timeout_s) {
             py::gil_scoped_release release;
             return new G(windows, num_signals, ranks_per_node, all_to_all, queue_depth, timeout_s);
           }),
           py::arg("windows"), py::arg("num_signals"), py::arg("ranks_per_node"), py::arg("all_to_all"),
           py::arg("queue_depth"), py::arg("timeout_s"), py::keep_alive<1, 2>())
      .def_property_readonly("plan", [](const G& g) { return plan_dict(g.plan()); })
      .def_property_readonly("gin_type", &G::gin_type)
      .def_property_readonly("ring_ptr", &G::ring_ptr)
      .def_property_readonly("state_ptr", &G::state_ptr)
      .def_property_readonly("num_signals", &G::num_signals)
      .def_property_readonly("closed", &G::closed)
      .def("close", &G::close, release_gil());
#endif
}

}  // namespace moelink::bindings
