// Dispatch layout kernel: from top-k expert ids, how many tokens each rank, node and expert
// receives, and which ranks each token goes to (DeepEP's get_dispatch_layout semantics).
//
// Work split. Every block counts one kind of *group* — experts, ranks or nodes — for up to 32
// consecutive groups: expert blocks first, then rank blocks, then node blocks. A group is a
// contiguous range of expert ids (1 expert, E/R experts for a rank, E/N for a node), so one loop
// serves all three. Threads stride over tokens and keep per-thread partial counts in shared
// memory (transposed, [group][thread], so that neighbouring threads hit different banks); a
// warp per group then sums a column. No atomics: the result is deterministic on both targets.
//
// Counting rules: a token counts once per rank and once per node however many of its experts
// live there; per expert, every (token, top-k slot) pair counts, duplicates included (DeepEP's
// rule: it is the number of rows an expert's grouped GEMM receives).
#pragma once

#include "arch/arch.cuh"
#include "runtime/ops_layout.h"

namespace moelink::kernels {

namespace layout {

constexpr int kThreads = 256;
constexpr int kGroupsPerBlock = 32;  // one bit per group in a uint32 "reached" mask
constexpr size_t kSmemBytes = sizeof(int32_t) * kGroupsPerBlock * kThreads;

enum class GroupKind : int { kExpert, kRank, kNode };

struct BlockPlan {
  GroupKind kind;
  int first_group;   // first group this block counts
  int num_groups;    // groups in this block, <= kGroupsPerBlock
  int group_size;    // experts per group
  int32_t* counts_out;
};

MOELINK_HOST_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }

MOELINK_DEVICE BlockPlan plan_block(const DispatchLayoutArgs& args, int block) {
  const int expert_blocks = ceil_div(args.num_experts, kGroupsPerBlock);
  const int rank_blocks = ceil_div(args.num_ranks, kGroupsPerBlock);
  const int experts_per_rank = args.num_experts / args.num_ranks;
  BlockPlan plan;
  int total_groups;
  if (block < expert_blocks) {
    plan = {GroupKind::kExpert, block * kGroupsPerBlock, 0, 1, args.num_tokens_per_expert};
    total_groups = args.num_experts;
  } else if (block < expert_blocks + rank_blocks) {
    plan = {GroupKind::kRank, (block - expert_blocks) * kGroupsPerBlock, 0, experts_per_rank, args.num_tokens_per_rank};
    total_groups = args.num_ranks;
  } else {
    plan = {GroupKind::kNode, (block - expert_blocks - rank_blocks) * kGroupsPerBlock, 0,
            experts_per_rank * args.ranks_per_node, args.num_tokens_per_node};
    total_groups = args.num_ranks / args.ranks_per_node;
  }
  const int remaining = total_groups - plan.first_group;
  plan.num_groups = remaining < kGroupsPerBlock ? remaining : kGroupsPerBlock;
  return plan;
}

template <typename Index>
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kThreads) dispatch_layout_kernel(DispatchLayoutArgs args) {
  using namespace arch;
  MOELINK_DYNAMIC_SMEM(int32_t, partial_counts);  // [kGroupsPerBlock][workers]
  const BlockPlan plan = plan_block(args, static_cast<int>(block_rank()));
  // The working lanes of every warp (arch.cuh: work_lanes; all of them on the GPU, one per warp on
  // the host, whose idle lanes leave here) stride over the tokens; `tid` is a thread's index among
  // the block's working threads and `threads` their number.
  const uint32_t lanes = work_lanes(kFullMask);
  if (!((lanes >> lane_id()) & 1u)) return;
  const int per_warp = popcount(lanes);
  const int tid = static_cast<int>(warp_id()) * per_warp + popcount(lanes & ((1u << lane_id()) - 1u));
  const int threads = static_cast<int>(num_warps()) * per_warp;
  for (int g = 0; g < kGroupsPerBlock; ++g) partial_counts[g * threads + tid] = 0;

  const Index* topk_idx = static_cast<const Index*>(args.topk_idx);
  const int64_t first_expert = static_cast<int64_t>(plan.first_group) * plan.group_size;
  for (int64_t token = tid; token < args.num_tokens; token += threads) {
    const Index* row = topk_idx + token * args.row_stride;
    uint32_t reached = 0;  // bit g: the token has an expert in group first_group + g
    for (int k = 0; k < args.num_topk; ++k) {
      const int64_t expert = static_cast<int64_t>(row[k]);
      if (expert < first_expert) continue;  // also skips -1
      const int64_t group = (expert - first_expert) / plan.group_size;
      if (group >= plan.num_groups) continue;
      if (plan.kind == GroupKind::kExpert) {
        ++partial_counts[group * threads + tid];
      } else {
        reached |= 1u << group;
      }
    }
    for (uint32_t bits = reached; bits != 0; bits &= bits - 1) ++partial_counts[lowest_bit(bits) * threads + tid];
    if (plan.kind == GroupKind::kRank) {
      bool* row_out = args.is_token_in_rank + token * args.num_ranks + plan.first_group;
      for (int g = 0; g < plan.num_groups; ++g) row_out[g] = (reached >> g) & 1u;
    }
  }
  sync_block();

  const int warp = static_cast<int>(warp_id());
  for (int g = warp; g < plan.num_groups; g += static_cast<int>(num_warps())) {
    int32_t sum = 0;
    const LaneRange share = lane_range(lanes, threads);
    for (int64_t t = share.begin; t < share.end; t += share.step) sum += partial_counts[g * threads + t];
    sum = warp_reduce_sum(lanes, sum);
    if (elect_one(lanes)) plan.counts_out[plan.first_group + g] = sum;
  }
}

}  // namespace layout

inline void launch_dispatch_layout(const DispatchLayoutArgs& args, const LaunchContext& ctx) {
  using namespace layout;
  const int expert_blocks = ceil_div(args.num_experts, kGroupsPerBlock);
  const int rank_blocks = ceil_div(args.num_ranks, kGroupsPerBlock);
  const int node_blocks = args.num_tokens_per_node ? ceil_div(args.num_ranks / args.ranks_per_node, kGroupsPerBlock) : 0;
  const unsigned grid = static_cast<unsigned>(expert_blocks + rank_blocks + node_blocks);
  if (args.index_bytes == 8) {
    MOELINK_LAUNCH(ctx, "dispatch_layout", dispatch_layout_kernel<int64_t>, grid, kThreads, kSmemBytes, args);
  } else {
    MOELINK_LAUNCH(ctx, "dispatch_layout", dispatch_layout_kernel<int32_t>, grid, kThreads, kSmemBytes, args);
  }
}

}  // namespace moelink::kernels
