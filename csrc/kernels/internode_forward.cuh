// Internode dispatch, the forwarding block of each channel (block 2c + 1, runtime/ops_internode.h):
//   forwarders: warp w serves the local destination ranks j = w, w + forwarders, ...: it reads
//     every message of scale-out queues (c, 0), (c, 1), ... (sources (n, my local index), in node
//     order) and passes those bound for j on through NVL queue (c, me) in j's window, with the
//     top-k ids made local to j; it records each message's NVL position for the combine;
//   coordinator (the last warp): returns the credits of queue (c, n) to its source once every
//     forwarder warp has read past them (the minimum of their progress).
// Shared memory: the queues' start positions [N] and each forwarder warp's progress [W - 1][N].
#pragma once

#include "kernels/internode_common.cuh"
#include "kernels/internode_dispatch.cuh"

namespace moelink::kernels::internode {

// Messages a forwarder warp reads between reports of its progress to the coordinator.
constexpr int kProgressBatch = 8;

MOELINK_HOST_DEVICE size_t forward_smem_bytes(const InternodeShape& s) {
  return static_cast<size_t>(s.num_nodes) * sizeof(uint64_t) * static_cast<size_t>(s.block_warps);
}

// The NVL queue (c, sender) in the window of local rank `owner`.
MOELINK_DEVICE Queue nvl_queue(const InternodeContext& ctx, const InternodeLayout& layout, int owner, int c,
                               int sender) {
  const int64_t index = static_cast<int64_t>(c) * ctx.shape.ranks_per_node + sender;
  Queue q;
  q.tail = nvl_at<uint64_t>(ctx, owner, layout.nvl_tail + index * kIntranodeCounterStride);
  q.head = nvl_at<uint64_t>(ctx, owner, layout.nvl_head + index * kIntranodeCounterStride);
  q.base = nvl_at<char>(ctx, owner, layout.nvl_queues + index * layout.nvl_queue_bytes);
  q.capacity = ctx.shape.nvl_queue_tokens;
  return q;
}

MOELINK_DEVICE int64_t nvl_slot_bytes(const InternodeShape& s) { return s.row_bytes + 4 * s.num_scales + 8 * s.num_topk + 8; }

// One message on to local rank j: payload, scales, top-k ids local to j, weights, (source, index).
MOELINK_DEVICE void forward_message(const InternodeDispatchArgs& args, const InternodeLayout& layout,
                                    QueueSender& sender, const char* message, int j, int src, const WarpLanes& lanes) {
  const InternodeShape& s = args.ctx.shape;
  const int slot = sender.reserve();
  char* base = sender.queue.base;
  warp_copy(lanes.mask, base + layout.q_row + slot * s.row_bytes, message, static_cast<size_t>(s.row_bytes));
  const uint32_t* scales = reinterpret_cast<const uint32_t*>(message + layout.slot_scales);
  uint32_t* out_scales = reinterpret_cast<uint32_t*>(base + layout.q_scales) + static_cast<int64_t>(slot) * s.num_scales;
  for (int i = lanes.rank; i < s.num_scales; i += lanes.count) out_scales[i] = scales[i];
  const int32_t* topk = reinterpret_cast<const int32_t*>(message + layout.slot_topk);
  const float* weights = reinterpret_cast<const float*>(message + layout.slot_weights);
  int32_t* out_topk = reinterpret_cast<int32_t*>(base + layout.q_topk) + static_cast<int64_t>(slot) * s.num_topk;
  float* out_weights = reinterpret_cast<float*>(base + layout.q_weights) + static_cast<int64_t>(slot) * s.num_topk;
  const int64_t first = static_cast<int64_t>(args.ctx.node() * s.ranks_per_node + j) * s.experts_per_rank;
  for (int k = lanes.rank; k < s.num_topk; k += lanes.count) {
    const bool mine = topk[k] >= first && topk[k] < first + s.experts_per_rank;
    out_topk[k] = mine ? static_cast<int32_t>(topk[k] - first) : -1;
    out_weights[k] = mine ? weights[k] : 0.0f;
  }
  if (lanes.leads()) {
    // The source's word, passed on to a local rank that keeps it as recv_src_idx.
    const int32_t token = reinterpret_cast<const int32_t*>(message + layout.slot_meta)[0];
    MOELINK_DEVICE_CHECK(token >= 0, "internode dispatch: source %d sent token index %d", src, token);
    int32_t* meta = reinterpret_cast<int32_t*>(base + layout.q_src) + 2 * static_cast<int64_t>(slot);
    meta[0] = src;
    meta[1] = token;
  }
  sender.commit();
}

// Whether the message goes to local rank j: its mask, written by the source from the layout.
MOELINK_DEVICE bool message_for(const InternodeLayout& layout, const char* message, int j) {
  return (reinterpret_cast<const uint32_t*>(message + layout.slot_mask)[j / 32] >> (j % 32)) & 1u;
}

MOELINK_DEVICE_NOINLINE void forward(const InternodeDispatchArgs& args, const InternodeLayout& layout, const InternodeRoles& roles,
                            int c, int warp, const uint64_t* starts, uint64_t* progress, int nvl_chunk) {
  const InternodeContext& ctx = args.ctx;
  const InternodeShape& s = ctx.shape;
  const int lr = s.ranks_per_node, nodes = s.num_nodes;
  // The warp's working lanes (work_lanes) split every message; the others have left.
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  QueueSender senders[kMaxPeersPerWarp];
  int served = 0;
  for (int j = warp; j < lr; j += roles.forwarders, ++served) {
    senders[served] = QueueSender::open(ctx.rank, j != ctx.local() ? ctx.nvl_bytes : nullptr,
                                        nvl_queue(ctx, layout, j, c, ctx.local()), ctx.node() * lr + j, c, nvl_chunk,
                                        nvl_slot_bytes(s), nullptr, "internode dispatch: room in local rank's queue",
                                        lanes.mask);
  }
  const int64_t ring_bytes = s.rdma_queue_tokens * layout.dispatch_slot;
  for (int n = 0; n < nodes; ++n) {
    const int src = n * lr + ctx.local();
    const int32_t first = args.forward_start[c * nodes + n], count = args.forward_start[c * nodes + n + 1] - first;
    const char* ring = net_at<const char>(ctx, layout.rdma_recv + stream_index(ctx, c, n) * ring_bytes);
    const int64_t tail_signal = layout.sig_rdma_tail + stream_index(ctx, c, n);
    uint64_t available = starts[n];
    for (int m = 0; m < count; ++m) {
      const uint64_t position = starts[n] + static_cast<uint64_t>(m);
      if (position >= available) {
        available = lanes.from_leader(lanes.leads() ? transport::wait_signal(ctx.net, tail_signal, Cmp::kGt, position,
                                                                             WaitSite{"internode dispatch: tokens from source", ctx.rank, src, c})
                                                      : uint64_t{0});
        MOELINK_DEVICE_CHECK(available - starts[n] <= static_cast<uint64_t>(count),
                             "internode dispatch: source %d published %llu tokens, %d expected", src,
                             static_cast<unsigned long long>(available - starts[n]), count);
        syncwarp(lanes.mask);  // the leader's acquire orders the other lanes' message reads too
      }
      const char* message = ring + static_cast<int64_t>(position % static_cast<uint64_t>(s.rdma_queue_tokens)) * layout.dispatch_slot;
      for (int i = 0, j = warp; i < served; ++i, j += roles.forwarders) {
        int32_t at = -1;
        if (message_for(layout, message, j)) {
          at = static_cast<int32_t>(senders[i].tail - senders[i].start);
          forward_message(args, layout, senders[i], message, j, src, lanes);
        }
        if (lanes.leads()) args.forward_head[static_cast<int64_t>(first + m) * lr + j] = at;
      }
      // Progress for the coordinator, every few messages (and before waiting for more): each
      // publication costs the warp a collective, each credit a network signal.
      if (m + 1 == count || (m + 1) % kProgressBatch == 0 || starts[n] + static_cast<uint64_t>(m) + 1 >= available) {
        syncwarp(lanes.mask);  // every working lane is done with the messages before the coordinator frees them
        if (lanes.leads()) st_release<Scope::kBlock>(progress + static_cast<int64_t>(warp) * nodes + n, static_cast<uint64_t>(m + 1));
      }
    }
  }
  for (int i = 0; i < served; ++i) senders[i].publish();
}

// Returns the credits of every queue (c, n) as the slowest forwarder warp passes them.
MOELINK_DEVICE_NOINLINE void coordinate(const InternodeDispatchArgs& args, const InternodeLayout& layout,
                               const InternodeRoles& roles, int c, const uint64_t* starts, const uint64_t* progress) {
  const InternodeContext& ctx = args.ctx;
  const InternodeShape& s = ctx.shape;
  const int lr = s.ranks_per_node, nodes = s.num_nodes;
  if (!WarpLanes::of(work_lanes(kFullMask)).leads()) return;  // one thread: the leader
  for (int n = 0; n < nodes; ++n) {
    const int src = n * lr + ctx.local();
    const uint64_t count = static_cast<uint64_t>(args.forward_start[c * nodes + n + 1] - args.forward_start[c * nodes + n]);
    uint64_t released = 0;
    while (released < count) {
      uint64_t slowest = count;
      int slowest_warp = 0;
      for (int w = 0; w < roles.forwarders && w < lr; ++w) {
        const uint64_t done = ld_acquire<Scope::kBlock>(progress + static_cast<int64_t>(w) * nodes + n);
        if (done < slowest) { slowest = done; slowest_warp = w; }
      }
      // Whatever every warp has passed goes back at once: the source may be waiting for one slot
      // (batching beyond what accumulated while this warp looked elsewhere could deadlock).
      if (slowest > released) {
        signal_add(ctx, src, layout.sig_rdma_head + stream_index(ctx, c, ctx.node()), slowest - released);
        released = slowest;
      } else {
        wait_until<Scope::kBlock>(progress + static_cast<int64_t>(slowest_warp) * nodes + n, Cmp::kGt, released,
                                  WaitSite{"internode dispatch: forwarder warp progress", ctx.rank, src, c});
      }
    }
    st_relaxed(position_at(ctx, layout.pos_rdma_taken, c, n), starts[n] + count);
  }
}

// Returns false on the lanes that have no work (work_lanes: only on the host), which then leave
// the kernel.
MOELINK_DEVICE bool dispatch_forward_block(const InternodeDispatchArgs& args, const InternodeLayout& layout,
                                           const InternodeRoles& roles, int c, const DispatchTuning& tuning) {
  const InternodeContext& ctx = args.ctx;
  const int nodes = ctx.shape.num_nodes, warp = static_cast<int>(warp_id());
  MOELINK_DYNAMIC_SMEM(uint64_t, smem);
  uint64_t* starts = smem;
  uint64_t* progress = smem + nodes;  // [forwarders][N]
  // The block's working threads (work_lanes of every warp: one fiber per warp on the host) fill
  // the shared words; the others leave at once (sync_block counts their warps as arrived).
  const WarpLanes lanes = WarpLanes::of(work_lanes(kFullMask));
  if (!lanes.mine()) return false;
  const BlockWorkers workers = block_workers(lanes);
  for (int i = workers.index; i < nodes * (roles.forwarders + 1); i += workers.count) {
    smem[i] = i < nodes ? ld_relaxed(position_at(ctx, layout.pos_rdma_taken, c, i)) : 0;
  }
  sync_block();
  if (warp < roles.forwarders) {
    if (warp < ctx.shape.ranks_per_node) forward(args, layout, roles, c, warp, starts, progress, tuning.nvl_chunk);
  } else if (warp == roles.forwarders) {
    coordinate(args, layout, roles, c, starts, progress);
  }
  return true;
}

}  // namespace moelink::kernels::internode
