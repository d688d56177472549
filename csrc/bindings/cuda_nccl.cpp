// moelink._cuda.nccl: libnccl.so.2 through dlopen and the NCCL windows (csrc/transport/nccl/).
//
// The Python side is moelink._nccl_windows, which chooses the library path and drives the
// collective bootstrap; nothing here talks to torch. Pointers are integers. Classes are
// module_local (both extensions may be loaded in one process). Calls that may wait for peers
// or the device release the GIL.
//
// Without NCCL headers at build time (MOELINK_HAVE_NCCL == 0) the submodule still exists:
// AVAILABLE is False, UNAVAILABLE_REASON says why, and load_library raises NcclUnavailable.
#include <pybind11/stl.h>

#include <cstring>
#include <string>

#include "bindings/common.h"
#include "transport/nccl/nccl_windows.h"

namespace moelink::bindings {

void bind_gin(py::module_& nccl);  // cuda_gin.cpp

#if MOELINK_HAVE_NCCL

namespace {

namespace nccl = ::moelink::transport::nccl;

// The library is a process-wide singleton per path; Python holds this light handle to it.
struct LibraryHandle {
  const nccl::Library* lib;
};

int parse_link(const std::string& link) {
  if (link == "nvl") return 0;
  if (link == "rdma") return 1;
  throw Error(ErrorKind::kInvalidArgument, "link: expected 'nvl' or 'rdma', got '" + link + "'");
}

py::bytes unique_id(const LibraryHandle& handle) {
  ncclUniqueId id;
  nccl::check(*handle.lib, nullptr, handle.lib->ncclGetUniqueId(&id), "ncclGetUniqueId");
  return py::bytes(id.internal, sizeof(id.internal));
}

ncclUniqueId parse_unique_id(const py::bytes& data) {
  const std::string text = data;
  if (text.size() != sizeof(ncclUniqueId::internal)) {
    throw Error(ErrorKind::kInvalidArgument, "unique_id: expected " + std::to_string(sizeof(ncclUniqueId::internal)) +
                                                 " bytes, got " + std::to_string(text.size()));
  }
  ncclUniqueId id;
  std::memcpy(id.internal, text.data(), sizeof(id.internal));
  return id;
}

py::dict properties(const nccl::Windows& w) {
  const ncclCommProperties_t& p = w.properties();
  py::dict out;
  out["rank"] = p.rank;
  out["num_ranks"] = p.nRanks;
  out["cuda_device"] = p.cudaDev;
  out["device_api_support"] = p.deviceApiSupport;
  out["multimem_support"] = p.multimemSupport;
  out["gin_type"] = static_cast<int>(p.ginType);
  out["railed_gin_type"] = static_cast<int>(p.railedGinType);
  out["num_lsa_teams"] = p.nLsaTeams;
  return out;
}

}  // namespace

void bind_nccl(py::module_& parent) {
  py::module_ m = parent.def_submodule("nccl", "libnccl.so.2 through dlopen, and NCCL symmetric windows");
  m.attr("AVAILABLE") = true;
  m.attr("UNAVAILABLE_REASON") = "";
  m.attr("HEADER_VERSION") = nccl::kHeaderVersion;
  m.attr("MINIMUM_VERSION") = nccl::kMinimumVersion;
  m.attr("CONTROL_BYTES") = nccl::kControlBytes;
  m.attr("WINDOW_ALIGNMENT") = nccl::kWindowAlignment;
  m.attr("UNIQUE_ID_BYTES") = static_cast<int>(sizeof(ncclUniqueId::internal));

  m.def("symbol_names", &nccl::symbol_names, "Every NCCL function moelink resolves, in order.");
  m.def("version_text", &nccl::version_text, py::arg("code"));
  m.def("version_problem", &nccl::version_problem, py::arg("library_version"),
        py::arg("header_version") = nccl::kHeaderVersion,
        "'' if a library of that version may be used with headers of that version, else why not.");
  m.def("result_name", [](int code) { return nccl::result_name(static_cast<ncclResult_t>(code)); }, py::arg("code"));
  m.def(
      "_raise_for_result",
      [](int code, const std::string& what) {
        if (code == ncclSuccess) throw Error(ErrorKind::kInvalidArgument, "code: expected a failing ncclResult_t, got 0");
        nccl::throw_result(nullptr, nullptr, static_cast<ncclResult_t>(code), what);
      },
      py::arg("code"), py::arg("what"), "Test hook: raises the typed error moelink maps an ncclResult_t onto.");
  m.def(
      "_memcpy",
      [](uintptr_t dst, uintptr_t src, std::size_t nbytes) {
        const cudaError_t err = cudaMemcpy(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                                           cudaMemcpyDefault);
        if (err != cudaSuccess) {
          cudaGetLastError();
          throw Error(ErrorKind::kCudaError, std::string("cudaMemcpy failed: ") + cudaGetErrorName(err));
        }
      },
      py::arg("dst"), py::arg("src"), py::arg("nbytes"), release_gil(),
      "Test hook: a synchronous cudaMemcpy (cudaMemcpyDefault) between host and window addresses.");

  py::class_<LibraryHandle>(m, "Library", py::module_local(), "A loaded and checked libnccl (never unloaded).")
      .def_property_readonly("path", [](const LibraryHandle& h) { return h.lib->path; })
      .def_property_readonly("resolved_path", [](const LibraryHandle& h) { return h.lib->resolved_path; })
      .def_property_readonly("version", [](const LibraryHandle& h) { return h.lib->version; })
      .def_property_readonly("version_text", [](const LibraryHandle& h) { return nccl::version_text(h.lib->version); })
      .def("unique_id", &unique_id, "ncclGetUniqueId as 128 bytes (rank 0 of a bootstrap only).")
      .def("__repr__", [](const LibraryHandle& h) {
        return "<moelink NCCL " + nccl::version_text(h.lib->version) + " at " + h.lib->resolved_path + ">";
      });

  m.def(
      "load_library", [](const std::string& path) { return LibraryHandle{&nccl::load_library(path)}; },
      py::arg("path"), release_gil(),
      "dlopen `path` (cached per path), resolve every symbol, check the version; NcclUnavailable if not.");

  using W = nccl::Windows;
  py::class_<W>(m, "Windows", py::module_local(), "One rank's NCCL symmetric window (csrc/transport/nccl/nccl_windows.h).")
      .def(py::init([](const LibraryHandle& h, int rank, int num_ranks, int device) {
             return new W(*h.lib, rank, num_ranks, device);
           }),
           py::arg("library"), py::arg("rank"), py::arg("num_ranks"), py::arg("device"), py::keep_alive<1, 2>())
      .def(
          "init_communicator",
          [](W& w, const py::bytes& id, double timeout_s) {
            const ncclUniqueId parsed = parse_unique_id(id);
            py::gil_scoped_release release;
            w.init_communicator(parsed, timeout_s);
          },
          py::arg("unique_id"), py::arg("timeout_s"))
      .def("allocate", &W::allocate, py::arg("data_bytes"), release_gil())
      .def("register_window", &W::register_window, py::arg("timeout_s"), release_gil())
      .def_property_readonly("rank", &W::rank)
      .def_property_readonly("num_ranks", &W::num_ranks)
      .def_property_readonly("device", &W::device)
      .def_property_readonly("state", [](const W& w) { return std::string(nccl::state_name(w.state())); })
      .def_property_readonly("is_closed", [](const W& w) { return w.state() == W::State::kClosed || w.state() == W::State::kAborted; })
      .def("properties", &properties)
      .def_property_readonly("data_bytes", &W::data_bytes)
      .def_property_readonly("window_bytes", &W::window_bytes)
      .def("lsa_team", [](const W& w) {
        const nccl::LsaTeam t = w.lsa_team();
        py::dict out;
        out["rank"] = t.rank;
        out["size"] = t.size;
        out["stride"] = t.stride;
        return out;
      })
      .def("lsa_window_ptrs", &W::lsa_window_ptrs)
      .def_property_readonly("local_ptr", &W::local_ptr)
      .def("counter_ptr", [](const W& w, const std::string& link) { return w.counter_ptr(parse_link(link)); }, py::arg("link"))
      .def("read_counter", [](const W& w, const std::string& link) { return w.read_counter(parse_link(link)); },
           py::arg("link"), release_gil())
      .def("reset_counters", &W::reset_counters, release_gil())
      .def("close", &W::close, py::arg("timeout_s"), release_gil())
      .def("abort", &W::abort, release_gil());
  bind_gin(m);
}

#else  // !MOELINK_HAVE_NCCL

void bind_nccl(py::module_& parent) {
  py::module_ m = parent.def_submodule("nccl", "NCCL windows: unavailable in this build");
  const std::string reason =
      "moelink._cuda was built without NCCL >= 2.28 headers (install nvidia-nccl-cu12 in the build "
      "environment or set MOELINK_NCCL_HOME, then rebuild)";
  m.attr("AVAILABLE") = false;
  m.attr("UNAVAILABLE_REASON") = reason;
  m.def(
      "load_library", [reason](const std::string&) -> py::object { throw Error(ErrorKind::kNcclUnavailable, reason); },
      py::arg("path"));
  bind_gin(m);
}

#endif  // MOELINK_HAVE_NCCL

}  // namespace moelink::bindings
