// One-copy intranode dispatch (DispatchArgs::direct; runtime/ops_intranode.h, "One-copy paths"):
// the sender writes every row straight into its receiver's receive region, at the row the
// receiver's receive order gives it (send_row_start from notify, then one more per token of the
// stream), and publishes its queue tail once, at the end of the stream. The receiver copies
// nothing: it waits until every tail it owns reached what notify announced and moves the heads
// up to the tails (so the next call starts with head == tail, as after a queue-based one). The
// same warps, virtual channels and token order as dispatch_send, so results are bit for bit
// those of the queue path. Senders never wait, hence receivers' waits always end.
#pragma once

#include "kernels/intranode_common.cuh"

namespace moelink::kernels::intranode {

// Bytes one row puts into a peer's receive region (for the byte counter).
MOELINK_HOST_DEVICE int64_t direct_row_bytes(const IntranodeShape& s) {
  return s.row_bytes + 4 * s.num_scales + 12 * s.num_topk + 4;
}

MOELINK_DEVICE void direct_send(const DispatchArgs& args, const IntranodeLayout& layout, const DirectRecvLayout& region,
                                int v, int dst, const WarpLanes& lanes) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const int channels = shape.virtual_channels();
  const TokenRange range = channel_tokens(args.num_tokens, channels, v);
  const int64_t first_expert = static_cast<int64_t>(dst) * shape.experts_per_rank;
  const Queue queue = Queue::of(node, layout, dst, v, node.rank);
  // The tail was last written by this rank (earlier calls drained the queue): it is the start.
  const uint64_t start = lanes.from_leader(lanes.leads() ? ld_acquire(queue.tail) : uint64_t{0});
  char* base = window_at<char>(node, dst, region.base);
  const int64_t first_row = args.send_row_start[dst * channels + v];
  int64_t sent = 0;

  for (int64_t batch = range.begin; batch < range.end; batch += lanes.count) {
    const int64_t my_token = batch + lanes.rank;
    const bool mine = my_token < range.end && args.is_token_in_rank[my_token * shape.num_ranks + dst];
    if (my_token < range.end && !mine) args.send_head[my_token * shape.num_ranks + dst] = -1;
    for (uint32_t selected = ballot(lanes.mask, mine); selected != 0; selected &= selected - 1) {
      const int64_t token = batch + lanes.rank_of(lowest_bit(selected));
      const int64_t row = first_row + sent;
      MOELINK_DEVICE_CHECK(row >= 0 && row < args.direct_rows,
                           "intranode dispatch: row %lld of rank %d is outside its receive region of %lld rows",
                           static_cast<long long>(row), dst, static_cast<long long>(args.direct_rows));
      warp_copy_input(lanes.mask, base + region.row + row * shape.row_bytes,
                      static_cast<const char*>(args.x) + token * shape.row_bytes, static_cast<size_t>(shape.row_bytes));
      uint32_t* scales = reinterpret_cast<uint32_t*>(base + region.scales) + row * shape.num_scales;
      const LaneRange scale_share = lane_range(lanes.mask, shape.num_scales);
      for (int64_t i = scale_share.begin; i < scale_share.end; i += scale_share.step) {
        scales[i] = args.x_scales[token * shape.num_scales + i];
      }
      int64_t* topk = reinterpret_cast<int64_t*>(base + region.topk) + row * shape.num_topk;
      float* weights = reinterpret_cast<float*>(base + region.weights) + row * shape.num_topk;
      const LaneRange topk_share = lane_range(lanes.mask, shape.num_topk);
      for (int64_t k = topk_share.begin; k < topk_share.end; k += topk_share.step) {
        const int64_t expert = args.topk_idx[token * shape.num_topk + k];
        const bool local = expert >= first_expert && expert < first_expert + shape.experts_per_rank;
        topk[k] = local ? expert - first_expert : -1;
        weights[k] = (local && args.topk_weights != nullptr) ? args.topk_weights[token * shape.num_topk + k] : 0.0f;
      }
      if (lanes.leads()) {
        reinterpret_cast<int32_t*>(base + region.src)[row] = static_cast<int32_t>(token);
        args.send_head[token * shape.num_ranks + dst] = static_cast<int32_t>(sent);
      }
      ++sent;
    }
  }
  syncwarp(lanes.mask);  // every working lane's writes precede the leader's release
  if (lanes.leads()) {
    st_release(queue.tail, start + static_cast<uint64_t>(sent));
    if (dst != node.rank && node.nvl_bytes != nullptr && sent > 0) {
      atomic_add(node.nvl_bytes, static_cast<uint64_t>(sent * direct_row_bytes(shape)));
    }
  }
}

// Waits until every queue (v, s) this warp serves has its final tail, then frees it. One queue at
// a time: senders never wait for room here, so no queue's tail depends on another's head.
MOELINK_DEVICE void direct_receive(const DispatchArgs& args, const IntranodeLayout& layout, int v, const WarpRole& role,
                                   const WarpLanes& lanes) {
  const IntranodeContext& node = args.node;
  const int ranks = node.shape.num_ranks, channels = node.shape.virtual_channels();
  if (!lanes.leads()) return;
  for (int src = role.first_peer; src < ranks; src += role.peer_stride) {
    const Queue queue = Queue::of(node, layout, node.rank, v, src);
    const uint64_t head = ld_acquire(queue.head);  // this rank's own word
    const int32_t* starts = args.recv_channel_start + src * channels + v;
    const uint64_t target = head + static_cast<uint64_t>(starts[1] - starts[0]);
    const uint64_t tail = wait_until(queue.tail, Cmp::kGe, target,
                                     WaitSite{"intranode dispatch: rows from sender", node.rank, src, v});
    // The tail is the sender's word: anything but what notify announced is a faulty peer.
    MOELINK_DEVICE_CHECK(tail == target, "intranode dispatch: sender %d wrote %lld rows, %lld expected", src,
                         static_cast<long long>(tail - head), static_cast<long long>(target - head));
    st_release(queue.head, tail);
  }
}

// The one-copy dispatch's own kernel (its register budget is not shared with the queue path's):
// the grid, warp map and epochs of dispatch_kernel.
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) dispatch_direct_kernel(DispatchArgs args) {
  const IntranodeContext& node = args.node;
  const IntranodeLayout layout = IntranodeLayout::of(node.shape);
  const WarpMap map = node.shape.map();
  const uint64_t epoch = operation_epoch(node, layout);
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
      const DirectRecvLayout region = DirectRecvLayout::of(node.shape, args.direct_rows, args.window_bytes);
      for (int dst = role.first_peer; dst < node.shape.num_ranks; dst += role.peer_stride) {
        direct_send(args, layout, region, v, dst, lanes);
      }
    } else {
      direct_receive(args, layout, v, role, lanes);
    }
  }
  end_operation(node, layout, epoch);
}

}  // namespace moelink::kernels::intranode
