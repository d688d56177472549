// ThreadSanitizer driver for the intranode kernels: every rank of one node in ONE process, one
// std::thread per rank, the windows in ordinary memory, the SIMT runtime's fiber switches
// annotated for TSan (csrc/simt/fiber_sanitizer.h). Built and run by tools/tsan_intranode.py.
//
// Each rank thread runs, per iteration: notify, dispatch, a cached dispatch, combine, through the
// public runtime functions of csrc/runtime/ops_intranode.h, exactly as the Python layer calls them,
// and checks every output against values it computes from everyone's inputs. The threads share no
// memory but the windows (and the read-only inputs), so every report TSan makes is a pair of
// accesses to a window that the kernels' acquire/release protocol fails to order.
//
// Exit status: 0 all checks passed (TSan adds its own exit code if it reported anything),
// 1 a check or a kernel failed, 2 bad usage.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "runtime/errors.h"
#include "runtime/ops_intranode.h"
#include "simt/runtime.h"

namespace {

using namespace moelink;

struct Options {
  int ranks = 4, tokens = 48, hidden = 64, topk = 4, experts_per_rank = 2, iterations = 2;
  int num_sms = 4, queue = 8, chunk = 3;
  unsigned seed = 1;
  std::string schedule = "deterministic";
  int plant_race = 0;  // negative control: a plain store where the kernels use a release
};

uint16_t float_to_bf16(float f) {  // round to nearest even, as the kernels' numeric.cuh
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7fff + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

// Everything rank r feeds in; built before the threads start, read-only afterwards.
struct RankInput {
  int64_t tokens = 0;
  std::vector<uint16_t> x;           // [tokens][hidden] bf16 of small integers (exact)
  std::vector<int64_t> topk_idx;     // [tokens][topk]
  std::vector<float> topk_weights;   // [tokens][topk]
  std::vector<uint8_t> in_rank;      // [tokens][ranks] (bool)
  std::vector<int32_t> per_expert;   // [ranks * experts_per_rank]
};

RankInput make_input(const Options& o, int rank) {
  std::mt19937 gen(o.seed * 7919u + static_cast<unsigned>(rank));
  RankInput in;
  in.tokens = o.tokens + 5 * rank;  // unequal on purpose
  const int experts = o.ranks * o.experts_per_rank;
  in.x.resize(in.tokens * o.hidden);
  for (int64_t t = 0; t < in.tokens; ++t)
    for (int h = 0; h < o.hidden; ++h) in.x[t * o.hidden + h] = float_to_bf16(static_cast<float>((rank * 7 + t * 3 + h) % 64));
  in.topk_idx.resize(in.tokens * o.topk);
  in.topk_weights.resize(in.tokens * o.topk);
  in.in_rank.assign(in.tokens * o.ranks, 0);
  in.per_expert.assign(experts, 0);
  std::uniform_int_distribution<int> pick(-1, experts - 1);
  for (int64_t t = 0; t < in.tokens; ++t) {
    for (int k = 0; k < o.topk; ++k) {
      int e = pick(gen);
      for (int j = 0; j < k; ++j)
        if (in.topk_idx[t * o.topk + j] == e) e = -1;  // distinct experts per token
      in.topk_idx[t * o.topk + k] = e;
      in.topk_weights[t * o.topk + k] = 0.25f * static_cast<float>(k + 1);
      if (e >= 0) {
        in.in_rank[t * o.ranks + e / o.experts_per_rank] = 1;
        ++in.per_expert[e];
      }
    }
  }
  return in;
}

struct Shared {
  Options o;
  std::vector<RankInput> inputs;
  std::vector<void*> windows;  // [ranks]: each rank's window, ordinary memory
  std::atomic<int> failures{0};
};

// Warps per block of the host launches (the GPU's 16 would only slow TSan down; the warp map
// changes nothing about the protocol).
constexpr int kBlockWarps = 4;

IntranodeShape shape_of(const Options& o, int row_bytes, int num_scales, int num_topk, int experts_per_rank) {
  const int sub = WarpMap::default_sub_channels(o.ranks, kBlockWarps, o.num_sms / 2, o.queue);
  return IntranodeShape{o.ranks, o.num_sms / 2, kBlockWarps, sub, o.queue, row_bytes, num_scales, num_topk,
                        experts_per_rank};
}

// The one place that builds the kernels' view of the node: windows by value, the epoch is the
// kernels' own (in the windows).
IntranodeContext make_context(const Shared& s, int rank, int row_bytes, int num_scales, int num_topk,
                              int experts_per_rank, uint64_t* nvl_bytes) {
  IntranodeContext node;
  node.rank = rank;
  node.shape = shape_of(s.o, row_bytes, num_scales, num_topk, experts_per_rank);
  for (size_t r = 0; r < s.windows.size(); ++r) node.windows.base[r] = s.windows[r];
  node.nvl_bytes = nvl_bytes;
  return node;
}

#define CHECK(cond, ...)                                                          \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "tsan_intranode: rank %d: check failed: %s: ", rank, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                          \
      std::fprintf(stderr, "\n");                                                 \
      s.failures.fetch_add(1);                                                    \
      return;                                                                     \
    }                                                                             \
  } while (0)

void run_rank(Shared& s, int rank) {
  const Options& o = s.o;
  const RankInput& in = s.inputs[rank];
  const int ranks = o.ranks, row_bytes = o.hidden * 2;
  const int channels = shape_of(o, row_bytes, 0, o.topk, o.experts_per_rank).virtual_channels();
  const LaunchContext ctx{0, rank};
  uint64_t nvl_bytes = 0;
  if (o.plant_race && rank == 0 && ranks > 1) {
    // A plain store to rank 0's barrier slot in rank 1's window, which rank 1's notify kernel
    // polls with acquire loads from one of its fibers. Rank 0 then holds back its own release for
    // a second, so rank 1 reads the plain store's value: nothing orders the two accesses, which
    // is the race TSan must report from inside the kernel.
    const IntranodeShape shape = shape_of(o, row_bytes, 0, o.topk, o.experts_per_rank);
    auto* slot = reinterpret_cast<uint64_t*>(static_cast<char*>(s.windows[1]) + IntranodeLayout::of(shape).barrier);
    *slot = 0;
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  for (int iteration = 0; iteration < o.iterations; ++iteration) {
    // notify
    std::vector<int32_t> recv_channel_start(ranks * channels + 1), recv_counts(1 + o.experts_per_rank);
    NotifyArgs notify;
    notify.node = make_context(s, rank, row_bytes, 0, o.topk, o.experts_per_rank, &nvl_bytes);
    notify.num_tokens = in.tokens;
    notify.is_token_in_rank = reinterpret_cast<const bool*>(in.in_rank.data());
    notify.num_tokens_per_expert = in.per_expert.data();
    notify.recv_channel_start = recv_channel_start.data();
    notify.recv_counts = recv_counts.data();
    intranode_notify(notify, ctx);
    const int64_t num_recv = recv_counts[0];
    int64_t expected_recv = 0;
    for (int src = 0; src < ranks; ++src)
      for (int64_t t = 0; t < s.inputs[src].tokens; ++t) expected_recv += s.inputs[src].in_rank[t * ranks + rank];
    CHECK(num_recv == expected_recv, "received %lld rows, expected %lld", (long long)num_recv, (long long)expected_recv);

    // dispatch, then the same dispatch from the cached layout
    std::vector<int32_t> send_head(in.tokens * ranks), src_idx(num_recv);
    std::vector<uint16_t> recv_x[2];
    std::vector<int64_t> recv_topk(num_recv * o.topk);
    std::vector<float> recv_weights(num_recv * o.topk);
    for (int cached = 0; cached < 2; ++cached) {
      recv_x[cached].assign(num_recv * o.hidden, 0xffff);
      DispatchArgs d;
      d.node = make_context(s, rank, row_bytes, 0, o.topk, o.experts_per_rank, &nvl_bytes);
      d.barrier_first = cached != 0;
      d.num_tokens = in.tokens;
      d.x = in.x.data();
      d.topk_idx = in.topk_idx.data();
      d.topk_weights = in.topk_weights.data();
      d.is_token_in_rank = reinterpret_cast<const bool*>(in.in_rank.data());
      d.recv_channel_start = recv_channel_start.data();
      d.send_head = send_head.data();
      d.recv_x = recv_x[cached].data();
      d.recv_topk_idx = recv_topk.data();
      d.recv_topk_weights = recv_weights.data();
      d.recv_src_idx = src_idx.data();
      intranode_dispatch(d, ctx, o.chunk);
    }
    CHECK(recv_x[0] == recv_x[1], "iteration %d: the cached dispatch differs from the fresh one", iteration);
    for (int src = 0; src < ranks; ++src) {
      const int64_t begin = recv_channel_start[src * channels], end = recv_channel_start[(src + 1) * channels];
      for (int64_t row = begin; row < end; ++row) {
        const int64_t t = src_idx[row];
        CHECK(t >= 0 && t < s.inputs[src].tokens, "row %lld: source token %lld of rank %d", (long long)row, (long long)t, src);
        CHECK(std::memcmp(&recv_x[0][row * o.hidden], &s.inputs[src].x[t * o.hidden], row_bytes) == 0,
              "row %lld (rank %d token %lld): payload differs", (long long)row, src, (long long)t);
      }
    }

    // combine: every rank returns its received rows unchanged; a token's result is copies x row
    std::vector<uint16_t> combined(in.tokens * o.hidden);
    std::vector<float> combined_weights(in.tokens * o.topk);
    CombineArgs c;
    c.node = make_context(s, rank, row_bytes, 0, o.topk, 0, &nvl_bytes);
    c.hidden = o.hidden;
    c.num_recv = num_recv;
    c.x = recv_x[0].data();
    c.topk_weights = recv_weights.data();
    c.recv_channel_start = recv_channel_start.data();
    c.num_tokens = in.tokens;
    c.is_token_in_rank = reinterpret_cast<const bool*>(in.in_rank.data());
    c.send_head = send_head.data();
    c.combined_x = combined.data();
    c.combined_topk_weights = combined_weights.data();
    intranode_combine(c, ctx, o.chunk);
    for (int64_t t = 0; t < in.tokens; ++t) {
      int copies = 0;
      for (int d = 0; d < ranks; ++d) copies += in.in_rank[t * ranks + d];
      for (int h = 0; h < o.hidden; ++h) {
        const float value = static_cast<float>((rank * 7 + t * 3 + h) % 64);
        const uint16_t want = float_to_bf16(value * static_cast<float>(copies));
        CHECK(combined[t * o.hidden + h] == want, "token %lld channel %d: combined %04x, expected %04x", (long long)t, h,
              combined[t * o.hidden + h], want);
      }
    }
  }
}

bool parse(int argc, char** argv, Options& o) {
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string key = argv[i];
    const char* v = argv[i + 1];
    if (key == "--ranks") o.ranks = std::atoi(v);
    else if (key == "--tokens") o.tokens = std::atoi(v);
    else if (key == "--hidden") o.hidden = std::atoi(v);
    else if (key == "--topk") o.topk = std::atoi(v);
    else if (key == "--experts-per-rank") o.experts_per_rank = std::atoi(v);
    else if (key == "--iterations") o.iterations = std::atoi(v);
    else if (key == "--num-sms") o.num_sms = std::atoi(v);
    else if (key == "--queue") o.queue = std::atoi(v);
    else if (key == "--chunk") o.chunk = std::atoi(v);
    else if (key == "--seed") o.seed = static_cast<unsigned>(std::atoi(v));
    else if (key == "--schedule") o.schedule = v;
    else if (key == "--plant-race") o.plant_race = std::atoi(v);
    else return false;
  }
  return argc % 2 == 1 && o.ranks >= 1 && o.ranks <= kIntranodeMaxRanks && o.hidden % 8 == 0 && o.hidden > 0 &&
         o.num_sms >= 2 && o.queue >= o.ranks && o.chunk >= 1 && o.chunk <= o.queue && o.topk >= 1;
}

}  // namespace

int main(int argc, char** argv) {
  Shared s;
  if (!parse(argc, argv, s.o)) {
    std::fprintf(stderr, "usage: %s [--ranks N] [--tokens T] [--hidden H] [--topk K] [--experts-per-rank E] "
                         "[--iterations I] [--num-sms S] [--queue Q] [--chunk C] [--seed X] [--schedule SPEC] "
                         "[--plant-race 1]\n", argv[0]);
    return 2;
  }
  const Options& o = s.o;
  try {
    moelink::simt::set_wait_timeout(600.0);  // TSan runs the kernels 5-20x slower
    moelink::simt::set_schedule(o.schedule);
  } catch (const moelink::Error& e) {
    std::fprintf(stderr, "tsan_intranode: %s\n", e.what());
    return 2;
  }
  const IntranodeShape widest = shape_of(o, o.hidden * 2, 0, o.topk, o.experts_per_rank);
  const int64_t window_bytes = IntranodeLayout::of(widest).total_bytes;
  const size_t rounded = (static_cast<size_t>(window_bytes) + 4095) / 4096 * 4096;
  for (int r = 0; r < o.ranks; ++r) {
    s.inputs.push_back(make_input(o, r));
    void* window = std::aligned_alloc(4096, rounded);  // page-aligned and zero, as a host window
    std::memset(window, 0, rounded);
    s.windows.push_back(window);
  }
  std::vector<std::thread> threads;
  for (int r = 0; r < o.ranks; ++r) {
    threads.emplace_back([&s, r] {
      try {
        run_rank(s, r);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "tsan_intranode: rank %d: %s\n", r, e.what());
        s.failures.fetch_add(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  for (void* window : s.windows) std::free(window);
  std::printf("tsan_intranode: %d ranks x %d iterations (notify, dispatch, cached dispatch, combine), %d tokens/rank, "
              "hidden %d, top-%d, %d SMs, queue %d, chunk %d, schedule %s: %s\n",
              o.ranks, o.iterations, o.tokens, o.hidden, o.topk, o.num_sms, o.queue, o.chunk, o.schedule.c_str(),
              s.failures.load() ? "FAILED" : "all outputs checked");
  return s.failures.load() ? 1 : 0;
}
