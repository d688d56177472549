// Compiled by g++ into moelink._host and by nvcc into moelink._cuda.
#include "runtime/ops_low_latency.h"

#include <string>
#include <type_traits>

#include "kernels/low_latency_combine.cuh"
#include "kernels/low_latency_dispatch.cuh"
#include "runtime/errors.h"
#include "runtime/launch_net.h"

namespace moelink {

namespace {

namespace k = kernels::low_latency;
using F = LowLatencyFormat;

[[noreturn]] void invalid(const char* op, const std::string& what) {
  throw Error(ErrorKind::kInvalidArgument, std::string(op) + ": " + what);
}

std::string str(long long v) { return std::to_string(v); }

// The kernels' own assumptions; the Python layer has validated user input against them.
void check_context(const char* op, const LowLatencyContext& c, int64_t needed_half_bytes, int num_blocks) {
  const LowLatencyShape& s = c.shape;
  if (s.num_ranks < 1 || s.ranks_per_node < 1 || s.num_ranks % s.ranks_per_node != 0)
    invalid(op, "ranks per node must divide the ranks, got " + str(s.ranks_per_node) + " of " + str(s.num_ranks));
  if (s.ranks_per_node > kIntranodeMaxRanks) invalid(op, "at most " + str(kIntranodeMaxRanks) + " ranks per node");
  if (c.rank < 0 || c.rank >= s.num_ranks) invalid(op, "rank out of range");
  if (s.num_max_tokens < 1) invalid(op, "num_max_dispatch_tokens_per_rank must be >= 1");
  if (s.hidden < 128 || s.hidden % 128 != 0) invalid(op, "hidden must be a positive multiple of 128, got " + str(s.hidden));
  if (s.num_experts < s.num_ranks || s.num_experts % s.num_ranks != 0)
    invalid(op, "num_experts must be a positive multiple of the ranks, got " + str(s.num_experts));
  if (s.num_topk < 1 || s.num_topk > kLowLatencyMaxTopk)
    invalid(op, "top-k must be in [1, " + str(kLowLatencyMaxTopk) + "], got " + str(s.num_topk));
  if (static_cast<int64_t>(s.num_max_tokens) * s.num_topk > INT32_MAX ||
      static_cast<int64_t>(s.num_max_tokens) * s.num_ranks > INT32_MAX)
    invalid(op, "num_max_dispatch_tokens_per_rank * max(top-k, ranks) must stay below 2**31");
  if (static_cast<int>(s.format) < 0 || static_cast<int>(s.format) > static_cast<int>(F::kLogfmt10))
    invalid(op, "unknown payload format " + str(static_cast<int>(s.format)));
#if defined(__CUDACC__)
  if (s.block_warps != kGpuBlockWarps)
    invalid(op, "the GPU build runs blocks of " + str(kGpuBlockWarps) + " warps, got " + str(s.block_warps));
#endif
  if (s.block_warps < 1 || s.block_warps > kMaxBlockWarps)
    invalid(op, "block_warps must be in [1, " + str(kMaxBlockWarps) + "], got " + str(s.block_warps));
  if (num_blocks < 1) invalid(op, "the grid needs at least one block");
  if (c.net.window == nullptr || c.net.kind == transport::ScaleOutKind::kNone) invalid(op, "no scale-out transport");
  if (c.net.num_ranks != s.num_ranks || c.net.rank != c.rank) invalid(op, "the transport's ranks differ from the call's");
  const LowLatencyWindow& w = s.window;
  if (static_cast<int64_t>(c.net.num_signals) < w.num_signals)
    invalid(op, "the transport has " + str(c.net.num_signals) + " signals, the layout needs " + str(w.num_signals));
  if (w.half_bytes < needed_half_bytes || static_cast<int64_t>(c.net.window_bytes) < w.data_base + 2 * w.half_bytes)
    invalid(op, "the scale-out window has halves of " + str(w.half_bytes) + " bytes, this call needs " +
                    str(needed_half_bytes) + " (num_rdma_bytes >= " + str(w.data_base + 2 * needed_half_bytes) + ")");
  if (c.claims == nullptr || c.claim_capacity < s.num_experts) invalid(op, "no slot claims for every expert");
  if (c.use_nvlink)
    for (int r = 0; r < s.ranks_per_node; ++r)
      if (c.node_windows.base[r] == nullptr) invalid(op, "NVLink: the window of local rank " + str(r) + " is not mapped");
}

unsigned threads_of(const LowLatencyShape& s) { return static_cast<unsigned>(s.block_warps * arch::kWarpSize); }

// Calls launch(std::integral_constant<F, f>{}) for the runtime format: one kernel each.
template <typename Launch>
void with_format(F format, Launch&& launch) {
  switch (format) {
    case F::kFp8: launch(std::integral_constant<F, F::kFp8>{}); break;
    case F::kFp8Pow2: launch(std::integral_constant<F, F::kFp8Pow2>{}); break;
    case F::kFp8Ue8m0: launch(std::integral_constant<F, F::kFp8Ue8m0>{}); break;
    case F::kMxfp8: launch(std::integral_constant<F, F::kMxfp8>{}); break;
    case F::kNvfp4: launch(std::integral_constant<F, F::kNvfp4>{}); break;
    case F::kLogfmt8: launch(std::integral_constant<F, F::kLogfmt8>{}); break;
    case F::kLogfmt9: launch(std::integral_constant<F, F::kLogfmt9>{}); break;
    case F::kLogfmt10: launch(std::integral_constant<F, F::kLogfmt10>{}); break;
    default: launch(std::integral_constant<F, F::kBf16>{}); break;
  }
}

template <typename Launch>
void with_combine_format(F format, Launch&& launch) {
  switch (format) {
    case F::kLogfmt8: launch(std::integral_constant<F, F::kLogfmt8>{}); break;
    case F::kLogfmt9: launch(std::integral_constant<F, F::kLogfmt9>{}); break;
    case F::kLogfmt10: launch(std::integral_constant<F, F::kLogfmt10>{}); break;
    default: launch(std::integral_constant<F, F::kBf16>{}); break;
  }
}

void check_phases(const char* op, int phases) {
  if (phases < 1 || phases > (kLowLatencySendPhase | kLowLatencyRecvPhase)) invalid(op, "phases must be 1, 2 or 3");
}

}  // namespace

void low_latency_dispatch(const LowLatencyDispatchArgs& args, const LaunchContext& ctx, int num_blocks) {
  const char* op = "low-latency dispatch";
  check_phases(op, args.phases);
  check_context(op, args.ctx, LowLatencyLayout::of(args.ctx.shape).dispatch_bytes, num_blocks);
  if (args.num_tokens < 0 || args.num_tokens > args.ctx.shape.num_max_tokens)
    invalid(op, "num_tokens must be in [0, num_max_dispatch_tokens_per_rank]");
  if (args.ctx.shape.format == F::kNvfp4 && args.global_scale == nullptr) invalid(op, "NVFP4 needs its tensor scale");
  if (args.ctx.shape.carry_weights && args.num_tokens > 0 && args.topk_weights == nullptr)
    invalid(op, "carried weights need topk_weights");
  if (args.scale_by_weight && (!args.ctx.shape.carry_weights || args.ctx.shape.format != F::kBf16))
    invalid(op, "scale_by_weight needs bf16 rows that carry their weights");
  with_format(args.ctx.shape.format, [&](auto format) {
    MOELINK_WITH_NET(args.ctx.net, ctx,
                     MOELINK_LAUNCH_COOPERATIVE(ctx, "low_latency_dispatch", k::dispatch_kernel<decltype(format)::value>,
                                                static_cast<unsigned>(num_blocks), threads_of(args.ctx.shape), 0, args));
  });
}

void low_latency_combine(const LowLatencyCombineArgs& args, const LaunchContext& ctx, int num_blocks) {
  const char* op = "low-latency combine";
  check_phases(op, args.phases);
  const F format = args.ctx.shape.format;
  if (format != F::kBf16 && !is_logfmt(format)) invalid(op, "the combine format is bf16 or LogFMT-8/9/10");
  check_context(op, args.ctx, LowLatencyLayout::of(args.ctx.shape).combine_bytes, num_blocks);
  if (args.num_tokens < 0 || args.num_tokens > args.ctx.shape.num_max_tokens)
    invalid(op, "num_tokens must be in [0, num_max_dispatch_tokens_per_rank]");
  if (!args.ctx.shape.zero_copy && (args.phases & kLowLatencySendPhase) && args.x == nullptr)
    invalid(op, "x is needed without zero_copy");
  with_combine_format(format, [&](auto f) {
    MOELINK_WITH_NET(args.ctx.net, ctx,
                     MOELINK_LAUNCH_COOPERATIVE(ctx, "low_latency_combine", k::combine_kernel<decltype(f)::value>,
                                                static_cast<unsigned>(num_blocks), threads_of(args.ctx.shape), 0, args));
  });
}

void low_latency_clean(const LowLatencyCleanArgs& args, const LaunchContext& ctx) {
  check_context("low-latency clean", args.ctx, 0, 1);
  MOELINK_WITH_NET(args.ctx.net, ctx,
                   MOELINK_LAUNCH(ctx, "low_latency_clean", k::clean_kernel, 1u, threads_of(args.ctx.shape), 0, args));
}

}  // namespace moelink
