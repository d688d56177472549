// Compiled by g++ into moelink._host and by nvcc into moelink._cuda.
#include "runtime/ops_intranode.h"

#include <string>

#include "kernels/intranode_combine.cuh"
#include "kernels/intranode_combine_direct.cuh"
#include "kernels/intranode_dispatch.cuh"
#include "kernels/intranode_dispatch_direct.cuh"
#include "kernels/intranode_notify.cuh"
#include "runtime/errors.h"

namespace moelink {

namespace {

namespace k = kernels::intranode;

[[noreturn]] void invalid(const char* op, const std::string& what) {
  throw Error(ErrorKind::kInvalidArgument, std::string(op) + ": " + what);
}

std::string str(long long v) { return std::to_string(v); }

// The kernels' own assumptions; the Python layer has already validated user input against them.
void check_node(const char* op, const IntranodeContext& node) {
  const IntranodeShape& s = node.shape;
  if (s.num_ranks < 1 || s.num_ranks > kIntranodeMaxRanks)
    invalid(op, "ranks per node must be in [1, " + str(kIntranodeMaxRanks) + "], got " + str(s.num_ranks));
  if (node.rank < 0 || node.rank >= s.num_ranks) invalid(op, "rank out of range");
  if (s.num_channels < 1 || s.num_channels > kIntranodeMaxChannels)
    invalid(op, "channels (num_sms / 2) must be in [1, " + str(kIntranodeMaxChannels) + "], got " + str(s.num_channels));
#if defined(__CUDACC__)
  if (s.block_warps != kGpuBlockWarps)
    invalid(op, "the GPU build runs blocks of " + str(kGpuBlockWarps) + " warps, got block_warps " + str(s.block_warps));
#endif
  if (s.block_warps < 1 || s.block_warps > kMaxBlockWarps)
    invalid(op, "block_warps must be in [1, " + str(kMaxBlockWarps) + "], got " + str(s.block_warps));
  if (s.sub_channels < 1 || s.num_channels * s.sub_channels > kMaxVirtualChannels)
    invalid(op, "channels * sub_channels must be in [1, " + str(kMaxVirtualChannels) + "], got " + str(s.num_channels) +
                    " * " + str(s.sub_channels));
  const WarpMap map = s.map();
  if (!map.valid(s.num_ranks)) {
    invalid(op, "no warp map for " + str(s.num_ranks) + " ranks, " + str(s.block_warps) + " warps per block, " +
                    str(s.sub_channels) + " sub-channels and queues of " + str(s.queue_tokens) +
                    " tokens: every queue needs at least min(ranks, warps) = " + str(map.group_warps) +
                    " slots and a warp serves at most " + str(kMaxPeersPerWarp) + " peers");
  }
  if (s.row_bytes <= 0 || s.row_bytes % 16 != 0) invalid(op, "row bytes must be a positive multiple of 16");
  if (s.num_topk < 0 || s.num_scales < 0 || s.experts_per_rank < 0) invalid(op, "negative shape");
  for (int r = 0; r < s.num_ranks; ++r) {
    if (node.windows.base[r] == nullptr) invalid(op, "window of local rank " + str(r) + " not set");
  }
}

unsigned grid_of(const IntranodeShape& s) { return static_cast<unsigned>(2 * s.num_channels); }
unsigned threads_of(const IntranodeShape& s) { return static_cast<unsigned>(s.block_warps * arch::kWarpSize); }

}  // namespace

size_t intranode_dispatch_smem_bytes(const IntranodeShape& shape) {
  return static_cast<size_t>(shape.block_warps) * arch::kBulkStageBytes;
}

size_t intranode_combine_smem_bytes(const IntranodeShape& shape) { return k::combine_smem_bytes(shape); }

void intranode_notify(const NotifyArgs& args, const LaunchContext& ctx) {
  check_node("intranode notify", args.node);
  if (args.expert_alignment < 1) invalid("intranode notify", "expert_alignment must be >= 1");
  MOELINK_LAUNCH_COOPERATIVE(ctx, "intranode_notify", k::notify_kernel, static_cast<unsigned>(args.node.shape.num_ranks),
                             threads_of(args.node.shape), 0, args);
}

void intranode_dispatch(const DispatchArgs& args, const LaunchContext& ctx, int send_chunk) {
  check_node("intranode dispatch", args.node);
  if (send_chunk < 1) invalid("intranode dispatch", "send chunk must be >= 1");
  if (args.direct) {
    if (args.send_row_start == nullptr) invalid("intranode dispatch", "a one-copy dispatch needs send_row_start");
    if (args.direct_rows < 0 || DirectRecvLayout::of(args.node.shape, args.direct_rows, args.window_bytes).base < 0) {
      invalid("intranode dispatch", "a receive region of " + str(args.direct_rows) + " rows does not fit windows of " +
                                        str(args.window_bytes) + " bytes");
    }
  }
  if (args.direct) {
    MOELINK_LAUNCH_COOPERATIVE(ctx, "intranode_dispatch_direct", k::dispatch_direct_kernel, grid_of(args.node.shape),
                               threads_of(args.node.shape), 0, args);
    return;
  }
  MOELINK_LAUNCH_COOPERATIVE(ctx, "intranode_dispatch", k::dispatch_kernel, grid_of(args.node.shape),
                             threads_of(args.node.shape), intranode_dispatch_smem_bytes(args.node.shape), args,
                             k::DispatchTuning{send_chunk});
}

void intranode_combine(const CombineArgs& args, const LaunchContext& ctx, int send_chunk) {
  check_node("intranode combine", args.node);
  if (args.hidden * 2 != args.node.shape.row_bytes) invalid("intranode combine", "row bytes must be hidden * 2 (bf16)");
  if (send_chunk < 1) invalid("intranode combine", "send chunk must be >= 1");
  if (args.direct && (args.send_row_start == nullptr || args.direct_rows < 0)) {
    invalid("intranode combine", "a one-copy combine needs send_row_start and direct_rows >= 0");
  }
  if (args.direct) {
    MOELINK_LAUNCH_COOPERATIVE(ctx, "intranode_combine_direct", k::combine_direct_kernel, grid_of(args.node.shape),
                               threads_of(args.node.shape), intranode_combine_smem_bytes(args.node.shape), args);
    return;
  }
  MOELINK_LAUNCH_COOPERATIVE(ctx, "intranode_combine", k::combine_kernel, grid_of(args.node.shape),
                             threads_of(args.node.shape), intranode_combine_smem_bytes(args.node.shape), args,
                             k::CombineTuning{send_chunk});
}

}  // namespace moelink
