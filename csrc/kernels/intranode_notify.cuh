// Intranode notify: before a (non-cached) dispatch, every rank tells every peer how many tokens
// it will put in each virtual channel's queue and how many (token, slot) pairs it routes to each
// of the peer's experts; each rank then knows where every (sender, virtual channel) stream lands
// in its receive buffer and how many rows each local expert gets. The host reads the totals and
// allocates.
//
// Grid: one block per destination rank d. Block d counts this rank's tokens for d per virtual
// channel (one warp per channel stride), writes the counts into d's window and releases
// notify_epoch[me] there. Block 0 then also acts for this rank as a receiver: it acquires every
// peer's notify_epoch and turns the counts into prefix sums. Notify is not an operation's last
// kernel: the dispatch that follows advances the epoch.
#pragma once

#include "kernels/intranode_common.cuh"

namespace moelink::kernels::intranode {

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) notify_kernel(NotifyArgs args) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const IntranodeLayout layout = IntranodeLayout::of(shape);
  const int ranks = shape.num_ranks, channels = shape.virtual_channels(), experts = shape.experts_per_rank;
  const int dst = static_cast<int>(block_rank());
  const int warp = static_cast<int>(warp_id()), lane = static_cast<int>(lane_id());
  const int tid = static_cast<int>(thread_rank()), threads = static_cast<int>(num_threads());
  const uint64_t epoch = operation_epoch(node, layout);
  node_barrier(node, layout, epoch, "intranode notify: node barrier (peer has not entered this dispatch)");

  // What this rank will send to `dst`, virtual channel by virtual channel.
  int32_t* channel_count = window_at<int32_t>(node, dst, layout.channel_count) + node.rank * channels;
  for (int v = warp; v < channels; v += static_cast<int>(num_warps())) {
    const TokenRange range = channel_tokens(args.num_tokens, channels, v);
    int32_t count = 0;
    for (int64_t token = range.begin + lane; token < range.end; token += kWarpSize) {
      count += args.is_token_in_rank[token * ranks + dst] ? 1 : 0;
    }
    count = warp_reduce_sum(kFullMask, count);
    if (lane == 0) channel_count[v] = count;
  }
  int32_t* expert_count = window_at<int32_t>(node, dst, layout.expert_count) + node.rank * experts;
  for (int e = tid; e < experts; e += threads) expert_count[e] = args.num_tokens_per_expert[dst * experts + e];
  sync_block();
  if (tid == 0) {
    fence<Scope::kSys>();  // the block's count stores, ordered before the flag for the peer
    st_release(window_at<uint64_t>(node, dst, layout.notify_epoch) + node.rank, epoch);
  }
  if (dst != 0) return;

  // Block 0: receive everyone's counts.
  for (int src = tid; src < ranks; src += threads) {
    wait_until(window_at<uint64_t>(node, node.rank, layout.notify_epoch) + src, Cmp::kGe, epoch,
               WaitSite{"intranode notify: peer's token counts", node.rank, src});
  }
  sync_block();
  if (tid == 0) {
    const int32_t* received = window_at<int32_t>(node, node.rank, layout.channel_count);
    int64_t total = 0;
    for (int i = 0; i < ranks * channels; ++i) {  // sender-major, then channel: the receive order
      args.recv_channel_start[i] = static_cast<int32_t>(total);
      const int32_t count = received[i];
      // Peers write these counts: a negative one, or a sum past int32, must not become a row index.
      MOELINK_DEVICE_CHECK(count >= 0 && total + count <= INT32_MAX,
                           "intranode notify: rank %d sent a token count of %d (total so far %lld)", i / channels,
                           count, static_cast<long long>(total));
      total += count;
    }
    args.recv_channel_start[ranks * channels] = static_cast<int32_t>(total);
    args.recv_counts[0] = static_cast<int32_t>(total);
  }
  const int32_t* per_expert = window_at<int32_t>(node, node.rank, layout.expert_count);
  for (int e = tid; e < experts; e += threads) {
    int64_t rows = 0;
    for (int s = 0; s < ranks; ++s) {
      const int32_t count = per_expert[s * experts + e];
      MOELINK_DEVICE_CHECK(count >= 0, "intranode notify: rank %d sent %d rows for local expert %d", s, count, e);
      rows += count;
    }
    const int64_t alignment = args.expert_alignment;
    const int64_t aligned = (rows + alignment - 1) / alignment * alignment;
    MOELINK_DEVICE_CHECK(aligned <= INT32_MAX, "intranode notify: %lld rows for local expert %d",
                         static_cast<long long>(aligned), e);
    args.recv_counts[1 + e] = static_cast<int32_t>(aligned);
  }
}

}  // namespace moelink::kernels::intranode
