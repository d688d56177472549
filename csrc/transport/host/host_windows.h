// Host windows: the scale-up ("NVLink") address space of one rank on the host target.
//
// Every rank owns one shared-memory segment (shm_segment.h: anonymous memory shared by file
// descriptor, never a name). The ranks of a node map each other's segments, so a kernel in one
// process reaches a peer's window with ordinary loads, stores and atomics, as a GPU kernel does
// through NCCL's LSA pointers. Ranks of other nodes are never mapped for kernels: only the
// emulated NIC may reach them (nic_ptr), which is what keeps the host target honest about
// scale-out traffic (ARCHITECTURE.md §3).
//
// Bootstrap (python/moelink/_host_windows.py drives it over the user's process group, every step
// under the MOELINK_TIMEOUT_S deadline):
//   1. each rank constructs HostWindows: creates its segment, writes the header, keeps the
//      segment's descriptor open;
//   2. the ranks exchange (pid, descriptor, name, segment_bytes) through the group;
//   3. each rank attach()es the segments it is allowed to map (through /proc/<pid>/fd/<fd>);
//   4. once every rank reported its mapping, each rank close_descriptor()s: from then on no
//      process can open any segment, and the memory lives exactly as long as its mappings.
// There is no name to leak at any instant: a rank killed anywhere leaves nothing behind.
//
// Segment layout (byte offsets from the start of each rank's segment)
//
//   [0, 4096)           WindowHeader. One page, so the window below is page-aligned.
//   [4096, 4096 + D)    the window: D = data_bytes, zero at creation. Kernels address it as
//                       peer_ptr(peer, offset), offset in [0, D). Its contents are defined by
//                       whoever uses it (docs/buffer-layout.md for the intranode dispatch).
//
// WindowHeader, field by field (all little-endian, naturally aligned):
//   0    u64          magic            kWindowMagic, written (release) last by the creator
//   8    u32          layout_version   kWindowLayoutVersion: a peer refuses any other version
//   12   u32          header_bytes     kWindowHeaderBytes (4096): where the window starts
//   16   u64          segment_bytes    header_bytes + data_bytes: the size of the memory file
//   24   u64          data_bytes       D: usable window bytes (identical on every rank)
//   32   i32          owner_rank       rank that created the segment
//   36   i32          num_ranks        size of the group that bootstrapped it
//   40   i32          ranks_per_node   ranks [n*rpn, (n+1)*rpn) form node n
//   44   i32          owner_pid        process id of the creator (a peer checks it against the
//                                      process it opened the segment from; diagnostics)
//   48   atomic u32   attach_expected  processes that will map the segment, creator included
//   52   atomic u32   attach_count     processes that have mapped it (diagnostics)
//   56   —            reserved (zero) up to 128
//   128  atomic u64   bytes_moved[nvl]   alone on its 64-byte line
//   192  atomic u64   bytes_moved[rdma]  alone on its 64-byte line
//   256  FailureRecord failure          the first failure this rank published (below)
//   1344 —            reserved (zero) up to 4096
//
// FailureRecord (at 256; written only by the owner, read by any process that maps the segment):
//   +0   atomic u32   state        0 empty, 1 being written, 2 published (release; final)
//   +4   i32          peer         the rank whose wait expired (-1: none or unknown)
//   +8   u64          sequence     the owner's operation counter when it failed (e.g. the epoch)
//   +16  u64          time_ns      CLOCK_REALTIME of the publication (diagnostics)
//   +24  u32          text_bytes   bytes of text, <= kFailureTextBytes - 1
//   +28  —            reserved (zero) up to +64
//   +64  char[1024]   text         what the owner waited for (NUL-terminated, truncated)
// The first rank whose wait expires publishes what it waited for; a rank that times out later
// reads its peers' records and follows them to the root cause (the rank that waits on nobody:
// dead, stopped, or never entered). A reader never trusts the record: it reads it only after the
// state's acquire, bounds text_bytes and the text at the first NUL, and range-checks peer.
//
// Byte counters. bytes_moved[link] counts the payload bytes the owning rank moved over that link
// class, as reported by the transport that moved them (add_bytes):
//   nvl   bytes this rank wrote into the windows of *other* ranks of its node (writes into its own
//         window cross no link and are not counted);
//   rdma  bytes this rank's NIC delivered to ranks of other nodes.
// They are std::atomic<uint64_t> in shared memory (lock-free, so valid across processes), relaxed:
// they are statistics, read after the operation's own synchronisation. Each counter has its own
// cache line because kernel fibers and the NIC thread update them concurrently. Any process that
// maps a segment may read its counters; only the owner adds to or resets them.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "transport/host/shm_segment.h"

namespace moelink::transport::host {

enum class LinkClass : int { kNvl = 0, kRdma = 1 };
inline constexpr int kNumLinkClasses = 2;
const char* link_class_name(LinkClass link);  // "nvl" / "rdma"

inline constexpr uint64_t kWindowMagic = 0x574b4e494c454f4dull;  // "MOELINKW"
inline constexpr uint32_t kWindowLayoutVersion = 2;  // 2: memfd segments, failure record
inline constexpr std::size_t kWindowHeaderBytes = 4096;
inline constexpr std::size_t kFailureTextBytes = 1024;

struct alignas(64) PaddedCounter {
  std::atomic<uint64_t> value{0};
};

enum class FailureState : uint32_t { kEmpty = 0, kWriting = 1, kPublished = 2 };

struct FailureRecordLayout {
  std::atomic<uint32_t> state;
  int32_t peer;
  uint64_t sequence;
  uint64_t time_ns;
  uint32_t text_bytes;
  uint8_t reserved[64 - 28];
  char text[kFailureTextBytes];
};

struct WindowHeader {
  uint64_t magic;
  uint32_t layout_version;
  uint32_t header_bytes;
  uint64_t segment_bytes;
  uint64_t data_bytes;
  int32_t owner_rank;
  int32_t num_ranks;
  int32_t ranks_per_node;
  int32_t owner_pid;
  std::atomic<uint32_t> attach_expected;
  std::atomic<uint32_t> attach_count;
  uint8_t reserved0[128 - 56];
  PaddedCounter bytes_moved[kNumLinkClasses];
  FailureRecordLayout failure;
};

static_assert(std::atomic<uint32_t>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "cross-process atomics need lock-free std::atomic");
static_assert(offsetof(WindowHeader, attach_expected) == 48 && offsetof(WindowHeader, attach_count) == 52);
static_assert(offsetof(WindowHeader, bytes_moved) == 128 && sizeof(PaddedCounter) == 64);
static_assert(offsetof(WindowHeader, failure) == 256 && offsetof(FailureRecordLayout, text) == 64);
static_assert(sizeof(WindowHeader) == 256 + 64 + kFailureTextBytes && sizeof(WindowHeader) <= kWindowHeaderBytes);

// A failure record as read back (validated) from a window header.
struct FailureRecord {
  int rank = -1;          // whose record
  int peer = -1;          // the rank it waited on, -1 if none or the record held an invalid one
  uint64_t sequence = 0;
  uint64_t time_ns = 0;
  std::string text;
};

class HostWindows {
 public:
  // Creates this rank's segment with a `data_bytes` window (> 0, rounded up to a multiple of 4096).
  // `nic_maps_remote`: every rank of the group, not only the node, will map the segment (the
  // emulated NIC needs that for scale-out); it changes attach_expected and which attach() calls
  // are accepted. Throws kInvalidArgument on inconsistent rank arguments or a bad tag.
  HostWindows(int rank, int num_ranks, int ranks_per_node, std::size_t data_bytes, std::string_view tag = {},
              bool nic_maps_remote = false);
  HostWindows(const HostWindows&) = delete;
  HostWindows& operator=(const HostWindows&) = delete;
  ~HostWindows();  // close()

  // Identity.
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int ranks_per_node() const { return ranks_per_node_; }
  int node() const { return rank_ / ranks_per_node_; }
  int local_rank() const { return rank_ % ranks_per_node_; }
  int node_of(int r) const { return r / ranks_per_node_; }
  bool is_node_peer(int r) const { return r >= 0 && r < num_ranks_ && node_of(r) == node(); }
  bool nic_maps_remote() const { return nic_maps_remote_; }

  // Own segment: what peers need to open it (owner_pid, descriptor, name, segment_bytes).
  const std::string& name() const { return own().name(); }
  pid_t owner_pid() const { return owner_pid_; }
  int descriptor() const { return own().descriptor(); }  // -1 once closed
  bool is_shareable() const { return own().is_shareable(); }
  std::size_t segment_bytes() const { return kWindowHeaderBytes + data_bytes_; }
  std::size_t data_bytes() const { return data_bytes_; }
  uint32_t attach_expected() const { return attach_expected_; }

  // Maps rank `peer`'s segment, held open by process `pid` as descriptor `fd` under `name`
  // (ShmSegment::open's checks), then checks its header against this group (magic, version,
  // owner rank and pid, ranks, node size, window size). Ranks of other nodes are accepted only
  // with nic_maps_remote. Throws kInvalidArgument naming the field that differs.
  void attach(int peer, pid_t pid, int fd, const std::string& name, std::size_t segment_bytes);
  // Closes the own segment's descriptor: no process can open it any more (mappings stay).
  void close_descriptor();
  bool is_mapped(int r) const;

  // Address of `offset` in the window of `peer`, a mapped rank of this node (itself included).
  // [offset, offset + bytes) must lie inside the window. Throws kInvalidArgument otherwise.
  std::byte* peer_ptr(int peer, std::size_t offset = 0, std::size_t bytes = 0) const;
  std::byte* local_ptr(std::size_t offset = 0, std::size_t bytes = 0) const { return peer_ptr(rank_, offset, bytes); }
  // Same for any mapped rank, including other nodes: for the emulated NIC only.
  std::byte* nic_ptr(int r, std::size_t offset = 0, std::size_t bytes = 0) const;
  // Window base of every rank of this node, by local rank: the pointer table kernels receive.
  std::vector<std::byte*> node_window_bases() const;

  // Counters (see the header comment).
  void add_bytes(LinkClass link, uint64_t bytes) {
    header(rank_)->bytes_moved[static_cast<int>(link)].value.fetch_add(bytes, std::memory_order_relaxed);
  }
  std::atomic<uint64_t>* counter(LinkClass link) { return &header(rank_)->bytes_moved[static_cast<int>(link)].value; }
  uint64_t bytes_moved(int r, LinkClass link) const;  // r: any mapped rank
  void reset_counters();
  const WindowHeader* header_of(int r) const;  // r: any mapped rank

  // Failure record (see the header comment). publish_failure writes this rank's record once:
  // false if one was already published (the first failure is the one that explains the rest).
  // `text` is truncated to kFailureTextBytes - 1 bytes; `peer` must be -1 or a rank.
  bool publish_failure(const std::string& text, int peer, uint64_t sequence);
  // The published record of mapped rank `r`, validated, or nothing.
  std::optional<FailureRecord> failure_of(int r) const;

  // Unmaps every segment and closes the own descriptor. Afterwards every accessor but the
  // identity ones throws. Idempotent.
  void close() noexcept;
  bool is_closed() const { return closed_; }

 private:
  const ShmSegment& own() const { return segments_[rank_]; }
  WindowHeader* header(int r) const { return reinterpret_cast<WindowHeader*>(segments_[r].data()); }
  void check_open(const char* what) const;
  void check_rank(const char* what, int r) const;
  std::byte* window_ptr(const char* what, int r, std::size_t offset, std::size_t bytes) const;

  int rank_;
  int num_ranks_;
  int ranks_per_node_;
  std::size_t data_bytes_;
  uint32_t attach_expected_;
  bool nic_maps_remote_;
  pid_t owner_pid_;
  bool closed_ = false;
  std::vector<ShmSegment> segments_;  // by rank; unmapped entries are empty
};

}  // namespace moelink::transport::host
