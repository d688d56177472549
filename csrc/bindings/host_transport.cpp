// moelink._host.transport: shared-memory segments (memfd) and host windows (csrc/transport/host/).
//
// Pointers are returned as integers (uintptr), like every pointer crossing this boundary. They
// stay valid until the owning object is closed or collected; the Python layer
// (moelink._host_windows) keeps the HostWindows alive as long as anything uses its pointers.
// Link classes are spelled "nvl" and "rdma" on the Python side.
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "bindings/common.h"
#include "transport/host/host_windows.h"
#include "transport/host/shm_segment.h"

namespace moelink::bindings {

namespace {

using transport::host::HostWindows;
using transport::host::LinkClass;
using transport::host::ShmSegment;

LinkClass parse_link(const std::string& link) {
  if (link == "nvl") return LinkClass::kNvl;
  if (link == "rdma") return LinkClass::kRdma;
  throw Error(ErrorKind::kInvalidArgument, "link: expected 'nvl' or 'rdma', got '" + link + "'");
}

uintptr_t address(const void* p) { return reinterpret_cast<uintptr_t>(p); }

py::dict counters(const HostWindows& w, int rank) {
  py::dict out;
  for (LinkClass link : {LinkClass::kNvl, LinkClass::kRdma}) {
    out[transport::host::link_class_name(link)] = w.bytes_moved(rank, link);
  }
  return out;
}

py::object failure_dict(const std::optional<transport::host::FailureRecord>& record) {
  if (!record) return py::none();
  py::dict d;
  d["rank"] = record->rank;
  d["peer"] = record->peer;
  d["sequence"] = record->sequence;
  d["time_ns"] = record->time_ns;
  d["text"] = record->text;
  return d;
}

void bind_segment(py::module_& t) {
  py::class_<ShmSegment>(t, "ShmSegment",
                         "Anonymous shared memory (memfd) shared by file descriptor (csrc/transport/host/shm_segment.h).")
      .def_static("create", &ShmSegment::create, py::arg("nbytes"), py::arg("tag") = "",
                  "New zero-filled, size-sealed memfd 'moelink-[tag-]<128 random bits>', mode 0600, kept open.")
      .def_static("open", &ShmSegment::open, py::arg("pid"), py::arg("fd"), py::arg("name"), py::arg("nbytes"),
                  "Maps the segment process `pid` holds as descriptor `fd` (/proc/<pid>/fd/<fd>), after checking it "
                  "is our memfd `name` (same uid, mode 0600, size-sealed, exactly nbytes long).")
      .def_property_readonly("name", &ShmSegment::name)
      .def_property_readonly("size", &ShmSegment::size)
      .def_property_readonly("data_ptr", [](const ShmSegment& s) { return address(s.data()); })
      .def_property_readonly("is_mapped", &ShmSegment::is_mapped)
      .def_property_readonly("is_creator", &ShmSegment::is_creator)
      .def_property_readonly("descriptor", &ShmSegment::descriptor)
      .def_property_readonly("is_shareable", &ShmSegment::is_shareable)
      .def("close_descriptor", &ShmSegment::close_descriptor, "No process can open it any more; mappings stay.")
      .def("close", &ShmSegment::close, "Unmaps and closes the descriptor.")
      .def("__enter__", [](ShmSegment& s) -> ShmSegment& { return s; }, py::return_value_policy::reference)
      .def("__exit__", [](ShmSegment& s, py::args) { s.close(); })
      .def("__repr__", [](const ShmSegment& s) {
        return "<ShmSegment " + s.name() + " " + std::to_string(s.size()) + " bytes" +
               (s.is_mapped() ? "" : " closed") + ">";
      });
}

void bind_windows(py::module_& t) {
  py::class_<HostWindows>(t, "HostWindows",
                          "This rank's window segment plus the mapped windows of its node's peers "
                          "(csrc/transport/host/host_windows.h). Built by moelink._host_windows.bootstrap.")
      .def(py::init<int, int, int, std::size_t, std::string, bool>(), py::arg("rank"), py::arg("num_ranks"),
           py::arg("ranks_per_node"), py::arg("data_bytes"), py::arg("tag") = "", py::arg("nic_maps_remote") = false)
      .def_property_readonly("rank", &HostWindows::rank)
      .def_property_readonly("num_ranks", &HostWindows::num_ranks)
      .def_property_readonly("ranks_per_node", &HostWindows::ranks_per_node)
      .def_property_readonly("node", &HostWindows::node)
      .def_property_readonly("local_rank", &HostWindows::local_rank)
      .def_property_readonly("name", &HostWindows::name)
      .def_property_readonly("owner_pid", &HostWindows::owner_pid)
      .def_property_readonly("descriptor", &HostWindows::descriptor)
      .def_property_readonly("is_shareable", &HostWindows::is_shareable)
      .def_property_readonly("nic_maps_remote", &HostWindows::nic_maps_remote)
      .def_property_readonly("segment_bytes", &HostWindows::segment_bytes)
      .def_property_readonly("data_bytes", &HostWindows::data_bytes)
      .def_property_readonly("attach_expected", &HostWindows::attach_expected)
      .def_property_readonly("is_closed", &HostWindows::is_closed)
      .def("is_node_peer", &HostWindows::is_node_peer, py::arg("rank"))
      .def("is_mapped", &HostWindows::is_mapped, py::arg("rank"))
      .def("attach", &HostWindows::attach, py::arg("peer"), py::arg("pid"), py::arg("fd"), py::arg("name"),
           py::arg("segment_bytes"), "Maps a peer's segment (held by `pid` as `fd`) after checking it and its header.")
      .def("close_descriptor", &HostWindows::close_descriptor,
           "Closes the own segment's descriptor: nobody can open it any more.")
      .def("publish_failure", &HostWindows::publish_failure, py::arg("text"), py::arg("peer"), py::arg("sequence"),
           "Writes this rank's failure record once; False if one was already published.")
      .def(
          "failure", [](const HostWindows& w, int r) { return failure_dict(w.failure_of(r)); }, py::arg("rank"),
          "The published failure record of a mapped rank as a dict (rank, peer, sequence, time_ns, text), or None.")
      .def(
          "peer_ptr",
          [](const HostWindows& w, int peer, std::size_t offset, std::size_t nbytes) {
            return address(w.peer_ptr(peer, offset, nbytes));
          },
          py::arg("peer"), py::arg("offset") = 0, py::arg("nbytes") = 0,
          "Address of window byte `offset` of `peer` (a rank of this node); [offset, offset+nbytes) is checked.")
      .def(
          "local_ptr",
          [](const HostWindows& w, std::size_t offset, std::size_t nbytes) {
            return address(w.local_ptr(offset, nbytes));
          },
          py::arg("offset") = 0, py::arg("nbytes") = 0)
      .def(
          "nic_ptr",
          [](const HostWindows& w, int r, std::size_t offset, std::size_t nbytes) {
            return address(w.nic_ptr(r, offset, nbytes));
          },
          py::arg("rank"), py::arg("offset") = 0, py::arg("nbytes") = 0,
          "Like peer_ptr for any mapped rank, other nodes included: for the emulated NIC only.")
      .def("node_window_ptrs",
           [](const HostWindows& w) {
             std::vector<uintptr_t> out;
             for (auto* p : w.node_window_bases()) out.push_back(address(p));
             return out;
           },
           "Window base of every rank of this node, by local rank.")
      .def(
          "add_bytes", [](HostWindows& w, const std::string& link, uint64_t n) { w.add_bytes(parse_link(link), n); },
          py::arg("link"), py::arg("nbytes"))
      .def(
          "counter_ptr", [](HostWindows& w, const std::string& link) { return address(w.counter(parse_link(link))); },
          py::arg("link"), "Address of this rank's std::atomic<uint64_t> counter for `link`.")
      .def(
          "counters",
          [](const HostWindows& w, int r) { return counters(w, r < 0 ? w.rank() : r); },
          py::arg("rank") = -1, "{'nvl': bytes, 'rdma': bytes} moved by `rank` (default: this rank).")
      .def("reset_counters", &HostWindows::reset_counters)
      .def(
          "header",
          [](const HostWindows& w, int r) {
            const auto* h = w.header_of(r < 0 ? w.rank() : r);
            py::dict d;
            d["layout_version"] = h->layout_version;
            d["header_bytes"] = h->header_bytes;
            d["segment_bytes"] = h->segment_bytes;
            d["data_bytes"] = h->data_bytes;
            d["owner_rank"] = h->owner_rank;
            d["num_ranks"] = h->num_ranks;
            d["ranks_per_node"] = h->ranks_per_node;
            d["owner_pid"] = h->owner_pid;
            d["attach_expected"] = h->attach_expected.load();
            d["attach_count"] = h->attach_count.load();
            d["failure_state"] = h->failure.state.load();
            return d;
          },
          py::arg("rank") = -1, "The header fields of a mapped rank's segment, as a dict.")
      .def("close", &HostWindows::close, "Unmaps everything and closes the own descriptor. Idempotent.")
      .def("__repr__", [](const HostWindows& w) {
        return "<HostWindows rank " + std::to_string(w.rank()) + "/" + std::to_string(w.num_ranks()) + " node " +
               std::to_string(w.node()) + " " + std::to_string(w.data_bytes()) + " bytes" +
               (w.is_closed() ? " closed" : "") + ">";
      });
}

}  // namespace

void bind_transport(py::module_& m) {
  py::module_ t = m.def_submodule("transport", "Host transport: shared-memory windows (csrc/transport/host/)");
  t.attr("WINDOW_HEADER_BYTES") = transport::host::kWindowHeaderBytes;
  t.attr("WINDOW_LAYOUT_VERSION") = transport::host::kWindowLayoutVersion;
  t.attr("SEGMENT_NAME_PREFIX") = std::string(transport::host::kSegmentNamePrefix);
  t.attr("FAILURE_TEXT_BYTES") = transport::host::kFailureTextBytes;
  bind_segment(t);
  bind_windows(t);
}

}  // namespace moelink::bindings
