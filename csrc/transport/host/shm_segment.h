// Shared-memory segments with no name: the memory behind the host target's windows.
//
// A segment is created by one rank process and mapped by the other ranks of its node, so that a
// kernel running in one process can load and store into a peer's window exactly as a GPU kernel
// does over NVLink (ARCHITECTURE.md §3).
//
// A segment is an anonymous memory file (memfd_create), never a name in /dev/shm or any other
// namespace. The creator holds a file descriptor; a peer opens that descriptor through the
// creator's /proc/<pid>/fd/<fd> (the kernel's "magic link" to the open file). Nothing outlives the
// processes: the memory is freed when the last descriptor and the last mapping are gone, however
// the processes end (SIGKILL included), so there is nothing to clean up and no instant at which a
// crash can leak.
//
// Security and hygiene contract:
//   - /proc/<pid>/fd/<fd> opens only for a process allowed to inspect the creator (the kernel's
//     ptrace read check: same uid, the creator dumpable) and only while the creator holds the
//     descriptor; nothing can be pre-created, squatted or guessed into existence;
//   - the file is chmod 0600 (owner read/write only); a peer refuses a file that is not a regular
//     file owned by its own effective uid with no group/other access;
//   - its size is sealed (F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL): no process, a faulty peer
//     included, can truncate it under another's mapping (which would turn the next access into a
//     SIGBUS) or grow it; a peer refuses a file without those seals;
//   - the memfd name "moelink-" [tag "-"] + 32 hex digits from getrandom (128 bits) is the
//     segment's id: not a namespace entry (it shows in /proc/<pid>/maps and fd links for
//     diagnostics only), but the creator publishes it and a peer refuses a file whose name differs
//     (a descriptor number reused after the creator died cannot be mistaken for the segment);
//   - the whole size is reserved with fallocate at creation: running out of memory for shared
//     pages is a clear error here instead of a SIGBUS inside a kernel later.
//
// Errors are moelink::Error whose text includes the call, the path and strerror(errno).
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moelink::transport::host {

// Longest tag accepted in a segment name (letters, digits and '_' only).
inline constexpr std::size_t kMaxSegmentTagLength = 32;
inline constexpr std::string_view kSegmentNamePrefix = "moelink-";
inline constexpr std::size_t kSegmentIdHexDigits = 32;

class ShmSegment {
 public:
  // Creates a new segment of `bytes` bytes (> 0), zero-filled, mapped read/write, its size sealed.
  // The creator keeps a descriptor open so that peers can open() it until close_descriptor().
  // `tag` (may be empty) goes into the memfd name so that a test harness can tell its segments
  // from those of other processes in /proc/<pid>/maps; it adds no secret and removes none.
  static ShmSegment create(std::size_t bytes, std::string_view tag = {});

  // Maps the segment process `pid` holds open as descriptor `fd`, through /proc/<pid>/fd/<fd>.
  // Fails (kInvalidArgument, naming what differs) unless it is a moelink memfd named `name`, a
  // regular file owned by this effective uid with mode 0600, exactly `expected_bytes` long and
  // size-sealed. The descriptor opened for the check is closed before returning.
  static ShmSegment open(pid_t pid, int fd, const std::string& name, std::size_t expected_bytes);

  ShmSegment() = default;
  ShmSegment(ShmSegment&& other) noexcept;
  ShmSegment& operator=(ShmSegment&& other) noexcept;
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;
  ~ShmSegment();  // close()

  // The memfd name, "moelink-[tag-]<32 hex>" (what /proc/<pid>/fd/<fd> links to, after "/memfd:").
  const std::string& name() const { return name_; }
  std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool is_mapped() const { return data_ != nullptr; }
  bool is_creator() const { return creator_; }
  // The creator's descriptor while peers may still open the segment; -1 otherwise.
  int descriptor() const { return fd_; }
  bool is_shareable() const { return fd_ >= 0; }

  // Closes the creator's descriptor: from then on no process can open the segment; mappings stay.
  // Idempotent; no-throw.
  void close_descriptor() noexcept;
  // Unmaps and closes the descriptor. Idempotent; no-throw.
  void close() noexcept;

 private:
  ShmSegment(std::string name, std::byte* data, std::size_t size, bool creator, int fd);

  std::string name_;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  bool creator_ = false;
  int fd_ = -1;
};

// "moelink-" [tag "-"] + 32 random hex digits. Throws kInvalidArgument on a bad tag.
std::string make_segment_name(std::string_view tag);

// True if `tag` is empty or at most kMaxSegmentTagLength characters of [A-Za-z0-9_].
bool is_valid_segment_tag(std::string_view tag);

}  // namespace moelink::transport::host
