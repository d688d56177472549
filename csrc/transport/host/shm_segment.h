// POSIX shared-memory segments: the memory behind the host target's windows.
//
// A segment is created by one rank process and mapped by the other ranks of its node, so that a
// kernel running in one process can load and store into a peer's window exactly as a GPU kernel
// does over NVLink (ARCHITECTURE.md §3).
//
// Security and hygiene contract:
//   - names are "/moelink-" [tag "-"] + 32 hex digits from getrandom (128 bits): unguessable, so no
//     other process can pre-create, open or squat a name before the creator;
//   - created with O_CREAT | O_EXCL and mode 0600 (owner read/write only, whatever the umask);
//   - opened by peers only if owned by the same effective uid and not accessible to group/other;
//   - the name exists only while peers still have to open it: whoever maps last unlinks it (see
//     host_windows.h), and the creator's destructor unlinks it if it is still linked, so a failed
//     bootstrap leaves nothing in /dev/shm. The memory itself lives until the last mapping goes.
//   - the whole size is reserved with posix_fallocate at creation: running out of /dev/shm space
//     is a clear error here instead of a SIGBUS inside a kernel later.
//
// Errors are moelink::Error whose text includes the call, the name and strerror(errno).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace moelink::transport::host {

// Longest tag accepted in a segment name (letters, digits and '_' only).
inline constexpr std::size_t kMaxSegmentTagLength = 32;
inline constexpr std::string_view kSegmentNamePrefix = "/moelink-";

class ShmSegment {
 public:
  // Creates a new segment of `bytes` bytes (> 0), zero-filled, mapped read/write. `tag` (may be
  // empty) is inserted into the name so that a test harness can tell its segments from those of
  // other processes on the machine; it adds no secret and removes none.
  static ShmSegment create(std::size_t bytes, std::string_view tag = {});

  // Opens and maps an existing segment by name. Fails if it does not exist, is not owned by this
  // effective uid, is accessible to anyone else, or is not exactly `expected_bytes` long.
  static ShmSegment open(const std::string& name, std::size_t expected_bytes);

  // Removes `name` from the shared-memory namespace. Returns false if it was already gone (a
  // peer unlinked it first), throws on any other failure. Existing mappings stay valid.
  static bool unlink_name(const std::string& name);

  ShmSegment() = default;
  ShmSegment(ShmSegment&& other) noexcept;
  ShmSegment& operator=(ShmSegment&& other) noexcept;
  ShmSegment(const ShmSegment&) = delete;
  ShmSegment& operator=(const ShmSegment&) = delete;
  ~ShmSegment();  // close()

  const std::string& name() const { return name_; }
  std::byte* data() const { return data_; }
  std::size_t size() const { return size_; }
  bool is_mapped() const { return data_ != nullptr; }
  bool is_creator() const { return creator_; }
  // True while this object believes the name exists: it created or opened it and neither it nor
  // anyone it was told about has unlinked it (a peer's unlink is not observed).
  bool is_linked() const { return linked_; }

  // Unlinks the name if this object still believes it linked; true if this call removed it
  // (false if it was already gone, e.g. a peer unlinked it first). Idempotent.
  bool unlink();
  // Unmaps; a creator first unlinks the name if it is still linked. Idempotent; no-throw.
  void close() noexcept;

 private:
  ShmSegment(std::string name, std::byte* data, std::size_t size, bool creator);

  std::string name_;
  std::byte* data_ = nullptr;
  std::size_t size_ = 0;
  bool creator_ = false;
  bool linked_ = false;
};

// "/moelink-" [tag "-"] + 32 random hex digits. Throws kInvalidArgument on a bad tag.
std::string make_segment_name(std::string_view tag);

// True if `tag` is empty or at most kMaxSegmentTagLength characters of [A-Za-z0-9_].
bool is_valid_segment_tag(std::string_view tag);

}  // namespace moelink::transport::host
