#include "transport/host/host_windows.h"

#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <new>
#include <string>

#include "runtime/errors.h"

namespace moelink::transport::host {

namespace {

constexpr std::size_t kPageBytes = 4096;

[[noreturn]] void invalid(const std::string& message) { throw Error(ErrorKind::kInvalidArgument, message); }

std::string expected_got(const std::string& what, const std::string& expected, const std::string& got) {
  return what + ": expected " + expected + ", got " + got;
}

}  // namespace

const char* link_class_name(LinkClass link) { return link == LinkClass::kNvl ? "nvl" : "rdma"; }

HostWindows::HostWindows(int rank, int num_ranks, int ranks_per_node, std::size_t data_bytes, std::string_view tag,
                         bool nic_maps_remote)
    : rank_(rank),
      num_ranks_(num_ranks),
      ranks_per_node_(ranks_per_node),
      nic_maps_remote_(nic_maps_remote),
      owner_pid_(::getpid()) {
  if (num_ranks < 1) invalid(expected_got("HostWindows num_ranks", ">= 1", std::to_string(num_ranks)));
  if (rank < 0 || rank >= num_ranks) {
    invalid(expected_got("HostWindows rank", "in [0, " + std::to_string(num_ranks) + ")", std::to_string(rank)));
  }
  if (ranks_per_node < 1 || num_ranks % ranks_per_node != 0) {
    invalid(expected_got("HostWindows ranks_per_node", "a divisor of num_ranks = " + std::to_string(num_ranks),
                         std::to_string(ranks_per_node)));
  }
  if (data_bytes == 0) invalid(expected_got("HostWindows data_bytes", "> 0", "0"));
  data_bytes_ = (data_bytes + kPageBytes - 1) / kPageBytes * kPageBytes;
  attach_expected_ = static_cast<uint32_t>(nic_maps_remote ? num_ranks : ranks_per_node);

  segments_.resize(num_ranks);
  segments_[rank] = ShmSegment::create(segment_bytes(), tag);
  auto* h = new (segments_[rank].data()) WindowHeader{};  // the memory is zero; this starts the objects' lifetime
  h->layout_version = kWindowLayoutVersion;
  h->header_bytes = static_cast<uint32_t>(kWindowHeaderBytes);
  h->segment_bytes = segment_bytes();
  h->data_bytes = data_bytes_;
  h->owner_rank = rank;
  h->num_ranks = num_ranks;
  h->ranks_per_node = ranks_per_node;
  h->owner_pid = static_cast<int32_t>(owner_pid_);
  h->attach_expected.store(attach_expected_, std::memory_order_relaxed);
  h->attach_count.store(1, std::memory_order_relaxed);
  std::atomic_ref<uint64_t>(h->magic).store(kWindowMagic, std::memory_order_release);
  // Alone on its node and unseen by any NIC: nobody else will ever open the segment.
  if (attach_expected_ == 1) segments_[rank].close_descriptor();
}

HostWindows::~HostWindows() { close(); }

void HostWindows::check_open(const char* what) const {
  if (closed_) invalid(std::string("HostWindows.") + what + ": the windows were closed");
}

void HostWindows::check_rank(const char* what, int r) const {
  check_open(what);
  if (r < 0 || r >= num_ranks_) {
    invalid(expected_got(std::string("HostWindows.") + what + " rank", "in [0, " + std::to_string(num_ranks_) + ")",
                         std::to_string(r)));
  }
  if (!segments_[r].is_mapped()) {
    invalid(std::string("HostWindows.") + what + ": the window of rank " + std::to_string(r) +
            " is not mapped in rank " + std::to_string(rank_));
  }
}

void HostWindows::attach(int peer, pid_t pid, int fd, const std::string& name, std::size_t segment_bytes) {
  check_open("attach");
  if (peer < 0 || peer >= num_ranks_ || peer == rank_) {
    invalid(expected_got("HostWindows.attach peer", "another rank in [0, " + std::to_string(num_ranks_) + ")",
                         std::to_string(peer)));
  }
  if (!is_node_peer(peer) && !nic_maps_remote_) {
    invalid("HostWindows.attach: rank " + std::to_string(peer) + " is on node " + std::to_string(node_of(peer)) +
            ", rank " + std::to_string(rank_) + " on node " + std::to_string(node()) +
            ": windows of other nodes are mapped only for the NIC (nic_maps_remote)");
  }
  if (segments_[peer].is_mapped()) invalid("HostWindows.attach: rank " + std::to_string(peer) + " is already mapped");
  if (segment_bytes != this->segment_bytes()) {
    invalid(expected_got("HostWindows.attach segment_bytes of rank " + std::to_string(peer),
                         std::to_string(this->segment_bytes()) + " (windows are symmetric)",
                         std::to_string(segment_bytes)));
  }
  ShmSegment segment = ShmSegment::open(pid, fd, name, segment_bytes);
  auto* h = reinterpret_cast<WindowHeader*>(segment.data());
  // The creator stores the magic last, with release: everything checked below is complete.
  uint64_t magic = std::atomic_ref<uint64_t>(h->magic).load(std::memory_order_acquire);
  auto mismatch = [&](const char* field, int64_t expected, int64_t got) {
    if (expected != got) {
      invalid(expected_got("HostWindows.attach: header field " + std::string(field) + " of " + name + " (rank " +
                               std::to_string(peer) + ")",
                           std::to_string(expected), std::to_string(got)));
    }
  };
  mismatch("magic", static_cast<int64_t>(kWindowMagic), static_cast<int64_t>(magic));
  mismatch("layout_version", kWindowLayoutVersion, h->layout_version);
  mismatch("header_bytes", static_cast<int64_t>(kWindowHeaderBytes), h->header_bytes);
  mismatch("segment_bytes", static_cast<int64_t>(segment_bytes), static_cast<int64_t>(h->segment_bytes));
  mismatch("owner_rank", peer, h->owner_rank);
  mismatch("owner_pid", pid, h->owner_pid);
  mismatch("num_ranks", num_ranks_, h->num_ranks);
  mismatch("ranks_per_node", ranks_per_node_, h->ranks_per_node);
  mismatch("data_bytes", static_cast<int64_t>(data_bytes_), static_cast<int64_t>(h->data_bytes));
  h->attach_count.fetch_add(1, std::memory_order_acq_rel);
  segments_[peer] = std::move(segment);
}

void HostWindows::close_descriptor() {
  check_open("close_descriptor");
  segments_[rank_].close_descriptor();
}

bool HostWindows::is_mapped(int r) const {
  return !closed_ && r >= 0 && r < num_ranks_ && segments_[r].is_mapped();
}

std::byte* HostWindows::window_ptr(const char* what, int r, std::size_t offset, std::size_t bytes) const {
  if (offset > data_bytes_ || bytes > data_bytes_ - offset) {
    invalid(std::string("HostWindows.") + what + ": bytes [" + std::to_string(offset) + ", " +
            std::to_string(offset) + " + " + std::to_string(bytes) + ") are outside the " +
            std::to_string(data_bytes_) + "-byte window of rank " + std::to_string(r));
  }
  return segments_[r].data() + kWindowHeaderBytes + offset;
}

std::byte* HostWindows::peer_ptr(int peer, std::size_t offset, std::size_t bytes) const {
  check_open("peer_ptr");
  if (peer >= 0 && peer < num_ranks_ && !is_node_peer(peer)) {
    invalid("HostWindows.peer_ptr: rank " + std::to_string(peer) + " is on node " + std::to_string(node_of(peer)) +
            ", not on node " + std::to_string(node()) + " of rank " + std::to_string(rank_) +
            ": only the NIC reaches other nodes");
  }
  check_rank("peer_ptr", peer);
  return window_ptr("peer_ptr", peer, offset, bytes);
}

std::byte* HostWindows::nic_ptr(int r, std::size_t offset, std::size_t bytes) const {
  check_rank("nic_ptr", r);
  return window_ptr("nic_ptr", r, offset, bytes);
}

std::vector<std::byte*> HostWindows::node_window_bases() const {
  std::vector<std::byte*> bases(ranks_per_node_);
  for (int i = 0; i < ranks_per_node_; ++i) bases[i] = peer_ptr(node() * ranks_per_node_ + i);
  return bases;
}

uint64_t HostWindows::bytes_moved(int r, LinkClass link) const {
  check_rank("bytes_moved", r);
  return header(r)->bytes_moved[static_cast<int>(link)].value.load(std::memory_order_relaxed);
}

void HostWindows::reset_counters() {
  check_open("reset_counters");
  for (auto& c : header(rank_)->bytes_moved) c.value.store(0, std::memory_order_relaxed);
}

const WindowHeader* HostWindows::header_of(int r) const {
  check_rank("header_of", r);
  return header(r);
}

bool HostWindows::publish_failure(const std::string& text, int peer, uint64_t sequence) {
  check_open("publish_failure");
  if (peer < -1 || peer >= num_ranks_) {
    invalid(expected_got("HostWindows.publish_failure peer", "-1 or a rank in [0, " + std::to_string(num_ranks_) + ")",
                         std::to_string(peer)));
  }
  FailureRecordLayout& record = header(rank_)->failure;
  uint32_t expected = static_cast<uint32_t>(FailureState::kEmpty);
  if (!record.state.compare_exchange_strong(expected, static_cast<uint32_t>(FailureState::kWriting),
                                            std::memory_order_acq_rel)) {
    return false;  // the first failure stays: it is the one that explains the others
  }
  const std::size_t n = std::min(text.size(), kFailureTextBytes - 1);
  std::memcpy(record.text, text.data(), n);
  record.text[n] = '\0';
  record.text_bytes = static_cast<uint32_t>(n);
  record.peer = peer;
  record.sequence = sequence;
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  record.time_ns = static_cast<uint64_t>(now.tv_sec) * 1000000000ull + static_cast<uint64_t>(now.tv_nsec);
  record.state.store(static_cast<uint32_t>(FailureState::kPublished), std::memory_order_release);
  return true;
}

std::optional<FailureRecord> HostWindows::failure_of(int r) const {
  check_rank("failure_of", r);
  const FailureRecordLayout& record = header(r)->failure;
  if (record.state.load(std::memory_order_acquire) != static_cast<uint32_t>(FailureState::kPublished)) {
    return std::nullopt;
  }
  // Another process wrote this: bound every field before using it.
  FailureRecord out;
  out.rank = r;
  // Copies first, checks on the copies (the writer may be faulty and still writing).
  int32_t peer;
  uint32_t claimed;
  char text[kFailureTextBytes];
  std::memcpy(&peer, &record.peer, sizeof peer);
  std::memcpy(&out.sequence, &record.sequence, sizeof out.sequence);
  std::memcpy(&out.time_ns, &record.time_ns, sizeof out.time_ns);
  std::memcpy(&claimed, &record.text_bytes, sizeof claimed);
  std::memcpy(text, record.text, kFailureTextBytes);
  out.peer = peer >= 0 && peer < num_ranks_ ? peer : -1;
  const std::size_t limit = std::min<std::size_t>(claimed, kFailureTextBytes - 1);
  out.text.assign(text, strnlen(text, limit));
  return out;
}

void HostWindows::close() noexcept {
  if (closed_) return;
  closed_ = true;
  for (auto& segment : segments_) segment.close();
}

}  // namespace moelink::transport::host
