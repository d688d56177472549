#include "simt/settings.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <string>

#include "runtime/errors.h"

namespace moelink::simt {

namespace {

constexpr double kDefaultTimeoutSeconds = 100.0;
constexpr double kDefaultFuzzProbability = 0.125;

struct State {
  std::mutex mutex;
  Settings settings;
  std::string schedule_spec = "deterministic";
  std::atomic<uint64_t> launch_index{0};
  std::atomic<uint64_t> launches{0}, fibers{0}, switches{0}, parked_waits{0}, polls{0}, idle_sleeps{0};
};

Error schedule_error(const std::string& spec) {
  return Error(ErrorKind::kInvalidArgument,
               "schedule: expected 'deterministic' or 'random:<seed>[:<probability in [0, 1]>]', got '" + spec + "'");
}

// Parses a schedule spec into `settings` (all or nothing).
void parse_schedule(const std::string& spec, Settings& settings) {
  if (spec.empty() || spec == "deterministic") {
    settings.random = false;
    return;
  }
  if (spec.rfind("random:", 0) != 0) throw schedule_error(spec);
  const std::string rest = spec.substr(7);
  const size_t colon = rest.find(':');
  size_t used = 0;
  uint64_t seed;
  double probability = kDefaultFuzzProbability;
  try {
    const std::string seed_text = rest.substr(0, colon);
    seed = std::stoull(seed_text, &used);
    if (used != seed_text.size()) throw schedule_error(spec);
    if (colon != std::string::npos) {
      const std::string p_text = rest.substr(colon + 1);
      probability = std::stod(p_text, &used);
      if (used != p_text.size() || !(probability >= 0.0 && probability <= 1.0)) throw schedule_error(spec);
    }
  } catch (const std::logic_error&) {
    throw schedule_error(spec);
  }
  settings.random = true;
  settings.seed = seed;
  settings.fuzz_probability = probability;
}

double timeout_from_env() {
  const char* env = std::getenv("MOELINK_TIMEOUT_S");
  if (env == nullptr || *env == '\0') return kDefaultTimeoutSeconds;
  char* end = nullptr;
  double seconds = std::strtod(env, &end);
  if (end == env || *end != '\0' || !(seconds > 0) || !std::isfinite(seconds)) {
    throw Error(ErrorKind::kInvalidArgument,
                std::string("MOELINK_TIMEOUT_S: expected a positive number of seconds, got '") + env + "'");
  }
  return seconds;
}

State& state() {
  static State* instance = [] {
    auto* s = new State();
    s->settings.timeout_ns = static_cast<uint64_t>(timeout_from_env() * 1e9);
    if (const char* env = std::getenv("MOELINK_SIMT_SCHEDULE"); env != nullptr && *env != '\0') {
      parse_schedule(env, s->settings);
      s->schedule_spec = env;
    }
    return s;
  }();
  return *instance;
}

}  // namespace

Settings current_settings() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.settings;
}

uint64_t next_launch_index() { return state().launch_index.fetch_add(1, std::memory_order_relaxed); }

void set_wait_timeout(double seconds) {
  if (!(seconds > 0) || !std::isfinite(seconds)) {
    throw Error(ErrorKind::kInvalidArgument,
                "timeout: expected a positive number of seconds, got " + std::to_string(seconds));
  }
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.settings.timeout_ns = static_cast<uint64_t>(seconds * 1e9);
}

double wait_timeout() { return static_cast<double>(current_settings().timeout_ns) / 1e9; }

void set_schedule(const std::string& spec) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  Settings updated = s.settings;
  parse_schedule(spec, updated);
  s.settings = updated;
  s.schedule_spec = spec.empty() ? "deterministic" : spec;
  s.launch_index.store(0, std::memory_order_relaxed);  // a new schedule replays from its start
}

std::string schedule() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.schedule_spec;
}

void add_stats(const Stats& delta) {
  State& s = state();
  s.launches += delta.launches;
  s.fibers += delta.fibers;
  s.switches += delta.switches;
  s.parked_waits += delta.parked_waits;
  s.polls += delta.polls;
  s.idle_sleeps += delta.idle_sleeps;
}

Stats stats() {
  State& s = state();
  Stats out;
  out.launches = s.launches;
  out.fibers = s.fibers;
  out.switches = s.switches;
  out.parked_waits = s.parked_waits;
  out.polls = s.polls;
  out.idle_sleeps = s.idle_sleeps;
  return out;
}

}  // namespace moelink::simt
