// Self-test kernels for the arch.cuh primitives (contracts in runtime/ops_selftest.h). They are
// deliberately small: each failure in tests/test_simt.py points at one primitive.
#pragma once

#include "arch/arch.cuh"
#include "runtime/ops_selftest.h"

namespace moelink::kernels::selftest {

using namespace arch;
using moelink::selftest::kWarpOpResults;

struct WarpOpsArgs {
  const int32_t* in;
  int32_t* out;
  float* out_float;
};

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) warp_ops_kernel(WarpOpsArgs args) {
  const unsigned global = block_rank() * num_threads() + thread_rank();
  const int lane = static_cast<int>(lane_id());
  const uint32_t mask = activemask();
  const int32_t v = args.in[global];
  int32_t* out = args.out + global * kWarpOpResults;
  out[0] = shfl(mask, v, (lane * 7 + 3) % 32);
  out[1] = shfl_up(mask, v, 3);
  out[2] = shfl_down(mask, v, 5);
  out[3] = shfl_xor(mask, v, 6);
  out[4] = shfl(mask, v, lane + 1, 8);
  out[5] = shfl_down(mask, v, 2, 16);
  out[6] = static_cast<int32_t>(ballot(mask, v & 1));
  out[7] = any(mask, v > 900);
  out[8] = all(mask, v >= 0);
  out[9] = warp_reduce_sum(mask, v);
  out[10] = warp_reduce_min(mask, v);
  out[11] = warp_reduce_max(mask, v);
  out[12] = static_cast<int32_t>(mask);
  args.out_float[global] = warp_reduce_sum(mask, static_cast<float>(v) * 0.375f);
}

struct NamedBarrierArgs {
  int32_t* out;
  int rounds;
};

// 128 threads: warps 0-1 are group A (barrier 1), warps 2-3 group B (barrier 2).
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) named_barriers_kernel(NamedBarrierArgs args) {
  MOELINK_SHARED(int32_t, slots, [2][64]);
  MOELINK_SHARED(int32_t, produced, [32]);
  const int tid = static_cast<int>(thread_rank());
  const int group = tid / 64, member = tid % 64;
  int errors = 0;
  for (int round = 0; round < args.rounds; ++round) {
    slots[group][member] = round * 1000 + member;
    bar_sync(1 + group, 64);
    const int neighbour = (member + 1) % 64;
    if (slots[group][neighbour] != round * 1000 + neighbour) ++errors;
    bar_sync(1 + group, 64);  // nobody overwrites a slot its neighbour has not read yet
  }
  if (errors != 0) atomic_add<Scope::kBlock>(&args.out[group], errors);

  // Producer/consumer on barrier 3: warp 0 arrives without waiting, warp 2 waits.
  if (warp_id() == 0) {
    produced[lane_id()] = 1000 + static_cast<int32_t>(lane_id());
    bar_arrive(3, 64);
  } else if (warp_id() == 2) {
    bar_sync(3, 64);
    args.out[2 + lane_id()] = produced[lane_id()];
  }
}

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) intrawarp_spin_kernel(int32_t* out) {
  MOELINK_SHARED(int32_t, flags, [32]);
  MOELINK_SHARED(int32_t, finished, [1]);
  const int lane = static_cast<int>(lane_id());
  st_relaxed<Scope::kBlock>(&flags[lane], 0);
  if (lane == 0) st_relaxed<Scope::kBlock>(&finished[0], 0);
  syncwarp();
  // Lane 0 runs first on the host's FIFO schedule and must yield to lane 31 here: a runtime that
  // kept a warp in lock step would never finish.
  if (lane < 31) {
    wait_until<Scope::kBlock>(&flags[lane + 1], Cmp::kGe, 1, WaitSite{"selftest: neighbour lane's flag"});
  }
  out[lane] = atomic_add<Scope::kBlock>(&finished[0], 1);
  st_release<Scope::kBlock>(&flags[lane], 1);
}

struct WaitForeverArgs {
  const uint64_t* flag;
  int rank, peer, channel;
};

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) wait_forever_kernel(WaitForeverArgs args) {
  if (thread_rank() == 0) {
    wait_until(args.flag, Cmp::kGe, uint64_t{1}, WaitSite{"selftest: a flag nobody sets", args.rank, args.peer, args.channel});
  }
}

struct AtomicsArgs {
  int64_t* counters64;
  int32_t* counters32;
};

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) atomics_kernel(AtomicsArgs args) {
  MOELINK_SHARED(int64_t, block_sum, [1]);
  const int64_t id = block_rank() * num_threads() + thread_rank();
  int64_t* c = args.counters64;
  if (thread_rank() == 0) block_sum[0] = 0;
  sync_block();
  atomic_add<Scope::kSys>(&c[0], int64_t{1});
  atomic_add<Scope::kGpu>(&c[1], id);
  atomic_add<Scope::kBlock>(&block_sum[0], id);
  atomic_max<Scope::kGpu>(&c[3], id);
  atomic_min<Scope::kGpu>(&c[4], id + 5);
  for (int64_t seen = ld_relaxed(&c[5]);;) {
    const int64_t old = atomic_cas(&c[5], seen, seen + 1);
    if (old == seen) break;
    seen = old;
  }
  atomic_add(&c[7], atomic_exch(&c[6], id));
  red_add_release(&c[8], int64_t{2});
  atomic_add<Scope::kBlock>(reinterpret_cast<uint32_t*>(&args.counters32[0]), 1u);
  atomic_max(&args.counters32[1], static_cast<int32_t>(id) - 100);
  sync_block();
  if (thread_rank() == 0) atomic_add(&c[2], ld_relaxed<Scope::kBlock>(&block_sum[0]));
}

struct DeviceCheckArgs {
  const int32_t* values;
  int count;
};

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) device_check_kernel(DeviceCheckArgs args) {
  const int t = static_cast<int>(block_rank() * num_threads() + thread_rank());
  if (t < args.count) {
    MOELINK_DEVICE_CHECK(args.values[t] != 13, "value %d at index %d is forbidden", args.values[t], t);
  }
}

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) broken_sync_kernel(int kind) {
  const unsigned lane = lane_id();
  if (kind == 0) {
    if (warp_id() == 0) bar_sync(1, 64);  // warp 1 never arrives
  } else if (kind == 1) {
    if (lane == 5) return;
    syncwarp(kFullMask);  // names lane 5, which has exited
  } else {
    if (lane < 16) {
      ballot(kFullMask, true);
    } else {
      shfl(kFullMask, 1, 0);
    }
  }
}

struct PingPongArgs {
  uint64_t* my_flag;
  const uint64_t* peer_flag;
  int32_t* my_payload;
  const int32_t* peer_payload;
  int payload_words, role, iterations, rank;
  int32_t* errors;
};

MOELINK_DEVICE int32_t initiator_word(int iteration, int word) { return iteration * 1000003 + word; }
MOELINK_DEVICE int32_t responder_word(int iteration, int word) { return iteration * 7 + word; }

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) pingpong_kernel(PingPongArgs a) {
  const int lane = static_cast<int>(lane_id());
  const int peer = 1 - a.role;
  int errors = 0;
  auto await_peer = [&](int iteration) {
    if (lane == 0) {
      wait_until(a.peer_flag, Cmp::kGe, static_cast<uint64_t>(iteration),
                 WaitSite{"selftest: pingpong peer flag", a.rank, peer});
    }
    syncwarp();
  };
  auto publish = [&](int iteration) {
    syncwarp();  // every lane's payload writes happen before lane 0's release
    if (lane == 0) st_release(a.my_flag, static_cast<uint64_t>(iteration));
  };
  for (int i = 1; i <= a.iterations; ++i) {
    if (a.role == 0) {
      for (int w = lane; w < a.payload_words; w += kWarpSize) a.my_payload[w] = initiator_word(i, w);
      publish(i);
      await_peer(i);
      for (int w = lane; w < a.payload_words; w += kWarpSize) errors += a.peer_payload[w] != responder_word(i, w);
    } else {
      await_peer(i);
      for (int w = lane; w < a.payload_words; w += kWarpSize) errors += a.peer_payload[w] != initiator_word(i, w);
      for (int w = lane; w < a.payload_words; w += kWarpSize) a.my_payload[w] = responder_word(i, w);
      publish(i);
    }
  }
  errors = warp_reduce_sum(kFullMask, errors);
  if (lane == 0) *a.errors = errors;
}

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(1024) cost_probe_kernel(int kind, int iterations) {
  if (kind == 0) {
    for (int i = 0; i < iterations; ++i) syncwarp();
  }
}

}  // namespace moelink::kernels::selftest
