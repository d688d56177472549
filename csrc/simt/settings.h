// Process-wide settings of the SIMT runtime (deadline, schedule) and its statistics.
#pragma once

#include <cstdint>

#include "simt/runtime.h"

namespace moelink::simt {

struct Settings {
  uint64_t timeout_ns = 0;
  bool random = false;          // random schedule
  uint64_t seed = 0;            // its seed
  double fuzz_probability = 0;  // chance of a switch at each memory primitive
};

// A snapshot; the first call reads MOELINK_TIMEOUT_S and MOELINK_SIMT_SCHEDULE.
Settings current_settings();
// 0, 1, 2, ... per launch in this process: a random schedule uses seed + index.
uint64_t next_launch_index();
void add_stats(const Stats& delta);

}  // namespace moelink::simt
