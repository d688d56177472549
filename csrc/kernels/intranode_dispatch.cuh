// Intranode dispatch: every token goes to every rank of the node that hosts one of its top-k
// experts, through per-(channel, sender) ring queues in the receiver's window.
//
// Grid: 2 * num_channels blocks of one warp per rank. Even block 2c sends channel c: warp d walks
// the channel's tokens in order and enqueues those bound for rank d (payload row, FP8 scales,
// top-k ids made local to d, weights, token index), publishing the tail every `send_chunk` tokens
// and whenever it must wait for room. Odd block 2c+1 receives channel c: warp s drains queue
// (c, s) into the receive buffer at the rows notify assigned to (s, c), publishing the head as it
// goes. Receive order is therefore: by sender rank, then channel, then token index.
#pragma once

#include "kernels/intranode_common.cuh"

namespace moelink::kernels::intranode {

struct DispatchTuning {
  int send_chunk;  // tokens between tail publications
};

MOELINK_DEVICE int64_t dispatch_slot_bytes(const IntranodeShape& s) {
  return s.row_bytes + 4 * s.num_scales + 8 * s.num_topk + 4;
}

MOELINK_DEVICE void dispatch_send(const DispatchArgs& args, const IntranodeLayout& layout, int channel, int dst,
                                  int send_chunk) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const int lane = static_cast<int>(lane_id());
  const TokenRange range = channel_tokens(args.num_tokens, shape.num_channels, channel);
  const int64_t first_expert = static_cast<int64_t>(dst) * shape.experts_per_rank;
  QueueSender sender = QueueSender::open(node, Queue::of(node, layout, dst, channel, node.rank), dst, channel,
                                         send_chunk, dispatch_slot_bytes(shape),
                                         "intranode dispatch: room in receiver's queue");
  const Queue& queue = sender.queue;

  for (int64_t batch = range.begin; batch < range.end; batch += kWarpSize) {
    const int64_t my_token = batch + lane;
    const bool mine = my_token < range.end && args.is_token_in_rank[my_token * shape.num_ranks + dst];
    if (my_token < range.end && !mine) args.send_head[my_token * shape.num_ranks + dst] = -1;
    for (uint32_t selected = ballot(kFullMask, mine); selected != 0; selected &= selected - 1) {
      const int64_t token = batch + lowest_bit(selected);
      const int slot = sender.reserve();
      warp_copy(kFullMask, queue.base + layout.row + slot * shape.row_bytes,
                static_cast<const char*>(args.x) + token * shape.row_bytes, static_cast<size_t>(shape.row_bytes));
      float* scales = reinterpret_cast<float*>(queue.base + layout.scales) + static_cast<int64_t>(slot) * shape.num_scales;
      for (int i = lane; i < shape.num_scales; i += kWarpSize) scales[i] = args.x_scales[token * shape.num_scales + i];
      int32_t* topk = reinterpret_cast<int32_t*>(queue.base + layout.topk) + static_cast<int64_t>(slot) * shape.num_topk;
      float* weights = reinterpret_cast<float*>(queue.base + layout.weights) + static_cast<int64_t>(slot) * shape.num_topk;
      for (int k = lane; k < shape.num_topk; k += kWarpSize) {
        const int64_t expert = args.topk_idx[token * shape.num_topk + k];
        const bool local = expert >= first_expert && expert < first_expert + shape.experts_per_rank;
        topk[k] = local ? static_cast<int32_t>(expert - first_expert) : -1;
        weights[k] = (local && args.topk_weights != nullptr) ? args.topk_weights[token * shape.num_topk + k] : 0.0f;
      }
      if (lane == 0) {
        reinterpret_cast<int32_t*>(queue.base + layout.src)[slot] = static_cast<int32_t>(token);
        args.send_head[token * shape.num_ranks + dst] = static_cast<int32_t>(sender.tail - sender.start);
      }
      sender.commit();
    }
  }
  sender.publish();
}

MOELINK_DEVICE void dispatch_receive(const DispatchArgs& args, const IntranodeLayout& layout, int channel, int src) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const int lane = static_cast<int>(lane_id());
  const Queue queue = Queue::of(node, layout, node.rank, channel, src);
  const int32_t* starts = args.recv_channel_start + src * shape.num_channels + channel;
  const int64_t first_row = starts[0], expected = starts[1] - starts[0];

  uint64_t head = shfl(kFullMask, lane == 0 ? ld_acquire(queue.head) : uint64_t{0}, 0);
  for (int64_t received = 0; received < expected;) {
    const uint64_t tail = shfl(kFullMask, lane == 0 ? wait_until(queue.tail, Cmp::kGt, head,
                                                                 WaitSite{"intranode dispatch: tokens from sender",
                                                                          node.rank, src, channel})
                                                    : uint64_t{0}, 0);
    syncwarp();  // lane 0's acquire orders the other lanes' slot reads too
    const int64_t ready = static_cast<int64_t>(tail - head);
    MOELINK_DEVICE_CHECK(ready <= expected - received, "intranode dispatch: sender %d queued %lld tokens, %lld expected",
                         src, static_cast<long long>(received + ready), static_cast<long long>(expected));
    for (int64_t i = 0; i < ready; ++i) {
      const int slot = queue.slot(head + static_cast<uint64_t>(i));
      const int64_t row = first_row + received + i;
      warp_copy(kFullMask, static_cast<char*>(args.recv_x) + row * shape.row_bytes,
                queue.base + layout.row + slot * shape.row_bytes, static_cast<size_t>(shape.row_bytes));
      const float* scales = reinterpret_cast<const float*>(queue.base + layout.scales) + static_cast<int64_t>(slot) * shape.num_scales;
      for (int j = lane; j < shape.num_scales; j += kWarpSize) args.recv_x_scales[row * shape.num_scales + j] = scales[j];
      const int32_t* topk = reinterpret_cast<const int32_t*>(queue.base + layout.topk) + static_cast<int64_t>(slot) * shape.num_topk;
      const float* weights = reinterpret_cast<const float*>(queue.base + layout.weights) + static_cast<int64_t>(slot) * shape.num_topk;
      for (int k = lane; k < shape.num_topk; k += kWarpSize) {
        args.recv_topk_idx[row * shape.num_topk + k] = topk[k];
        if (args.recv_topk_weights != nullptr) args.recv_topk_weights[row * shape.num_topk + k] = weights[k];
      }
      if (lane == 0) args.recv_src_idx[row] = reinterpret_cast<const int32_t*>(queue.base + layout.src)[slot];
    }
    received += ready;
    head = tail;
    syncwarp();  // every lane is done with the slots before lane 0 frees them
    if (lane == 0) st_release(queue.head, head);
  }
}

MOELINK_KERNEL void dispatch_kernel(DispatchArgs args, DispatchTuning tuning) {
  const IntranodeLayout layout = IntranodeLayout::of(args.node.shape);
  if (args.barrier_first) {
    node_barrier(args.node, layout, "intranode dispatch: node barrier (peer has not entered this dispatch)");
  }
  const int channel = static_cast<int>(block_rank()) / 2;
  const int peer = static_cast<int>(warp_id());
  if (block_rank() % 2 == 0) {
    dispatch_send(args, layout, channel, peer, tuning.send_chunk);
  } else {
    dispatch_receive(args, layout, channel, peer);
  }
}

}  // namespace moelink::kernels::intranode
