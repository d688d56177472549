// moelink device primitives: the one header every kernel includes.
//
// Every kernel in csrc/kernels/ is compiled twice: by nvcc for the GPU and by g++ for the SIMT host
// runtime (csrc/simt/), which runs each CUDA thread as a fiber. A kernel may use only what this
// header declares, plus plain C++ arithmetic and plain loads/stores of its own data. The two
// implementations are arch_cuda.cuh (inline PTX) and arch_host.h (C++ atomics + the SIMT runtime).
//
// Contract summary (both targets implement exactly this):
//
// Qualifiers
//   MOELINK_DEVICE            a device function (`__device__ __forceinline__` / `inline`).
//   MOELINK_HOST_DEVICE       callable from host code too (types.h).
//   MOELINK_DEVICE_NOINLINE   a device function kept out of line: a kernel's roles each get their
//                             own register allocation instead of one for their sum (GPU), plain
//                             code on the host.
//   MOELINK_KERNEL            a kernel entry point (`__global__` / plain function).
//   MOELINK_LAUNCH_BOUNDS(n)  between `void` and the kernel's name: the most threads per block it is
//                             launched with (`__launch_bounds__(n, 1)` on the GPU, so ptxas budgets
//                             registers for n threads; nothing on the host).
//   MOELINK_SHARED(T, name, [d0][d1]...)
//                             a statically sized shared array, one per block on both targets.
//                             Never write a bare `__shared__` array: on the host it would be
//                             per-fiber. `name` behaves as a reference to `T[d0][d1]...`.
//   MOELINK_DYNAMIC_SMEM(T, name)
//                             `T* name` pointing at the block's dynamic shared memory (the
//                             launch's `dynamic_smem_bytes`, 128-byte aligned, uninitialised).
//
// Identity (1-, 2- or 3-D launches; kernels in this project use 1-D)
//   thread_rank()             linear thread index in the block (threadIdx.x + y*bx + z*bx*by).
//   block_rank()              linear block index in the grid.
//   num_threads()/num_blocks() block and grid sizes in threads and blocks.
//   lane_id()/warp_id()/num_warps()   thread_rank() % 32, thread_rank() / 32, ceil(threads / 32).
//   On the host `threadIdx`, `blockIdx`, `blockDim`, `gridDim` exist too, so CUDA-style code
//   compiles unchanged.
//
// Memory operations. Scope is kBlock (PTX .cta), kGpu (.gpu) or kSys (.sys: other GPUs over
// NVLink, other processes on the host). T is a 32- or 64-bit integer type, taken from the pointer:
// value operands are not deduced (std::type_identity_t<T>), so `st_release(flag_u64, 1)` works.
//   ld_acquire<S>(p)          load-acquire: later reads of this thread see what the releasing
//                             writer wrote before its release.
//   ld_relaxed<S>(p)          atomic load with no ordering.
//   ld_volatile(p)            a load the compiler may not cache or elide (PTX ld.volatile).
//   st_release<S>(p, v)       store-release: publishes every earlier write of this thread.
//   st_relaxed<S>(p, v)       atomic store with no ordering.
//   st_volatile(p, v)         a store the compiler may not elide.
//   atomic_add/atomic_exch/atomic_min/atomic_max<S>(p, v) -> old value, relaxed.
//   atomic_cas<S>(p, expected, desired) -> old value, relaxed.
//   atomic_add_release<S>(p, v) -> old value; red_add_release<S>(p, v) (no result).
//   fence<S>()                fence.acq_rel at scope S.
//   Only these operations may be the writer a spin-wait (below) waits for: a plain store is not
//   guaranteed to become visible to a spinning reader on the GPU, and on the host the runtime
//   only learns of plain stores by polling.
//
// Waiting: the only way to spin.
//   wait_until<S>(p, cmp, value, site) -> T
//                             Returns the first value v observed with an acquire load at scope S
//                             such that `v cmp value` holds (signed or unsigned as T). While it
//                             waits the thread yields (host) or spins with relaxed loads (GPU: no
//                             L1 invalidation per poll; one acquire load once the condition holds).
//                             Every wait has a deadline (MOELINK_TIMEOUT_S, default 100 s). On
//                             expiry the host launch fails with moelink.errors.CommTimeout; the GPU
//                             fills the process's AbortRecord (runtime/abort_record.h) and returns,
//                             and from then on every wait returns at once with a value satisfying
//                             its condition, so grids drain in bounded time; the host raises the
//                             same CommTimeout from the record. Both name the kernel or wait, rank,
//                             peer, channel, block, thread, `site` and the last value seen. Kernels
//                             therefore use waited-for values only within bounds they check.
//   wait_until_or_expire<S>(p, cmp, value, site, T* seen) -> bool
//                             The same wait, for a caller that survives a peer that never writes
//                             (low-latency shrink mode): true with the first satisfying value in
//                             `*seen`, as wait_until; at the deadline (the same MOELINK_TIMEOUT_S)
//                             it gives up and returns false with the last value seen, and neither
//                             fails the host launch nor fills the AbortRecord. Once another wait
//                             of the process claimed the record (GPU) it returns true at once with
//                             a satisfying value, like every wait: check aborted().
//   aborted() -> bool         true once a wait of this process timed out on the GPU (the AbortRecord
//                             is claimed); always false on the host, where a timeout ends the launch.
//                             A loop that waits on a doorbell rather than on the data it consumes
//                             must leave when it holds (its data will never come).
//   WaitSite{what, rank, peer, channel}
//                             describes a wait for that message: `what` is a static string such
//                             as "dispatch: receiver queue tail"; -1 means "not applicable".
//
// Warp collectives. `mask` names the participating lanes; it must contain the calling lane and
// every lane in it must reach the same collective (as on sm_70+ with independent scheduling).
//   syncwarp(mask)
//   shfl(mask, v, src_lane, width=32), shfl_xor(mask, v, lane_mask, width=32),
//   shfl_up(mask, v, delta, width=32), shfl_down(mask, v, delta, width=32)
//                             CUDA semantics: width is a power of two <= 32 and splits the warp
//                             into segments; a source outside the caller's segment yields the
//                             caller's own value. T is any trivially copyable type of <= 8 bytes.
//   ballot(mask, pred) -> uint32, any(mask, pred), all(mask, pred), activemask()
//                             activemask() on the host is the set of lanes that have not exited.
//   warp_reduce_sum/min/max(mask, v) over the lanes of mask (int32, uint32, int64, float, double).
//
// Block synchronisation
//   sync_block()              __syncthreads(). Threads that have exited count as arrived.
//   bar_sync(id, n)           PTX `bar.sync id, n`: id in [1, 15], n a multiple of 32 threads;
//                             id 0 is reserved for sync_block(). Waits until n threads arrived,
//                             counted per warp as the GPU does: a warp arrives once every one of its
//                             lanes that has not exited has arrived, and counts 32 threads (so a warp
//                             whose idle lanes returned early still arrives; a warp none of whose
//                             lanes arrive never does).
//   bar_arrive(id, n)         PTX `bar.arrive`: counts toward the barrier without waiting.
//
// 16-byte vectors (Vec16, types.h): pointers 16-byte aligned.
//   load16(p)                 a plain 16-byte load (memory other threads or ranks may have written,
//                             after the acquire that published it).
//   load16_input(p)           a 16-byte load of memory that no one writes while the kernel runs
//                             (the caller's input tensors): the GPU's read-only path (ld.global.nc).
//   store16(p, v)             a plain 16-byte store.
//
// Bulk movement
//   warp_copy(mask, dst, src, bytes)
//                             Copies `bytes` (a multiple of 16, both pointers 16-byte aligned)
//                             with the lanes of `mask`. Precondition: `src` is complete for every
//                             lane before any lane calls (establish it with a wait, syncwarp or
//                             barrier). Postcondition: after a syncwarp(mask), every lane sees all
//                             of `dst`. On the host it is one memcpy by the lowest lane of mask.
//
// Work split across lanes
//   LaneRange lane_range(mask, count)
//                             The calling lane's share of `count` work items (16-byte pieces of a
//                             row, 8-channel groups, ...) among the lanes of `mask`, which must hold
//                             the calling lane. Iterate `for (int64_t i = r.begin; i < r.end; i +=
//                             r.step)`; together the lanes of `mask` visit [0, count) exactly once.
//                             GPU: interleaved (begin = the lane's rank among mask's lanes, step =
//                             popcount(mask)), so at every step the lanes touch consecutive items
//                             (coalesced). Host: one contiguous chunk per lane (ceil(count / lanes)
//                             items, step 1), so the single OS thread that runs every fiber streams
//                             through memory in order, which the prefetcher and the compiler's
//                             vectoriser want (interleaved like the GPU under a random schedule).
//                             Kernels must not assume which lane gets which item.
//   elect_one(mask) -> bool   true on exactly one lane of `mask` (the lowest), false on the rest.
//   uint32_t work_lanes(mask) The lanes of `mask` that do the warp's cooperative work (row copies,
//                             reductions, per-token queue bookkeeping): a nonempty subset of `mask`
//                             holding its lowest lane. GPU: `mask` itself, so the work is split over
//                             every lane (coalesced). Host: the lowest lane alone, so one fiber runs
//                             the whole loop and every collective over the result completes without a
//                             fiber switch (32 fibers taking turns per token cost far more than the
//                             work); under a random schedule the host returns `mask`, like the GPU,
//                             so the tests exercise both splits (docs/simt.md). Kernels write the work
//                             for any result: per-lane loops with lane_range over it, signalling with
//                             elect_one over it, collectives with it as their mask. Lanes outside it
//                             have nothing to do and may return (see bar_sync); they must not be
//                             named in a later collective.
//   warp_copy_input(mask, dst, src, bytes)
//                             warp_copy from memory no one writes while the kernel runs (the read-only
//                             path on the GPU).
//   BulkStage bulk_stage(warp_smem)
//                             Every lane of a warp calls it once with the same kBulkStageBytes of
//                             dynamic shared memory (128-byte aligned) that only this warp uses; the
//                             result is the warp's staging for warp_bulk_copy.
//   warp_bulk_copy(mask, stage, dst, src, bytes)
//                             Same contract as warp_copy (bytes a multiple of 16, pointers 16-byte
//                             aligned, src complete before the call, dst complete for every lane of
//                             mask when it returns). sm_90: one elected lane streams the bytes through
//                             the warp's staging with the Tensor Memory Accelerator (cp.async.bulk
//                             global -> shared -> global, two halves in flight); host: one memcpy.
//                             Always call it with the same mask for a given stage.
//
// Failure
//   MOELINK_DEVICE_CHECK(cond, fmt, ...)
//                             If !cond: host launch fails with moelink.errors.DeviceAssert whose
//                             message is the formatted text plus the kernel, block and thread;
//                             the GPU prints the same and traps.
//
// Bits (types.h, usable on host and device)
//   lowest_bit(x)             index of the lowest set bit of a nonzero uint32.
//   popcount(x)               number of set bits.
//
// Time
//   globaltimer_ns()          monotonically increasing nanoseconds.
//
// Launching (from host code, in the launcher that sits beside each kernel)
//   MOELINK_LAUNCH(ctx, "name", kernel, grid_blocks, block_threads, dynamic_smem_bytes, args...)
//                             ctx is a moelink::LaunchContext (csrc/runtime/launch_context.h).
//                             1-D grids; args are copied by value, like CUDA kernel parameters.
//   MOELINK_LAUNCH_COOPERATIVE(ctx, "name", kernel, grid_blocks, block_threads, smem, args...)
//                             The same for a grid whose blocks wait on each other: on the GPU a
//                             cooperative launch, which either makes every block co-resident or fails
//                             at launch with InvalidArgument naming the grid (instead of hanging);
//                             on the host every block is co-resident anyway.
#pragma once

#include "arch/types.h"

#if defined(__CUDACC__)
#include "arch_cuda.cuh"
#else
#include "arch_host.h"
#endif
