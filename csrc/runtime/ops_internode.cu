// Compiled by g++ into moelink._host and by nvcc into moelink._cuda.
#include "runtime/ops_internode.h"

#include <string>

#include "kernels/internode_combine.cuh"
#include "kernels/internode_dispatch.cuh"
#include "kernels/internode_forward.cuh"
#include "kernels/internode_notify.cuh"
#include "runtime/errors.h"
#include "runtime/launch_net.h"

namespace moelink {

namespace kernels::internode {

// The dispatch kernel: block 2c sends channel c, block 2c + 1 forwards it (see the headers).
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) dispatch_kernel(InternodeDispatchArgs args, DispatchTuning tuning) {
  const InternodeContext& ctx = args.ctx;
  const uint64_t epoch = operation_epoch(ctx);
  if (args.barrier_first) {
    global_barrier(ctx, epoch, "internode dispatch: global barrier (rank has not entered this dispatch)");
  }
  const InternodeLayout layout = InternodeLayout::of(ctx.shape);  // after the barrier: nothing live across it
  const InternodeRoles roles = InternodeRoles::of(ctx.shape);
  const int c = static_cast<int>(block_rank()) / 2;
  // Lanes outside their warp's working lanes (work_lanes: only on the host) leave the kernel here;
  // the block barriers count their warps as arrived without them (arch.cuh: bar_sync).
  const bool works = block_rank() % 2 == 0 ? dispatch_send_block(args, layout, roles, c, tuning)
                                           : dispatch_forward_block(args, layout, roles, c, tuning);
  if (!works) return;
  end_operation(ctx, epoch);
}

}  // namespace kernels::internode

namespace {

namespace k = kernels::internode;

[[noreturn]] void invalid(const char* op, const std::string& what) {
  throw Error(ErrorKind::kInvalidArgument, std::string(op) + ": " + what);
}

std::string str(long long v) { return std::to_string(v); }

// The kernels' own assumptions; the Python layer has validated user input against them.
void check_context(const char* op, const InternodeContext& ctx, int64_t needed_rdma_bytes) {
  const InternodeShape& s = ctx.shape;
  if (s.num_nodes < 1 || s.num_nodes > kInternodeMaxNodes)
    invalid(op, "nodes must be in [1, " + str(kInternodeMaxNodes) + "], got " + str(s.num_nodes));
  if (s.ranks_per_node < 1 || s.ranks_per_node > kInternodeMaxLocalRanks)
    invalid(op, "ranks per node must be in [1, " + str(kInternodeMaxLocalRanks) + "], got " + str(s.ranks_per_node));
  if (ctx.rank < 0 || ctx.rank >= s.num_ranks()) invalid(op, "rank out of range");
  if (s.num_channels < 1 || s.num_channels > kInternodeMaxChannels)
    invalid(op, "channels (num_sms / 2) must be in [1, " + str(kInternodeMaxChannels) + "], got " + str(s.num_channels));
#if defined(__CUDACC__)
  if (s.block_warps != kGpuBlockWarps)
    invalid(op, "the GPU build runs blocks of " + str(kGpuBlockWarps) + " warps, got " + str(s.block_warps));
#endif
  if (s.block_warps < 2 || s.block_warps > kMaxBlockWarps)
    invalid(op, "block_warps must be in [2, " + str(kMaxBlockWarps) + "], got " + str(s.block_warps));
  const InternodeRoles roles = InternodeRoles::of(s);
  if (!roles.valid() || (s.ranks_per_node + roles.forwarders - 1) / roles.forwarders > kMaxPeersPerWarp) {
    invalid(op, "queues of " + str(s.nvl_queue_tokens) + " (NVL) and " + str(s.rdma_queue_tokens) +
                    " (RDMA) tokens are too small for blocks of " + str(s.block_warps) + " warps: they need at least " +
                    str(s.block_warps) + " and " + str(s.block_warps + roles.combine_reducers) + " slots");
  }
  if (s.row_bytes <= 0 || s.row_bytes % 16 != 0) invalid(op, "row bytes must be a positive multiple of 16");
  if (s.num_topk < 0 || s.num_scales < 0 || s.experts_per_rank < 0) invalid(op, "negative shape");
  for (int r = 0; r < s.ranks_per_node; ++r)
    if (ctx.nvl.base[r] == nullptr) invalid(op, "NVL window of local rank " + str(r) + " not set");
  const InternodeLayout layout = InternodeLayout::of(s);
  if (ctx.net.window == nullptr || ctx.net.kind == transport::ScaleOutKind::kNone)
    invalid(op, "no scale-out transport");
#if !defined(__CUDACC__)
  if (ctx.net.kind == transport::ScaleOutKind::kGin) invalid(op, "the GIN transport exists on the GPU target only");
#endif
  if (static_cast<int64_t>(ctx.net.num_signals) < layout.num_signals)
    invalid(op, "the transport has " + str(ctx.net.num_signals) + " signals, the layout needs " + str(layout.num_signals));
  if (static_cast<int64_t>(ctx.net.window_bytes) < needed_rdma_bytes)
    invalid(op, "the scale-out window has " + str(static_cast<long long>(ctx.net.window_bytes)) + " bytes, this call needs " +
                    str(needed_rdma_bytes));
}

unsigned grid_of(const InternodeShape& s) { return static_cast<unsigned>(2 * s.num_channels); }
unsigned threads_of(const InternodeShape& s) { return static_cast<unsigned>(s.block_warps * arch::kWarpSize); }

size_t dispatch_smem(const InternodeShape& s) {
  const InternodeRoles roles = InternodeRoles::of(s);
  const size_t stages = static_cast<size_t>(roles.nvl_receivers) * arch::kBulkStageBytes;
  const size_t forward = k::forward_smem_bytes(s);
  return stages > forward ? stages : forward;
}

}  // namespace

size_t internode_combine_smem_bytes(const InternodeShape& shape) { return k::combine_block_smem_bytes(shape); }

void internode_notify(const InternodeNotifyArgs& args, const LaunchContext& ctx) {
  check_context("internode notify", args.ctx, InternodeLayout::of(args.ctx.shape).rdma_total_bytes);
  if (args.expert_alignment < 1) invalid("internode notify", "expert_alignment must be >= 1");
  MOELINK_WITH_NET(args.ctx.net, ctx,
                   MOELINK_LAUNCH_COOPERATIVE(ctx, "internode_notify", k::notify_kernel, grid_of(args.ctx.shape),
                                              threads_of(args.ctx.shape), 0, args));
}

void internode_dispatch(const InternodeDispatchArgs& args, const LaunchContext& ctx, int nvl_chunk, int rdma_chunk) {
  check_context("internode dispatch", args.ctx, InternodeLayout::of(args.ctx.shape).rdma_total_bytes);
  if (nvl_chunk < 1 || rdma_chunk < 1) invalid("internode dispatch", "send chunks must be >= 1");
  MOELINK_WITH_NET(args.ctx.net, ctx,
                   MOELINK_LAUNCH_COOPERATIVE(ctx, "internode_dispatch", k::dispatch_kernel, grid_of(args.ctx.shape),
                                              threads_of(args.ctx.shape), dispatch_smem(args.ctx.shape), args,
                                              k::DispatchTuning{nvl_chunk, rdma_chunk}));
}

void internode_combine(const InternodeCombineArgs& args, const LaunchContext& ctx, int nvl_chunk, int rdma_chunk) {
  check_context("internode combine", args.ctx, InternodeLayout::of(args.ctx.shape).rdma_total_bytes);
  if (args.hidden * 2 != args.ctx.shape.row_bytes) invalid("internode combine", "row bytes must be hidden * 2 (bf16)");
  if (nvl_chunk < 1 || rdma_chunk < 1) invalid("internode combine", "send chunks must be >= 1");
  MOELINK_WITH_NET(args.ctx.net, ctx,
                   MOELINK_LAUNCH_COOPERATIVE(ctx, "internode_combine", k::combine_kernel, grid_of(args.ctx.shape),
                                              threads_of(args.ctx.shape), internode_combine_smem_bytes(args.ctx.shape),
                                              args, k::CombineTuning{nvl_chunk, rdma_chunk}));
}

}  // namespace moelink
