#include "bindings/common.h"
#include "runtime/ops_selftest.h"

namespace moelink::bindings {

void bind_selftest(py::module_& parent) {
  py::module_ m = parent.def_submodule("selftest", "Kernels that exercise the device primitives (ops_selftest.h).");
  m.attr("WARP_OP_RESULTS") = selftest::kWarpOpResults;
  m.def(
      "warp_ops",
      [](uintptr_t in, uintptr_t out, uintptr_t out_float, int blocks, int threads, uintptr_t stream, int rank) {
        selftest::warp_ops(ptr<const int32_t>(in), ptr<int32_t>(out), ptr<float>(out_float), blocks, threads,
                           context(stream, rank));
      },
      py::arg("input"), py::arg("out"), py::arg("out_float"), py::arg("blocks"), py::arg("threads"),
      MOELINK_CONTEXT_ARGS, release_gil());
  m.def(
      "named_barriers",
      [](uintptr_t out, int rounds, uintptr_t stream, int rank) {
        selftest::named_barriers(ptr<int32_t>(out), rounds, context(stream, rank));
      },
      py::arg("out"), py::arg("rounds"), MOELINK_CONTEXT_ARGS, release_gil());
  m.def(
      "intrawarp_spin",
      [](uintptr_t out, uintptr_t stream, int rank) { selftest::intrawarp_spin(ptr<int32_t>(out), context(stream, rank)); },
      py::arg("out"), MOELINK_CONTEXT_ARGS, release_gil());
  m.def(
      "wait_forever",
      [](uintptr_t flag, int peer, int channel, uintptr_t stream, int rank) {
        selftest::wait_forever(ptr<const uint64_t>(flag), peer, channel, context(stream, rank));
      },
      py::arg("flag"), py::arg("peer"), py::arg("channel"), MOELINK_CONTEXT_ARGS, release_gil());
  m.def(
      "atomics",
      [](uintptr_t counters64, uintptr_t counters32, uintptr_t stream, int rank) {
        selftest::atomics(ptr<int64_t>(counters64), ptr<int32_t>(counters32), context(stream, rank));
      },
      py::arg("counters64"), py::arg("counters32"), MOELINK_CONTEXT_ARGS, release_gil());
  m.def(
      "device_check",
      [](uintptr_t values, int count, uintptr_t stream, int rank) {
        selftest::device_check(ptr<const int32_t>(values), count, context(stream, rank));
      },
      py::arg("values"), py::arg("count"), MOELINK_CONTEXT_ARGS, release_gil());
  m.def(
      "broken_sync", [](int kind, uintptr_t stream, int rank) { selftest::broken_sync(kind, context(stream, rank)); },
      py::arg("kind"), MOELINK_CONTEXT_ARGS, release_gil());
  m.def(
      "pingpong",
      [](uintptr_t my_flag, uintptr_t peer_flag, uintptr_t my_payload, uintptr_t peer_payload, int payload_words,
         int role, int iterations, uintptr_t errors, uintptr_t stream, int rank) {
        selftest::pingpong(ptr<uint64_t>(my_flag), ptr<const uint64_t>(peer_flag), ptr<int32_t>(my_payload),
                           ptr<const int32_t>(peer_payload), payload_words, role, iterations, ptr<int32_t>(errors),
                           context(stream, rank));
      },
      py::arg("my_flag"), py::arg("peer_flag"), py::arg("my_payload"), py::arg("peer_payload"),
      py::arg("payload_words"), py::arg("role"), py::arg("iterations"), py::arg("errors"), MOELINK_CONTEXT_ARGS,
      release_gil());
  m.def(
      "cost_probe",
      [](int kind, int blocks, int threads, int iterations, uintptr_t stream, int rank) {
        selftest::cost_probe(kind, blocks, threads, iterations, context(stream, rank));
      },
      py::arg("kind"), py::arg("blocks"), py::arg("threads"), py::arg("iterations"), MOELINK_CONTEXT_ARGS,
      release_gil());
}

}  // namespace moelink::bindings
