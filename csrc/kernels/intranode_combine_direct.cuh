// One-copy intranode combine (CombineArgs::direct; runtime/ops_intranode.h, "One-copy paths"):
// every rank's caller has written its expert outputs into its own combine input region before
// the combine (and the combine copied the top-k weights beside them), so each source rank reads
// every copy of its tokens where it lies, in the window of the rank that holds it: the row the
// token took in that rank's receive order, send_row_start[d][v] + send_head[t][d]. Nothing is
// sent and no queue is used; all 2C blocks reduce, each warp a contiguous range of tokens, in the
// same fp32 rank order as the queue path (bit for bit the same result). The last block runs the
// closing barrier (end_operation's exit_barrier), so no rank returns, and no caller rewrites its
// region, while a peer may still read it.
#pragma once

#include "kernels/intranode_combine.cuh"

namespace moelink::kernels::intranode {

// `slots`: this warp's scratch of at least R int32 (combine_smem_bytes).
MOELINK_DEVICE void direct_combine(const CombineArgs& args, const WarpLanes& lanes, int32_t* slots) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const int ranks = shape.num_ranks, channels = shape.virtual_channels();
  const CombineInputLayout input = CombineInputLayout::of(shape, args.direct_rows);
  const int64_t warps = static_cast<int64_t>(num_blocks()) * num_warps();
  const int64_t warp = static_cast<int64_t>(block_rank()) * num_warps() + warp_id();
  const int64_t per_warp = (args.num_tokens + warps - 1) / warps;
  const int64_t begin = per_warp * warp < args.num_tokens ? per_warp * warp : args.num_tokens;
  const int64_t end = begin + per_warp < args.num_tokens ? begin + per_warp : args.num_tokens;
  // The dispatch's virtual channel of a token (channel_tokens).
  const int64_t per_channel = (args.num_tokens + channels - 1) / channels;
  int64_t pulled = 0;  // bytes read from other ranks' windows
  for (int64_t token = begin; token < end; ++token) {
    const int v = static_cast<int>(token / per_channel);
    const LaneRange share = lane_range(lanes.mask, ranks);
    for (int64_t d = share.begin; d < share.end; d += share.step) {
      int32_t row = -1;
      if (args.is_token_in_rank[token * ranks + d]) {
        const int64_t position = args.send_head[token * ranks + d];
        const int64_t at = position < 0 ? -1 : args.send_row_start[d * channels + v] + position;
        MOELINK_DEVICE_CHECK(at >= 0 && at < args.direct_rows,
                             "intranode combine: token %lld of rank %lld has no row in its combine input (%lld rows)",
                             static_cast<long long>(token), static_cast<long long>(d),
                             static_cast<long long>(args.direct_rows));
        row = static_cast<int32_t>(at);
        if (d != node.rank) pulled += shape.row_bytes + 4 * shape.num_topk;
      }
      slots[d] = row;
    }
    syncwarp(lanes.mask);  // every working lane's rows, before any lane reads them
    reduce_row(args, token, ranks, [&](int d) -> const char* {
      return slots[d] < 0 ? nullptr
                          : window_at<char>(node, d, input.base + input.row) + static_cast<int64_t>(slots[d]) * shape.row_bytes;
    }, lanes);
    if (args.combined_topk_weights != nullptr) {
      const LaneRange k_share = lane_range(lanes.mask, shape.num_topk);
      for (int64_t k = k_share.begin; k < k_share.end; k += k_share.step) {
        float weight = 0.0f;
        for (int d = 0; d < ranks; ++d) {
          if (slots[d] < 0) continue;
          weight += window_at<float>(node, d, input.base + input.weights)[static_cast<int64_t>(slots[d]) * shape.num_topk + k];
        }
        args.combined_topk_weights[token * shape.num_topk + k] = weight;
      }
    }
    syncwarp(lanes.mask);  // done with the rows before the next token overwrites them
  }
  if (node.nvl_bytes != nullptr) {
    pulled = warp_reduce_sum(lanes.mask, pulled);
    if (lanes.leads() && pulled > 0) atomic_add(node.nvl_bytes, static_cast<uint64_t>(pulled));
  }
}

// The one-copy combine's own kernel: the grid of combine_kernel, every block reducing.
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) combine_direct_kernel(CombineArgs args) {
  const IntranodeContext& node = args.node;
  const IntranodeLayout layout = IntranodeLayout::of(node.shape);
  const WarpMap map = node.shape.map();
  const uint64_t epoch = operation_epoch(node, layout);
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  if (!lanes.mine()) return;  // lanes with no work (host) leave; sync_block counts them as arrived
  node_barrier(node, layout, epoch, "intranode combine: node barrier (peer has not entered this combine)");
  MOELINK_DYNAMIC_SMEM(unsigned char, smem);
  int32_t* slots = reinterpret_cast<int32_t*>(smem + combine_starts_bytes(node.shape)) +
                   static_cast<int64_t>(warp_id()) * map.tokens_per_warp * node.shape.num_ranks;
  direct_combine(args, lanes, slots);
  end_operation(node, layout, epoch, "intranode combine: peers reading this rank's combine input (closing barrier)");
}

}  // namespace moelink::kernels::intranode
