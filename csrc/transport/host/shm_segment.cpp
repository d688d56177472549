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

constexpr unsigned kRequiredSeals = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL;

// OS failures are reported as kInvalidArgument until errors.h grows an OS-error kind: the usual
// causes (size beyond the memory limit, a creator that is gone) are the caller's arguments.
[[noreturn]] void throw_os_error(const std::string& what, int error) {
  throw Error(ErrorKind::kInvalidArgument, what + ": " + std::strerror(error) + " (errno " + std::to_string(error) + ")");
}

[[noreturn]] void refuse(const std::string& what) { throw Error(ErrorKind::kInvalidArgument, what); }

// Closes a descriptor on every exit path unless released; the mapping outlives it.
struct FdGuard {
  int fd;
  ~FdGuard() {
    if (fd >= 0) ::close(fd);
  }
  int release() { return std::exchange(fd, -1); }
};

// What /proc/self/fd/<fd> links to: "/memfd:<name> (deleted)" for a memfd.
std::string link_target(int fd) {
  char path[64], target[512];
  std::snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
  ssize_t n = ::readlink(path, target, sizeof target - 1);
  if (n < 0) return "?";
  return std::string(target, static_cast<std::size_t>(n));
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
  unsigned char random[kSegmentIdHexDigits / 2];
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

ShmSegment::ShmSegment(std::string name, std::byte* data, std::size_t size, bool creator, int fd)
    : name_(std::move(name)), data_(data), size_(size), creator_(creator), fd_(fd) {}

ShmSegment ShmSegment::create(std::size_t bytes, std::string_view tag) {
  if (bytes == 0) throw Error(ErrorKind::kInvalidArgument, "shared-memory segment size: expected > 0 bytes, got 0");
  std::string name = make_segment_name(tag);
  const std::string what = "memfd " + name;
  FdGuard guard{::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING)};
  if (guard.fd < 0) throw_os_error("memfd_create(" + name + ")", errno);
  // A memfd starts with mode 0777 (less the umask); owner-only must hold regardless.
  if (::fchmod(guard.fd, S_IRUSR | S_IWUSR) != 0) throw_os_error("fchmod(" + what + ", 0600)", errno);
  if (::ftruncate(guard.fd, static_cast<off_t>(bytes)) != 0) {
    throw_os_error("ftruncate(" + what + ", " + std::to_string(bytes) + " bytes)", errno);
  }
  // posix_fallocate returns the error instead of setting errno.
  if (int error = ::posix_fallocate(guard.fd, 0, static_cast<off_t>(bytes)); error != 0 && error != EOPNOTSUPP) {
    throw_os_error("fallocate(" + what + ", " + std::to_string(bytes) + " bytes; is there memory for shared pages?)",
                   error);
  }
  if (::fcntl(guard.fd, F_ADD_SEALS, kRequiredSeals) != 0) throw_os_error("fcntl(" + what + ", F_ADD_SEALS)", errno);
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, guard.fd, 0);
  if (p == MAP_FAILED) throw_os_error("mmap(" + what + ", " + std::to_string(bytes) + " bytes)", errno);
  return ShmSegment(std::move(name), static_cast<std::byte*>(p), bytes, /*creator=*/true, guard.release());
}

ShmSegment ShmSegment::open(pid_t pid, int fd, const std::string& name, std::size_t expected_bytes) {
  if (name.rfind(kSegmentNamePrefix, 0) != 0) {
    refuse("shared-memory segment name: expected a name starting with '" + std::string(kSegmentNamePrefix) +
           "', got '" + name + "'");
  }
  if (pid <= 0 || fd < 0) {
    refuse("shared-memory segment " + name + ": expected a process id > 0 and a descriptor >= 0, got pid " +
           std::to_string(pid) + " fd " + std::to_string(fd));
  }
  const std::string path = "/proc/" + std::to_string(pid) + "/fd/" + std::to_string(fd);
  FdGuard guard{::open(path.c_str(), O_RDWR | O_CLOEXEC)};
  if (guard.fd < 0) {
    const int error = errno;
    const char* why = error == ENOENT ? " (the creating process exited or closed the descriptor)"
                      : error == EACCES || error == EPERM ? " (another user's process, or not dumpable)"
                                                           : "";
    throw_os_error("open(" + path + ") for segment " + name + why, error);
  }
  // Every check is on the descriptor actually opened, so nothing can change between check and use.
  const std::string target = link_target(guard.fd);
  const std::string expected_target = "/memfd:" + name + " (deleted)";
  if (target != expected_target) {
    refuse("shared-memory segment at " + path + ": expected " + expected_target + ", got " + target);
  }
  struct stat st {};
  if (::fstat(guard.fd, &st) != 0) throw_os_error("fstat(" + path + ")", errno);
  if (!S_ISREG(st.st_mode) || st.st_uid != ::geteuid() || (st.st_mode & 077) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "0%03o", static_cast<unsigned>(st.st_mode & 0777));
    refuse("shared-memory segment " + name + ": expected a regular file of owner uid " + std::to_string(::geteuid()) +
           " and mode 0600, got uid " + std::to_string(st.st_uid) + " and mode " + mode);
  }
  if (static_cast<std::size_t>(st.st_size) != expected_bytes) {
    refuse("shared-memory segment " + name + ": expected " + std::to_string(expected_bytes) + " bytes, got " +
           std::to_string(st.st_size));
  }
  const int seals = ::fcntl(guard.fd, F_GET_SEALS);
  if (seals < 0 || (static_cast<unsigned>(seals) & kRequiredSeals) != kRequiredSeals) {
    refuse("shared-memory segment " + name + ": expected its size sealed (F_SEAL_SHRINK|F_SEAL_GROW|F_SEAL_SEAL), got seals " +
           std::to_string(seals));
  }
  void* p = ::mmap(nullptr, expected_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, guard.fd, 0);
  if (p == MAP_FAILED) throw_os_error("mmap(" + path + ", " + std::to_string(expected_bytes) + " bytes)", errno);
  return ShmSegment(name, static_cast<std::byte*>(p), expected_bytes, /*creator=*/false, -1);
}

ShmSegment::ShmSegment(ShmSegment&& other) noexcept
    : name_(std::move(other.name_)),
      data_(std::exchange(other.data_, nullptr)),
      size_(std::exchange(other.size_, 0)),
      creator_(std::exchange(other.creator_, false)),
      fd_(std::exchange(other.fd_, -1)) {}

ShmSegment& ShmSegment::operator=(ShmSegment&& other) noexcept {
  if (this != &other) {
    close();
    name_ = std::move(other.name_);
    data_ = std::exchange(other.data_, nullptr);
    size_ = std::exchange(other.size_, 0);
    creator_ = std::exchange(other.creator_, false);
    fd_ = std::exchange(other.fd_, -1);
  }
  return *this;
}

ShmSegment::~ShmSegment() { close(); }

void ShmSegment::close_descriptor() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void ShmSegment::close() noexcept {
  close_descriptor();
  if (data_ != nullptr) ::munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace moelink::transport::host
