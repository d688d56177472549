// What a failed launch reports: where a fiber is, what an expired wait waited for, and the same
// facts structured (last_timeout) for the layers that turn a timeout into a root cause.
#include <algorithm>
#include <cstdio>
#include <string>

#include "simt/launch_state.h"

namespace moelink::simt {

namespace {

thread_local TimeoutInfo t_last_timeout;

}  // namespace

void reset_last_timeout() { t_last_timeout = TimeoutInfo{}; }

TimeoutInfo last_timeout() { return t_last_timeout; }

std::string Launch::where(const Fiber& fiber) const {
  std::string text = std::string("kernel '") + config_.kernel_name + "'";
  if (config_.rank >= 0) text += " rank " + std::to_string(config_.rank);
  text += " block " + std::to_string(fiber.id.block_rank) + " thread " + std::to_string(fiber.id.thread_rank);
  return text;
}

std::string Launch::describe_timeout(const Fiber& expired, uint64_t now) const {
  const DataWait& w = expired.wait;
  auto as_text = [&](uint64_t bits) {
    if (!w.value_signed) return std::to_string(w.value_bytes == 4 ? static_cast<uint32_t>(bits) : bits);
    return std::to_string(w.value_bytes == 4 ? static_cast<int64_t>(static_cast<int32_t>(bits))
                                             : static_cast<int64_t>(bits));
  };
  char addr[32];
  std::snprintf(addr, sizeof addr, "%p", w.addr);
  std::string text = where(expired) + ": waited " + std::to_string((now - w.since_ns) / 1000000) +
                     " ms for " + (w.site.what ? w.site.what : "?");
  if (w.site.rank >= 0 && config_.rank < 0) text += " (rank " + std::to_string(w.site.rank) + ")";
  if (w.site.peer >= 0) text += " from peer " + std::to_string(w.site.peer);
  if (w.site.channel >= 0) text += " on channel " + std::to_string(w.site.channel);
  text += ": value at " + std::string(addr) + " is " + as_text(w.seen) + ", waited for " +
          arch::cmp_text(w.cmp) + " " + as_text(w.value);
  if (parked_.size() > 1) text += " (" + std::to_string(parked_.size() - 1) + " other threads were waiting too)";
  return text + " [MOELINK_TIMEOUT_S=" + std::to_string(timeout_ns_ / 1000000000.0) + "]";
}

void Launch::record_timeout(const Fiber& expired, uint64_t now) const {
  TimeoutInfo info;
  info.valid = true;
  info.kernel = config_.kernel_name;
  info.rank = config_.rank >= 0 ? config_.rank : expired.wait.site.rank;
  info.peer = expired.wait.site.peer;
  info.channel = expired.wait.site.channel;
  info.what = expired.wait.site.what ? expired.wait.site.what : "?";
  info.waited_ns = now - expired.wait.since_ns;
  for (const Fiber* fiber : parked_) {
    if (fiber->wait.site.peer >= 0) info.peers_waited.push_back(fiber->wait.site.peer);
  }
  std::sort(info.peers_waited.begin(), info.peers_waited.end());
  info.peers_waited.erase(std::unique(info.peers_waited.begin(), info.peers_waited.end()), info.peers_waited.end());
  t_last_timeout = std::move(info);
}

}  // namespace moelink::simt
