// Compiled by g++ into moelink._host and by nvcc into moelink._cuda.
#include "runtime/ops_intranode.h"

#include <string>

#include "kernels/intranode_combine.cuh"
#include "kernels/intranode_dispatch.cuh"
#include "kernels/intranode_notify.cuh"
#include "runtime/errors.h"

namespace moelink {

namespace {

namespace k = kernels::intranode;

[[noreturn]] void invalid(const char* op, const std::string& what) {
  throw Error(ErrorKind::kInvalidArgument, std::string(op) + ": " + what);
}

// The kernels' own assumptions; the Python layer has already validated user input against them.
void check_node(const char* op, const IntranodeContext& node) {
  const IntranodeShape& s = node.shape;
  if (s.num_ranks < 1 || s.num_ranks > kIntranodeMaxRanks)
    invalid(op, "ranks per node must be in [1, " + std::to_string(kIntranodeMaxRanks) + "], got " + std::to_string(s.num_ranks));
  if (node.rank < 0 || node.rank >= s.num_ranks) invalid(op, "rank out of range");
  if (s.num_channels < 1 || s.num_channels > kIntranodeMaxChannels)
    invalid(op, "channels (num_sms / 2) must be in [1, " + std::to_string(kIntranodeMaxChannels) + "], got " +
                    std::to_string(s.num_channels));
  if (s.queue_tokens < s.num_ranks)
    invalid(op, "queue_tokens must be at least the number of ranks (" + std::to_string(s.num_ranks) + ")");
  if (s.row_bytes <= 0 || s.row_bytes % 16 != 0) invalid(op, "row bytes must be a positive multiple of 16");
  if (s.num_topk < 0 || s.num_scales < 0 || s.experts_per_rank < 0) invalid(op, "negative shape");
  if (node.windows == nullptr || node.epoch == 0) invalid(op, "windows not set up");
}

unsigned grid_of(const IntranodeShape& s) { return static_cast<unsigned>(2 * s.num_channels); }

}  // namespace

void intranode_notify(const NotifyArgs& args, const LaunchContext& ctx) {
  check_node("intranode notify", args.node);
  if (args.expert_alignment < 1) invalid("intranode notify", "expert_alignment must be >= 1");
  MOELINK_LAUNCH(ctx, "intranode_notify", k::notify_kernel, static_cast<unsigned>(args.node.shape.num_ranks),
                 k::block_threads(args.node.shape.num_ranks), 0, args);
}

void intranode_dispatch(const DispatchArgs& args, const LaunchContext& ctx, int send_chunk) {
  check_node("intranode dispatch", args.node);
  if (send_chunk < 1 || send_chunk > args.node.shape.queue_tokens)
    invalid("intranode dispatch", "send chunk must be in [1, queue_tokens]");
  MOELINK_LAUNCH(ctx, "intranode_dispatch", k::dispatch_kernel, grid_of(args.node.shape),
                 k::block_threads(args.node.shape.num_ranks), 0, args, k::DispatchTuning{send_chunk});
}

void intranode_combine(const CombineArgs& args, const LaunchContext& ctx, int send_chunk) {
  check_node("intranode combine", args.node);
  if (args.hidden * 2 != args.node.shape.row_bytes) invalid("intranode combine", "row bytes must be hidden * 2 (bf16)");
  if (send_chunk < 1 || send_chunk > args.node.shape.queue_tokens)
    invalid("intranode combine", "send chunk must be in [1, queue_tokens]");
  MOELINK_LAUNCH(ctx, "intranode_combine", k::combine_kernel, grid_of(args.node.shape),
                 k::block_threads(args.node.shape.num_ranks), 0, args, k::CombineTuning{send_chunk});
}

}  // namespace moelink
