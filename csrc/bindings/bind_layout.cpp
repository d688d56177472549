#include "bindings/common.h"
#include "runtime/ops_layout.h"

namespace moelink::bindings {

void bind_layout(py::module_& m) {
  m.def(
      "dispatch_layout",
      [](uintptr_t topk_idx, int index_bytes, int64_t num_tokens, int num_topk, int64_t row_stride, int num_experts,
         int num_ranks, int ranks_per_node, uintptr_t num_tokens_per_rank, uintptr_t num_tokens_per_node,
         uintptr_t num_tokens_per_expert, uintptr_t is_token_in_rank, uintptr_t stream, int rank) {
        DispatchLayoutArgs args;
        args.topk_idx = ptr<const void>(topk_idx);
        args.index_bytes = index_bytes;
        args.num_tokens = num_tokens;
        args.num_topk = num_topk;
        args.row_stride = row_stride;
        args.num_experts = num_experts;
        args.num_ranks = num_ranks;
        args.ranks_per_node = ranks_per_node;
        args.num_tokens_per_rank = ptr<int32_t>(num_tokens_per_rank);
        args.num_tokens_per_node = ptr<int32_t>(num_tokens_per_node);
        args.num_tokens_per_expert = ptr<int32_t>(num_tokens_per_expert);
        args.is_token_in_rank = ptr<bool>(is_token_in_rank);
        dispatch_layout(args, context(stream, rank));
      },
      "Dispatch layout kernel (see csrc/runtime/ops_layout.h); pointers are data_ptr() integers.",
      py::arg("topk_idx"), py::arg("index_bytes"), py::arg("num_tokens"), py::arg("num_topk"), py::arg("row_stride"),
      py::arg("num_experts"), py::arg("num_ranks"), py::arg("ranks_per_node"), py::arg("num_tokens_per_rank"),
      py::arg("num_tokens_per_node"), py::arg("num_tokens_per_expert"), py::arg("is_token_in_rank"),
      MOELINK_CONTEXT_ARGS, release_gil());
}

}  // namespace moelink::bindings
