#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/common.h"
#include "runtime/ops_intranode.h"

namespace moelink::bindings {

using namespace pybind11::literals;

void bind_intranode(py::module_& parent) {
  py::module_ m = parent.def_submodule("intranode", "Intranode dispatch/combine kernels (runtime/ops_intranode.h).");
  m.attr("MAX_RANKS") = kIntranodeMaxRanks;
  m.attr("MAX_CHANNELS") = kIntranodeMaxChannels;

  m.attr("MAX_BLOCK_WARPS") = kMaxBlockWarps;
  m.attr("GPU_BLOCK_WARPS") = kGpuBlockWarps;
  m.attr("MAX_SUB_CHANNELS") = kMaxSubChannels;
  m.attr("MAX_VIRTUAL_CHANNELS") = kMaxVirtualChannels;
  // Where the node barrier's slots start in every window (tests that watch a rank enter it).
  m.attr("BARRIER_OFFSET") = IntranodeLayout::kControlBytes;
  m.attr("AGREEMENT_WORDS") = kAgreementWords;
  m.attr("COUNTER_STRIDE") = kIntranodeCounterStride;
  m.def("default_sub_channels", &WarpMap::default_sub_channels, py::arg("num_ranks"), py::arg("block_warps"),
        py::arg("num_channels"), py::arg("queue_tokens"),
        "Sub-channels a fresh dispatch uses (WarpMap in runtime/ops_intranode.h).");

  py::class_<IntranodeContext>(m, "Node", "Where a call runs: rank, shapes, windows.", py::module_local())
      .def(py::init([](int rank, int num_ranks, int num_channels, int block_warps, int sub_channels, int queue_tokens,
                       int64_t row_bytes, int num_scales, int num_topk, int experts_per_rank,
                       const std::vector<uintptr_t>& windows, uintptr_t nvl_bytes,
                       const std::vector<uint64_t>& agreement) {
             if (windows.size() != static_cast<size_t>(num_ranks) || num_ranks > kIntranodeMaxRanks) {
               throw Error(ErrorKind::kInvalidArgument, "intranode Node: expected " + std::to_string(num_ranks) +
                                                            " window addresses (at most " +
                                                            std::to_string(kIntranodeMaxRanks) + "), got " +
                                                            std::to_string(windows.size()));
             }
             IntranodeContext node;
             node.rank = rank;
             node.shape = IntranodeShape{num_ranks, num_channels, block_warps, sub_channels, queue_tokens, row_bytes,
                                         num_scales, num_topk, experts_per_rank};
             for (size_t i = 0; i < windows.size(); ++i) node.windows.base[i] = ptr<void>(windows[i]);
             node.nvl_bytes = ptr<uint64_t>(nvl_bytes);
             if (agreement.size() > static_cast<size_t>(kAgreementWords)) {
               throw Error(ErrorKind::kInvalidArgument, "intranode Node: at most " + std::to_string(kAgreementWords) +
                                                            " agreement words, got " + std::to_string(agreement.size()));
             }
             for (size_t i = 0; i < agreement.size(); ++i) node.agreement[i] = agreement[i];
             return node;
           }),
           py::kw_only(), py::arg("rank"), py::arg("num_ranks"), py::arg("num_channels"), py::arg("block_warps"),
           py::arg("sub_channels"), py::arg("queue_tokens"), py::arg("row_bytes"), py::arg("num_scales"),
           py::arg("num_topk"), py::arg("experts_per_rank"), py::arg("windows"), py::arg("nvl_bytes") = 0,
           py::arg("agreement") = std::vector<uint64_t>{})
      .def_property_readonly("window_bytes_needed",
                             [](const IntranodeContext& node) { return IntranodeLayout::of(node.shape).total_bytes; })
      .def_property_readonly("virtual_channels", [](const IntranodeContext& node) { return node.shape.virtual_channels(); })
      .def_property_readonly("map_valid", [](const IntranodeContext& node) {
        return node.shape.map().valid(node.shape.num_ranks);
      })
      .def_property_readonly("round_tokens", [](const IntranodeContext& node) { return node.shape.map().round_tokens; })
      .def_property_readonly("queue_capacity", [](const IntranodeContext& node) { return node.shape.map().capacity; })
      .def_property_readonly("layout",
                             [](const IntranodeContext& node) {
                               const IntranodeLayout l = IntranodeLayout::of(node.shape);
                               // Every region (tests that play a faulty peer address them).
                               return py::dict("control"_a = l.control, "barrier"_a = l.barrier,
                                               "notify_epoch"_a = l.notify_epoch, "exit_barrier"_a = l.exit_barrier,
                                               "tail"_a = l.tail, "head"_a = l.head, "agreement"_a = l.agreement,
                                               "channel_count"_a = l.channel_count, "expert_count"_a = l.expert_count,
                                               "rank_count"_a = l.rank_count, "slots"_a = l.slots,
                                               "queue_bytes"_a = l.queue_bytes, "row"_a = l.row, "scales"_a = l.scales,
                                               "topk"_a = l.topk, "weights"_a = l.weights, "src"_a = l.src,
                                               "total_bytes"_a = l.total_bytes);
                             })
      .def(
          "direct_recv_layout",
          [](const IntranodeContext& node, int64_t rows, int64_t window_bytes) {
            const DirectRecvLayout l = DirectRecvLayout::of(node.shape, rows, window_bytes);
            return py::dict("base"_a = l.base, "row"_a = l.row, "scales"_a = l.scales, "topk"_a = l.topk,
                            "weights"_a = l.weights, "src"_a = l.src, "bytes"_a = l.bytes);
          },
          py::arg("rows"), py::arg("window_bytes"), "DirectRecvLayout (runtime/ops_intranode.h): base < 0 if it does not fit.")
      .def(
          "combine_input_layout",
          [](const IntranodeContext& node, int64_t rows) {
            const CombineInputLayout l = CombineInputLayout::of(node.shape, rows);
            return py::dict("base"_a = l.base, "row"_a = l.row, "weights"_a = l.weights, "bytes"_a = l.bytes);
          },
          py::arg("rows"), "CombineInputLayout (runtime/ops_intranode.h).");

  m.def(
      "notify",
      [](const IntranodeContext& node, int64_t num_tokens, uintptr_t is_token_in_rank, uintptr_t num_tokens_per_expert,
         int expert_alignment, uintptr_t recv_channel_start, uintptr_t recv_counts, uintptr_t rank_counts,
         uintptr_t send_row_start, int direct_rows_request, uintptr_t stream, int rank) {
        NotifyArgs args;
        args.node = node;
        args.num_tokens = num_tokens;
        args.is_token_in_rank = ptr<const bool>(is_token_in_rank);
        args.num_tokens_per_expert = ptr<const int32_t>(num_tokens_per_expert);
        args.expert_alignment = expert_alignment;
        args.recv_channel_start = ptr<int32_t>(recv_channel_start);
        args.recv_counts = ptr<int32_t>(recv_counts);
        args.rank_counts = ptr<int32_t>(rank_counts);
        args.send_row_start = ptr<int32_t>(send_row_start);
        args.direct_rows_request = direct_rows_request;
        intranode_notify(args, context(stream, rank));
      },
      py::arg("node"), py::arg("num_tokens"), py::arg("is_token_in_rank"), py::arg("num_tokens_per_expert"),
      py::arg("expert_alignment"), py::arg("recv_channel_start"), py::arg("recv_counts"), py::arg("rank_counts") = 0,
      py::arg("send_row_start") = 0, py::arg("direct_rows_request") = 0, MOELINK_CONTEXT_ARGS,
      release_gil());

  m.def(
      "dispatch",
      [](const IntranodeContext& node, bool barrier_first, int send_chunk, int64_t num_tokens, uintptr_t x,
         uintptr_t x_scales, uintptr_t topk_idx, uintptr_t topk_weights, uintptr_t is_token_in_rank,
         uintptr_t recv_channel_start, uintptr_t send_head, uintptr_t recv_x, uintptr_t recv_x_scales,
         uintptr_t recv_topk_idx, uintptr_t recv_topk_weights, uintptr_t recv_src_idx, bool direct, int64_t direct_rows,
         int64_t window_bytes, uintptr_t send_row_start, uintptr_t stream, int rank) {
        DispatchArgs args;
        args.node = node;
        args.barrier_first = barrier_first;
        args.num_tokens = num_tokens;
        args.x = ptr<const void>(x);
        args.x_scales = ptr<const uint32_t>(x_scales);
        args.topk_idx = ptr<const int64_t>(topk_idx);
        args.topk_weights = ptr<const float>(topk_weights);
        args.is_token_in_rank = ptr<const bool>(is_token_in_rank);
        args.recv_channel_start = ptr<const int32_t>(recv_channel_start);
        args.send_head = ptr<int32_t>(send_head);
        args.recv_x = ptr<void>(recv_x);
        args.recv_x_scales = ptr<uint32_t>(recv_x_scales);
        args.recv_topk_idx = ptr<int64_t>(recv_topk_idx);
        args.recv_topk_weights = ptr<float>(recv_topk_weights);
        args.recv_src_idx = ptr<int32_t>(recv_src_idx);
        args.direct = direct;
        args.direct_rows = direct_rows;
        args.window_bytes = window_bytes;
        args.send_row_start = ptr<const int32_t>(send_row_start);
        intranode_dispatch(args, context(stream, rank), send_chunk);
      },
      py::arg("node"), py::arg("barrier_first"), py::arg("send_chunk"), py::arg("num_tokens"), py::arg("x"),
      py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("is_token_in_rank"),
      py::arg("recv_channel_start"), py::arg("send_head"), py::arg("recv_x"), py::arg("recv_x_scales"),
      py::arg("recv_topk_idx"), py::arg("recv_topk_weights"), py::arg("recv_src_idx"), py::arg("direct") = false,
      py::arg("direct_rows") = 0, py::arg("window_bytes") = 0, py::arg("send_row_start") = 0, MOELINK_CONTEXT_ARGS,
      release_gil());

  m.def(
      "combine",
      [](const IntranodeContext& node, int send_chunk, int hidden, int64_t num_recv, uintptr_t x, uintptr_t topk_weights,
         uintptr_t recv_channel_start, int64_t num_tokens, uintptr_t is_token_in_rank, uintptr_t send_head,
         uintptr_t bias0, uintptr_t bias1, uintptr_t combined_x, uintptr_t combined_topk_weights, bool direct,
         int64_t direct_rows, uintptr_t send_row_start, uintptr_t stream, int rank) {
        CombineArgs args;
        args.node = node;
        args.hidden = hidden;
        args.num_recv = num_recv;
        args.x = ptr<const uint16_t>(x);
        args.topk_weights = ptr<const float>(topk_weights);
        args.recv_channel_start = ptr<const int32_t>(recv_channel_start);
        args.num_tokens = num_tokens;
        args.is_token_in_rank = ptr<const bool>(is_token_in_rank);
        args.send_head = ptr<const int32_t>(send_head);
        args.bias[0] = ptr<const uint16_t>(bias0);
        args.bias[1] = ptr<const uint16_t>(bias1);
        args.combined_x = ptr<uint16_t>(combined_x);
        args.combined_topk_weights = ptr<float>(combined_topk_weights);
        args.direct = direct;
        args.direct_rows = direct_rows;
        args.send_row_start = ptr<const int32_t>(send_row_start);
        intranode_combine(args, context(stream, rank), send_chunk);
      },
      py::arg("node"), py::arg("send_chunk"), py::arg("hidden"), py::arg("num_recv"), py::arg("x"),
      py::arg("topk_weights"), py::arg("recv_channel_start"), py::arg("num_tokens"), py::arg("is_token_in_rank"),
      py::arg("send_head"), py::arg("bias0"), py::arg("bias1"), py::arg("combined_x"), py::arg("combined_topk_weights"),
      py::arg("direct") = false, py::arg("direct_rows") = 0, py::arg("send_row_start") = 0, MOELINK_CONTEXT_ARGS,
      release_gil());
}

}  // namespace moelink::bindings
