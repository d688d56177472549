// Self-test kernels: each exercises one group of arch.cuh primitives so that tests/ can check the
// SIMT runtime primitive by primitive (and the CUDA build proves the same code compiles for sm_90).
// Every function launches one kernel and returns when it finished.
#pragma once

#include <cstdint>

#include "launch_context.h"

namespace moelink::selftest {

// Per thread, kWarpOpResults int32 results of warp collectives over `in` (one value per thread),
// with mask = activemask() so partial warps work. Result slots:
//   0 shfl(src=(lane*7+3)%32)  1 shfl_up(3)  2 shfl_down(5)  3 shfl_xor(6)  4 shfl(lane+1, width 8)
//   5 shfl_down(2, width 16)   6 ballot(v odd)  7 any(v > 900)  8 all(v >= 0)
//   9 warp_reduce_sum  10 warp_reduce_min  11 warp_reduce_max  12 activemask()
// and out_float[thread] = warp_reduce_sum(float(v) * 0.375f).
constexpr int kWarpOpResults = 13;
void warp_ops(const int32_t* in, int32_t* out, float* out_float, int num_blocks, int threads_per_block,
              const LaunchContext& ctx);

// Two groups of 64 threads synchronise on named barriers 1 and 2 for `rounds` rounds and count
// values they read before their partners wrote them (errors); warp 0 produces 32 values for warp 2
// through bar_arrive/bar_sync on barrier 3. out: [0] errors group A, [1] errors group B,
// [2..33] the values warp 2 consumed (expected 1000 + lane).
void named_barriers(int32_t* out, int rounds, const LaunchContext& ctx);

// Lane i of one warp waits for lane i+1's flag in shared memory, so lane 31 must run while lanes
// 0..30 spin. out[lane] = order in which lanes finished (expected 31 - lane).
void intrawarp_spin(int32_t* out, const LaunchContext& ctx);

// One thread waits for *flag >= 1 (nobody writes it): the launch must fail with CommTimeout.
void wait_forever(const uint64_t* flag, int peer, int channel, const LaunchContext& ctx);

// 4 blocks x 128 threads hammer atomics. counters64 (host-initialised):
//   [0] += 1 (sys)  [1] += thread id (gpu)  [2] per-block shared sums added once per block
//   [3] max(thread id)  [4] min(thread id + 5)  [5] += 1 through a CAS loop
//   [6] exch(thread id)  [7] sum of the values exch returned  [8] red.add.release 2
// counters32: [0] += 1 (uint32, block scope)  [1] max over signed ids - 100.
void atomics(int64_t* counters64, int32_t* counters32, const LaunchContext& ctx);

// Thread t checks values[t] != 13 with MOELINK_DEVICE_CHECK.
void device_check(const int32_t* values, int count, const LaunchContext& ctx);

// Launches that can never finish: 0 = a named barrier missing a warp, 1 = syncwarp naming an
// exited lane, 2 = divergent collectives in one warp. Each must fail with a clear error.
void broken_sync(int kind, const LaunchContext& ctx);

// One warp plays one side of an acquire/release handshake with another process over shared
// memory: for i = 1..iterations the initiator (role 0) writes payload i and releases its flag; the
// responder (role 1) acquires it, checks the payload, writes its own and releases. Both count
// payload words that did not match. payload_words per direction.
void pingpong(uint64_t* my_flag, const uint64_t* peer_flag, int32_t* my_payload, const int32_t* peer_payload,
              int payload_words, int role, int iterations, int32_t* errors, const LaunchContext& ctx);

// Runtime cost probes: `threads` threads of one block each call syncwarp `iterations` times
// (kind 0), or a kernel that does nothing (kind 1) on `blocks` x `threads`.
void cost_probe(int kind, int blocks, int threads, int iterations, const LaunchContext& ctx);

}  // namespace moelink::selftest
