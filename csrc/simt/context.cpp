// User-space context switch and the fiber stack pool.
//
// The switch saves only what the System V ABI makes callee-saved (rbx, rbp, r12-r15 and rsp);
// everything else is already dead at a call boundary. It makes no system call, unlike
// swapcontext, which saves and restores the signal mask (measured on this kind of machine: ~16 ns
// against ~260 ns; docs/results.md has the runtime's own figures).
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "simt/launch_state.h"

#if !defined(__x86_64__)
#error "the SIMT runtime's context switch is written for x86-64 (System V); port moelink_simt_switch"
#endif

// void moelink_simt_switch(void** save_sp /* rdi */, void* load_sp /* rsi */)
asm(R"(
  .text
  .globl moelink_simt_switch
  .hidden moelink_simt_switch
  .type moelink_simt_switch, @function
moelink_simt_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size moelink_simt_switch, .-moelink_simt_switch
)");

namespace moelink::simt {

void* prepare_stack(char* stack_low, size_t bytes, size_t index, void (*entry)()) {
  // Layout from the new sp upwards: six zeroed callee-saved registers, the address `ret` jumps
  // to (entry) and a null fake return address for entry. The top is 16-byte aligned, so entry
  // starts with rsp % 16 == 8, exactly as after a call instruction.
  //
  // Stacks are equally sized and aligned, so without an offset every fiber's hot frames would
  // share the same cache sets; staggering the tops by up to 4 KiB ("colouring") spreads them.
  const size_t colour = (index * 17 % 64) * 64;
  auto top = reinterpret_cast<uintptr_t>(stack_low + bytes - colour) & ~uintptr_t{15};
  auto* frame = reinterpret_cast<void**>(top) - 8;
  for (int i = 0; i < 6; ++i) frame[i] = nullptr;
  frame[6] = reinterpret_cast<void*>(entry);
  frame[7] = nullptr;
  std::memcpy(stack_low, &kStackCanary, sizeof kStackCanary);
  return frame;
}

namespace {

// Stacks are carved out of large anonymous mappings without guard pages: a guard page per fiber
// would cost two memory mappings per fiber, and a large grid would exceed vm.max_map_count. A
// canary at the bottom of each stack catches overflows when the fiber switches out.
class StackPool {
 public:
  void acquire(size_t count, std::vector<char*>& out) {
    std::lock_guard<std::mutex> lock(mutex_);
    while (free_.size() < count) grow();
    out.insert(out.end(), free_.end() - static_cast<std::ptrdiff_t>(count), free_.end());
    free_.resize(free_.size() - count);
  }

  void release(std::vector<char*>& stacks) {
    for (char* stack : stacks) sanitizer::forget_stack(stack, stack_bytes());
    std::lock_guard<std::mutex> lock(mutex_);
    free_.insert(free_.end(), stacks.begin(), stacks.end());
    stacks.clear();
  }

 private:
  static constexpr size_t kStacksPerMapping = 256;

  void grow() {
    size_t bytes = stack_bytes();
    void* mapping = mmap(nullptr, bytes * kStacksPerMapping, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) {
      throw Error(ErrorKind::kInvalidArgument,
                  std::string("SIMT runtime: cannot map fiber stacks: ") + std::strerror(errno));
    }
    for (size_t i = 0; i < kStacksPerMapping; ++i) free_.push_back(static_cast<char*>(mapping) + i * bytes);
  }

  std::mutex mutex_;
  std::vector<char*> free_;
};

StackPool& pool() {
  static StackPool* instance = new StackPool();  // never destroyed: fibers may outlive statics
  return *instance;
}

}  // namespace

size_t stack_bytes() {
  static const size_t bytes = [] {
    const char* env = std::getenv("MOELINK_SIMT_STACK_KB");
    long kib = env ? std::strtol(env, nullptr, 10) : 64;
    if (kib < 16) kib = 16;
    return static_cast<size_t>(kib) * 1024;
  }();
  return bytes;
}

void acquire_stacks(size_t count, std::vector<char*>& out) { pool().acquire(count, out); }
void release_stacks(std::vector<char*>& stacks) { pool().release(stacks); }

}  // namespace moelink::simt
