// Low-latency dispatch (runtime/ops_low_latency.h has the layout and the protocol).
//
// Send half, per call c (half h = c % 2), on every rank s:
//   - block 0 zeroes the slot claims of half h ^ 1 (for call c + 1);
//   - warp w sends the counts message to ranks d = w, w + G, ... (G warps in the grid): how many
//     (token, top-k slot) pairs go to each expert of d, counted from topk_idx, with a fingerprint
//     of the call's shape; its put carries count[h][s] + 1 at d;
//   - warp w quantises tokens t = w, w + G, ... once into this rank's staging slot t (payload,
//     scales, token index, top-k row), claims a receive slot per (t, k) with an atomic on
//     claims[h][expert], and puts the message into slot (e, s, i) of the expert's rank, each put
//     carrying tokens[h][s] + 1 there (over NVLink: stores and a release add).
// Receive half, on every rank r:
//   - every block waits for the counts message of every source (count[h][s] = seen + 1), checks
//     it (sender, fingerprint, counts in [0, T], their sum);
//   - warp w handles (local expert e, source s) pairs p = w, w + G, ... (p = e * R + s): its rows
//     start at the sum of e's counts from sources before s (so rows are grouped by source rank),
//     it waits for tokens[h][s] = seen + (messages s announced), then copies (or decodes) each
//     message into recv_x[e][row], finds the message's k in its top-k row, and records
//     src_info = token * K + k and layout_range[e][s] = count | begin << 32;
//   - the last block advances the seen words by what was consumed.
// Shrink mode (ops_low_latency.h): nothing goes to a masked rank (send_counts 0, slots
// kLowLatencyMaskedSlot); in the receive half block 0 waits for every source's counts and tokens
// (an expired wait masks the source) and publishes verdicts; a masked source counts 0 everywhere
// and its seen words stay.
#pragma once

#include "kernels/low_latency_codec.cuh"
#include "kernels/low_latency_common.cuh"

namespace moelink::kernels::low_latency {

// Bytes of one received row in recv_x: bf16 (also LogFMT, decoded), FP8 / MXFP8 codes, NVFP4 nibbles.
template <F kFormat>
MOELINK_DEVICE int64_t recv_row_bytes(int hidden) {
  if constexpr (kFormat == F::kBf16 || kIsLogfmt<kFormat>) return 2 * static_cast<int64_t>(hidden);
  else if constexpr (kFormat == F::kNvfp4) return hidden / 2;
  else return hidden;
}

// Counts messages: warp `warp` of `warps` tells ranks d = warp, warp + warps, ... how many
// (token, slot) pairs go to each of their experts.
MOELINK_DEVICE void send_count_messages(const LowLatencyDispatchArgs& a, const LowLatencyLayout& l, int h, int warp, int warps) {
  const LowLatencyContext& c = a.ctx;
  const LowLatencyShape& s = c.shape;
  const int lane = static_cast<int>(lane_id()), el = s.experts_per_rank();
  const int64_t pairs = a.num_tokens * s.num_topk, hb = half_offset(c, h);
  for (int d = warp; d < s.num_ranks; d += warps) {
    if (warp_masked(c, d)) {  // shrink: nothing goes to a masked rank
      if (lane == 0) a.send_counts[d] = 0;
      continue;
    }
    char* message = own_at(c, hb + l.count_out + d * l.count_bytes);
    int32_t* counts = reinterpret_cast<int32_t*>(message + 16);
    for (int e = lane; e < el; e += kWarpSize) counts[e] = 0;
    syncwarp();
    const int64_t first = static_cast<int64_t>(d) * el;
    int32_t mine = 0;
    for (int64_t i = lane; i < pairs; i += kWarpSize) {
      const int64_t e = a.topk_idx[i];
      MOELINK_DEVICE_CHECK(e >= -1 && e < s.num_experts, "low-latency dispatch: rank %d: topk_idx[%lld] = %lld outside "
                           "[-1, %d)", c.rank, static_cast<long long>(i), static_cast<long long>(e), s.num_experts);
      if (e >= first && e < first + el) {
        atomic_add<Scope::kBlock>(&counts[e - first], 1);
        ++mine;
      }
    }
    const int32_t total = warp_reduce_sum(kFullMask, mine);
    syncwarp();  // every lane's count is in
    if (lane == 0) {
      int32_t* header = reinterpret_cast<int32_t*>(message);
      header[0] = c.rank;
      header[1] = static_cast<int32_t>(s.fingerprint());
      header[2] = total;
      header[3] = 0;
      a.send_counts[d] = total;
    }
    syncwarp();
    deliver(c, d, hb + l.count_in + static_cast<int64_t>(c.rank) * l.count_bytes, message, l.count_bytes,
            signal_id(c, kCountSignal, h, c.rank));
  }
}

template <F kFormat>
MOELINK_DEVICE_NOINLINE void dispatch_send(const LowLatencyDispatchArgs& a, const LowLatencyLayout& l, int h, bool owned) {
  const LowLatencyContext& c = a.ctx;
  const LowLatencyShape& s = c.shape;
  const int lane = static_cast<int>(lane_id()), warp = global_warp(), warps = global_warps();
  const int k_top = s.num_topk, el = s.experts_per_rank(), t_max = s.num_max_tokens;
  const int64_t hb = half_offset(c, h);
  MOELINK_SHARED(int32_t, expert_of, [kMaxBlockWarps][kWarpSize]);
  MOELINK_SHARED(int32_t, slot_of, [kMaxBlockWarps][kWarpSize]);
  clean_next_claims(c, h);
  send_count_messages(a, l, h, warp, warps);
  const float g = kFormat == F::kNvfp4 ? a.global_scale[0] : 0.0f;
  const int w = static_cast<int>(warp_id());
  for (int64_t t = warp; t < a.num_tokens; t += warps) {
    char* message = own_at(c, hb + l.disp_send + t * l.msg_bytes);
    encode_row<kFormat>(a.x + t * s.hidden, s.hidden, message, l.msg_scales, owned, g, true);
    int32_t* meta = reinterpret_cast<int32_t*>(message + l.msg_meta);
    if (lane < 4) meta[lane] = lane == 0 ? static_cast<int32_t>(t) : (lane == 1 ? static_cast<int32_t>(float_bits(g)) : 0);
    const int64_t expert = lane < k_top ? a.topk_idx[t * k_top + lane] : -1;
    if (lane < k_top) {
      reinterpret_cast<int32_t*>(message + l.msg_topk)[lane] = static_cast<int32_t>(expert);
      if (s.carry_weights) reinterpret_cast<float*>(message + l.msg_weights)[lane] = a.topk_weights[t * k_top + lane];
    }
    expert_of[w][lane] = static_cast<int32_t>(expert);
    syncwarp();
    int32_t slot = -1;
    MOELINK_DEVICE_CHECK(expert >= -1 && expert < s.num_experts, "low-latency dispatch: rank %d: token %lld routes to "
                         "expert %lld (outside [-1, %d))", c.rank, static_cast<long long>(t),
                         static_cast<long long>(expert), s.num_experts);
    const bool masked = expert >= 0 && is_masked(c, static_cast<int>(expert / el));
    if (masked) {
      slot = kLowLatencyMaskedSlot;  // shrink: its rank is masked, nothing is sent
    } else if (expert >= 0) {
      for (int j = 0; j < k_top; ++j)  // a receive slot per (token, expert): the ids of a row differ
        MOELINK_DEVICE_CHECK(j == lane || expert_of[w][j] != expert, "low-latency dispatch: rank %d: token %lld lists "
                             "expert %lld twice (top-k slots %d and %d)", c.rank, static_cast<long long>(t),
                             static_cast<long long>(expert), j, lane);
      slot = a.cached_slots != nullptr ? a.cached_slots[t * k_top + lane]
                                       : static_cast<int32_t>(atomic_add(c.claims + h * c.claim_capacity + expert, 1u));
      MOELINK_DEVICE_CHECK(slot >= 0 && slot < t_max, "low-latency dispatch: rank %d: receive slot %d of expert %lld "
                           "outside [0, %d)", c.rank, slot, static_cast<long long>(expert), t_max);
    }
    if (lane < k_top) a.send_slots[t * k_top + lane] = slot;
    slot_of[w][lane] = slot;
    syncwarp();  // the message and every slot are complete for every lane
    for (int k = 0; k < k_top; ++k) {
      const int32_t e = expert_of[w][k], sl = slot_of[w][k];
      if (e < 0 || sl < 0) continue;
      const int d = e / el, local = e % el;
      const int64_t slot_index = (static_cast<int64_t>(local) * s.num_ranks + c.rank) * t_max + sl;
      deliver(c, d, hb + l.disp_recv + slot_index * l.msg_bytes, message, l.msg_bytes,
              signal_id(c, kTokenSignal, h, c.rank));
    }
    syncwarp();  // expert_of / slot_of are rewritten by the next token
  }
}

// Counts message of `src` in this rank's half (after its signal was awaited).
MOELINK_DEVICE const int32_t* counts_of(const LowLatencyContext& c, const LowLatencyLayout& l, int h, int src) {
  return own_at<const int32_t>(c, half_offset(c, h) + l.count_in + src * l.count_bytes);
}

// Never trust the window: the counts message of `src` names its sender and this call's shape,
// announces at most num_max_tokens per local expert, and a total equal to their sum.
MOELINK_DEVICE void check_counts_message(const LowLatencyContext& c, const int32_t* m, int src) {
  const LowLatencyShape& s = c.shape;
  MOELINK_DEVICE_CHECK(m[0] == src && static_cast<uint32_t>(m[1]) == s.fingerprint(),
                       "low-latency dispatch: rank %d: the counts message of rank %d names rank %d and shape %08x, "
                       "this call's is %08x (ranks disagree on hidden, tokens, experts, top-k or format)", c.rank,
                       src, m[0], static_cast<uint32_t>(m[1]), s.fingerprint());
  int64_t sum = 0;
  for (int e = 0; e < s.experts_per_rank(); ++e) {
    MOELINK_DEVICE_CHECK(m[4 + e] >= 0 && m[4 + e] <= s.num_max_tokens, "low-latency dispatch: rank %d: rank %d "
                         "announced %d tokens for local expert %d (at most %d)", c.rank, src, m[4 + e], e,
                         s.num_max_tokens);
    sum += m[4 + e];
  }
  MOELINK_DEVICE_CHECK(sum == m[2], "low-latency dispatch: rank %d: rank %d announced %d messages but %lld per expert",
                       c.rank, src, m[2], static_cast<long long>(sum));
}

// Waits for and checks every source's counts message (each block, all threads).
MOELINK_DEVICE bool await_counts(const LowLatencyDispatchArgs& a, const LowLatencyLayout& l, int h) {
  const LowLatencyContext& c = a.ctx;
  const LowLatencyShape& s = c.shape;
  for (int src = static_cast<int>(thread_rank()); src < s.num_ranks; src += static_cast<int>(num_threads())) {
    const uint64_t due = ld_relaxed(seen_word(c, kCountSignal, h, src)) + 1;
    if (!await_signal(c, signal_id(c, kCountSignal, h, src), due, "low-latency dispatch: token counts from peer", src))
      continue;
    check_counts_message(c, counts_of(c, l, h, src), src);
  }
  sync_block();
  return !aborted();
}

// Shrink mode: block 0 decides every source of call `call` (its counts message, checked, then
// every token it announced, or masked: already, or now because a wait expired) and publishes the
// verdicts; the other blocks follow them. Every block, all threads.
MOELINK_DEVICE bool decide_sources(const LowLatencyDispatchArgs& a, const LowLatencyLayout& l, int h, uint64_t call) {
  const LowLatencyContext& c = a.ctx;
  const LowLatencyShape& s = c.shape;
  if (block_rank() != 0) {
    follow_verdicts(c, call, "low-latency dispatch: block 0's verdict on a source");
    sync_block();
    return !aborted();
  }
  for (int src = static_cast<int>(thread_rank()); src < s.num_ranks; src += static_cast<int>(num_threads())) {
    const uint64_t start = globaltimer_ns();
    bool live = !is_masked(c, src) &&
                await_or_mask(c, signal_id(c, kCountSignal, h, src), ld_relaxed(seen_word(c, kCountSignal, h, src)) + 1,
                              "low-latency dispatch: token counts from peer", src);
    if (live && !aborted()) {
      const int32_t* m = counts_of(c, l, h, src);
      check_counts_message(c, m, src);
      const uint64_t due = ld_relaxed(seen_word(c, kTokenSignal, h, src)) + static_cast<uint64_t>(m[2]);
      live = await_or_mask(c, signal_id(c, kTokenSignal, h, src), due, "low-latency dispatch: tokens from peer", src);
    }
    if (a.wait_cost_stats != nullptr) atomic_add(a.wait_cost_stats + src, static_cast<int64_t>(globaltimer_ns() - start));
    publish_verdict(c, call, src, live);
  }
  sync_block();
  return !aborted();
}

// Messages source `src` announced for local expert `e` (0 from a source masked for the call).
MOELINK_DEVICE int64_t announced(const LowLatencyContext& c, const LowLatencyLayout& l, int h, uint64_t call, int src,
                                 int e) {
  return live_source(c, call, src) ? counts_of(c, l, h, src)[4 + e] : 0;
}

template <F kFormat>
MOELINK_DEVICE_NOINLINE void dispatch_recv(const LowLatencyDispatchArgs& a, const LowLatencyLayout& l, int h,
                                           uint64_t call) {
  const LowLatencyContext& c = a.ctx;
  const LowLatencyShape& s = c.shape;
  if (!(c.shrink ? decide_sources(a, l, h, call) : await_counts(a, l, h))) return;
  const int lane = static_cast<int>(lane_id()), ranks = s.num_ranks, el = s.experts_per_rank(), k_top = s.num_topk;
  const int64_t t_max = s.num_max_tokens, rows = ranks * t_max, hb = half_offset(c, h);
  const int groups = s.num_groups();
  const int32_t mine_first = c.rank * el;
  for (int p = global_warp(); p < el * ranks; p += global_warps()) {
    const int e = p / ranks, src = p % ranks;
    int64_t begin = 0;
    for (int q = lane; q < src; q += kWarpSize) begin += announced(c, l, h, call, q, e);
    begin = warp_reduce_sum(kFullMask, begin);
    const int32_t* from = counts_of(c, l, h, src);
    const int64_t count = announced(c, l, h, call, src, e);
    if (lane == 0) {
      a.layout_range[static_cast<int64_t>(e) * ranks + src] = count | (begin << 32);
      if (src == ranks - 1) {
        a.recv_count[e] = static_cast<int32_t>(begin + count);
        if (a.cumulative_recv_stats != nullptr) atomic_add(a.cumulative_recv_stats + e, static_cast<int32_t>(begin + count));
      }
    }
    if (count == 0 && (e != 0 || c.shrink)) continue;
    if (lane == 0 && !c.shrink) {  // e == 0 waits for every source, for the wait statistics (shrink: block 0 waited)
      const uint64_t start = globaltimer_ns();
      const uint64_t due = ld_relaxed(seen_word(c, kTokenSignal, h, src)) + static_cast<uint64_t>(from[2]);
      await_signal(c, signal_id(c, kTokenSignal, h, src), due, "low-latency dispatch: tokens from peer", src);
      if (e == 0 && a.wait_cost_stats != nullptr)
        atomic_add(a.wait_cost_stats + src, static_cast<int64_t>(globaltimer_ns() - start));
    }
    const bool stop = shfl(kFullMask, lane == 0 ? aborted() : false, 0);
    if (stop) return;
    syncwarp();  // lane 0's acquire, then every lane reads the messages
    for (int64_t i = 0; i < count; ++i) {
      const char* m = own_at<const char>(c, hb + l.disp_recv + ((static_cast<int64_t>(e) * ranks + src) * t_max + i) * l.msg_bytes);
      const int64_t row = static_cast<int64_t>(e) * rows + begin + i;
      const int32_t* meta = reinterpret_cast<const int32_t*>(m + l.msg_meta);
      const int32_t* topk = reinterpret_cast<const int32_t*>(m + l.msg_topk);
      int k = -1;
      if (lane == 0) {
        const int32_t token = meta[0];
        MOELINK_DEVICE_CHECK(token >= 0 && token < t_max, "low-latency dispatch: rank %d: a message of rank %d names "
                             "token %d (outside [0, %lld))", c.rank, src, token, static_cast<long long>(t_max));
        int found = 0;
        for (int j = 0; j < k_top; ++j) {
          if (topk[j] == mine_first + e) {
            k = j;
            ++found;
          }
        }
        MOELINK_DEVICE_CHECK(found == 1, "low-latency dispatch: rank %d: a message of rank %d for local expert %d lists "
                             "it %d times in its top-k row", c.rank, src, e, found);
        a.src_info[row] = token * k_top + k;
        if (kFormat == F::kNvfp4) a.recv_global_scale[row] = bits_float(static_cast<uint32_t>(meta[1]));
      }
      char* out = static_cast<char*>(a.recv_x) + row * recv_row_bytes<kFormat>(s.hidden);
      if constexpr (kIsLogfmt<kFormat>) {
        decode_row_bf16<kFormat>(m, s.hidden, reinterpret_cast<uint16_t*>(out), false, 0.0f);
      } else if constexpr (kFormat == F::kBf16) {
        if (a.scale_by_weight) {
          k = shfl(kFullMask, k, 0);
          const float w = reinterpret_cast<const float*>(m + l.msg_weights)[k];
          decode_row_bf16<F::kBf16>(m, s.hidden, reinterpret_cast<uint16_t*>(out), true, w);
        } else {
          warp_copy(kFullMask, out, m, static_cast<size_t>(l.payload_bytes));
        }
      } else {
        warp_copy(kFullMask, out, m, static_cast<size_t>(l.payload_bytes));
        const char* scales = m + l.msg_scales;
        if constexpr (kFormat == F::kFp8 || kFormat == F::kFp8Pow2 || kFormat == F::kFp8Ue8m0) {
          // Token-major scales ([e][group][row]), as DeepEP returns them.
          const int words = kFormat == F::kFp8Ue8m0 ? (groups + 3) / 4 : groups;
          int32_t* out_scales = static_cast<int32_t*>(a.recv_scales);
          for (int j = lane; j < words; j += kWarpSize)
            out_scales[(static_cast<int64_t>(e) * words + j) * rows + begin + i] = reinterpret_cast<const int32_t*>(scales)[j];
        } else {
          const int64_t bytes = l.scale_bytes;
          uint8_t* out_scales = static_cast<uint8_t*>(a.recv_scales) + row * bytes;
          for (int64_t j = lane; j < bytes; j += kWarpSize) out_scales[j] = reinterpret_cast<const uint8_t*>(scales)[j];
        }
      }
    }
  }
}

// The last block: every source's messages of this call are consumed.
// Shrink: a masked source's seen words stay (what it may have sent is not consumed).
MOELINK_DEVICE void dispatch_consumed(const LowLatencyDispatchArgs& a, const LowLatencyLayout& l, int h, uint64_t call) {
  const LowLatencyContext& c = a.ctx;
  for (int src = static_cast<int>(thread_rank()); src < c.shape.num_ranks; src += static_cast<int>(num_threads())) {
    if (!live_source(c, call, src)) continue;
    uint64_t* counts = seen_word(c, kCountSignal, h, src);
    uint64_t* tokens = seen_word(c, kTokenSignal, h, src);
    st_relaxed(tokens, ld_relaxed(tokens) + static_cast<uint64_t>(counts_of(c, l, h, src)[2]));
    st_relaxed(counts, ld_relaxed(counts) + 1);
  }
}

template <F kFormat>
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) dispatch_kernel(LowLatencyDispatchArgs args) {
  const LowLatencyContext& c = args.ctx;
  const LowLatencyLayout l = LowLatencyLayout::of(c.shape);
  const uint64_t call = call_number(c, args.phases);
  const int h = static_cast<int>(call & 1);
  const bool owned = encoders_owned(c);
  if (args.phases & kLowLatencySendPhase) dispatch_send<kFormat>(args, l, h, owned);
  if (args.phases & kLowLatencyRecvPhase) dispatch_recv<kFormat>(args, l, h, call);
  if (last_block(c)) {
    if ((args.phases & kLowLatencyRecvPhase) && !aborted()) dispatch_consumed(args, l, h, call);
    if (args.phases & kLowLatencySendPhase) advance_calls(c);
  }
}

}  // namespace moelink::kernels::low_latency
