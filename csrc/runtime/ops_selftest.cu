// Compiled by g++ into moelink._host and by nvcc into moelink._cuda.
#include "runtime/ops_selftest.h"

#include "kernels/selftest.cuh"

namespace moelink::selftest {

namespace k = kernels::selftest;

void warp_ops(const int32_t* in, int32_t* out, float* out_float, int num_blocks, int threads_per_block,
              const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "selftest_warp_ops", k::warp_ops_kernel, num_blocks, threads_per_block, 0,
                 k::WarpOpsArgs{in, out, out_float});
}

void named_barriers(int32_t* out, int rounds, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "selftest_named_barriers", k::named_barriers_kernel, 1, 128, 0, k::NamedBarrierArgs{out, rounds});
}

void intrawarp_spin(int32_t* out, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "selftest_intrawarp_spin", k::intrawarp_spin_kernel, 1, 32, 0, out);
}

void wait_forever(const uint64_t* flag, int peer, int channel, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "selftest_wait_forever", k::wait_forever_kernel, 1, 32, 0,
                 k::WaitForeverArgs{flag, ctx.rank, peer, channel});
}

void atomics(int64_t* counters64, int32_t* counters32, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "selftest_atomics", k::atomics_kernel, 4, 128, 0, k::AtomicsArgs{counters64, counters32});
}

void device_check(const int32_t* values, int count, const LaunchContext& ctx) {
  const int threads = 128, blocks = count > 0 ? (count + threads - 1) / threads : 1;
  MOELINK_LAUNCH(ctx, "selftest_device_check", k::device_check_kernel, blocks, threads, 0,
                 k::DeviceCheckArgs{values, count});
}

void broken_sync(int kind, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "selftest_broken_sync", k::broken_sync_kernel, 1, 64, 0, kind);
}

void pingpong(uint64_t* my_flag, const uint64_t* peer_flag, int32_t* my_payload, const int32_t* peer_payload,
              int payload_words, int role, int iterations, int32_t* errors, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "selftest_pingpong", k::pingpong_kernel, 1, 32, 0,
                 k::PingPongArgs{my_flag, peer_flag, my_payload, peer_payload, payload_words, role, iterations,
                                 ctx.rank, errors});
}

void cost_probe(int kind, int blocks, int threads, int iterations, const LaunchContext& ctx) {
  MOELINK_LAUNCH(ctx, "selftest_cost_probe", k::cost_probe_kernel, blocks, threads, 0, kind, iterations);
}

}  // namespace moelink::selftest
