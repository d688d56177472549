// What a GPU kernel leaves behind when one of its waits reaches its deadline.
//
// On the GPU a timed-out wait must not trap: a trap destroys the process's CUDA context, and with
// it every other Buffer and tensor of the process. Instead the first thread whose wait expires
// claims this record (CAS on `state`), fills it in and returns; every wait of every kernel that
// sees `state != 0` returns at once with a value satisfying its condition, so the grids run to
// their end in bounded time with garbage results. The record lives in mapped, pinned host
// memory (one per process, see runtime/cuda_device.h): the host reads it without synchronising
// and raises moelink.errors.CommTimeout with the same facts the host target's message carries;
// the Buffer that ran the operation is poisoned, the CUDA context is not.
//
// Layout (all naturally aligned; written by the device, read by the host):
//   0    u32   state        0 = nothing happened, 1 = a wait timed out (claimed by CAS 0 -> 1)
//   4    i32   rank         WaitSite.rank of the expired wait
//   8    i32   peer         WaitSite.peer
//   12   i32   channel      WaitSite.channel
//   16   u32   block        block of the thread that timed out
//   20   u32   thread       thread in that block
//   24   u64   awaited      the value the wait compared with
//   32   u64   last         the last value it saw
//   40   u64   waited_ns    how long it waited
//   48   u32   cmp          arch::Cmp of the wait
//   52   u32   is_signed    1 if the awaited word is a signed type
//   56   u32   published    1 once every field above is written (release); the host reads only then
//   60   u32   reserved
//   64   char  what[192]    WaitSite.what, NUL-terminated (truncated)
#pragma once

#include <cstdint>

namespace moelink {

struct AbortRecord {
  uint32_t state;
  int32_t rank, peer, channel;
  uint32_t block, thread;
  uint64_t awaited, last, waited_ns;
  uint32_t cmp, is_signed;
  uint32_t published;
  uint32_t reserved;
  char what[192];
};

static_assert(sizeof(AbortRecord) == 256, "AbortRecord layout is documented field by field");

}  // namespace moelink
