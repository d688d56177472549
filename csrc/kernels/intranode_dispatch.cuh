// Intranode dispatch: every token goes to every rank of the node that hosts one of its top-k
// experts, through per-(virtual channel, sender) ring queues in the receiver's window.
//
// Grid: 2 * num_channels blocks of W warps (WarpMap, runtime/ops_intranode.h). Even block 2c
// sends channel c: warp (sub, d) walks virtual channel v = c * S + sub in token order and
// enqueues the tokens bound for rank d (payload row, FP8 scales, top-k ids made local to d,
// weights, token index), publishing the tail every `send_chunk` tokens and whenever it must wait
// for room. Odd block 2c+1 receives channel c: warp (sub, s) drains queue (v, s) into the receive
// buffer at the rows notify assigned to (s, v), releasing the head as it goes. Receive order is
// therefore: by sender rank, then virtual channel, then token index, i.e. by sender, then token.
// With more ranks than warps a warp serves several peers: a sender one after the other (a
// receiver never waits on anything but data, so room always comes), a receiver all at once,
// waiting on its data doorbell. On the host each warp's work runs on one fiber (work_lanes).
// The one-copy form (DispatchArgs::direct) is dispatch_direct_kernel, intranode_dispatch_direct.cuh.
#pragma once

#include "kernels/intranode_common.cuh"

namespace moelink::kernels::intranode {

struct DispatchTuning {
  int send_chunk;  // tokens between tail publications
};

MOELINK_HOST_DEVICE int64_t dispatch_slot_bytes(const IntranodeShape& s) {
  return s.row_bytes + 4 * s.num_scales + 8 * s.num_topk + 4;
}

// The receiver warp's data doorbell when it serves several queues, else null.
MOELINK_DEVICE uint64_t* data_doorbell(const IntranodeContext& node, const IntranodeLayout& layout, const WarpMap& map,
                                       int owner, int v, int sender) {
  if (map.peers_per_warp == 1) return nullptr;
  const int warp = warp_of_peer(map, node.shape.num_ranks, 0, sender);
  return counter_at(node, owner, layout.data_bell, static_cast<int64_t>(v) * kMaxBlockWarps + warp);
}

MOELINK_DEVICE void dispatch_send(const DispatchArgs& args, const IntranodeLayout& layout, const WarpMap& map, int v,
                                  int dst, int send_chunk, const WarpLanes& lanes) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const TokenRange range = channel_tokens(args.num_tokens, shape.virtual_channels(), v);
  const int64_t first_expert = static_cast<int64_t>(dst) * shape.experts_per_rank;
  QueueSender sender = QueueSender::open(node, Queue::of(node, layout, dst, v, node.rank), dst, v, send_chunk,
                                         dispatch_slot_bytes(shape), data_doorbell(node, layout, map, dst, v, node.rank),
                                         "intranode dispatch: room in receiver's queue", lanes.mask);
  const Queue& queue = sender.queue;

  // Each working lane looks at one token of the batch; the ballot says which go to `dst`.
  for (int64_t batch = range.begin; batch < range.end; batch += lanes.count) {
    const int64_t my_token = batch + lanes.rank;
    const bool mine = my_token < range.end && args.is_token_in_rank[my_token * shape.num_ranks + dst];
    if (my_token < range.end && !mine) args.send_head[my_token * shape.num_ranks + dst] = -1;
    for (uint32_t selected = ballot(lanes.mask, mine); selected != 0; selected &= selected - 1) {
      const int64_t token = batch + lanes.rank_of(lowest_bit(selected));
      const int slot = sender.reserve();
      warp_copy_input(lanes.mask, queue.base + layout.row + slot * shape.row_bytes,
                      static_cast<const char*>(args.x) + token * shape.row_bytes, static_cast<size_t>(shape.row_bytes));
      uint32_t* scales = reinterpret_cast<uint32_t*>(queue.base + layout.scales) + static_cast<int64_t>(slot) * shape.num_scales;
      const LaneRange scale_share = lane_range(lanes.mask, shape.num_scales);
      for (int64_t i = scale_share.begin; i < scale_share.end; i += scale_share.step) {
        scales[i] = args.x_scales[token * shape.num_scales + i];
      }
      int32_t* topk = reinterpret_cast<int32_t*>(queue.base + layout.topk) + static_cast<int64_t>(slot) * shape.num_topk;
      float* weights = reinterpret_cast<float*>(queue.base + layout.weights) + static_cast<int64_t>(slot) * shape.num_topk;
      const LaneRange topk_share = lane_range(lanes.mask, shape.num_topk);
      for (int64_t k = topk_share.begin; k < topk_share.end; k += topk_share.step) {
        const int64_t expert = args.topk_idx[token * shape.num_topk + k];
        const bool local = expert >= first_expert && expert < first_expert + shape.experts_per_rank;
        topk[k] = local ? static_cast<int32_t>(expert - first_expert) : -1;
        weights[k] = (local && args.topk_weights != nullptr) ? args.topk_weights[token * shape.num_topk + k] : 0.0f;
      }
      if (lanes.leads()) {
        reinterpret_cast<int32_t*>(queue.base + layout.src)[slot] = static_cast<int32_t>(token);
        args.send_head[token * shape.num_ranks + dst] = static_cast<int32_t>(sender.tail - sender.start);
      }
      sender.commit();
    }
  }
  sender.publish();
}

// One receiver warp's end of queue (v, src).
struct QueueReceiver {
  Queue queue;
  uint64_t head;
  int64_t first_row, expected, received;
  int src;

  // The receiver of queue (v, src) at `head` (the head its own last release left).
  MOELINK_DEVICE static QueueReceiver at(const DispatchArgs& args, const IntranodeLayout& layout, int v, int src,
                                         uint64_t head) {
    const IntranodeContext& node = args.node;
    QueueReceiver r;
    r.queue = Queue::of(node, layout, node.rank, v, src);
    r.head = head;
    const int32_t* starts = args.recv_channel_start + src * node.shape.virtual_channels() + v;
    r.first_row = starts[0];
    r.expected = starts[1] - starts[0];
    r.received = 0;
    r.src = src;
    return r;
  }
  // At the start of a call: the head is this rank's own word, last written by itself.
  MOELINK_DEVICE static QueueReceiver open(const DispatchArgs& args, const IntranodeLayout& layout, int v, int src,
                                           const WarpLanes& lanes) {
    const Queue queue = Queue::of(args.node, layout, args.node.rank, v, src);
    return at(args, layout, v, src, lanes.from_leader(lanes.leads() ? ld_acquire(queue.head) : uint64_t{0}));
  }
  MOELINK_DEVICE bool done() const { return received >= expected; }

  // Copies the tokens published up to `tail` into the receive buffer and frees their slots.
  MOELINK_DEVICE void drain(const DispatchArgs& args, const IntranodeLayout& layout, uint64_t tail, BulkStage& stage,
                            const WarpLanes& lanes) {
    const IntranodeShape& shape = args.node.shape;
    syncwarp(lanes.mask);  // the leader's acquire of the tail orders the other lanes' slot reads too
    const int64_t ready = static_cast<int64_t>(tail - head);
    // The tail is the sender's word: past what notify announced, it must not become a row.
    MOELINK_DEVICE_CHECK(ready >= 0 && ready <= expected - received,
                         "intranode dispatch: sender %d queued %lld tokens, %lld expected", src,
                         static_cast<long long>(received + ready), static_cast<long long>(expected));
    const LaneRange scale_share = lane_range(lanes.mask, shape.num_scales);
    const LaneRange topk_share = lane_range(lanes.mask, shape.num_topk);
    for (int64_t i = 0; i < ready; ++i) {
      const int slot = queue.slot(head + static_cast<uint64_t>(i));
      const int64_t row = first_row + received + i;
      warp_bulk_copy(lanes.mask, stage, static_cast<char*>(args.recv_x) + row * shape.row_bytes,
                     queue.base + layout.row + slot * shape.row_bytes, static_cast<size_t>(shape.row_bytes));
      const uint32_t* scales = reinterpret_cast<const uint32_t*>(queue.base + layout.scales) + static_cast<int64_t>(slot) * shape.num_scales;
      for (int64_t j = scale_share.begin; j < scale_share.end; j += scale_share.step) {
        args.recv_x_scales[row * shape.num_scales + j] = scales[j];
      }
      const int32_t* topk = reinterpret_cast<const int32_t*>(queue.base + layout.topk) + static_cast<int64_t>(slot) * shape.num_topk;
      const float* weights = reinterpret_cast<const float*>(queue.base + layout.weights) + static_cast<int64_t>(slot) * shape.num_topk;
      for (int64_t k = topk_share.begin; k < topk_share.end; k += topk_share.step) {
        const int32_t expert = topk[k];  // the sender's word: callers index expert tables with it
        MOELINK_DEVICE_CHECK(expert >= -1 && expert < shape.experts_per_rank,
                             "intranode dispatch: sender %d sent local expert id %d (this rank has %d)", src, expert,
                             shape.experts_per_rank);
        args.recv_topk_idx[row * shape.num_topk + k] = expert;
        if (args.recv_topk_weights != nullptr) args.recv_topk_weights[row * shape.num_topk + k] = weights[k];
      }
      if (lanes.leads()) {
        const int32_t source_token = reinterpret_cast<const int32_t*>(queue.base + layout.src)[slot];
        MOELINK_DEVICE_CHECK(source_token >= 0, "intranode dispatch: sender %d sent source token index %d", src,
                             source_token);
        args.recv_src_idx[row] = source_token;
      }
    }
    received += ready;
    head = tail;
    syncwarp(lanes.mask);  // every lane is done with the slots before the leader frees them
    if (lanes.leads()) st_release(queue.head, head);
  }
};

MOELINK_DEVICE void dispatch_receive(const DispatchArgs& args, const IntranodeLayout& layout, const WarpMap& map, int v,
                                     const WarpRole& role, BulkStage& stage, const WarpLanes& lanes) {
  const IntranodeContext& node = args.node;
  const int ranks = node.shape.num_ranks;
  if (map.peers_per_warp == 1) {
    QueueReceiver r = QueueReceiver::open(args, layout, v, role.first_peer, lanes);
    while (!r.done()) {
      const uint64_t tail = lanes.from_leader(
          lanes.leads() ? wait_until(r.queue.tail, Cmp::kGt, r.head,
                                     WaitSite{"intranode dispatch: tokens from sender", node.rank, r.src, v})
                        : uint64_t{0});
      r.drain(args, layout, tail, stage, lanes);
    }
    return;
  }
  // Several queues: never wait on one of them while another may have data (see the header).
  uint64_t* bell = counter_at(node, node.rank, layout.data_bell, static_cast<int64_t>(v) * kMaxBlockWarps + role.first_peer);
  uint64_t heads[kMaxPeersPerWarp];
  int64_t received[kMaxPeersPerWarp];
  int peers = 0;
  for (int src = role.first_peer; src < ranks; src += role.peer_stride, ++peers) received[peers] = 0;
  for (int p = 0; p < peers; ++p) {
    heads[p] = QueueReceiver::open(args, layout, v, role.first_peer + p * role.peer_stride, lanes).head;
  }
  for (;;) {
    const uint64_t rung = lanes.from_leader(lanes.leads() ? ld_acquire(bell) : uint64_t{0});
    bool progress = false, all_done = true;
    for (int p = 0; p < peers; ++p) {
      QueueReceiver r = QueueReceiver::at(args, layout, v, role.first_peer + p * role.peer_stride, heads[p]);
      r.received = received[p];
      if (r.done()) continue;
      const uint64_t tail = lanes.from_leader(lanes.leads() ? ld_acquire(r.queue.tail) : uint64_t{0});
      if (tail != r.head) {
        r.drain(args, layout, tail, stage, lanes);
        progress = true;
      }
      heads[p] = r.head;
      received[p] = r.received;
      all_done = all_done && r.done();
    }
    if (all_done || aborted()) return;  // aborted: a doorbell that never rings again
    if (!progress && lanes.leads()) {
      wait_until(bell, Cmp::kGt, rung, WaitSite{"intranode dispatch: tokens from any of this warp's senders",
                                                node.rank, role.first_peer, v});
    }
    syncwarp(lanes.mask);
  }
}

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) dispatch_kernel(DispatchArgs args, DispatchTuning tuning) {
  const IntranodeContext& node = args.node;
  const IntranodeLayout layout = IntranodeLayout::of(node.shape);
  const WarpMap map = node.shape.map();
  const uint64_t epoch = operation_epoch(node, layout);
  MOELINK_DYNAMIC_SMEM(unsigned char, smem);
  BulkStage stage = bulk_stage(smem + warp_id() * kBulkStageBytes);  // every lane, before any leaves
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  if (!lanes.mine()) return;  // lanes with no work (host) leave; sync_block counts them as arrived
  if (args.barrier_first) {
    node_barrier(node, layout, epoch, "intranode dispatch: node barrier (peer has not entered this dispatch)");
  }
  const int channel = static_cast<int>(block_rank()) / 2;
  const WarpRole role = warp_role(map, node.shape.num_ranks, static_cast<int>(warp_id()));
  if (!role.idle()) {
    const int v = channel * map.sub_channels + role.sub;
    if (block_rank() % 2 == 0) {
      for (int dst = role.first_peer; dst < node.shape.num_ranks; dst += role.peer_stride) {
        dispatch_send(args, layout, map, v, dst, tuning.send_chunk, lanes);
      }
    } else {
      dispatch_receive(args, layout, map, v, role, stage, lanes);
    }
  }
  end_operation(node, layout, epoch);
}

}  // namespace moelink::kernels::intranode
