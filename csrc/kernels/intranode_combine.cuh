// Intranode combine: the reverse of dispatch. Each rank returns the rows it received (expert
// outputs, bf16) to their source ranks through the same queues, and each source rank sums, in
// fp32 and in rank order, the copies of every token it dispatched, plus optional biases.
//
// Grid: 2 * num_channels blocks of one warp per rank. Even block 2c sends: warp s returns, in
// order, the rows this rank received from (s, c) to queue (c, me) in s's window. Odd block 2c+1
// reduces channel c of this rank's own tokens in rounds of one token per warp: for token t and
// every rank d it went to, the row sits at position send_head[t][d] of queue (c, d) (recorded by
// the dispatch). After each round the block publishes how far each queue has been consumed, so a
// sender never overwrites a row that is still needed; a round reads at most one row per warp from
// each queue, hence queue_tokens >= warps per block (= ranks).
#pragma once

#include "kernels/intranode_common.cuh"
#include "kernels/numeric.cuh"

namespace moelink::kernels::intranode {

struct CombineTuning {
  int send_chunk;
};

MOELINK_DEVICE void combine_send(const CombineArgs& args, const IntranodeLayout& layout, int channel, int dst,
                                 int send_chunk) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const int lane = static_cast<int>(lane_id());
  const int32_t* starts = args.recv_channel_start + dst * shape.num_channels + channel;
  const int64_t first_row = starts[0], rows = starts[1] - starts[0];
  QueueSender sender = QueueSender::open(node, Queue::of(node, layout, dst, channel, node.rank), dst, channel,
                                         send_chunk, shape.row_bytes + 4 * shape.num_topk,
                                         "intranode combine: room in source rank's queue");
  const Queue& queue = sender.queue;
  for (int64_t i = 0; i < rows; ++i) {
    const int slot = sender.reserve();
    const int64_t row = first_row + i;
    warp_copy(kFullMask, queue.base + layout.row + slot * shape.row_bytes,
              reinterpret_cast<const char*>(args.x) + row * shape.row_bytes, static_cast<size_t>(shape.row_bytes));
    float* weights = reinterpret_cast<float*>(queue.base + layout.weights) + static_cast<int64_t>(slot) * shape.num_topk;
    for (int k = lane; k < shape.num_topk; k += kWarpSize) {
      weights[k] = args.topk_weights != nullptr ? args.topk_weights[row * shape.num_topk + k] : 0.0f;
    }
    sender.commit();
  }
  sender.publish();
}

// Sums the copies of `token` (8 bf16 channels per lane per step) into combined_x. `rows` and
// `weights` are this warp's scratch for the copies' addresses, resolved once per token rather
// than once per channel group (the slot lookup is a 64-bit modulo).
MOELINK_DEVICE void reduce_token(const CombineArgs& args, const IntranodeLayout& layout, int channel, int64_t token,
                                 const uint64_t* queue_start, const uint16_t** rows, const float** weights) {
  const IntranodeContext& node = args.node;
  const IntranodeShape& shape = node.shape;
  const int ranks = shape.num_ranks, lane = static_cast<int>(lane_id());

  // Lane d resolves rank d's copy; the copies are compacted in rank order (the summation order).
  const bool has_copy = lane < ranks && args.is_token_in_rank[token * ranks + lane];
  const uint32_t holders = ballot(kFullMask, has_copy);
  const int copies = popcount(holders);
  if (has_copy) {
    const Queue queue = Queue::of(node, layout, node.rank, channel, lane);
    const uint64_t position = queue_start[lane] + static_cast<uint64_t>(args.send_head[token * ranks + lane]);
    wait_until(queue.tail, Cmp::kGt, position, WaitSite{"intranode combine: expert output from rank", node.rank, lane, channel});
    const int index = popcount(holders & ((1u << lane) - 1u));
    const int slot = queue.slot(position);
    rows[index] = reinterpret_cast<const uint16_t*>(queue.base + layout.row + slot * shape.row_bytes);
    weights[index] = reinterpret_cast<const float*>(queue.base + layout.weights) + static_cast<int64_t>(slot) * shape.num_topk;
  }
  syncwarp();  // the acquires and the scratch writes, for every lane

  const int groups = args.hidden / 8;
  for (int g = lane; g < groups; g += kWarpSize) {
    float sum[8];
    for (int i = 0; i < 8; ++i) {
      float value = 0.0f;
      for (int b = 0; b < 2; ++b) {
        if (args.bias[b] != nullptr) value += bf16_to_float(args.bias[b][token * args.hidden + g * 8 + i]);
      }
      sum[i] = value;
    }
    for (int c = 0; c < copies; ++c) {
      const uint16_t* row = rows[c] + g * 8;
      for (int i = 0; i < 8; ++i) sum[i] += bf16_to_float(row[i]);
    }
    for (int i = 0; i < 8; ++i) args.combined_x[token * args.hidden + g * 8 + i] = float_to_bf16(sum[i]);
  }
  if (args.combined_topk_weights != nullptr) {
    for (int k = lane; k < shape.num_topk; k += kWarpSize) {
      float weight = 0.0f;
      for (int c = 0; c < copies; ++c) weight += weights[c][k];
      args.combined_topk_weights[token * shape.num_topk + k] = weight;
    }
  }
}

MOELINK_DEVICE void combine_receive(const CombineArgs& args, const IntranodeLayout& layout, int channel) {
  const IntranodeContext& node = args.node;
  const int ranks = node.shape.num_ranks;
  MOELINK_SHARED(uint64_t, queue_start, [kIntranodeMaxRanks]);
  MOELINK_SHARED(const uint16_t*, copy_rows, [kIntranodeMaxRanks][kIntranodeMaxRanks]);  // [warp][copy]
  MOELINK_SHARED(const float*, copy_weights, [kIntranodeMaxRanks][kIntranodeMaxRanks]);
  const int tid = static_cast<int>(thread_rank());
  // Thread d (< ranks) owns queue (c, d): it alone reads its start and publishes its head.
  const Queue own_queue = Queue::of(node, layout, node.rank, channel, tid < ranks ? tid : 0);
  if (tid < ranks) queue_start[tid] = ld_acquire(own_queue.head);
  sync_block();

  const TokenRange range = channel_tokens(args.num_tokens, node.shape.num_channels, channel);
  const int warps = static_cast<int>(num_warps());
  for (int64_t round = range.begin; round < range.end; round += warps) {
    const int64_t round_end = round + warps < range.end ? round + warps : range.end;
    const int64_t token = round + static_cast<int>(warp_id());
    if (token < round_end) {
      reduce_token(args, layout, channel, token, queue_start, copy_rows[warp_id()], copy_weights[warp_id()]);
    }
    sync_block();  // every warp is done with this round's rows (and with its copy scratch)
    // Rows of queue (c, d) used so far: one past the position of the round's last token sent by d.
    // Derived from the round's own tokens, not from what other warps record, because they may
    // already be reading the next round's rows.
    if (tid < ranks) {
      for (int64_t t = round_end - 1; t >= round; --t) {
        const int32_t position = args.send_head[t * ranks + tid];
        if (position >= 0) {
          st_release(own_queue.head, queue_start[tid] + static_cast<uint64_t>(position) + 1);
          break;
        }
      }
    }
  }
}

MOELINK_KERNEL void combine_kernel(CombineArgs args, CombineTuning tuning) {
  const IntranodeLayout layout = IntranodeLayout::of(args.node.shape);
  node_barrier(args.node, layout, "intranode combine: node barrier (peer has not entered this combine)");
  const int channel = static_cast<int>(block_rank()) / 2;
  if (block_rank() % 2 == 0) {
    combine_send(args, layout, channel, static_cast<int>(warp_id()), tuning.send_chunk);
  } else {
    combine_receive(args, layout, channel);
  }
}

}  // namespace moelink::kernels::intranode
