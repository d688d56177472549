#include "transport/host/shm_segment.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <utility>

#include "runtime/errors.h"

namespace moelink::transport::host {

namespace {

// OS failures are reported as kInvalidArgument until errors.h grows an OS-error kind: the usual
// causes (size beyond /dev/shm, a name that is gone) are the caller's arguments.
[[noreturn]] void throw_os_error(const std::string& what, int error) {
  throw Error(ErrorKind::kInvalidArgument, what + ": " + std::strerror(error) + " (errno " + std::to_string(error) + ")");
}

// Closes a descriptor on every exit path; the mapping outlives it.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
};

std::byte* map_shared(int fd, std::size_t bytes, const std::string& name) {
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) throw_os_error("mmap(" + name + ", " + std::to_string(bytes) + " bytes)", errno);
  return static_cast<std::byte*>(p);
}

}  // namespace

bool is_valid_segment_tag(std::string_view tag) {
  if (tag.size() > kMaxSegmentTagLength) return false;
  for (char c : tag) {
    bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
    if (!ok) return false;
  }
  return true;
}

std::string make_segment_name(std::string_view tag) {
  if (!is_valid_segment_tag(tag)) {
    throw Error(ErrorKind::kInvalidArgument,
                "shared-memory tag: expected at most " + std::to_string(kMaxSegmentTagLength) +
                    " characters of [A-Za-z0-9_], got '" + std::string(tag) + "'");
  }
  unsigned char random[16];
  std::size_t filled = 0;
  while (filled < sizeof random) {
    ssize_t n = ::getrandom(random + filled, sizeof random - filled, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_os_error("getrandom", errno);
    }
    filled += static_cast<std::size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string name(kSegmentNamePrefix);
  if (!tag.empty()) name.append(tag).push_back('-');
  for (unsigned char byte : random) {
    name.push_back(kHex[byte >> 4]);
    name.push_back(kHex[byte & 15]);
  }
  return name;
}

ShmSegment::ShmSegment(std::string name, std::byte* data, std::size_t size, bool creator)
    : name_(std::move(name)), data_(data), size_(size), creator_(creator), linked_(true) {}

ShmSegment ShmSegment::create(std::size_t bytes, std::string_view tag) {
  if (bytes == 0) throw Error(ErrorKind::kInvalidArgument, "shared-memory segment size: expected > 0 bytes, got 0");
  std::string name = make_segment_name(tag);
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, S_IRUSR | S_IWUSR);
  if (fd < 0) throw_os_error("shm_open(" + name + ", O_CREAT|O_EXCL, 0600)", errno);
  FdGuard guard{fd};
  // From here on the name exists: every failure path must unlink it before throwing.
  auto fail = [&](const std::string& what, int error) {
    ::shm_unlink(name.c_str());
    throw_os_error(what, error);
  };
  // shm_open applies the umask; 0600 must hold regardless.
  if (::fchmod(fd, S_IRUSR | S_IWUSR) != 0) fail("fchmod(" + name + ", 0600)", errno);
  if (::ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    fail("ftruncate(" + name + ", " + std::to_string(bytes) + " bytes)", errno);
  }
  // posix_fallocate returns the error instead of setting errno.
  if (int error = ::posix_fallocate(fd, 0, static_cast<off_t>(bytes)); error != 0 && error != EOPNOTSUPP) {
    fail("posix_fallocate(" + name + ", " + std::to_string(bytes) + " bytes; is /dev/shm large enough?)", error);
  }
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  if (p == MAP_FAILED) fail("mmap(" + name + ", " + std::to_string(bytes) + " bytes)", errno);
  return ShmSegment(std::move(name), static_cast<std::byte*>(p), bytes, /*creator=*/true);
}

ShmSegment ShmSegment::open(const std::string& name, std::size_t expected_bytes) {
  if (name.rfind(kSegmentNamePrefix, 0) != 0) {
    throw Error(ErrorKind::kInvalidArgument,
                "shared-memory name: expected a name starting with '" + std::string(kSegmentNamePrefix) + "', got '" +
                    name + "'");
  }
  int fd = ::shm_open(name.c_str(), O_RDWR | O_CLOEXEC, 0);
  if (fd < 0) throw_os_error("shm_open(" + name + ")", errno);
  FdGuard guard{fd};
  struct stat st {};
  if (::fstat(fd, &st) != 0) throw_os_error("fstat(" + name + ")", errno);
  if (st.st_uid != ::geteuid() || (st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "0%03o", static_cast<unsigned>(st.st_mode & 0777));
    throw Error(ErrorKind::kInvalidArgument, "shared-memory segment " + name + ": expected owner uid " +
                                                 std::to_string(::geteuid()) + " and mode 0600, got uid " +
                                                 std::to_string(st.st_uid) + " and mode " + mode);
  }
  if (static_cast<std::size_t>(st.st_size) != expected_bytes) {
    throw Error(ErrorKind::kInvalidArgument, "shared-memory segment " + name + ": expected " +
                                                 std::to_string(expected_bytes) + " bytes, got " +
                                                 std::to_string(st.st_size));
  }
  std::byte* data = map_shared(fd, expected_bytes, name);
  return ShmSegment(name, data, expected_bytes, /*creator=*/false);
}

bool ShmSegment::unlink_name(const std::string& name) {
  if (::shm_unlink(name.c_str()) == 0) return true;
  if (errno == ENOENT) return false;
  throw_os_error("shm_unlink(" + name + ")", errno);
}

ShmSegment::ShmSegment(ShmSegment&& other) noexcept
    : name_(std::move(other.name_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      creator_(std::exchange(other.creator_, false)),
      linked_(std::exchange(other.linked_, false)) {}

ShmSegment& ShmSegment::operator=(ShmSegment&& other) noexcept {
  if (this != &other) {
    close();
    name_ = std::move(other.name_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    creator_ = std::exchange(other.creator_, false);
    linked_ = std::exchange(other.linked_, false);
  }
  return *this;
}

ShmSegment::~ShmSegment() { close(); }

bool ShmSegment::unlink() {
  if (!linked_) return false;
  bool removed = unlink_name(name_);
  linked_ = false;
  return removed;
}

void ShmSegment::close() noexcept {
  if (creator_ && linked_) ::shm_unlink(name_.c_str());  // best effort: nothing to report to
  linked_ = false;
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace moelink::transport::host
