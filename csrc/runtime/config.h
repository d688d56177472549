// Performance configuration of the normal (high-throughput) kernels and the NVL buffer size hint.
// Mirrors python/moelink/config.py field by field and formula by formula (tests/test_config.py
// compiles this header and compares). The window layout itself is IntranodeLayout in
// runtime/ops_intranode.h, drawn in docs/buffer-layout.md.
//
// Config (same meaning and defaults as DeepEP V1's Config):
//   num_sms                          SMs (host: blocks) a normal kernel may use: even, >= 2.
//                                    The intranode kernels run num_sms / 2 channels, each a
//                                    sender block and a receiver block.
//   num_max_nvl_chunked_send_tokens  tokens a sender publishes per tail update, >= 1,
//                                    <= num_max_nvl_chunked_recv_tokens (a chunk must fit a queue)
//   num_max_nvl_chunked_recv_tokens  slots of each (channel, peer) ring queue, >= 1
//   num_max_rdma_chunked_send_tokens same two for the scale-out queues (internode path)
//   num_max_rdma_chunked_recv_tokens
// The constructor validates and throws moelink::Error(kInvalidArgument) naming the argument, the
// expectation and the value, exactly like the Python dataclass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "runtime/errors.h"
#include "runtime/ops_intranode.h"

namespace moelink {

// The size hint covers calls with up to this many top-k slots per token and local experts per rank.
inline constexpr int kNvlHintMaxTopk = 32;
inline constexpr int kNvlHintMaxExpertsPerRank = 1024;

struct Config {
  int num_sms = 20;
  int num_max_nvl_chunked_send_tokens = 6;
  int num_max_nvl_chunked_recv_tokens = 256;
  int num_max_rdma_chunked_send_tokens = 6;
  int num_max_rdma_chunked_recv_tokens = 256;

  Config(int num_sms_, int nvl_send, int nvl_recv, int rdma_send, int rdma_recv)
      : num_sms(num_sms_),
        num_max_nvl_chunked_send_tokens(nvl_send),
        num_max_nvl_chunked_recv_tokens(nvl_recv),
        num_max_rdma_chunked_send_tokens(rdma_send),
        num_max_rdma_chunked_recv_tokens(rdma_recv) {
    if (num_sms < 2 || num_sms % 2 != 0) fail("num_sms", "an even int >= 2", num_sms);
    check_chunks("nvl", num_max_nvl_chunked_send_tokens, num_max_nvl_chunked_recv_tokens);
    check_chunks("rdma", num_max_rdma_chunked_send_tokens, num_max_rdma_chunked_recv_tokens);
  }
  Config() : Config(20, 6, 256, 6, 256) {}

  int num_channels() const { return num_sms / 2; }

  // Bytes of NVL buffer (window) that any intranode dispatch or combine with this config fits in,
  // for `ranks_per_node` ranks (all of `num_ranks` on one node when <= 0): IntranodeLayout (the
  // layout the kernels use, runtime/ops_intranode.h) evaluated for rows of `hidden_bytes` bytes
  // (DeepEP's convention: hidden * max(element size, 2)), ceil(hidden_bytes / 128) FP8 scales,
  // `num_topk` top-k slots and kNvlHintMaxExpertsPerRank local experts, for the sub-channel split
  // that needs the most (any block size may pick any split up to kMaxSubChannels). The layout grows
  // with every field, so every call with smaller rows (bf16, FP8, combine), fewer scales, slots and
  // experts fits. With `zero_copy_rows` M > 0, also the one-copy regions for up to M rows: the
  // queues or the combine input region (CombineInputLayout), whichever ends later, then a receive
  // region (DirectRecvLayout) at the end of the window.
  int64_t nvl_buffer_size_hint(int64_t hidden_bytes, int num_ranks, int ranks_per_node = 0,
                               int num_topk = kNvlHintMaxTopk, int64_t zero_copy_rows = 0) const {
    IntranodeShape shape;
    shape.num_ranks = ranks_per_node > 0 ? ranks_per_node : num_ranks;
    shape.num_channels = num_channels();
    shape.queue_tokens = num_max_nvl_chunked_recv_tokens;
    shape.row_bytes = (hidden_bytes + 15) / 16 * 16;
    shape.num_scales = static_cast<int>((hidden_bytes + 127) / 128);
    shape.num_topk = num_topk;
    shape.experts_per_rank = kNvlHintMaxExpertsPerRank;
    int64_t most = 0;
    for (int s = 1; s <= kMaxSubChannels && s <= num_max_nvl_chunked_recv_tokens; ++s) {
      shape.sub_channels = s;
      const int64_t bytes = IntranodeLayout::of(shape).total_bytes;
      most = bytes > most ? bytes : most;
    }
    if (zero_copy_rows <= 0) return most;
    shape.sub_channels = 1;
    const int64_t recv_bytes = DirectRecvLayout::of(shape, zero_copy_rows, 0).bytes;
    const CombineInputLayout input = CombineInputLayout::of(shape, zero_copy_rows);  // bf16 rows of row_bytes
    const int64_t start = input.base + input.bytes > most ? input.base + input.bytes : most;
    return IntranodeLayout::align(start) + recv_bytes;
  }

 private:
  [[noreturn]] static void fail(const char* name, const std::string& expected, long long got) {
    throw Error(ErrorKind::kInvalidArgument,
                std::string("Config.") + name + ": expected " + expected + ", got " + std::to_string(got));
  }
  static void check_chunks(const std::string& link, int send, int recv) {
    std::string send_name = "num_max_" + link + "_chunked_send_tokens";
    std::string recv_name = "num_max_" + link + "_chunked_recv_tokens";
    if (recv < 1) fail(recv_name.c_str(), "an int >= 1", recv);
    if (send < 1) fail(send_name.c_str(), "an int >= 1", send);
    if (send > recv) fail(send_name.c_str(), "an int <= " + recv_name + " = " + std::to_string(recv), send);
  }
};

}  // namespace moelink
