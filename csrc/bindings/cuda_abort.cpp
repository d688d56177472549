// moelink._cuda.abort: the process's AbortRecord (runtime/abort_record.h) as the host sees it.
//
// On the GPU a wait that reaches its deadline does not trap: it fills the record (mapped, pinned
// host memory) and every wait of every kernel then returns at once, so the grids drain. Once the
// streams that ran the operation are idle, the host reads the record here and raises the same
// moelink.errors.CommTimeout the host target raises, with the message built the same way:
//
//   kernel '<kernel>' rank R block B thread T: waited N ms for <what> from peer P on channel C:
//   value is <last>, waited for <cmp> <awaited> [MOELINK_TIMEOUT_S=<s>]
//
// (the host target also prints the word's address, which the record does not keep, and how many
// other threads waited, which the GPU does not count). The record is process-wide: one per
// process, whatever the device or Buffer; taking it clears it, so later kernels run normally.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "arch/types.h"
#include "bindings/common.h"
#include "runtime/abort_record.h"
#include "runtime/cuda_device.h"

namespace moelink::bindings {

namespace {

// Only once `published` is set (release by the device) are the other fields complete.
bool published(const AbortRecord* record) {
  return record != nullptr && __atomic_load_n(&record->state, __ATOMIC_ACQUIRE) != 0 &&
         __atomic_load_n(&record->published, __ATOMIC_ACQUIRE) != 0;
}

std::string value_text(uint64_t bits, bool is_signed) {
  return is_signed ? std::to_string(static_cast<int64_t>(bits)) : std::to_string(bits);
}

std::string cmp_text(uint32_t cmp) {
  return cmp <= static_cast<uint32_t>(arch::Cmp::kLt) ? arch::cmp_text(static_cast<arch::Cmp>(cmp)) : "?";
}

}  // namespace

// The CommTimeout message for `record`, in the host target's format (file comment).
std::string format_abort_record(const AbortRecord& record, const std::string& kernel) {
  const bool is_signed = record.is_signed != 0;
  std::string what(record.what, strnlen(record.what, sizeof record.what));
  std::string text = "kernel '" + (kernel.empty() ? std::string("?") : kernel) + "'";
  if (record.rank >= 0) text += " rank " + std::to_string(record.rank);
  text += " block " + std::to_string(record.block) + " thread " + std::to_string(record.thread);
  text += ": waited " + std::to_string(record.waited_ns / 1000000) + " ms for " + (what.empty() ? "?" : what);
  if (record.peer >= 0) text += " from peer " + std::to_string(record.peer);
  if (record.channel >= 0) text += " on channel " + std::to_string(record.channel);
  text += ": value is " + value_text(record.last, is_signed) + ", waited for " + cmp_text(record.cmp) + " " +
          value_text(record.awaited, is_signed);
  text += " [MOELINK_TIMEOUT_S=" + std::to_string(cuda::wait_timeout_seconds()) + "] (GPU abort record)";
  return text;
}

void bind_cuda_abort(py::module_& parent) {
  py::module_ m = parent.def_submodule(
      "abort", "The process's GPU AbortRecord: what a timed-out wait left behind (runtime/abort_record.h).");

  m.def(
      "record",
      []() -> py::object {
        const AbortRecord* record = cuda::abort_record();
        if (!published(record)) return py::none();
        py::dict d;
        d["rank"] = record->rank;
        d["peer"] = record->peer;
        d["channel"] = record->channel;
        d["block"] = record->block;
        d["thread"] = record->thread;
        d["awaited"] = record->awaited;
        d["last"] = record->last;
        d["waited_ns"] = record->waited_ns;
        d["cmp"] = cmp_text(record->cmp);
        d["is_signed"] = record->is_signed != 0;
        d["what"] = std::string(record->what, strnlen(record->what, sizeof record->what));
        return d;
      },
      "The published record as a dict (rank, peer, channel, block, thread, awaited, last, waited_ns, cmp, "
      "is_signed, what), or None when no wait timed out. Does not clear it.");

  m.def("pending", []() { return cuda::abort_record() != nullptr && cuda::abort_record()->state != 0; },
        "True while a wait has claimed the record (published or not): kernels launched now drain at once.");

  m.def(
      "take",
      [](const std::string& kernel) -> py::object {
        const AbortRecord* record = cuda::abort_record();
        if (!published(record)) return py::none();
        std::string message = format_abort_record(*record, kernel);
        cuda::clear_abort_record();
        return py::str(message);
      },
      py::arg("kernel") = "",
      "The CommTimeout message of the published record (kernel names the operation that ran), then clears "
      "the record; None when no wait timed out. Call it only once the streams that ran the operation are idle.");

  m.def(
      "raise_if_aborted",
      [](const std::string& kernel) {
        const AbortRecord* record = cuda::abort_record();
        if (!published(record)) return;
        std::string message = format_abort_record(*record, kernel);
        cuda::clear_abort_record();
        throw Error(ErrorKind::kCommTimeout, message);
      },
      py::arg("kernel") = "",
      "Raises moelink.errors.CommTimeout with take()'s message (and clears the record) if a wait timed out.");

  m.def("clear", &cuda::clear_abort_record, "Forgets a recorded abort, published or not.");
}

}  // namespace moelink::bindings
