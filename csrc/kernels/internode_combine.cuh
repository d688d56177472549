// Internode combine: the reverse of dispatch, reducing inside each node before crossing back.
//   block 2c, NVL senders: warp w returns, for each local forwarder l = w, w + senders, ..., the
//     rows this rank received through it (sources (0, l), (1, l), ..., each in token order: the
//     order the forwarder reduces in) into NVL queue (c, me) of l;
//   block 2c + 1, forwarders: the block's warps take the messages this rank forwarded, per source
//     node in order and in rounds of forward_round; a message's copies (rank j's row at the NVL
//     position the dispatch recorded) are summed in fp32 in local-rank order, rounded to one bf16
//     partial (weights: fp32 sums) and put, one put per round, into combine queue (c, my node) of
//     the source (n, my local index);
//   block 2c, RDMA receivers: the remaining warps reduce this rank's own tokens in rounds: bias
//     first, then each node's partial in node order, in fp32, rounded once.
// Summation order, and why results differ from one node's: a token's copies on one node are
// summed exactly as intranode does (fp32, rank order), but each node's sum is rounded to bf16
// before the source adds the nodes' partials; docs/internode.md states the resulting bound.
#pragma once

#include "kernels/bf16x8.cuh"
#include "kernels/internode_common.cuh"
#include "kernels/internode_forward.cuh"

namespace moelink::kernels::internode {

struct CombineTuning {
  int nvl_chunk, rdma_chunk;
};

MOELINK_HOST_DEVICE size_t combine_block_smem_bytes(const InternodeShape& s) {
  const InternodeRoles roles = InternodeRoles::of(s);
  const int most = s.num_nodes > s.ranks_per_node ? s.num_nodes : s.ranks_per_node;
  return 2 * static_cast<size_t>(most) * sizeof(uint64_t) +
         static_cast<size_t>(s.block_warps) * roles.tokens_per_warp * most * sizeof(int64_t);
}

// Sums `count` rows of `hidden` bf16 channels into `out` (bf16), rows[i] null = absent, bias first.
// The working lanes `lanes` split the row with lane_range; 16 bytes (8 channels) at a time.
MOELINK_DEVICE void sum_rows(uint16_t* out, int hidden, const uint16_t* const* bias, const char* const* rows, int count,
                             uint32_t lanes) {
  const LaneRange share = lane_range(lanes, hidden / 8);
  for (int64_t g = share.begin; g < share.end; g += share.step) {
    Bf16x8Sum sum;
    for (int b = 0; b < 2; ++b) {
      if (bias[b] != nullptr) add_bf16x8(sum, load16_input(bias[b] + g * 8));
    }
    for (int i = 0; i < count; ++i) {
      if (rows[i] != nullptr) add_bf16x8(sum, load16(rows[i] + g * 16));
    }
    store16(out + g * 8, pack_bf16x8(sum));
  }
}

MOELINK_DEVICE void sum_weights(float* out, int num_topk, const char* const* rows, int count, int64_t weights_offset,
                                const WarpLanes& lanes) {
  for (int k = lanes.rank; k < num_topk; k += lanes.count) {
    float sum = 0.0f;
    for (int i = 0; i < count; ++i) {
      if (rows[i] != nullptr) sum += reinterpret_cast<const float*>(rows[i] + weights_offset)[k];
    }
    out[k] = sum;
  }
}

// --- block 2c: NVL senders -----------------------------------------------------------------------

MOELINK_DEVICE_NOINLINE void nvl_return(const InternodeCombineArgs& args, const InternodeLayout& layout, int c, int l,
                               int chunk) {
  const InternodeContext& ctx = args.ctx;
  const InternodeShape& s = ctx.shape;
  const int lr = s.ranks_per_node;
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));  // the others have left (combine_kernel)
  QueueSender sender = QueueSender::open(ctx.rank, l != ctx.local() ? ctx.nvl_bytes : nullptr,
                                         nvl_queue(ctx, layout, l, c, ctx.local()), ctx.node() * lr + l, c, chunk,
                                         s.row_bytes + 4 * s.num_topk, nullptr,
                                         "internode combine: room in forwarder's queue", lanes.mask);
  for (int n = 0; n < s.num_nodes; ++n) {
    const int32_t* start = args.recv_channel_start + (n * lr + l) * s.num_channels + c;
    for (int64_t row = start[0]; row < start[1]; ++row) {
      const int slot = sender.reserve();
      warp_copy_input(lanes.mask, sender.queue.base + layout.q_row + slot * s.row_bytes,
                      reinterpret_cast<const char*>(args.x) + row * s.row_bytes, static_cast<size_t>(s.row_bytes));
      float* weights = reinterpret_cast<float*>(sender.queue.base + layout.q_weights) + static_cast<int64_t>(slot) * s.num_topk;
      for (int k = lanes.rank; k < s.num_topk; k += lanes.count) {
        weights[k] = args.topk_weights != nullptr ? args.topk_weights[row * s.num_topk + k] : 0.0f;
      }
      sender.commit();
    }
  }
  sender.publish();
}

// --- block 2c: RDMA receivers ---------------------------------------------------------------------

MOELINK_DEVICE_NOINLINE void source_reduce(const InternodeCombineArgs& args, const InternodeLayout& layout,
                                  const InternodeRoles& roles, int c, int reducer) {
  const InternodeContext& ctx = args.ctx;
  const InternodeShape& s = ctx.shape;
  const int nodes = s.num_nodes, k_round = roles.tokens_per_warp;
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));  // the others have left (combine_kernel)
  MOELINK_DYNAMIC_SMEM(uint64_t, smem);
  uint64_t* starts = smem;            // [N] first position of queue (c, n) this call
  uint64_t* released = smem + nodes;  // [N] positions returned to forwarder (n, my l)
  const char** rows = reinterpret_cast<const char**>(smem + 2 * nodes) + static_cast<int64_t>(reducer) * k_round * nodes;
  // Barrier 1 counts the reducer warps' threads (a warp whose idle lanes left still arrives as 32);
  // the per-node loops run over the reducers' working threads (one per warp on the host).
  const int threads = roles.combine_reducers * kWarpSize;
  const int tid = reducer * lanes.count + lanes.rank, workers = roles.combine_reducers * lanes.count;
  for (int n = tid; n < nodes; n += workers) {
    starts[n] = released[n] = ld_relaxed(position_at(ctx, layout.pos_comb_taken, c, n));
  }
  bar_sync(1, threads);
  const int64_t ring_bytes = s.rdma_queue_tokens * layout.partial_slot;
  const TokenRange range = channel_tokens(args.num_tokens, s.num_channels, c);
  for (int64_t round = range.begin; round < range.end; round += roles.source_round) {
    const int64_t round_end = round + roles.source_round < range.end ? round + roles.source_round : range.end;
    const int64_t first = round + static_cast<int64_t>(reducer) * k_round;
    const int64_t last = first + k_round < round_end ? first + k_round : round_end;
    for (int item = lanes.rank; item < (last - first) * nodes && first < last; item += lanes.count) {
      const int64_t token = first + item / nodes;
      const int n = item % nodes;
      const int32_t at = args.rdma_send_head[token * nodes + n];
      const char* row = nullptr;
      if (at >= 0) {
        const uint64_t position = starts[n] + static_cast<uint64_t>(at);
        transport::wait_signal(ctx.net, layout.sig_comb_tail + stream_index(ctx, c, n), Cmp::kGt, position,
                               WaitSite{"internode combine: node partial from forwarder", ctx.rank,
                                        n * s.ranks_per_node + ctx.local(), c});
        row = net_at<const char>(ctx, layout.comb_recv + stream_index(ctx, c, n) * ring_bytes) +
              static_cast<int64_t>(position % static_cast<uint64_t>(s.rdma_queue_tokens)) * layout.partial_slot;
      }
      rows[item] = row;
    }
    syncwarp(lanes.mask);  // every working lane's waits and row pointers, before any lane sums
    for (int64_t token = first; token < last; ++token) {
      const char* const* token_rows = rows + (token - first) * nodes;
      const uint16_t* bias[2] = {args.bias[0] ? args.bias[0] + token * args.hidden : nullptr,
                                 args.bias[1] ? args.bias[1] + token * args.hidden : nullptr};
      sum_rows(args.combined_x + token * args.hidden, args.hidden, bias, token_rows, nodes, lanes.mask);
      if (args.combined_topk_weights != nullptr) {
        sum_weights(args.combined_topk_weights + token * s.num_topk, s.num_topk, token_rows, nodes, layout.partial_weights,
                    lanes);
      }
    }
    bar_sync(1, threads);  // every reducer is done with this round's partials
    for (int n = tid; n < nodes; n += workers) {
      for (int64_t t = round_end - 1; t >= round; --t) {
        const int32_t at = args.rdma_send_head[t * nodes + n];
        if (at >= 0) {
          const uint64_t used = starts[n] + static_cast<uint64_t>(at) + 1;
          signal_add(ctx, n * s.ranks_per_node + ctx.local(), layout.sig_comb_head + stream_index(ctx, c, ctx.node()),
                     used - released[n]);
          released[n] = used;
          break;
        }
      }
    }
  }
  bar_sync(1, threads);
  for (int n = tid; n < nodes; n += workers) st_relaxed(position_at(ctx, layout.pos_comb_taken, c, n), released[n]);
}

// --- block 2c + 1: forwarders ---------------------------------------------------------------------

MOELINK_DEVICE_NOINLINE void forward_reduce(const InternodeCombineArgs& args, const InternodeLayout& layout,
                                   const InternodeRoles& roles, int c) {
  const InternodeContext& ctx = args.ctx;
  const InternodeShape& s = ctx.shape;
  const int lr = s.ranks_per_node, nodes = s.num_nodes;
  const int warp = static_cast<int>(warp_id()), k_round = roles.tokens_per_warp;
  // The block's working threads (work_lanes of every warp, the others have left: combine_kernel):
  // `tid` among `threads` of them; thread 0 (warp 0's leader) waits for room and puts.
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  const BlockWorkers workers = block_workers(lanes);
  const int tid = workers.index, threads = workers.count;
  MOELINK_DYNAMIC_SMEM(uint64_t, smem);
  uint64_t* nvl_start = smem;  // [L] first position of NVL queue (c, j) this call
  const char** rows = reinterpret_cast<const char**>(smem + 2 * (nodes > lr ? nodes : lr)) +
                      static_cast<int64_t>(warp) * k_round * lr;
  for (int j = tid; j < lr; j += threads) nvl_start[j] = ld_acquire(nvl_queue(ctx, layout, ctx.local(), c, j).head);
  sync_block();
  const int64_t ring_bytes = s.rdma_queue_tokens * layout.partial_slot;
  for (int n = 0; n < nodes; ++n) {
    const int src = n * lr + ctx.local();
    const int32_t first_message = args.forward_start[c * nodes + n];
    const int32_t count = args.forward_start[c * nodes + n + 1] - first_message;
    const int64_t recv_ring = layout.comb_recv + stream_index(ctx, c, ctx.node()) * ring_bytes;  // at the source
    char* slots = src == ctx.rank ? net_at<char>(ctx, recv_ring)
                                  : net_at<char>(ctx, layout.comb_send + stream_index(ctx, c, n) * ring_bytes);
    uint64_t* position = position_at(ctx, layout.pos_comb_sent, c, n);
    const uint64_t start = ld_relaxed(position);
    const uint64_t* head = transport::signal_address(ctx.net, layout.sig_comb_head + stream_index(ctx, c, n));
    for (int32_t round = 0; round < count; round += roles.forward_round) {
      const int32_t round_end = round + roles.forward_round < count ? round + roles.forward_round : count;
      if (tid == 0) {  // room for the whole round in the source's ring
        const uint64_t end = start + static_cast<uint64_t>(round_end);
        if (end > static_cast<uint64_t>(s.rdma_queue_tokens)) {
          const uint64_t seen = wait_until(head, Cmp::kGe, end - static_cast<uint64_t>(s.rdma_queue_tokens),
                                           WaitSite{"internode combine: room in source's partial queue", ctx.rank, src, c});
          // The source's signal: past what this rank published it would free partials never sent.
          const uint64_t sent = start + static_cast<uint64_t>(round);
          MOELINK_DEVICE_CHECK(seen <= sent, "internode combine: rank %d released head %llu past this rank's tail %llu",
                               src, static_cast<unsigned long long>(seen), static_cast<unsigned long long>(sent));
        }
      }
      sync_block();
      const int32_t first = round + warp * k_round;
      const int32_t last = first + k_round < round_end ? first + k_round : round_end;
      for (int item = lanes.rank; first < last && item < (last - first) * lr; item += lanes.count) {
        const int32_t m = first + item / lr;
        const int j = item % lr;
        const int32_t at = args.forward_head[static_cast<int64_t>(first_message + m) * lr + j];
        const char* row = nullptr;
        if (at >= 0) {
          const Queue queue = nvl_queue(ctx, layout, ctx.local(), c, j);
          const uint64_t pos = nvl_start[j] + static_cast<uint64_t>(at);
          wait_until(queue.tail, Cmp::kGt, pos,
                     WaitSite{"internode combine: expert output from local rank", ctx.rank, ctx.node() * lr + j, c});
          row = queue.base + layout.q_row + static_cast<int64_t>(queue.slot(pos)) * s.row_bytes;
        }
        rows[item] = row;
      }
      syncwarp(lanes.mask);  // every working lane's waits and row pointers, before any lane sums
      for (int32_t m = first; m < last; ++m) {
        const char* const* message_rows = rows + (m - first) * lr;
        char* partial = slots + static_cast<int64_t>((start + static_cast<uint64_t>(m)) % static_cast<uint64_t>(s.rdma_queue_tokens)) * layout.partial_slot;
        const uint16_t* no_bias[2] = {nullptr, nullptr};
        sum_rows(reinterpret_cast<uint16_t*>(partial), args.hidden, no_bias, message_rows, lr, lanes.mask);
        // Weights: the NVL slots keep them in their own array, beside the rows.
        for (int k = lanes.rank; k < s.num_topk; k += lanes.count) {
          float sum = 0.0f;
          for (int j = 0; j < lr; ++j) {
            const int32_t at = args.forward_head[static_cast<int64_t>(first_message + m) * lr + j];
            if (at < 0) continue;
            const Queue queue = nvl_queue(ctx, layout, ctx.local(), c, j);
            sum += reinterpret_cast<const float*>(queue.base + layout.q_weights)[static_cast<int64_t>(queue.slot(nvl_start[j] + at)) * s.num_topk + k];
          }
          reinterpret_cast<float*>(partial + layout.partial_weights)[k] = sum;
        }
      }
      sync_block();  // the round's partials are written, and its NVL rows read
      if (tid == 0) {
        const uint64_t from = start + static_cast<uint64_t>(round), to = start + static_cast<uint64_t>(round_end);
        if (src == ctx.rank) {
          red_add_release(own_signal(ctx, layout.sig_comb_tail + stream_index(ctx, c, ctx.node())), to - from);
        } else {
          for (uint64_t p = from; p < to;) {
            const uint64_t slot = p % static_cast<uint64_t>(s.rdma_queue_tokens);
            const uint64_t run = to - p < static_cast<uint64_t>(s.rdma_queue_tokens) - slot ? to - p
                                                                                           : static_cast<uint64_t>(s.rdma_queue_tokens) - slot;
            transport::put(ctx.net, src, static_cast<uint64_t>(recv_ring + static_cast<int64_t>(slot) * layout.partial_slot),
                           slots + static_cast<int64_t>(slot) * layout.partial_slot, run * static_cast<uint64_t>(layout.partial_slot),
                           transport::SignalAdd{layout.sig_comb_tail + stream_index(ctx, c, ctx.node()), run});
            p += run;
          }
        }
      }
      for (int j = tid; j < lr; j += threads) {  // rows of NVL queue (c, j) used so far
        for (int32_t m = round_end - 1; m >= round; --m) {
          const int32_t at = args.forward_head[static_cast<int64_t>(first_message + m) * lr + j];
          if (at >= 0) {
            st_release(nvl_queue(ctx, layout, ctx.local(), c, j).head, nvl_start[j] + static_cast<uint64_t>(at) + 1);
            break;
          }
        }
      }
    }
    if (tid == 0) st_relaxed(position, start + static_cast<uint64_t>(count));
  }
}

MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) combine_kernel(InternodeCombineArgs args, CombineTuning tuning) {
  const InternodeContext& ctx = args.ctx;
  const InternodeLayout layout = InternodeLayout::of(ctx.shape);
  const InternodeRoles roles = InternodeRoles::of(ctx.shape);
  const uint64_t epoch = operation_epoch(ctx);
  // Lanes outside the warp's working lanes (work_lanes: only on the host) have nothing to do and
  // leave; the barriers (sync_block, bar_sync) count their warps as arrived without them.
  if (!WarpLanes::of(work_lanes(kFullMask)).mine()) return;
  global_barrier(ctx, epoch, "internode combine: global barrier (rank has not entered this combine)");
  const int c = static_cast<int>(block_rank()) / 2, warp = static_cast<int>(warp_id());
  if (block_rank() % 2 == 0) {
    if (warp < roles.combine_senders) {
      for (int l = warp; l < ctx.shape.ranks_per_node; l += roles.combine_senders) nvl_return(args, layout, c, l, tuning.nvl_chunk);
    } else {
      source_reduce(args, layout, roles, c, warp - roles.combine_senders);
    }
  } else {
    forward_reduce(args, layout, roles, c);
  }
  end_operation(ctx, epoch);
}

}  // namespace moelink::kernels::internode
