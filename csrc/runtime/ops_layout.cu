// Compiled by g++ into moelink._host and by nvcc into moelink._cuda.
#include "runtime/ops_layout.h"

#include <string>

#include "kernels/layout.cuh"
#include "runtime/errors.h"

namespace moelink {

void dispatch_layout(const DispatchLayoutArgs& args, const LaunchContext& ctx) {
  // The Python layer validates user input; these checks guard the kernel's own assumptions
  // (an unchecked index in a communication kernel is a write into another rank's memory).
  auto fail = [](const std::string& what) { throw Error(ErrorKind::kInvalidArgument, "dispatch_layout: " + what); };
  if (args.index_bytes != 4 && args.index_bytes != 8) fail("index_bytes must be 4 or 8");
  if (args.num_tokens < 0 || args.num_topk < 0) fail("negative num_tokens or num_topk");
  if (args.num_ranks <= 0 || args.num_experts <= 0 || args.num_experts % args.num_ranks != 0)
    fail("num_experts must be a positive multiple of num_ranks");
  if (args.ranks_per_node <= 0 || args.num_ranks % args.ranks_per_node != 0)
    fail("ranks_per_node must divide num_ranks");
  if (!args.num_tokens_per_rank || !args.num_tokens_per_expert ||
      (args.num_tokens > 0 && (!args.is_token_in_rank || (args.num_topk > 0 && !args.topk_idx))))
    fail("null pointer");
  kernels::launch_dispatch_layout(args, ctx);
}

}  // namespace moelink
