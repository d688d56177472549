// Intranode notify: before a (non-cached) dispatch, every rank tells every peer how many tokens
// it will put in each virtual channel's queue and how many (token, slot) pairs it routes to each
// of the peer's experts; each rank then knows where every (sender, virtual channel) stream lands
// in its receive buffer and how many rows each local expert gets. Every rank also sends every
// peer its per-destination totals (rank_count), from which each rank learns where its own rows
// land in every receiver's receive order (send_row_start, for one-copy dispatches) and the row
// capacity all ranks agree on. The host reads the totals and allocates.
//
// Grid: one block per destination rank d (cooperative: all co-resident). Block 0 first counts this
// rank's tokens per destination and writes that row into rank_count[me] of every window, then
// releases control.notify_rows (this rank's own word). Block d counts this rank's tokens for d
// per virtual channel (one warp per channel stride) and its expert counts, writes them into d's
// window, waits for notify_rows (so block 0's rows in d's window are covered too) and releases
// notify_epoch[me] there. Block 0 then also acts for this rank as a receiver: it acquires every
// peer's notify_epoch (and its own blocks' releases, to read back what it wrote) and turns the
// counts into prefix sums. Notify is not an operation's last kernel: the dispatch that follows
// advances the epoch. Nothing waits on a later step of another block, so nothing deadlocks.
#pragma once

#include "kernels/intranode_common.cuh"

namespace moelink::kernels::intranode {

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) notify_kernel(NotifyArgs args) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const IntranodeLayout layout = IntranodeLayout::of(shape);
  const int ranks = shape.num_ranks, channels = shape.virtual_channels(), experts = shape.experts_per_rank;
  const int dst = static_cast<int>(block_rank());
  const int warp = static_cast<int>(warp_id()), warps = static_cast<int>(num_warps());
  const uint64_t epoch = operation_epoch(node, layout);
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  if (!lanes.mine()) return;  // lanes with no work (host) leave; sync_block counts them as arrived
  const BlockWorkers workers = BlockWorkers::of(lanes);
  const bool lead = thread_rank() == 0;
  node_barrier(node, layout, epoch, "intranode notify: node barrier (peer has not entered this dispatch)");
  uint64_t* notify_rows = window_at<uint64_t>(node, node.rank, layout.control + IntranodeLayout::kNotifyRowsOffset);
  const int64_t row_stride = ranks + 1;  // rank_count rows: R totals, then the requested capacity

  if (dst == 0) {  // this rank's tokens per destination j, into rank_count[me][j] of every window
    for (int j = warp; j < ranks; j += warps) {
      int32_t count = 0;
      for (int64_t token = lanes.rank; token < args.num_tokens; token += lanes.count) {
        count += args.is_token_in_rank[token * ranks + j] ? 1 : 0;
      }
      count = warp_reduce_sum(lanes.mask, count);
      if (lanes.leads()) {
        for (int w = 0; w < ranks; ++w) window_at<int32_t>(node, w, layout.rank_count)[node.rank * row_stride + j] = count;
      }
    }
    for (int w = workers.index; w < ranks; w += workers.count) {
      window_at<int32_t>(node, w, layout.rank_count)[node.rank * row_stride + ranks] = args.direct_rows_request;
    }
    sync_block();
    if (lead) {
      fence<Scope::kSys>();  // the rows in every window, before the word the other blocks wait for
      st_release(notify_rows, epoch);
    }
  }

  // What this rank will send to `dst`, virtual channel by virtual channel.
  int32_t* channel_count = window_at<int32_t>(node, dst, layout.channel_count) + node.rank * channels;
  for (int v = warp; v < channels; v += warps) {
    const TokenRange range = channel_tokens(args.num_tokens, channels, v);
    int32_t count = 0;
    for (int64_t token = range.begin + lanes.rank; token < range.end; token += lanes.count) {
      count += args.is_token_in_rank[token * ranks + dst] ? 1 : 0;
    }
    count = warp_reduce_sum(lanes.mask, count);
    if (lanes.leads()) channel_count[v] = count;
  }
  int32_t* expert_count = window_at<int32_t>(node, dst, layout.expert_count) + node.rank * experts;
  for (int e = workers.index; e < experts; e += workers.count) expert_count[e] = args.num_tokens_per_expert[dst * experts + e];
  sync_block();
  if (lead) {
    // Block 0's rank_count rows in dst's window are ordered before this release through notify_rows.
    wait_until(notify_rows, Cmp::kGe, epoch, WaitSite{"intranode notify: this rank's block 0 (rank totals)", node.rank});
    fence<Scope::kSys>();  // the block's count stores, ordered before the flag for the peer
    st_release(window_at<uint64_t>(node, dst, layout.notify_epoch) + node.rank, epoch);
  }
  if (dst != 0) return;

  // Block 0: receive everyone's counts, and read back what this rank wrote into every window.
  for (int peer = workers.index; peer < ranks; peer += workers.count) {
    wait_until(window_at<uint64_t>(node, node.rank, layout.notify_epoch) + peer, Cmp::kGe, epoch,
               WaitSite{"intranode notify: peer's token counts", node.rank, peer});
    wait_until(window_at<uint64_t>(node, peer, layout.notify_epoch) + node.rank, Cmp::kGe, epoch,
               WaitSite{"intranode notify: this rank's counts for a peer", node.rank, peer});
  }
  sync_block();
  const int32_t* totals = window_at<int32_t>(node, node.rank, layout.rank_count);
  if (lead) {
    const int32_t* received = window_at<int32_t>(node, node.rank, layout.channel_count);
    int64_t total = 0;
    for (int s = 0; s < ranks; ++s) {  // sender-major, then channel: the receive order
      int64_t from_sender = 0;
      for (int v = 0; v < channels; ++v) {
        const int i = s * channels + v;
        args.recv_channel_start[i] = static_cast<int32_t>(total);
        const int32_t count = received[i];
        // Peers write these counts: a negative one, or a sum past int32, must not become a row index.
        MOELINK_DEVICE_CHECK(count >= 0 && total + count <= INT32_MAX,
                             "intranode notify: rank %d sent a token count of %d (total so far %lld)", s, count,
                             static_cast<long long>(total));
        total += count;
        from_sender += count;
      }
      MOELINK_DEVICE_CHECK(totals[s * row_stride + node.rank] == from_sender,
                           "intranode notify: rank %d announced %d tokens for this rank but sent counts of %lld", s,
                           totals[s * row_stride + node.rank], static_cast<long long>(from_sender));
    }
    args.recv_channel_start[ranks * channels] = static_cast<int32_t>(total);
    args.recv_counts[0] = static_cast<int32_t>(total);
  }
  const int32_t* per_expert = window_at<int32_t>(node, node.rank, layout.expert_count);
  for (int e = workers.index; e < experts; e += workers.count) {
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
  if (args.rank_counts != nullptr) {
    for (int64_t i = workers.index; i < ranks * row_stride; i += workers.count) {
      const int32_t count = totals[i];
      MOELINK_DEVICE_CHECK(count >= 0, "intranode notify: rank %lld sent a total of %d", static_cast<long long>(i / row_stride),
                           count);
      args.rank_counts[i] = count;
    }
  }
  if (args.send_row_start != nullptr) {
    // My rows for d start after those of ranks 0..me-1 (d's receive order is by sender), then go
    // virtual channel by virtual channel, with the counts this rank wrote into d's window.
    for (int d = workers.index; d < ranks; d += workers.count) {
      int64_t row = 0;
      for (int s = 0; s < node.rank; ++s) {
        const int32_t count = totals[s * row_stride + d];
        MOELINK_DEVICE_CHECK(count >= 0, "intranode notify: rank %d sent a total of %d", s, count);
        row += count;
      }
      const int32_t* mine = window_at<int32_t>(node, d, layout.channel_count) + node.rank * channels;
      for (int v = 0; v < channels; ++v) {
        MOELINK_DEVICE_CHECK(row <= INT32_MAX, "intranode notify: rank %d receives more than 2^31 rows", d);
        args.send_row_start[d * channels + v] = static_cast<int32_t>(row);
        // What this rank wrote into d's window, but d's memory: d (or a third rank) may overwrite it.
        MOELINK_DEVICE_CHECK(mine[v] >= 0, "intranode notify: rank %d's window holds a count of %d for this rank", d,
                             mine[v]);
        row += mine[v];
      }
    }
  }
}

}  // namespace moelink::kernels::intranode
