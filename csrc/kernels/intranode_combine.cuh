// Intranode combine: the reverse of dispatch. Each rank returns the rows it received (expert
// outputs, bf16) to their source ranks through the same queues, and each source rank sums, in
// fp32 and in rank order, the copies of every token it dispatched, plus optional biases.
//
// Grid: 2 * num_channels blocks of W warps (WarpMap). Even block 2c sends: warp (sub, s) returns,
// in order, the rows this rank received from (s, v) to queue (v, me) in s's window. Odd block
// 2c+1 reduces channel c of this rank's own tokens: the G = min(R, W) warps of sub-channel `sub`
// take virtual channel v in rounds of G * tokens_per_warp tokens. For token t and every rank d it
// went to, the row sits at position send_head[t][d] of queue (v, d) (recorded by the dispatch).
// After each round (one named barrier) the group releases how far each queue has been consumed,
// so a sender never overwrites a row that is still needed; a round reads at most round_tokens
// rows of a queue, hence capacity >= round_tokens (WarpMap). With more ranks than warps a sender
// warp serves several peers at once, waiting on its room doorbell, never on one peer.
// The one-copy form (CombineArgs::direct) is combine_direct_kernel, intranode_combine_direct.cuh.
#pragma once

#include "kernels/bf16x8.cuh"
#include "kernels/intranode_common.cuh"

namespace moelink::kernels::intranode {

struct CombineTuning {
  int send_chunk;
};

// Dynamic shared memory of the combine kernel: per sub-channel the queues' start positions, per
// warp the slot of every copy of the tokens it reduces in a round.
MOELINK_HOST_DEVICE size_t combine_starts_bytes(const IntranodeShape& s) {
  return static_cast<size_t>(s.sub_channels) * s.num_ranks * sizeof(uint64_t);
}
MOELINK_HOST_DEVICE size_t combine_smem_bytes(const IntranodeShape& s) {
  const WarpMap m = s.map();
  return combine_starts_bytes(s) + static_cast<size_t>(m.block_warps) * m.tokens_per_warp * s.num_ranks * sizeof(int32_t);
}

MOELINK_DEVICE int64_t combine_slot_bytes(const IntranodeShape& s) { return s.row_bytes + 4 * s.num_topk; }

// One row back to its source: payload and the top-k weights the experts produced for it.
MOELINK_DEVICE void send_row(const CombineArgs& args, const IntranodeLayout& layout, QueueSender& sender, int64_t row) {
  const IntranodeShape& shape = args.node.shape;
  const int slot = sender.reserve();
  warp_copy_input(sender.lanes, sender.queue.base + layout.row + slot * shape.row_bytes,
                  reinterpret_cast<const char*>(args.x) + row * shape.row_bytes, static_cast<size_t>(shape.row_bytes));
  float* weights = reinterpret_cast<float*>(sender.queue.base + layout.weights) + static_cast<int64_t>(slot) * shape.num_topk;
  const LaneRange share = lane_range(sender.lanes, shape.num_topk);
  for (int64_t k = share.begin; k < share.end; k += share.step) {
    weights[k] = args.topk_weights != nullptr ? args.topk_weights[row * shape.num_topk + k] : 0.0f;
  }
  sender.commit();
}

MOELINK_DEVICE QueueSender open_return_queue(const CombineArgs& args, const IntranodeLayout& layout, int v, int dst,
                                             int send_chunk, const WarpLanes& lanes) {
  return QueueSender::open(args.node, Queue::of(args.node, layout, dst, v, args.node.rank), dst, v, send_chunk,
                           combine_slot_bytes(args.node.shape), nullptr, "intranode combine: room in source rank's queue",
                           lanes.mask);
}

MOELINK_DEVICE void combine_send(const CombineArgs& args, const IntranodeLayout& layout, const WarpMap& map, int v,
                                 const WarpRole& role, int send_chunk, const WarpLanes& lanes) {
  const IntranodeContext& node = args.node;
  const int ranks = node.shape.num_ranks, channels = node.shape.virtual_channels();
  if (map.peers_per_warp == 1) {
    const int dst = role.first_peer;
    const int32_t* starts = args.recv_channel_start + dst * channels + v;
    // The handle's rows (validated by the Python layer; a cheap second look before they index x).
    MOELINK_DEVICE_CHECK(starts[0] >= 0 && starts[0] <= starts[1] && starts[1] <= args.num_recv,
                         "intranode combine: handle gives rows [%d, %d) of rank %d, %lld received", starts[0], starts[1],
                         dst, static_cast<long long>(args.num_recv));
    QueueSender sender = open_return_queue(args, layout, v, dst, send_chunk, lanes);
    for (int64_t row = starts[0]; row < starts[1]; ++row) send_row(args, layout, sender, row);
    sender.publish();
    return;
  }
  // Several peers: send to whichever has room; wait on the room doorbell when none has.
  uint64_t* bell = counter_at(node, node.rank, layout.room_bell, static_cast<int64_t>(v) * kMaxBlockWarps + role.first_peer);
  QueueSender senders[kMaxPeersPerWarp];
  int64_t next[kMaxPeersPerWarp];
  int peers = 0;
  for (int dst = role.first_peer; dst < ranks; dst += role.peer_stride, ++peers) {
    senders[peers] = open_return_queue(args, layout, v, dst, send_chunk, lanes);
    next[peers] = args.recv_channel_start[dst * channels + v];
  }
  for (;;) {
    const uint64_t rung = lanes.from_leader(lanes.leads() ? ld_acquire(bell) : uint64_t{0});
    bool progress = false, all_done = true;
    for (int p = 0; p < peers; ++p) {
      const int dst = role.first_peer + p * role.peer_stride;
      const int64_t end = args.recv_channel_start[dst * channels + v + 1];
      while (next[p] < end && senders[p].has_room()) {
        send_row(args, layout, senders[p], next[p]++);
        progress = true;
      }
      senders[p].publish();
      all_done = all_done && next[p] >= end;
    }
    if (all_done || aborted()) return;  // aborted: a doorbell that never rings again
    if (!progress && lanes.leads()) {
      wait_until(bell, Cmp::kGt, rung, WaitSite{"intranode combine: room in any of this warp's source ranks' queues",
                                                node.rank, role.first_peer, v});
    }
    syncwarp(lanes.mask);
  }
}

// Sums one token's copies and biases into combined_x, 8 bf16 channels (16 bytes) at a time, split
// over the working lanes with lane_range. `row_of(d)` is the token's row from rank d, or null where
// the token did not go; copies are added in rank order.
template <typename RowOf>
MOELINK_DEVICE void reduce_row(const CombineArgs& args, int64_t token, int ranks, const RowOf& row_of,
                               const WarpLanes& lanes) {
  const int64_t groups = args.hidden / 8;
  const LaneRange share = lane_range(lanes.mask, groups);
  for (int64_t g = share.begin; g < share.end; g += share.step) {
    Bf16x8Sum sum;
    for (int b = 0; b < 2; ++b) {
      if (args.bias[b] == nullptr) continue;
      add_bf16x8(sum, load16_input(args.bias[b] + token * args.hidden + g * 8));
    }
    for (int d = 0; d < ranks; ++d) {
      const char* row = row_of(d);
      if (row != nullptr) add_bf16x8(sum, load16(row + g * 16));
    }
    store16(args.combined_x + token * args.hidden + g * 8, pack_bf16x8(sum));
  }
}

// Reduces `count` consecutive tokens from `first`: the working lanes resolve every (token, rank)
// copy into `slots` ([count][R], -1 where the token did not go), then sum each token's copies in
// rank order (reduce_row).
MOELINK_DEVICE void reduce_tokens(const CombineArgs& args, const IntranodeLayout& layout, int v, int64_t first,
                                  int count, const uint64_t* queue_start, int32_t* slots, const WarpLanes& lanes) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const int ranks = shape.num_ranks;
  const int capacity = shape.map().capacity;
  const LaneRange items = lane_range(lanes.mask, static_cast<int64_t>(count) * ranks);
  for (int64_t item = items.begin; item < items.end; item += items.step) {
    const int j = static_cast<int>(item / ranks), d = static_cast<int>(item % ranks);
    const int64_t token = first + j;
    int32_t slot = -1;
    if (args.is_token_in_rank[token * ranks + d]) {
      const Queue queue = Queue::of(node, layout, node.rank, v, d);
      const int32_t offset = args.send_head[token * ranks + d];
      MOELINK_DEVICE_CHECK(offset >= 0, "intranode combine: handle has no queue position for token %lld of rank %d",
                           static_cast<long long>(token), d);
      const uint64_t position = queue_start[d] + static_cast<uint64_t>(offset);
      wait_until(queue.tail, Cmp::kGt, position, WaitSite{"intranode combine: expert output from rank", node.rank, d, v});
      slot = static_cast<int32_t>(position % static_cast<uint64_t>(capacity));
    }
    slots[item] = slot;
  }
  syncwarp(lanes.mask);  // the acquires and the slot writes, for every working lane

  // Queue (v, d) starts layout.queue_bytes after queue (v, d - 1).
  const char* queues = window_at<char>(node, node.rank, layout.slots + static_cast<int64_t>(v) * ranks * layout.queue_bytes);
  for (int j = 0; j < count; ++j) {
    const int64_t token = first + j;
    const int32_t* token_slots = slots + j * ranks;
    reduce_row(args, token, ranks, [&](int d) -> const char* {
      return token_slots[d] < 0 ? nullptr
                                : queues + d * layout.queue_bytes + layout.row + static_cast<int64_t>(token_slots[d]) * shape.row_bytes;
    }, lanes);
    if (args.combined_topk_weights != nullptr) {
      const LaneRange share = lane_range(lanes.mask, shape.num_topk);
      for (int64_t k = share.begin; k < share.end; k += share.step) {
        float weight = 0.0f;
        for (int d = 0; d < ranks; ++d) {
          if (token_slots[d] < 0) continue;
          const float* weights = reinterpret_cast<const float*>(queues + d * layout.queue_bytes + layout.weights);
          weight += weights[static_cast<int64_t>(token_slots[d]) * shape.num_topk + k];
        }
        args.combined_topk_weights[token * shape.num_topk + k] = weight;
      }
    }
  }
}

MOELINK_DEVICE void combine_receive(const CombineArgs& args, const IntranodeLayout& layout, const WarpMap& map, int v,
                                    int sub, int group_warp, const WarpLanes& lanes) {
  const IntranodeContext& node = args.node;
  const int ranks = node.shape.num_ranks;
  MOELINK_DYNAMIC_SMEM(unsigned char, smem);
  uint64_t* queue_start = reinterpret_cast<uint64_t*>(smem) + sub * ranks;
  int32_t* slots = reinterpret_cast<int32_t*>(smem + combine_starts_bytes(node.shape)) +
                   static_cast<int64_t>(warp_id()) * map.tokens_per_warp * ranks;
  // Named barrier per sub-channel, counted per warp (a warp whose idle lanes left still arrives).
  const int barrier = 1 + sub, barrier_threads = map.group_warps * kWarpSize;
  // Worker `worker` of the group owns queues worker, worker + group_workers, ...: it alone reads
  // their starts and releases their heads.
  const int worker = group_warp * lanes.count + lanes.rank, group_workers = map.group_warps * lanes.count;
  for (int d = worker; d < ranks; d += group_workers) queue_start[d] = ld_acquire(Queue::of(node, layout, node.rank, v, d).head);
  bar_sync(barrier, barrier_threads);

  const TokenRange range = channel_tokens(args.num_tokens, node.shape.virtual_channels(), v);
  for (int64_t round = range.begin; round < range.end; round += map.round_tokens) {
    const int64_t round_end = round + map.round_tokens < range.end ? round + map.round_tokens : range.end;
    const int64_t first = round + static_cast<int64_t>(group_warp) * map.tokens_per_warp;
    const int64_t last = first + map.tokens_per_warp < round_end ? first + map.tokens_per_warp : round_end;
    if (first < last) reduce_tokens(args, layout, v, first, static_cast<int>(last - first), queue_start, slots, lanes);
    bar_sync(barrier, barrier_threads);  // the group is done with this round's rows (and its slot scratch)
    // Rows of queue (v, d) used so far: one past the position of the round's last token sent by d.
    // Derived from the round's own tokens, not from what other warps record, because they may
    // already be reading the next round's rows.
    for (int d = worker; d < ranks; d += group_workers) {
      for (int64_t t = round_end - 1; t >= round; --t) {
        const int32_t position = args.send_head[t * ranks + d];
        if (position >= 0) {
          st_release(Queue::of(node, layout, node.rank, v, d).head, queue_start[d] + static_cast<uint64_t>(position) + 1);
          if (map.peers_per_warp > 1) {
            red_add_release(counter_at(node, d, layout.room_bell,
                                       static_cast<int64_t>(v) * kMaxBlockWarps + warp_of_peer(map, ranks, sub, node.rank)),
                            uint64_t{1});
          }
          break;
        }
      }
    }
  }
}

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) combine_kernel(CombineArgs args, CombineTuning tuning) {
  const IntranodeContext& node = args.node;
  const IntranodeLayout layout = IntranodeLayout::of(node.shape);
  const WarpMap map = node.shape.map();
  const uint64_t epoch = operation_epoch(node, layout);
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  if (!lanes.mine()) return;  // lanes with no work (host) leave; barriers count their warps without them
  node_barrier(node, layout, epoch, "intranode combine: node barrier (peer has not entered this combine)");
  const int channel = static_cast<int>(block_rank()) / 2;
  const int warp = static_cast<int>(warp_id());
  if (block_rank() % 2 == 0) {
    const WarpRole role = warp_role(map, node.shape.num_ranks, warp);
    if (!role.idle()) combine_send(args, layout, map, channel * map.sub_channels + role.sub, role, tuning.send_chunk, lanes);
  } else if (warp < map.sub_channels * map.group_warps) {
    const int sub = warp / map.group_warps;
    combine_receive(args, layout, map, channel * map.sub_channels + sub, sub, warp % map.group_warps, lanes);
  }
  end_operation(node, layout, epoch);
}

}  // namespace moelink::kernels::intranode
