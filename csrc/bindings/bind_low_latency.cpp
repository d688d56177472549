// moelink.<target>.low_latency: the low-latency kernels (runtime/ops_low_latency.h), their window
// regions and layouts.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/common.h"
#include "runtime/ops_low_latency.h"

namespace moelink::bindings {

namespace {

LowLatencyShape shape_of(int num_ranks, int ranks_per_node, int num_max_tokens, int hidden, int num_experts,
                         int num_topk, int format, bool carry_weights, bool zero_copy, int block_warps,
                         int num_nodes, int64_t window_bytes) {
  LowLatencyShape s;
  s.num_ranks = num_ranks;
  s.ranks_per_node = ranks_per_node;
  s.num_max_tokens = num_max_tokens;
  s.hidden = hidden;
  s.num_experts = num_experts;
  s.num_topk = num_topk;
  s.format = static_cast<LowLatencyFormat>(format);
  s.carry_weights = carry_weights;
  s.zero_copy = zero_copy;
  s.block_warps = block_warps;
  s.window = LowLatencyWindow::of(num_nodes, ranks_per_node, window_bytes);
  return s;
}

#define MOELINK_LL_SHAPE_ARGS                                                                                   \
  py::arg("num_ranks"), py::arg("ranks_per_node"), py::arg("num_max_tokens"), py::arg("hidden"),                \
      py::arg("num_experts"), py::arg("num_topk"), py::arg("format"), py::arg("carry_weights") = false,         \
      py::arg("zero_copy") = false, py::arg("block_warps"), py::arg("num_nodes"), py::arg("window_bytes")

py::dict window_dict(const LowLatencyWindow& w) {
  py::dict d;
  d["signal_base"] = w.signal_base;
  d["num_signals"] = w.num_signals;
  d["own_offset"] = w.own_offset;
  d["reserved_head"] = w.reserved_head;
  d["data_base"] = w.data_base;
  d["half_bytes"] = w.half_bytes;
  return d;
}

py::dict layout_dict(const LowLatencyShape& s) {
  const LowLatencyLayout l = LowLatencyLayout::of(s);
  py::dict d;
  d["payload_bytes"] = l.payload_bytes;
  d["scale_bytes"] = l.scale_bytes;
  d["msg_bytes"] = l.msg_bytes;
  d["count_bytes"] = l.count_bytes;
  d["comb_msg_bytes"] = l.comb_msg;
  d["comb_send"] = l.comb_send;
  d["dispatch_bytes"] = l.dispatch_bytes;
  d["combine_bytes"] = l.combine_bytes;
  d["fingerprint"] = s.fingerprint();
  d["window"] = window_dict(s.window);
  return d;
}

}  // namespace

void bind_low_latency(py::module_& parent) {
  py::module_ m = parent.def_submodule("low_latency", "Low-latency dispatch/combine kernels (runtime/ops_low_latency.h).");
  m.attr("MAX_TOPK") = kLowLatencyMaxTopk;
  m.attr("SEND_PHASE") = kLowLatencySendPhase;
  m.attr("RECV_PHASE") = kLowLatencyRecvPhase;
  m.attr("MASKED_SLOT") = kLowLatencyMaskedSlot;
  m.attr("OWN_FIXED_BYTES") = kLowLatencyOwnFixedBytes;
  py::dict formats;
  formats["bf16"] = static_cast<int>(LowLatencyFormat::kBf16);
  formats["fp8"] = static_cast<int>(LowLatencyFormat::kFp8);
  formats["fp8_pow2"] = static_cast<int>(LowLatencyFormat::kFp8Pow2);
  formats["fp8_ue8m0"] = static_cast<int>(LowLatencyFormat::kFp8Ue8m0);
  formats["mxfp8"] = static_cast<int>(LowLatencyFormat::kMxfp8);
  formats["nvfp4"] = static_cast<int>(LowLatencyFormat::kNvfp4);
  formats["logfmt8"] = static_cast<int>(LowLatencyFormat::kLogfmt8);
  formats["logfmt9"] = static_cast<int>(LowLatencyFormat::kLogfmt9);
  formats["logfmt10"] = static_cast<int>(LowLatencyFormat::kLogfmt10);
  m.attr("FORMATS") = formats;

  m.def(
      "window",
      [](int num_nodes, int ranks_per_node, int64_t window_bytes) {
        return window_dict(LowLatencyWindow::of(num_nodes, ranks_per_node, window_bytes));
      },
      py::kw_only(), py::arg("num_nodes"), py::arg("ranks_per_node"), py::arg("window_bytes"),
      "Where the low-latency regions lie in a scale-out window (LowLatencyWindow).");
  m.def(
      "layout",
      [](int num_ranks, int ranks_per_node, int num_max_tokens, int hidden, int num_experts, int num_topk, int format,
         bool carry_weights, bool zero_copy, int block_warps, int num_nodes, int64_t window_bytes) {
        return layout_dict(shape_of(num_ranks, ranks_per_node, num_max_tokens, hidden, num_experts, num_topk, format,
                                    carry_weights, zero_copy, block_warps, num_nodes, window_bytes));
      },
      py::kw_only(), MOELINK_LL_SHAPE_ARGS, "Message sizes and half sizes of one call's shape (LowLatencyLayout).");

  py::class_<LowLatencyContext>(m, "Context", "Where a low-latency call runs: rank, shape, transport, NVLink table.",
                                py::module_local())
      .def(py::init([](int rank, int num_ranks, int ranks_per_node, int num_max_tokens, int hidden, int num_experts,
                       int num_topk, int format, bool carry_weights, bool zero_copy, int block_warps, int num_nodes,
                       int64_t window_bytes, int net_kind, uintptr_t net_window, uint64_t net_window_bytes,
                       uint32_t num_signals, uintptr_t net_queue, uintptr_t net_rdma_bytes, bool use_nvlink,
                       const std::vector<uintptr_t>& node_windows, uintptr_t nvl_bytes, uintptr_t claims,
                       int64_t claim_capacity, int codec_split, bool shrink) {
             if (use_nvlink && (node_windows.size() != static_cast<size_t>(ranks_per_node) ||
                                ranks_per_node > kIntranodeMaxRanks)) {
               throw Error(ErrorKind::kInvalidArgument, "low-latency Context: expected " +
                                                            std::to_string(ranks_per_node) +
                                                            " node window addresses, got " +
                                                            std::to_string(node_windows.size()));
             }
             LowLatencyContext c;
             c.rank = rank;
             c.shape = shape_of(num_ranks, ranks_per_node, num_max_tokens, hidden, num_experts, num_topk, format,
                                carry_weights, zero_copy, block_warps, num_nodes, window_bytes);
             c.net.rank = rank;
             c.net.num_ranks = num_ranks;
             c.net.kind = static_cast<transport::ScaleOutKind>(net_kind);
             c.net.num_signals = num_signals;
             c.net.window = ptr<char>(net_window);
             c.net.window_bytes = net_window_bytes;
             c.net.queue = ptr<void>(net_queue);
             c.net.rdma_bytes = ptr<uint64_t>(net_rdma_bytes);
             c.use_nvlink = use_nvlink;
             for (size_t i = 0; i < node_windows.size() && i < static_cast<size_t>(kIntranodeMaxRanks); ++i)
               c.node_windows.base[i] = ptr<void>(node_windows[i]);
             c.nvl_bytes = ptr<uint64_t>(nvl_bytes);
             c.claims = ptr<uint32_t>(claims);
             c.claim_capacity = claim_capacity;
             c.codec_split = codec_split;
             c.shrink = shrink;
             return c;
           }),
           py::kw_only(), py::arg("rank"), MOELINK_LL_SHAPE_ARGS, py::arg("net_kind"), py::arg("net_window"),
           py::arg("net_window_bytes"), py::arg("num_signals"), py::arg("net_queue"), py::arg("net_rdma_bytes") = 0,
           py::arg("use_nvlink") = false, py::arg("node_windows") = std::vector<uintptr_t>{}, py::arg("nvl_bytes") = 0,
           py::arg("claims"), py::arg("claim_capacity"), py::arg("codec_split") = 0, py::arg("shrink") = false)
      .def_property_readonly("layout", [](const LowLatencyContext& c) { return layout_dict(c.shape); });

  m.def(
      "dispatch",
      [](const LowLatencyContext& ctx, int phases, int num_blocks, int64_t num_tokens, uintptr_t x, uintptr_t topk_idx,
         uintptr_t topk_weights, uintptr_t global_scale, uintptr_t cached_slots, bool scale_by_weight,
         uintptr_t send_slots, uintptr_t send_counts, uintptr_t recv_x, uintptr_t recv_scales,
         uintptr_t recv_global_scale, uintptr_t recv_count, uintptr_t src_info, uintptr_t layout_range,
         uintptr_t cumulative_recv_stats, uintptr_t wait_cost_stats, uintptr_t stream, int rank) {
        LowLatencyDispatchArgs a;
        a.ctx = ctx;
        a.phases = phases;
        a.num_tokens = num_tokens;
        a.x = ptr<const uint16_t>(x);
        a.topk_idx = ptr<const int64_t>(topk_idx);
        a.topk_weights = ptr<const float>(topk_weights);
        a.global_scale = ptr<const float>(global_scale);
        a.cached_slots = ptr<const int32_t>(cached_slots);
        a.scale_by_weight = scale_by_weight;
        a.send_slots = ptr<int32_t>(send_slots);
        a.send_counts = ptr<int32_t>(send_counts);
        a.recv_x = ptr<void>(recv_x);
        a.recv_scales = ptr<void>(recv_scales);
        a.recv_global_scale = ptr<float>(recv_global_scale);
        a.recv_count = ptr<int32_t>(recv_count);
        a.src_info = ptr<int32_t>(src_info);
        a.layout_range = ptr<int64_t>(layout_range);
        a.cumulative_recv_stats = ptr<int32_t>(cumulative_recv_stats);
        a.wait_cost_stats = ptr<int64_t>(wait_cost_stats);
        low_latency_dispatch(a, context(stream, rank), num_blocks);
      },
      py::arg("ctx"), py::arg("phases"), py::arg("num_blocks"), py::arg("num_tokens"), py::arg("x"), py::arg("topk_idx"),
      py::arg("topk_weights"), py::arg("global_scale"), py::arg("cached_slots"), py::arg("scale_by_weight"),
      py::arg("send_slots"), py::arg("send_counts"), py::arg("recv_x"), py::arg("recv_scales"),
      py::arg("recv_global_scale"), py::arg("recv_count"), py::arg("src_info"), py::arg("layout_range"),
      py::arg("cumulative_recv_stats"), py::arg("wait_cost_stats"), MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "combine",
      [](const LowLatencyContext& ctx, int phases, int num_blocks, uintptr_t x, uintptr_t src_info,
         uintptr_t layout_range, int64_t num_tokens, uintptr_t topk_idx, uintptr_t topk_weights, uintptr_t send_slots,
         uintptr_t send_counts, uintptr_t combined_x, uintptr_t slot_values, uintptr_t wait_cost_stats,
         uintptr_t stream, int rank) {
        LowLatencyCombineArgs a;
        a.ctx = ctx;
        a.phases = phases;
        a.x = ptr<const uint16_t>(x);
        a.src_info = ptr<const int32_t>(src_info);
        a.layout_range = ptr<const int64_t>(layout_range);
        a.num_tokens = num_tokens;
        a.topk_idx = ptr<const int64_t>(topk_idx);
        a.topk_weights = ptr<const float>(topk_weights);
        a.send_slots = ptr<const int32_t>(send_slots);
        a.send_counts = ptr<const int32_t>(send_counts);
        a.combined_x = ptr<uint16_t>(combined_x);
        a.slot_values = ptr<uint16_t>(slot_values);
        a.wait_cost_stats = ptr<int64_t>(wait_cost_stats);
        low_latency_combine(a, context(stream, rank), num_blocks);
      },
      py::arg("ctx"), py::arg("phases"), py::arg("num_blocks"), py::arg("x"), py::arg("src_info"),
      py::arg("layout_range"), py::arg("num_tokens"), py::arg("topk_idx"), py::arg("topk_weights"),
      py::arg("send_slots"), py::arg("send_counts"), py::arg("combined_x"), py::arg("slot_values"),
      py::arg("wait_cost_stats"), MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "clean",
      [](const LowLatencyContext& ctx, uintptr_t stream, int rank) {
        LowLatencyCleanArgs a;
        a.ctx = ctx;
        low_latency_clean(a, context(stream, rank));
      },
      py::arg("ctx"), MOELINK_CONTEXT_ARGS, release_gil());
}

}  // namespace moelink::bindings
