// Low-latency combine (runtime/ops_low_latency.h has the layout and the protocol).
//
// Send half, per call c (half h), on every (expert) rank r:
//   - block 0 zeroes the slot claims of half h ^ 1 and adds the call's "done" 1 to comb[h][r] of
//     every rank (so every call reaches every rank, also those r returns no row to);
//   - warp w handles (local expert e, source s) pairs p = w, w + G, ...: for each of the rows
//     layout_range[e][s] gives (the handle's), it stages the row (a bf16 copy, or the LogFMT
//     encoding; zero-copy: the row is in comb_send already) and puts it into slot src_info (= the
//     source's token * K + k) of s's comb_recv, each put carrying comb[h][r] + 1 at s (over
//     NVLink: the row, or its encoding, is stored straight into s's window).
// Receive half, on every (source) rank s:
//   - every block waits until comb[h][r] = seen + (rows s sent r in the dispatch) + 1 for every r;
//   - warp w reduces tokens t = w, w + G, ...: combined[t] = sum over k of topk_weights[t][k] *
//     row(t, k) in float32, k in order, slots whose topk_idx is -1 skipped, rounded once to bf16;
//   - the last block advances the seen words.
// Shrink mode (ops_low_latency.h): no "done" and no row goes to a masked rank; in the receive half
// block 0 waits for every rank (an expired wait masks it) and publishes verdicts; slots whose expert
// lives on a masked rank add nothing (and store zeros into slot_values).
#pragma once

#include "kernels/low_latency_codec.cuh"
#include "kernels/low_latency_common.cuh"

namespace moelink::kernels::low_latency {

template <F kFormat>
MOELINK_DEVICE_NOINLINE void combine_send(const LowLatencyCombineArgs& a, const LowLatencyLayout& l, int h, bool owned) {
  const LowLatencyContext& c = a.ctx;
  const LowLatencyShape& s = c.shape;
  const int ranks = s.num_ranks, el = s.experts_per_rank(), hidden = s.hidden;
  const int64_t t_max = s.num_max_tokens, rows = ranks * t_max, hb = half_offset(c, h);
  const int64_t slots = t_max * s.num_topk;
  clean_next_claims(c, h);
  if (block_rank() == 0) {
    for (int d = static_cast<int>(thread_rank()); d < ranks; d += static_cast<int>(num_threads()))
      if (!is_masked(c, d)) signal_peer(c, d, signal_id(c, kCombineSignal, h, c.rank));
  }
  for (int p = global_warp(); p < el * ranks; p += global_warps()) {
    const int e = p / ranks, src = p % ranks;
    const int64_t range = a.layout_range[static_cast<int64_t>(e) * ranks + src];
    const int64_t count = static_cast<int32_t>(range & 0xFFFFFFFF), begin = range >> 32;
    MOELINK_DEVICE_CHECK(count >= 0 && count <= t_max && begin >= 0 && begin + count <= rows,
                         "low-latency combine: rank %d: the handle gives local expert %d rows [%lld, +%lld) of rank %d "
                         "(outside [0, %lld))", c.rank, e, static_cast<long long>(begin), static_cast<long long>(count),
                         src, static_cast<long long>(rows));
    if (warp_masked(c, src)) continue;  // shrink: no row goes to a masked rank
    for (int64_t i = 0; i < count; ++i) {
      const int64_t row = static_cast<int64_t>(e) * rows + begin + i;
      const int32_t info = a.src_info[row];
      MOELINK_DEVICE_CHECK(info >= 0 && info < slots, "low-latency combine: rank %d: the handle's src_info %d (local "
                           "expert %d, row %lld) is outside [0, %lld)", c.rank, info, e,
                           static_cast<long long>(begin + i), static_cast<long long>(slots));
      char* staged = own_at(c, hb + l.comb_send + row * 2 * hidden);
      const bool input = !s.zero_copy;
      const uint16_t* source = input ? a.x + row * hidden : reinterpret_cast<const uint16_t*>(staged);
      const int64_t dst = hb + l.comb_recv + info * l.comb_msg;
      const int64_t id = signal_id(c, kCombineSignal, h, c.rank);
      if constexpr (kFormat == F::kBf16) {
        if (c.direct(src)) {
          deliver(c, src, dst, reinterpret_cast<const char*>(source), l.comb_msg, id, input);
        } else {
          if (input) warp_copy_input(kFullMask, staged, source, static_cast<size_t>(2 * hidden));
          syncwarp();
          deliver(c, src, dst, staged, l.comb_msg, id);
        }
      } else {
        char* encoded = s.zero_copy ? own_at(c, hb + l.comb_enc + row * l.comb_msg) : staged;
        encode_row<kFormat>(source, hidden, encoded, 0, owned, 0.0f, input);
        syncwarp();
        deliver(c, src, dst, encoded, l.comb_msg, id);
      }
      syncwarp();  // the staging of this row is read (or put) before the next one is written
    }
  }
}

// The combine signal value from rank r once its rows (as many as this rank's dispatch sent it,
// which the handle says) and its "done" arrived.
MOELINK_DEVICE uint64_t rows_due(const LowLatencyCombineArgs& a, int h, int r) {
  const LowLatencyContext& c = a.ctx;
  const int32_t sent = a.send_counts[r];
  MOELINK_DEVICE_CHECK(sent >= 0 && sent <= c.shape.num_max_tokens * c.shape.num_topk,
                       "low-latency combine: rank %d: the handle says %d rows went to rank %d", c.rank, sent, r);
  return ld_relaxed(seen_word(c, kCombineSignal, h, r)) + static_cast<uint64_t>(sent) + 1;
}

// Waits (each block, all threads) for every rank's rows and "done" of this call.
MOELINK_DEVICE bool await_rows(const LowLatencyCombineArgs& a, int h) {
  const LowLatencyContext& c = a.ctx;
  for (int r = static_cast<int>(thread_rank()); r < c.shape.num_ranks; r += static_cast<int>(num_threads())) {
    const uint64_t start = globaltimer_ns();
    const uint64_t due = rows_due(a, h, r);
    await_signal(c, signal_id(c, kCombineSignal, h, r), due, "low-latency combine: expert outputs from peer", r);
    if (block_rank() == 0 && a.wait_cost_stats != nullptr)
      atomic_add(a.wait_cost_stats + r, static_cast<int64_t>(globaltimer_ns() - start));
  }
  sync_block();
  return !aborted();
}

// Shrink mode: block 0 decides every rank r for call `call` (its rows and "done" arrived, or it
// is masked: already, or now because the wait expired) and publishes the verdicts; the other
// blocks follow them. Every block, all threads.
MOELINK_DEVICE bool decide_ranks(const LowLatencyCombineArgs& a, int h, uint64_t call) {
  const LowLatencyContext& c = a.ctx;
  if (block_rank() != 0) {
    follow_verdicts(c, call, "low-latency combine: block 0's verdict on a rank");
    sync_block();
    return !aborted();
  }
  for (int r = static_cast<int>(thread_rank()); r < c.shape.num_ranks; r += static_cast<int>(num_threads())) {
    const uint64_t start = globaltimer_ns();
    const uint64_t due = rows_due(a, h, r);
    const bool live = !is_masked(c, r) && await_or_mask(c, signal_id(c, kCombineSignal, h, r), due,
                                                        "low-latency combine: expert outputs from peer", r);
    if (a.wait_cost_stats != nullptr) atomic_add(a.wait_cost_stats + r, static_cast<int64_t>(globaltimer_ns() - start));
    publish_verdict(c, call, r, live);
  }
  sync_block();
  return !aborted();
}

template <F kFormat>
MOELINK_DEVICE_NOINLINE void combine_recv(const LowLatencyCombineArgs& a, const LowLatencyLayout& l, int h,
                                          uint64_t call) {
  const LowLatencyContext& c = a.ctx;
  const LowLatencyShape& s = c.shape;
  if (!(c.shrink ? decide_ranks(a, h, call) : await_rows(a, h))) return;
  const int lane = static_cast<int>(lane_id()), k_top = s.num_topk, hidden = s.hidden, el = s.experts_per_rank();
  const char* recv = own_at<const char>(c, half_offset(c, h) + l.comb_recv);
  for (int64_t t = global_warp(); t < a.num_tokens; t += global_warps()) {
    for (int k = lane; k < k_top; k += kWarpSize) {
      MOELINK_DEVICE_CHECK(a.topk_idx[t * k_top + k] < 0 || a.send_slots[t * k_top + k] >= 0 ||
                           (c.shrink && a.send_slots[t * k_top + k] == kLowLatencyMaskedSlot),
                           "low-latency combine: rank %d: token %lld slot %d names expert %lld, which the dispatch did "
                           "not send it to", c.rank, static_cast<long long>(t), k,
                           static_cast<long long>(a.topk_idx[t * k_top + k]));
    }
    for (int g = 0; g < hidden / 128; ++g) {
      float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      for (int k = 0; k < k_top; ++k) {
        const int64_t expert = a.topk_idx[t * k_top + k];
        if (expert < 0) continue;
        float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        if (c.shrink && (a.send_slots[t * k_top + k] < 0 || !live_source(c, call, static_cast<int>(expert / el)))) {
          // shrink: the expert's rank is masked; its row adds nothing (a zero row for autograd)
          if (a.slot_values != nullptr)
            codec::store4(a.slot_values + (t * k_top + k) * hidden, CodecDType::kBFloat16, 128 * g + 4 * lane, 4, v);
          continue;
        }
        const float w = a.topk_weights[t * k_top + k];
        decode_lane<kFormat>(recv + (t * k_top + k) * l.comb_msg, hidden, g, CodecDType::kFloat32, v);
        for (int i = 0; i < 4; ++i) sum[i] = rn_add(sum[i], rn_mul(w, v[i]));
        if (a.slot_values != nullptr)
          codec::store4(a.slot_values + (t * k_top + k) * hidden, CodecDType::kBFloat16, 128 * g + 4 * lane, 4, v);
      }
      codec::store4(a.combined_x + t * hidden, CodecDType::kBFloat16, 128 * g + 4 * lane, 4, sum);
    }
  }
}

// Shrink: a masked rank's seen word stays.
MOELINK_DEVICE void combine_consumed(const LowLatencyCombineArgs& a, int h, uint64_t call) {
  const LowLatencyContext& c = a.ctx;
  for (int r = static_cast<int>(thread_rank()); r < c.shape.num_ranks; r += static_cast<int>(num_threads())) {
    if (!live_source(c, call, r)) continue;
    uint64_t* seen = seen_word(c, kCombineSignal, h, r);
    st_relaxed(seen, ld_relaxed(seen) + static_cast<uint64_t>(a.send_counts[r]) + 1);
  }
}

template <F kFormat>
MOELINK_KERNEL void MOELINK_LAUNCH_BOUNDS(kGpuBlockThreads) combine_kernel(LowLatencyCombineArgs args) {
  const LowLatencyContext& c = args.ctx;
  const LowLatencyLayout l = LowLatencyLayout::of(c.shape);
  const uint64_t call = call_number(c, args.phases);
  const int h = static_cast<int>(call & 1);
  const bool owned = encoders_owned(c);
  if (args.phases & kLowLatencySendPhase) combine_send<kFormat>(args, l, h, owned);
  if (args.phases & kLowLatencyRecvPhase) combine_recv<kFormat>(args, l, h, call);
  if (last_block(c)) {
    if ((args.phases & kLowLatencyRecvPhase) && !aborted()) combine_consumed(args, h, call);
    if (args.phases & kLowLatencySendPhase) advance_calls(c);
  }
}

}  // namespace moelink::kernels::low_latency
