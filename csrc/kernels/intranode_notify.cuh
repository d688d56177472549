// Intranode notify: before a (non-cached) dispatch, every rank tells every peer how many tokens
// it will put in each channel's queue and how many (token, slot) pairs it routes to each of the
// peer's experts; each rank then knows where every (sender, channel) stream lands in its receive
// buffer and how many rows each local expert gets. The host reads the totals and allocates.
//
// Grid: one block per destination rank d, one warp per channel stride. Block d counts this rank's
// tokens for d per channel, writes the counts into d's window and releases notify_epoch[me] there.
// Block 0 then also acts for this rank as a receiver: it acquires every peer's notify_epoch and
// turns the counts into prefix sums.
#pragma once

#include "kernels/intranode_common.cuh"

namespace moelink::kernels::intranode {

MOELINK_KERNEL void notify_kernel(NotifyArgs args) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const IntranodeLayout layout = IntranodeLayout::of(shape);
  const int ranks = shape.num_ranks, channels = shape.num_channels, experts = shape.experts_per_rank;
  const int dst = static_cast<int>(block_rank());
  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  node_barrier(node, layout, "intranode notify: node barrier (peer has not entered this dispatch)");

  // What this rank will send to `dst`, channel by channel.
  int32_t* channel_count = window_at<int32_t>(node, dst, layout.channel_count) + node.rank * channels;
  for (int channel = warp; channel < channels; channel += static_cast<int>(num_warps())) {
    const TokenRange range = channel_tokens(args.num_tokens, channels, channel);
    int32_t count = 0;
    for (int64_t token = range.begin + lane; token < range.end; token += kWarpSize) {
      count += args.is_token_in_rank[token * ranks + dst] ? 1 : 0;
    }
    count = warp_reduce_sum(kFullMask, count);
    if (lane == 0) channel_count[channel] = count;
  }
  int32_t* expert_count = window_at<int32_t>(node, dst, layout.expert_count) + node.rank * experts;
  for (int e = static_cast<int>(thread_rank()); e < experts; e += static_cast<int>(num_threads())) {
    expert_count[e] = args.num_tokens_per_expert[dst * experts + e];
  }
  sync_block();
  if (thread_rank() == 0) {
    fence<Scope::kSys>();  // the block's count stores, ordered before the flag for the peer
    st_release(window_at<uint64_t>(node, dst, layout.notify_epoch) + node.rank, node.epoch);
  }
  if (dst != 0) return;

  // Block 0: receive everyone's counts.
  const int src = static_cast<int>(thread_rank());
  if (src < ranks) {
    wait_until(window_at<uint64_t>(node, node.rank, layout.notify_epoch) + src, Cmp::kGe, node.epoch,
               WaitSite{"intranode notify: peer's token counts", node.rank, src});
  }
  sync_block();
  if (thread_rank() == 0) {
    const int32_t* received = window_at<int32_t>(node, node.rank, layout.channel_count);
    int32_t total = 0;
    for (int i = 0; i < ranks * channels; ++i) {  // sender-major, then channel: the receive order
      args.recv_channel_start[i] = total;
      total += received[i];
    }
    args.recv_channel_start[ranks * channels] = total;
    args.recv_counts[0] = total;
  }
  const int32_t* per_expert = window_at<int32_t>(node, node.rank, layout.expert_count);
  for (int e = static_cast<int>(thread_rank()); e < experts; e += static_cast<int>(num_threads())) {
    int32_t rows = 0;
    for (int s = 0; s < ranks; ++s) rows += per_expert[s * experts + e];
    const int32_t alignment = args.expert_alignment;
    args.recv_counts[1 + e] = (rows + alignment - 1) / alignment * alignment;
  }
}

}  // namespace moelink::kernels::intranode
