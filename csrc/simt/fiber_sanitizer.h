// Sanitizer annotations of the SIMT runtime's fiber switches. Compiled in only under a sanitizer
// build (setup.py MOELINK_SANITIZE; gcc and clang define __SANITIZE_ADDRESS__ /
// __SANITIZE_THREAD__): every function here is an empty inline otherwise.
//
// AddressSanitizer keeps a shadow of the current stack's bounds; a switch to another stack it was
// not told about makes it report the first access (or the first exception unwinding) as a stack
// overflow or a bad access. Each switch is bracketed as its API requires:
//   __sanitizer_start_switch_fiber(save, bottom, size)  just before, with the *target* stack;
//   __sanitizer_finish_switch_fiber(saved, &from_bottom, &from_size)  first thing after resuming.
// A fiber that will never resume (finished, or abandoned by a failure) passes a null `save`, so
// ASan drops its fake stack.
//
// ThreadSanitizer needs a fiber object per stack (__tsan_create_fiber) and to be told of each
// switch (__tsan_switch_to_fiber) right before it happens. The switches synchronise (flags 0): a
// fiber's accesses happen before those of the fiber it switches to. So within one rank (one OS
// thread) TSan sees a total order and reports nothing; between ranks (threads of the one-process
// TSan driver, tools/tsan_intranode.cpp) only the kernels' atomics and the runtime's mutexes order
// accesses, which is what checks every release/acquire pair. docs/simt.md says what this can and
// cannot see.
#pragma once

#include <cstddef>

#if defined(__SANITIZE_ADDRESS__)
#define MOELINK_SIMT_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#else
#define MOELINK_SIMT_ASAN 0
#endif

#if defined(__SANITIZE_THREAD__)
#define MOELINK_SIMT_TSAN 1
extern "C" {
void* __tsan_get_current_fiber(void);
void* __tsan_create_fiber(unsigned flags);
void __tsan_destroy_fiber(void* fiber);
void __tsan_switch_to_fiber(void* fiber, unsigned flags);
}
#else
#define MOELINK_SIMT_TSAN 0
#endif

namespace moelink::simt::sanitizer {

// One execution context as the sanitizers see it: a fiber, or the thread that runs the launch.
struct Context {
  void* fake_stack = nullptr;   // ASan: saved fake stack while switched out
  const void* stack_bottom = nullptr;
  std::size_t stack_size = 0;
  void* tsan_fiber = nullptr;   // TSan: its fiber object
};

inline void create(Context& c, void* stack_bottom, std::size_t stack_size) {
  c.stack_bottom = stack_bottom;
  c.stack_size = stack_size;
#if MOELINK_SIMT_TSAN
  c.tsan_fiber = __tsan_create_fiber(0);
#endif
}

// The launching thread's own context (its TSan fiber; its stack bounds arrive with the first
// switch into a fiber, see started()).
inline void adopt_thread(Context& c) {
#if MOELINK_SIMT_TSAN
  c.tsan_fiber = __tsan_get_current_fiber();
#endif
  (void)c;
}

inline void destroy(Context& c) {
#if MOELINK_SIMT_TSAN
  if (c.tsan_fiber != nullptr) __tsan_destroy_fiber(c.tsan_fiber);
  c.tsan_fiber = nullptr;
#endif
  (void)c;
}

// Right before switching from `from` to `to`; `from_exits`: `from` will never run again.
inline void before_switch(Context& from, bool from_exits, const Context& to) {
#if MOELINK_SIMT_ASAN
  __sanitizer_start_switch_fiber(from_exits ? nullptr : &from.fake_stack, to.stack_bottom, to.stack_size);
#endif
#if MOELINK_SIMT_TSAN
  __tsan_switch_to_fiber(to.tsan_fiber, 0);
#endif
  (void)from, (void)from_exits, (void)to;
}

// First thing after `self` resumed (from a switch it started with before_switch).
inline void resumed(Context& self) {
#if MOELINK_SIMT_ASAN
  __sanitizer_finish_switch_fiber(self.fake_stack, nullptr, nullptr);
#endif
  (void)self;
}

// First thing a fresh fiber runs. `origin` receives the bounds of the stack it came from when the
// caller needs them (the launching thread's, for the switch back at the end).
inline void started(Context* origin) {
#if MOELINK_SIMT_ASAN
  const void* bottom = nullptr;
  std::size_t size = 0;
  __sanitizer_finish_switch_fiber(nullptr, &bottom, &size);
  if (origin != nullptr) {
    origin->stack_bottom = bottom;
    origin->stack_size = size;
  }
#endif
  (void)origin;
}

// A stack goes back to the pool. Frames of fibers that never returned (every fiber ends inside
// the switch, abandoned ones anywhere) leave ASan's redzone poison on it; the next fiber on this
// stack must not inherit it.
inline void forget_stack(void* low, std::size_t bytes) {
#if MOELINK_SIMT_ASAN
  __asan_unpoison_memory_region(low, bytes);
#endif
  (void)low, (void)bytes;
}

}  // namespace moelink::simt::sanitizer
