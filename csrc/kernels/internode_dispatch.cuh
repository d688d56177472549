// Internode dispatch, the sending block of each channel (block 2c, runtime/ops_internode.h):
//   RDMA senders: warp w streams, for each destination node n = w, w + rdma_senders, ..., the
//     channel's tokens bound for node n (payload, FP8 scales, top-k ids of the experts on n,
//     weights, token index: one wire message per token and node) into queue (c, my node) of
//     forwarder (n, my local index), through the scale-out transport (or, for this node, straight
//     into this rank's own queue: it forwards for itself);
//   NVL receivers: warp w drains, for each forwarder l = w - rdma_senders, ... of this node, NVL
//     queue (c, l): the tokens of sources (0, l), (1, l), ... in that order, each source's in
//     token order, placed at the rows notify gave to (source, c).
// The forwarding block (internode_forward.cuh) is the other half of the channel.
#pragma once

#include "kernels/internode_common.cuh"

namespace moelink::kernels::internode {

struct DispatchTuning {
  int nvl_chunk, rdma_chunk;
};

// Does `token` go to node `node`? (any rank of it in the layout)
MOELINK_DEVICE bool goes_to_node(const InternodeDispatchArgs& args, int64_t token, int node) {
  const int lr = args.ctx.shape.ranks_per_node;
  const bool* row = args.is_token_in_rank + token * args.ctx.shape.num_ranks() + node * lr;
  bool any = false;
  for (int j = 0; j < lr; ++j) any = any || row[j];
  return any;
}

MOELINK_DEVICE_NOINLINE void rdma_send(const InternodeDispatchArgs& args, const InternodeLayout& layout, int c, int node,
                              int chunk) {
  const InternodeContext& ctx = args.ctx;
  const InternodeShape& s = ctx.shape;
  const int nodes = s.num_nodes, me_node = ctx.node();
  const int peer = node * s.ranks_per_node + ctx.local();
  // The warp's working lanes (work_lanes: every lane on the GPU, one fiber on the host) split
  // every per-token loop below; the others have left (dispatch_send_block).
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  const int64_t ring_bytes = s.rdma_queue_tokens * layout.dispatch_slot;
  const int64_t recv_ring = layout.rdma_recv + stream_index(ctx, c, me_node) * ring_bytes;  // at the forwarder
  char* slots = peer == ctx.rank ? net_at<char>(ctx, recv_ring)
                                 : net_at<char>(ctx, layout.rdma_send + stream_index(ctx, c, node) * ring_bytes);
  NetSender sender = NetSender::open(ctx, peer, slots, recv_ring, layout.sig_rdma_tail + stream_index(ctx, c, me_node),
                                     layout.sig_rdma_head + stream_index(ctx, c, node),
                                     position_at(ctx, layout.pos_rdma_sent, c, node), s.rdma_queue_tokens, chunk,
                                     layout.dispatch_slot, "internode dispatch: room in forwarder's queue", c,
                                     lanes.mask);
  const int64_t first_expert = static_cast<int64_t>(node) * s.ranks_per_node * s.experts_per_rank;
  const int64_t node_experts = static_cast<int64_t>(s.ranks_per_node) * s.experts_per_rank;
  const TokenRange range = channel_tokens(args.num_tokens, s.num_channels, c);
  // Each working lane looks at one token of the batch; the ballot says which go to `node`.
  for (int64_t batch = range.begin; batch < range.end; batch += lanes.count) {
    const int64_t my_token = batch + lanes.rank;
    const bool mine = my_token < range.end && goes_to_node(args, my_token, node);
    if (my_token < range.end && !mine) args.rdma_send_head[my_token * nodes + node] = -1;
    for (uint32_t selected = ballot(lanes.mask, mine); selected != 0; selected &= selected - 1) {
      const int64_t token = batch + lanes.rank_of(lowest_bit(selected));
      char* slot = sender.reserve(ctx);
      warp_copy_input(lanes.mask, slot, static_cast<const char*>(args.x) + token * s.row_bytes,
                      static_cast<size_t>(s.row_bytes));
      uint32_t* scales = reinterpret_cast<uint32_t*>(slot + layout.slot_scales);
      for (int i = lanes.rank; i < s.num_scales; i += lanes.count) scales[i] = args.x_scales[token * s.num_scales + i];
      int32_t* topk = reinterpret_cast<int32_t*>(slot + layout.slot_topk);
      float* weights = reinterpret_cast<float*>(slot + layout.slot_weights);
      for (int k = lanes.rank; k < s.num_topk; k += lanes.count) {
        const int64_t expert = args.topk_idx[token * s.num_topk + k];
        const bool here = expert >= first_expert && expert < first_expert + node_experts;
        topk[k] = here ? static_cast<int32_t>(expert) : -1;
        weights[k] = here && args.topk_weights != nullptr ? args.topk_weights[token * s.num_topk + k] : 0.0f;
      }
      for (int i = lanes.rank; i < 4; i += lanes.count) {
        reinterpret_cast<int32_t*>(slot + layout.slot_meta)[i] = i == 0 ? static_cast<int32_t>(token) : 0;
      }
      // Which ranks of the node get it: bit j of word j / 32, from the layout (a lane per word).
      const bool* ranks_row = args.is_token_in_rank + token * s.num_ranks() + node * s.ranks_per_node;
      for (int word = lanes.rank; word < (s.ranks_per_node + 31) / 32; word += lanes.count) {
        uint32_t bits = 0;
        for (int j = word * 32; j < s.ranks_per_node && j < word * 32 + 32; ++j) bits |= ranks_row[j] ? 1u << (j % 32) : 0u;
        reinterpret_cast<uint32_t*>(slot + layout.slot_mask)[word] = bits;
      }
      if (lanes.leads()) args.rdma_send_head[token * nodes + node] = static_cast<int32_t>(sender.tail - sender.start);
      sender.commit(ctx);
    }
  }
  sender.finish(ctx);
}

// Drains NVL queue (c, l) of this rank: the tokens forwarder (my node, l) passes on from sources
// (0, l), (1, l), ..., each source's rows sequential from the row notify gave to (source, c).
MOELINK_DEVICE_NOINLINE void nvl_receive(const InternodeDispatchArgs& args, const InternodeLayout& layout, int c, int l,
                                BulkStage& stage) {
  const InternodeContext& ctx = args.ctx;
  const InternodeShape& s = ctx.shape;
  const int lr = s.ranks_per_node, channels = s.num_channels;
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));  // the others have left
  const int forwarder = ctx.node() * lr + l;  // the rank that fills this queue (named in every check)
  Queue queue;
  const int64_t index = static_cast<int64_t>(c) * lr + l;
  queue.tail = nvl_at<uint64_t>(ctx, ctx.local(), layout.nvl_tail + index * kIntranodeCounterStride);
  queue.head = nvl_at<uint64_t>(ctx, ctx.local(), layout.nvl_head + index * kIntranodeCounterStride);
  queue.base = nvl_at<char>(ctx, ctx.local(), layout.nvl_queues + index * layout.nvl_queue_bytes);
  queue.capacity = s.nvl_queue_tokens;

  uint64_t head = lanes.from_leader(lanes.leads() ? ld_acquire(queue.head) : uint64_t{0});
  int node = 0;
  int64_t taken = 0;  // rows of (node, l) already received
  auto rows_of = [&](int n) {
    const int32_t* start = args.recv_channel_start + (n * lr + l) * channels + c;
    return static_cast<int64_t>(start[1] - start[0]);
  };
  int64_t expected = 0;
  for (int n = 0; n < s.num_nodes; ++n) expected += rows_of(n);
  for (int64_t received = 0; received < expected;) {
    const uint64_t tail = lanes.from_leader(lanes.leads() ? wait_until(queue.tail, Cmp::kGt, head,
                                                                       WaitSite{"internode dispatch: tokens from forwarder",
                                                                                ctx.rank, forwarder, c})
                                                          : uint64_t{0});
    syncwarp(lanes.mask);  // the leader's acquire of the tail orders the other lanes' slot reads too
    const int64_t ready = static_cast<int64_t>(tail - head);
    MOELINK_DEVICE_CHECK(ready >= 0 && ready <= expected - received,
                         "internode dispatch: forwarder rank %d queued %lld tokens, %lld expected", forwarder,
                         static_cast<long long>(received + ready), static_cast<long long>(expected));
    for (int64_t i = 0; i < ready; ++i) {
      while (taken == rows_of(node)) {
        ++node;
        taken = 0;
      }
      const int slot = queue.slot(head + static_cast<uint64_t>(i));
      const int src = node * lr + l;
      const int64_t row = args.recv_channel_start[src * channels + c] + taken++;
      const int32_t* meta = reinterpret_cast<const int32_t*>(queue.base + layout.q_src) + 2 * static_cast<int64_t>(slot);
      // The forwarder's word: a message from another source here means the streams disagree.
      MOELINK_DEVICE_CHECK(meta[0] == src, "internode dispatch: forwarder rank %d passed a token of rank %d where rank "
                           "%d's were due", forwarder, meta[0], src);
      warp_bulk_copy(lanes.mask, stage, static_cast<char*>(args.recv_x) + row * s.row_bytes,
                     queue.base + layout.q_row + slot * s.row_bytes, static_cast<size_t>(s.row_bytes));
      const uint32_t* scales = reinterpret_cast<const uint32_t*>(queue.base + layout.q_scales) + static_cast<int64_t>(slot) * s.num_scales;
      for (int j = lanes.rank; j < s.num_scales; j += lanes.count) args.recv_x_scales[row * s.num_scales + j] = scales[j];
      const int32_t* topk = reinterpret_cast<const int32_t*>(queue.base + layout.q_topk) + static_cast<int64_t>(slot) * s.num_topk;
      const float* weights = reinterpret_cast<const float*>(queue.base + layout.q_weights) + static_cast<int64_t>(slot) * s.num_topk;
      for (int k = lanes.rank; k < s.num_topk; k += lanes.count) {
        const int32_t expert = topk[k];  // the forwarder's word: callers index expert tables with it
        MOELINK_DEVICE_CHECK(expert >= -1 && expert < s.experts_per_rank,
                             "internode dispatch: forwarder rank %d passed local expert id %d (this rank has %d)",
                             forwarder, expert,
                             s.experts_per_rank);
        args.recv_topk_idx[row * s.num_topk + k] = expert;
        if (args.recv_topk_weights != nullptr) args.recv_topk_weights[row * s.num_topk + k] = weights[k];
      }
      if (lanes.leads()) {
        MOELINK_DEVICE_CHECK(meta[1] >= 0, "internode dispatch: forwarder rank %d passed source token index %d of rank %d",
                             forwarder, meta[1], src);
        args.recv_src_idx[row] = meta[1];
      }
    }
    received += ready;
    head = tail;
    syncwarp(lanes.mask);  // every working lane is done with the slots before the leader frees them
    if (lanes.leads()) st_release(queue.head, head);
  }
}

// Returns false on the lanes that have no work (work_lanes: only on the host), which then leave
// the kernel.
MOELINK_DEVICE bool dispatch_send_block(const InternodeDispatchArgs& args, const InternodeLayout& layout,
                                        const InternodeRoles& roles, int c, const DispatchTuning& tuning) {
  const InternodeShape& s = args.ctx.shape;
  const int warp = static_cast<int>(warp_id());
  // Lanes outside the warp's working lanes have nothing to do and leave, after bulk_stage, which
  // every lane calls; the kernel's barriers count their warps as arrived without them.
  const bool works = WarpLanes::of(work_lanes(kFullMask)).mine();
  if (warp < roles.rdma_senders) {
    if (!works) return false;
    for (int node = warp; node < s.num_nodes; node += roles.rdma_senders) rdma_send(args, layout, c, node, tuning.rdma_chunk);
  } else {
    MOELINK_DYNAMIC_SMEM(unsigned char, smem);
    const int receiver = warp - roles.rdma_senders;
    BulkStage stage = bulk_stage(smem + receiver * kBulkStageBytes);
    if (!works) return false;
    for (int l = receiver; l < s.ranks_per_node; l += roles.nvl_receivers) nvl_receive(args, layout, c, l, stage);
  }
  return true;
}

}  // namespace moelink::kernels::internode
