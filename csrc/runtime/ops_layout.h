// Dispatch layout: who receives which token. Target-neutral declaration; the definition in
// ops_layout.cu is compiled by g++ into moelink._host and by nvcc into moelink._cuda.
#pragma once

#include <cstdint>

#include "launch_context.h"

namespace moelink {

struct DispatchLayoutArgs {
  // topk_idx[num_tokens][num_topk], int64 (index_bytes = 8) or int32 (index_bytes = 4), rows
  // `row_stride` elements apart. Entries are expert ids in [0, num_experts) or -1 (no expert);
  // the Python layer has validated the range: the kernel trusts it.
  const void* topk_idx = nullptr;
  int index_bytes = 8;
  int64_t num_tokens = 0;
  int num_topk = 0;
  int64_t row_stride = 0;

  int num_experts = 0;     // divisible by num_ranks: rank r owns experts [r*E/R, (r+1)*E/R)
  int num_ranks = 0;
  int ranks_per_node = 0;  // divides num_ranks; node n owns ranks [n*rpn, (n+1)*rpn)

  // Outputs, fully overwritten.
  int32_t* num_tokens_per_rank = nullptr;    // [num_ranks]: tokens with >= 1 expert on the rank
  int32_t* num_tokens_per_node = nullptr;    // [num_ranks / ranks_per_node], or nullptr to skip
  int32_t* num_tokens_per_expert = nullptr;  // [num_experts]: (token, top-k slot) pairs per expert
  bool* is_token_in_rank = nullptr;          // [num_tokens][num_ranks], row-major, dense
};

void dispatch_layout(const DispatchLayoutArgs& args, const LaunchContext& ctx);

}  // namespace moelink
