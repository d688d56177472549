// moelink.<target>.internode: the internode kernels (runtime/ops_internode.h) and their layout.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/common.h"
#include "runtime/ops_internode.h"

namespace moelink::bindings {

namespace {

InternodeShape shape_of(int num_nodes, int ranks_per_node, int num_channels, int block_warps, int nvl_queue_tokens,
                        int rdma_queue_tokens, int64_t row_bytes, int num_scales, int num_topk, int experts_per_rank) {
  InternodeShape s;
  s.num_nodes = num_nodes;
  s.ranks_per_node = ranks_per_node;
  s.num_channels = num_channels;
  s.block_warps = block_warps;
  s.nvl_queue_tokens = nvl_queue_tokens;
  s.rdma_queue_tokens = rdma_queue_tokens;
  s.row_bytes = row_bytes;
  s.num_scales = num_scales;
  s.num_topk = num_topk;
  s.experts_per_rank = experts_per_rank;
  return s;
}

#define MOELINK_SHAPE_ARGS                                                                                       \
  py::arg("num_nodes"), py::arg("ranks_per_node"), py::arg("num_channels"), py::arg("block_warps"),              \
      py::arg("nvl_queue_tokens"), py::arg("rdma_queue_tokens"), py::arg("row_bytes"), py::arg("num_scales"),    \
      py::arg("num_topk"), py::arg("experts_per_rank")

py::dict layout_dict(const InternodeShape& s) {
  const InternodeLayout l = InternodeLayout::of(s);
  const InternodeRoles r = InternodeRoles::of(s);
  py::dict d;
  d["num_signals"] = l.num_signals;
  d["rdma_bytes"] = l.rdma_total_bytes;
  d["nvl_bytes"] = l.nvl_total_bytes;
  d["notify_bytes"] = l.notify_bytes;
  d["dispatch_slot_bytes"] = l.dispatch_slot;
  d["partial_slot_bytes"] = l.partial_slot;
  d["nvl_slot_bytes"] = s.row_bytes + 4 * s.num_scales + 8 * s.num_topk + 8;
  d["roles_valid"] = r.valid();
  d["rdma_senders"] = r.rdma_senders;
  d["forwarders"] = r.forwarders;
  d["tokens_per_warp"] = r.tokens_per_warp;
  d["combine_reducers"] = r.combine_reducers;
  d["agreement_bytes"] = static_cast<int64_t>(8 * kAgreementWords);  // one rank's words: a put per remote rank
  // Offsets of every region (byte offsets; sig_* are signal ids), for the faulty-peer tests and
  // the docs (runtime/ops_internode.h documents each one).
  py::dict o;
  o["sig_barrier"] = l.sig_barrier;
  o["sig_notify"] = l.sig_notify;
  o["sig_rdma_tail"] = l.sig_rdma_tail;
  o["sig_rdma_head"] = l.sig_rdma_head;
  o["sig_comb_tail"] = l.sig_comb_tail;
  o["sig_comb_head"] = l.sig_comb_head;
  o["pos_rdma_sent"] = l.pos_rdma_sent;
  o["pos_rdma_taken"] = l.pos_rdma_taken;
  o["pos_comb_sent"] = l.pos_comb_sent;
  o["pos_comb_taken"] = l.pos_comb_taken;
  o["agreement_in"] = l.agreement_in;
  o["agreement_out"] = l.agreement_out;
  o["notify_in"] = l.notify_in;
  o["notify_out"] = l.notify_out;
  o["rdma_recv"] = l.rdma_recv;
  o["rdma_send"] = l.rdma_send;
  o["comb_recv"] = l.comb_recv;
  o["comb_send"] = l.comb_send;
  o["slot_scales"] = l.slot_scales;
  o["slot_topk"] = l.slot_topk;
  o["slot_weights"] = l.slot_weights;
  o["slot_meta"] = l.slot_meta;
  o["slot_mask"] = l.slot_mask;
  o["partial_weights"] = l.partial_weights;
  o["nvl_barrier"] = l.nvl_barrier;
  o["nvl_notify_flag"] = l.nvl_notify_flag;
  o["nvl_tail"] = l.nvl_tail;
  o["nvl_head"] = l.nvl_head;
  o["nvl_agreement"] = l.nvl_agreement;
  o["nvl_notify_in"] = l.nvl_notify_in;
  o["nvl_queues"] = l.nvl_queues;
  o["nvl_queue_bytes"] = l.nvl_queue_bytes;
  o["q_row"] = l.q_row;
  o["q_scales"] = l.q_scales;
  o["q_topk"] = l.q_topk;
  o["q_weights"] = l.q_weights;
  o["q_src"] = l.q_src;
  d["offsets"] = o;
  return d;
}

}  // namespace

void bind_internode(py::module_& parent) {
  py::module_ m = parent.def_submodule("internode", "Internode dispatch/combine kernels (runtime/ops_internode.h).");
  m.attr("MAX_NODES") = kInternodeMaxNodes;
  m.attr("MAX_CHANNELS") = kInternodeMaxChannels;

  m.def(
      "layout",
      [](int num_nodes, int ranks_per_node, int num_channels, int block_warps, int nvl_queue_tokens,
         int rdma_queue_tokens, int64_t row_bytes, int num_scales, int num_topk, int experts_per_rank,
         int64_t reserved_head_bytes) {
        InternodeShape s = shape_of(num_nodes, ranks_per_node, num_channels, block_warps, nvl_queue_tokens,
                                    rdma_queue_tokens, row_bytes, num_scales, num_topk, experts_per_rank);
        s.reserved_head_bytes = reserved_head_bytes;
        return layout_dict(s);
      },
      py::kw_only(), MOELINK_SHAPE_ARGS, py::arg("reserved_head_bytes") = 0, "Sizes of both windows and the role split for a shape (InternodeLayout).");

  py::class_<InternodeContext>(m, "Context", "Where an internode call runs: rank, shape, windows, transport.",
                               py::module_local())
      .def(py::init([](int rank, int num_nodes, int ranks_per_node, int num_channels, int block_warps,
                       int nvl_queue_tokens, int rdma_queue_tokens, int64_t row_bytes, int num_scales, int num_topk,
                       int experts_per_rank, const std::vector<uintptr_t>& nvl_windows, uintptr_t nvl_bytes,
                       int net_kind, uintptr_t net_window, uint64_t net_window_bytes, uint32_t num_signals,
                       uintptr_t net_queue, uintptr_t net_rdma_bytes, int64_t reserved_head_bytes,
                       const std::vector<uint64_t>& agreement) {
             if (nvl_windows.size() != static_cast<size_t>(ranks_per_node) || ranks_per_node > kIntranodeMaxRanks) {
               throw Error(ErrorKind::kInvalidArgument, "internode Context: expected " + std::to_string(ranks_per_node) +
                                                            " NVL window addresses, got " +
                                                            std::to_string(nvl_windows.size()));
             }
             if (agreement.size() > static_cast<size_t>(kAgreementWords)) {
               throw Error(ErrorKind::kInvalidArgument, "internode Context: at most " + std::to_string(kAgreementWords) +
                                                            " agreement words, got " + std::to_string(agreement.size()));
             }
             InternodeContext ctx;
             ctx.rank = rank;
             for (size_t i = 0; i < agreement.size(); ++i) ctx.agreement[i] = agreement[i];
             ctx.shape = shape_of(num_nodes, ranks_per_node, num_channels, block_warps, nvl_queue_tokens,
                                  rdma_queue_tokens, row_bytes, num_scales, num_topk, experts_per_rank);
             ctx.shape.reserved_head_bytes = reserved_head_bytes;
             for (size_t i = 0; i < nvl_windows.size(); ++i) ctx.nvl.base[i] = ptr<void>(nvl_windows[i]);
             ctx.nvl_bytes = ptr<uint64_t>(nvl_bytes);
             ctx.net.rank = rank;
             ctx.net.num_ranks = num_nodes * ranks_per_node;
             ctx.net.kind = static_cast<transport::ScaleOutKind>(net_kind);
             ctx.net.num_signals = num_signals;
             ctx.net.window = ptr<char>(net_window);
             ctx.net.window_bytes = net_window_bytes;
             ctx.net.queue = ptr<void>(net_queue);
             ctx.net.rdma_bytes = ptr<uint64_t>(net_rdma_bytes);
             return ctx;
           }),
           py::kw_only(), py::arg("rank"), MOELINK_SHAPE_ARGS, py::arg("nvl_windows"), py::arg("nvl_bytes") = 0,
           py::arg("net_kind"), py::arg("net_window"), py::arg("net_window_bytes"), py::arg("num_signals"),
           py::arg("net_queue"), py::arg("net_rdma_bytes") = 0, py::arg("reserved_head_bytes") = 0,
           py::arg("agreement") = std::vector<uint64_t>{})
      .def_property_readonly("layout", [](const InternodeContext& ctx) { return layout_dict(ctx.shape); });

  m.def(
      "notify",
      [](const InternodeContext& ctx, int64_t num_tokens, uintptr_t is_token_in_rank, uintptr_t num_tokens_per_expert,
         int expert_alignment, uintptr_t recv_channel_start, uintptr_t forward_start, uintptr_t recv_counts,
         uintptr_t stream, int rank) {
        InternodeNotifyArgs a;
        a.ctx = ctx;
        a.num_tokens = num_tokens;
        a.is_token_in_rank = ptr<const bool>(is_token_in_rank);
        a.num_tokens_per_expert = ptr<const int32_t>(num_tokens_per_expert);
        a.expert_alignment = expert_alignment;
        a.recv_channel_start = ptr<int32_t>(recv_channel_start);
        a.forward_start = ptr<int32_t>(forward_start);
        a.recv_counts = ptr<int32_t>(recv_counts);
        internode_notify(a, context(stream, rank));
      },
      py::arg("ctx"), py::arg("num_tokens"), py::arg("is_token_in_rank"), py::arg("num_tokens_per_expert"),
      py::arg("expert_alignment"), py::arg("recv_channel_start"), py::arg("forward_start"), py::arg("recv_counts"),
      MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "dispatch",
      [](const InternodeContext& ctx, bool barrier_first, int nvl_chunk, int rdma_chunk, int64_t num_tokens,
         uintptr_t x, uintptr_t x_scales, uintptr_t topk_idx, uintptr_t topk_weights, uintptr_t is_token_in_rank,
         uintptr_t recv_channel_start, uintptr_t forward_start, uintptr_t rdma_send_head, uintptr_t forward_head,
         uintptr_t recv_x, uintptr_t recv_x_scales, uintptr_t recv_topk_idx, uintptr_t recv_topk_weights,
         uintptr_t recv_src_idx, uintptr_t stream, int rank) {
        InternodeDispatchArgs a;
        a.ctx = ctx;
        a.barrier_first = barrier_first;
        a.num_tokens = num_tokens;
        a.x = ptr<const void>(x);
        a.x_scales = ptr<const uint32_t>(x_scales);
        a.topk_idx = ptr<const int64_t>(topk_idx);
        a.topk_weights = ptr<const float>(topk_weights);
        a.is_token_in_rank = ptr<const bool>(is_token_in_rank);
        a.recv_channel_start = ptr<const int32_t>(recv_channel_start);
        a.forward_start = ptr<const int32_t>(forward_start);
        a.rdma_send_head = ptr<int32_t>(rdma_send_head);
        a.forward_head = ptr<int32_t>(forward_head);
        a.recv_x = ptr<void>(recv_x);
        a.recv_x_scales = ptr<uint32_t>(recv_x_scales);
        a.recv_topk_idx = ptr<int64_t>(recv_topk_idx);
        a.recv_topk_weights = ptr<float>(recv_topk_weights);
        a.recv_src_idx = ptr<int32_t>(recv_src_idx);
        internode_dispatch(a, context(stream, rank), nvl_chunk, rdma_chunk);
      },
      py::arg("ctx"), py::arg("barrier_first"), py::arg("nvl_chunk"), py::arg("rdma_chunk"), py::arg("num_tokens"),
      py::arg("x"), py::arg("x_scales"), py::arg("topk_idx"), py::arg("topk_weights"), py::arg("is_token_in_rank"),
      py::arg("recv_channel_start"), py::arg("forward_start"), py::arg("rdma_send_head"), py::arg("forward_head"),
      py::arg("recv_x"), py::arg("recv_x_scales"), py::arg("recv_topk_idx"), py::arg("recv_topk_weights"),
      py::arg("recv_src_idx"), MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "combine",
      [](const InternodeContext& ctx, int nvl_chunk, int rdma_chunk, int hidden, uintptr_t x, uintptr_t topk_weights,
         uintptr_t recv_channel_start, uintptr_t forward_start, uintptr_t forward_head, int64_t num_tokens,
         uintptr_t rdma_send_head, uintptr_t bias0, uintptr_t bias1, uintptr_t combined_x,
         uintptr_t combined_topk_weights, uintptr_t stream, int rank) {
        InternodeCombineArgs a;
        a.ctx = ctx;
        a.hidden = hidden;
        a.x = ptr<const uint16_t>(x);
        a.topk_weights = ptr<const float>(topk_weights);
        a.recv_channel_start = ptr<const int32_t>(recv_channel_start);
        a.forward_start = ptr<const int32_t>(forward_start);
        a.forward_head = ptr<const int32_t>(forward_head);
        a.num_tokens = num_tokens;
        a.rdma_send_head = ptr<const int32_t>(rdma_send_head);
        a.bias[0] = ptr<const uint16_t>(bias0);
        a.bias[1] = ptr<const uint16_t>(bias1);
        a.combined_x = ptr<uint16_t>(combined_x);
        a.combined_topk_weights = ptr<float>(combined_topk_weights);
        internode_combine(a, context(stream, rank), nvl_chunk, rdma_chunk);
      },
      py::arg("ctx"), py::arg("nvl_chunk"), py::arg("rdma_chunk"), py::arg("hidden"), py::arg("x"),
      py::arg("topk_weights"), py::arg("recv_channel_start"), py::arg("forward_start"), py::arg("forward_head"),
      py::arg("num_tokens"), py::arg("rdma_send_head"), py::arg("bias0"), py::arg("bias1"), py::arg("combined_x"),
      py::arg("combined_topk_weights"), MOELINK_CONTEXT_ARGS, release_gil());
}

}  // namespace moelink::bindings
