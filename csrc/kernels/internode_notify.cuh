// Internode notify: before a (non-cached) dispatch every rank tells every rank how many of its
// tokens it will send there per channel, how many to that rank's node per channel (what a
// forwarder relays), and how many (token, slot) pairs go to each of its experts. Ranks of this
// node get the message through the NVL window, ranks of other nodes through one put each (the
// documented metadata of a dispatch: R - L messages of notify_bytes per rank). Each rank then
// knows where every (source, channel) stream lands in its receive buffer, how many messages it
// forwards per (channel, source node) and how many rows each local expert gets; the host reads
// the totals and allocates.
//
// Grid: num_sms blocks; block b writes the messages for destinations b, b + num_blocks, ...;
// block 0 then receives everyone's and computes the prefix sums. The notify count (how many
// notifies this rank completed, in the control area) is advanced by the last block.
#pragma once

#include "kernels/internode_common.cuh"

namespace moelink::kernels::internode {

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) notify_kernel(InternodeNotifyArgs args) {
  const InternodeContext& ctx = args.ctx;
  const InternodeShape& s = ctx.shape;
  const InternodeLayout layout = InternodeLayout::of(s);
  const int ranks = s.num_ranks(), lr = s.ranks_per_node, nodes = s.num_nodes, channels = s.num_channels;
  const int experts = s.experts_per_rank, me_node = ctx.node(), me_local = ctx.local();
  const int warp = static_cast<int>(warp_id());
  // Lanes outside the warp's working lanes (work_lanes: only on the host) have nothing to do and
  // leave; sync_block counts their warps as arrived. `tid` and `threads` number the block's
  // working threads (every thread on the GPU, one per warp on the host); thread 0 always works.
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  if (!lanes.mine()) return;
  const BlockWorkers workers = block_workers(lanes);
  const int tid = workers.index, threads = workers.count;
  const uint64_t epoch = operation_epoch(ctx);
  uint64_t* notify_count = nvl_at<uint64_t>(ctx, me_local, kNotifyCountOffset);
  const uint64_t count_now = ld_relaxed(notify_count) + 1;
  global_barrier(ctx, epoch, "internode notify: global barrier (rank has not entered this dispatch)");

  for (int dst = static_cast<int>(block_rank()); dst < ranks; dst += static_cast<int>(num_blocks())) {
    const bool local = dst / lr == me_node, forwarder = dst % lr == me_local;
    int32_t* message = local ? nvl_at<int32_t>(ctx, dst % lr, layout.nvl_notify_in + me_local * layout.notify_bytes)
                             : net_at<int32_t>(ctx, layout.notify_out + dst * layout.notify_bytes);
    const int dst_node = dst / lr;
    for (int c = warp; c < channels; c += static_cast<int>(num_warps())) {
      const TokenRange range = channel_tokens(args.num_tokens, channels, c);
      int32_t to_rank = 0, to_node = 0;
      for (int64_t t = range.begin + lanes.rank; t < range.end; t += lanes.count) {
        const bool* row = args.is_token_in_rank + t * ranks;
        to_rank += row[dst] ? 1 : 0;
        if (forwarder) {
          bool any = false;
          for (int j = 0; j < lr; ++j) any = any || row[dst_node * lr + j];
          to_node += any ? 1 : 0;
        }
      }
      to_rank = warp_reduce_sum(lanes.mask, to_rank);
      to_node = warp_reduce_sum(lanes.mask, to_node);
      if (lanes.leads()) {
        message[c] = to_rank;
        message[channels + c] = to_node;
      }
    }
    for (int e = tid; e < experts; e += threads) message[2 * channels + e] = args.num_tokens_per_expert[dst * experts + e];
    sync_block();
    if (tid == 0) {
      if (local) {
        fence<Scope::kSys>();
        st_release(nvl_at<uint64_t>(ctx, dst % lr, layout.nvl_notify_flag) + me_local, count_now);
      } else {
        transport::put(ctx.net, dst, static_cast<uint64_t>(layout.notify_in + ctx.rank * layout.notify_bytes), message,
                       static_cast<uint64_t>(layout.notify_bytes), transport::SignalAdd{layout.sig_notify + ctx.rank, 1});
      }
    }
  }

  if (block_rank() == 0) {
    for (int src = tid; src < ranks; src += threads) {
      const WaitSite site{"internode notify: peer's token counts", ctx.rank, src};
      if (src / lr == me_node) {
        wait_until(nvl_at<uint64_t>(ctx, me_local, layout.nvl_notify_flag) + src % lr, Cmp::kGe, count_now, site);
      } else {
        transport::wait_signal(ctx.net, layout.sig_notify + src, Cmp::kGe, count_now, site);
      }
    }
    sync_block();
    auto message_of = [&](int src) -> const int32_t* {
      return src / lr == me_node ? nvl_at<const int32_t>(ctx, me_local, layout.nvl_notify_in + (src % lr) * layout.notify_bytes)
                                 : net_at<const int32_t>(ctx, layout.notify_in + src * layout.notify_bytes);
    };
    if (tid == 0) {
      // Peers write these counts: a negative one, or a sum past int32, must not become a row.
      int64_t rows = 0;
      for (int src = 0; src < ranks; ++src) {
        const int32_t* message = message_of(src);
        for (int c = 0; c < channels; ++c) {
          args.recv_channel_start[src * channels + c] = static_cast<int32_t>(rows);
          MOELINK_DEVICE_CHECK(message[c] >= 0 && rows + message[c] <= INT32_MAX,
                               "internode notify: rank %d announced %d tokens (total so far %lld)", src, message[c],
                               static_cast<long long>(rows));
          rows += message[c];
        }
      }
      args.recv_channel_start[ranks * channels] = static_cast<int32_t>(rows);
      int64_t forwarded = 0;
      for (int c = 0; c < channels; ++c) {
        for (int n = 0; n < nodes; ++n) {
          const int32_t* message = message_of(n * lr + me_local);
          const int32_t count = message[channels + c];
          args.forward_start[c * nodes + n] = static_cast<int32_t>(forwarded);
          MOELINK_DEVICE_CHECK(count >= 0 && forwarded + count <= INT32_MAX,
                               "internode notify: rank %d announced %d tokens for this node (total so far %lld)",
                               n * lr + me_local, count, static_cast<long long>(forwarded));
          // Its tokens for this rank are some of those for this node: fewer node tokens than rank
          // tokens would leave the NVL receivers waiting for rows the forwarder never gets.
          MOELINK_DEVICE_CHECK(message[c] <= count,
                               "internode notify: rank %d announced %d tokens for this node but %d for this rank "
                               "(channel %d)", n * lr + me_local, count, message[c], c);
          forwarded += count;
        }
      }
      args.forward_start[channels * nodes] = static_cast<int32_t>(forwarded);
      args.recv_counts[0] = static_cast<int32_t>(rows);
      args.recv_counts[1] = static_cast<int32_t>(forwarded);
    }
    for (int e = tid; e < experts; e += threads) {
      int64_t total = 0;
      for (int src = 0; src < ranks; ++src) {
        const int32_t count = message_of(src)[2 * channels + e];
        MOELINK_DEVICE_CHECK(count >= 0, "internode notify: rank %d sent %d rows for local expert %d", src, count, e);
        total += count;
      }
      const int64_t alignment = args.expert_alignment;
      const int64_t aligned = (total + alignment - 1) / alignment * alignment;
      MOELINK_DEVICE_CHECK(aligned <= INT32_MAX, "internode notify: %lld rows for local expert %d",
                           static_cast<long long>(aligned), e);
      args.recv_counts[2 + e] = static_cast<int32_t>(aligned);
    }
  }

  // The last block records this notify as done (the next one waits for count + 1).
  sync_block();
  if (tid == 0) {
    uint32_t* blocks_done = nvl_at<uint32_t>(ctx, me_local, IntranodeLayout::kBlocksDoneOffset);
    fence<Scope::kGpu>();
    if (atomic_add<Scope::kGpu>(blocks_done, 1u) == num_blocks() - 1) {
      st_relaxed<Scope::kGpu>(blocks_done, 0u);
      st_release<Scope::kGpu>(notify_count, count_now);
    }
  }
}

}  // namespace moelink::kernels::internode
