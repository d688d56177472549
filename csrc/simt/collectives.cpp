// Block barriers and warp collectives. A participant that is not the last blocks (no polling);
// the last arrival computes every lane's result and makes the others runnable.
#include <bit>
#include <cstdio>
#include <cstring>
#include <string>

#include "simt/launch_state.h"

namespace moelink::simt {

namespace {

std::string hex(uint32_t mask) {
  char text[16];
  std::snprintf(text, sizeof text, "0x%08x", mask);
  return text;
}

const char* op_name(CollectiveOp op) {
  switch (op) {
    case CollectiveOp::kSync: return "syncwarp";
    case CollectiveOp::kShflIdx: return "shfl";
    case CollectiveOp::kShflUp: return "shfl_up";
    case CollectiveOp::kShflDown: return "shfl_down";
    case CollectiveOp::kShflXor: return "shfl_xor";
    case CollectiveOp::kBallot: return "ballot";
    case CollectiveOp::kAny: return "any";
    case CollectiveOp::kAll: return "all";
    default: return "warp_reduce";
  }
}

void complete_barrier(Launch& launch, Block& block, int id) {
  Barrier& barrier = block.barriers[id];
  for (Fiber* waiter : barrier.waiters) launch.make_runnable(waiter);
  barrier.waiters.clear();
  if (!barrier.whole_block) {
    for (Warp& warp : block.warps) warp.at_barrier[id] = 0;
  }
  barrier.expected = 0;
  barrier.arrived = 0;
  barrier.whole_block = false;
}

// A named barrier counts warps (PTX: a warp arrives once its non-exited lanes have): whether the
// lanes of `warp` at barrier `id` now complete it.
bool warp_arrived(const Warp& warp, int id) {
  return warp.at_barrier[id] != 0 && ((warp.at_barrier[id] | warp.exited) & warp.present) == warp.present;
}

template <typename T>
T load_as(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

template <typename T>
uint64_t store_as(T v) {
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

// kind: 0 sum, 1 min, 2 max.
template <typename T>
T combine(int kind, T a, T b) {
  if (kind == 0) return a + b;
  if (kind == 1) return b < a ? b : a;
  return a < b ? b : a;
}

template <typename T>
uint64_t reduce(int kind, const PendingCollective& c) {
  if (c.mask == 0xffffffffu) {
    // The xor butterfly a GPU warp reduction performs (offsets 16, 8, 4, 2, 1): the same
    // additions in the same order, so float sums agree bit for bit with the GPU build.
    T values[32];
    for (int lane = 0; lane < 32; ++lane) values[lane] = load_as<T>(c.bits[lane]);
    for (int offset = 16; offset > 0; offset >>= 1) {
      T next[32];
      for (int lane = 0; lane < 32; ++lane) next[lane] = combine(kind, values[lane], values[lane ^ offset]);
      std::memcpy(values, next, sizeof values);
    }
    return store_as(values[0]);
  }
  bool first = true;
  T acc{};
  for (int lane = 0; lane < 32; ++lane) {
    if (!(c.mask >> lane & 1u)) continue;
    T v = load_as<T>(c.bits[lane]);
    acc = first ? v : combine(kind, acc, v);
    first = false;
  }
  return store_as(acc);
}

uint64_t reduce(CollectiveOp op, const PendingCollective& c) {
  const int index = static_cast<int>(op) - static_cast<int>(CollectiveOp::kSumI32);
  const int kind = index / 6;
  switch (index % 6) {
    case 0: return reduce<int32_t>(kind, c);
    case 1: return reduce<uint32_t>(kind, c);
    case 2: return reduce<int64_t>(kind, c);
    case 3: return reduce<uint64_t>(kind, c);
    case 4: return reduce<float>(kind, c);
    default: return reduce<double>(kind, c);
  }
}

// Result of a shuffle for `lane`, CUDA semantics: a source outside the caller's segment (or not
// participating, which is undefined on the GPU) yields the caller's own value.
uint64_t shuffle_result(const PendingCollective& c, int lane) {
  const int width = c.width;
  const int segment = lane & ~(width - 1);
  const int arg = c.args[lane];
  int source;
  switch (c.op) {
    case CollectiveOp::kShflIdx: source = segment + (arg & (width - 1)); break;
    case CollectiveOp::kShflUp: source = lane - arg < segment ? lane : lane - arg; break;
    case CollectiveOp::kShflDown: source = lane + arg >= segment + width ? lane : lane + arg; break;
    default: source = (lane ^ arg) >= segment + width ? lane : (lane ^ arg); break;  // xor
  }
  if (source < 0 || source > 31 || !(c.mask >> source & 1u)) source = lane;
  return c.bits[source];
}

void finish_collective(Launch& launch, Warp& warp, size_t index) {
  PendingCollective c = std::move(warp.pending[index]);
  warp.pending.erase(warp.pending.begin() + static_cast<std::ptrdiff_t>(index));
  uint64_t shared = 0;
  if (c.op == CollectiveOp::kBallot || c.op == CollectiveOp::kAny || c.op == CollectiveOp::kAll) {
    uint32_t votes = 0;
    for (int lane = 0; lane < 32; ++lane)
      if ((c.mask >> lane & 1u) && c.bits[lane] != 0) votes |= 1u << lane;
    shared = c.op == CollectiveOp::kBallot ? votes : c.op == CollectiveOp::kAny ? votes != 0 : votes == c.mask;
  } else if (c.op >= CollectiveOp::kSumI32) {
    shared = reduce(c.op, c);
  }
  const bool is_shuffle = c.op >= CollectiveOp::kShflIdx && c.op <= CollectiveOp::kShflXor;
  for (int lane = 0; lane < 32; ++lane) {
    if (!(c.mask >> lane & 1u)) continue;
    Fiber* fiber = c.fibers[lane];
    fiber->collective_result = is_shuffle ? shuffle_result(c, lane) : shared;
    if (fiber != launch.current()) launch.make_runnable(fiber);
  }
}

}  // namespace

void block_barrier(int id, int count, bool arrive_only) {
  Launch& launch = *t_launch;
  Fiber* fiber = launch.current();
  Block& block = *fiber->block;
  if (id < 0 || id >= kNumBarriers || (id == 0 && count >= 0)) {
    launch.fail(ErrorKind::kDeviceAssert, "bar_sync/bar_arrive: barrier id must be in [1, 15] (0 is sync_block), got " +
                                              std::to_string(id));
  }
  const int rounded_threads = static_cast<int>((block.num_threads + 31) / 32 * 32);
  if (count >= 0 && (count == 0 || count % 32 != 0 || count > rounded_threads)) {
    launch.fail(ErrorKind::kDeviceAssert, "bar_sync(" + std::to_string(id) + ", n): n must be a positive multiple of 32 "
                                          "and at most the block's " + std::to_string(rounded_threads) + " threads, got " +
                                          std::to_string(count));
  }
  Barrier& barrier = block.barriers[id];
  if (barrier.expected == 0) {
    barrier.whole_block = count < 0;
    barrier.expected = count < 0 ? static_cast<int>(block.num_threads - block.exited) : count;
  } else if (!barrier.whole_block && count != barrier.expected) {
    launch.fail(ErrorKind::kDeviceAssert, "barrier " + std::to_string(id) + ": threads disagree on its thread count (" +
                                              std::to_string(barrier.expected) + " and " + std::to_string(count) + ")");
  }
  bool complete;
  if (barrier.whole_block) {
    complete = ++barrier.arrived >= barrier.expected;
  } else {
    Warp& warp = block.warps[fiber->id.warp];
    const uint32_t self = 1u << fiber->id.lane;
    if (warp.at_barrier[id] & self) {
      launch.fail(ErrorKind::kDeviceAssert, "barrier " + std::to_string(id) + ": lane " + std::to_string(fiber->id.lane) +
                                                " arrived twice before the barrier completed");
    }
    warp.at_barrier[id] |= self;
    if (warp_arrived(warp, id)) barrier.arrived += 32;
    complete = barrier.arrived >= barrier.expected;
  }
  if (complete) {
    complete_barrier(launch, block, id);
    return;
  }
  if (arrive_only) return;
  barrier.waiters.push_back(fiber);
  fiber->state = FiberState::kBlocked;
  fiber->blocked_barrier = id;
  launch.suspend();
  fiber->blocked_barrier = -1;
}

uint64_t warp_collective(uint32_t mask, CollectiveOp op, uint64_t bits, int arg, int width) {
  Launch& launch = *t_launch;
  Fiber* fiber = launch.current();
  Warp& warp = fiber->block->warps[fiber->id.warp];
  const int lane = static_cast<int>(fiber->id.lane);
  const uint32_t self = 1u << lane;
  if (!(mask & self)) {
    launch.fail(ErrorKind::kDeviceAssert, std::string(op_name(op)) + ": lane " + std::to_string(lane) +
                                              " is not in its own mask " + hex(mask));
  }
  if (mask & ~warp.present) {
    launch.fail(ErrorKind::kDeviceAssert, std::string(op_name(op)) + ": mask " + hex(mask) +
                                              " names lanes that do not exist in this warp (" + hex(warp.present) + ")");
  }
  if (mask & warp.exited) {
    launch.fail(ErrorKind::kDeadlock, std::string(op_name(op)) + ": mask " + hex(mask) + " names lanes that have exited (" +
                                          hex(mask & warp.exited) + "); it can never arrive");
  }
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    launch.fail(ErrorKind::kDeviceAssert, std::string(op_name(op)) + ": width must be a power of two in [1, 32], got " +
                                              std::to_string(width));
  }
  if (mask == self) {
    // A one-lane collective (work_lanes on the host): its result is the lane's own operand, or
    // its own vote; no other fiber is involved, so no switch.
    switch (op) {
      case CollectiveOp::kSync: return 0;
      case CollectiveOp::kBallot: return bits != 0 ? self : 0;
      case CollectiveOp::kAny:
      case CollectiveOp::kAll: return bits != 0;
      default: return bits;  // shuffles (the only source in the mask is the lane) and reductions
    }
  }
  size_t index = 0;
  while (index < warp.pending.size() && (warp.pending[index].mask != mask || (warp.pending[index].arrived & self))) ++index;
  if (index == warp.pending.size()) {
    warp.pending.emplace_back();
    warp.pending.back().mask = mask;
    warp.pending.back().op = op;
    warp.pending.back().width = width;
  } else if (warp.pending[index].op != op || warp.pending[index].width != width) {
    launch.fail(ErrorKind::kDeviceAssert, std::string("divergent warp collectives: lane ") + std::to_string(lane) +
                                              " calls " + op_name(op) + " while lanes " + hex(warp.pending[index].arrived) +
                                              " of mask " + hex(mask) + " wait in " + op_name(warp.pending[index].op));
  }
  PendingCollective& c = warp.pending[index];
  c.bits[lane] = bits;
  c.args[lane] = arg;
  c.fibers[lane] = fiber;
  c.arrived |= self;
  if (c.arrived == mask) {
    finish_collective(launch, warp, index);
    return fiber->collective_result;
  }
  fiber->state = FiberState::kBlocked;
  launch.suspend();
  return fiber->collective_result;
}

uint32_t active_mask() {
  Fiber* fiber = t_launch->current();
  const Warp& warp = fiber->block->warps[fiber->id.warp];
  return warp.present & ~warp.exited;
}

void on_thread_exit(Launch& launch, Fiber& fiber) {
  Block& block = *fiber.block;
  Warp& warp = block.warps[fiber.id.warp];
  const uint32_t self = 1u << fiber.id.lane;
  ++block.exited;
  warp.exited |= self;
  for (const PendingCollective& c : warp.pending) {
    if ((c.mask & self) && !(c.arrived & self)) {
      launch.fail(ErrorKind::kDeadlock, "lane " + std::to_string(fiber.id.lane) + " exited while lanes " +
                                            hex(c.arrived) + " wait for it in " + op_name(c.op) + " with mask " +
                                            hex(c.mask) + "; it can never arrive");
    }
  }
  // sync_block() counts exited threads as arrived, so `if (tid >= n) return; ... sync_block()`
  // patterns finish as they do on hardware.
  Barrier& barrier = block.barriers[0];
  if (barrier.expected > 0 && barrier.whole_block && barrier.arrived >= --barrier.expected) {
    complete_barrier(launch, block, 0);
  }
  // A named barrier its warp-mates wait at: the warp arrives once its last non-exited lane has.
  for (int id = 1; id < kNumBarriers; ++id) {
    Barrier& named = block.barriers[id];
    const uint32_t lanes = warp.at_barrier[id];
    const bool before = lanes != 0 && ((lanes | (warp.exited & ~self)) & warp.present) == warp.present;
    if (named.expected > 0 && !named.whole_block && !before && warp_arrived(warp, id)) {
      named.arrived += 32;
      if (named.arrived >= named.expected) complete_barrier(launch, block, id);
    }
  }
}

std::string Launch::describe_deadlock() const {
  std::string text = std::string("kernel '") + config_.kernel_name + "'";
  if (config_.rank >= 0) text += " rank " + std::to_string(config_.rank);
  text += ": every remaining thread is blocked and nothing can wake it:";
  int lines = 0;
  for (const Block& block : blocks_) {
    for (int id = 0; id < kNumBarriers && lines < 8; ++id) {
      const Barrier& barrier = block.barriers[id];
      if (barrier.waiters.empty()) continue;
      text += "\n  block " + std::to_string(block.rank) + ": barrier " + std::to_string(id) + " has " +
              std::to_string(barrier.arrived) + " of " + std::to_string(barrier.expected) + " threads (first waiter: thread " +
              std::to_string(barrier.waiters.front()->id.thread_rank) + ")";
      ++lines;
    }
    for (size_t w = 0; w < block.warps.size() && lines < 8; ++w) {
      for (const PendingCollective& c : block.warps[w].pending) {
        text += "\n  block " + std::to_string(block.rank) + " warp " + std::to_string(w) + ": " + op_name(c.op) +
                " with mask " + hex(c.mask) + " has lanes " + hex(c.arrived) + "; lanes " +
                hex(c.mask & ~c.arrived) + " never arrive";
        ++lines;
      }
    }
  }
  return text;
}

}  // namespace moelink::simt
