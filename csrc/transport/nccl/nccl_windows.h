// GPU windows: one rank's NCCL symmetric window and the LSA pointers of its node's windows.
//
// This is the GPU counterpart of transport/host/host_windows.h: kernels receive a table of window
// bases, one per rank of their node, and reach a peer's window with ordinary loads, stores and
// atomics. On the GPU those bases are NCCL's LSA ("load/store accessible") pointers into the
// symmetric window every rank registered: NCCL maps each LSA peer's allocation into this process
// (CUDA VMM, over NVLink or PCIe P2P), so the kernels need no NCCL device code for scale-up.
//
// Bootstrap (python/moelink/_nccl_windows.py drives it over the user's process group; every step
// is collective there, so a rank that fails makes every rank fail instead of leaving it waiting):
//   1. Windows(lib, rank, num_ranks, device): nothing is created yet;
//   2. init_communicator(id, timeout): a non-blocking NCCL communicator (config.blocking = 0) from
//      the unique id rank 0 generated; completion is polled with a deadline; on error or
//      timeout the communicator is aborted (ncclCommAbort) before the error is thrown. Then the
//      communicator's properties are checked: rank, size, device, and device-API support;
//   3. allocate(data_bytes): ncclMemAlloc of the window (below), zeroed; local only;
//   4. register_window(timeout): ncclCommWindowRegister(..., NCCL_WIN_COLL_SYMMETRIC), polled
//      like step 2 (NCCL synchronises the ranks inside it); then the LSA team (ncclTeamLsa) is
//      checked against moelink's node convention and ncclGetLsaDevicePointer gives every LSA
//      peer's window base.
//
// Window layout (byte offsets from every rank's window base; identical on every rank)
//   [0, D)            data: D = data_bytes rounded up to 4096, zero after allocate(). Kernels
//                     address it as base[peer] + offset. Its contents are the kernels' business
//                     (docs/buffer-layout.md).
//   [D, D + 4096)     control page, zero after allocate():
//     D + 0             u64  bytes_moved[nvl]   payload bytes this rank wrote into other ranks'
//                                               windows of its node (device atomics, relaxed)
//     D + 128           u64  bytes_moved[rdma]  payload bytes this rank's network binding sent
//     D + 256 ...       reserved (zero). A scale-out window's GIN signals are the first u64s of
//                       its data (transport/scaleout.cuh, "Addressing")
//   Every counter has its own 128-byte line: different SMs update them concurrently.
//
// LSA team and moelink's nodes. NCCL's LSA team is a run of consecutive ranks, the same size on
// every rank (NCCL uses the gcd of the nodes' rank counts), and lsa_rank = rank % lsa_size. That
// is moelink's convention for ranks_per_node, which the bootstrap sets to lsa_size (or to a
// divisor of it, to pose as smaller nodes). register_window() refuses any other shape.
//
// Teardown.
//   close(timeout): the orderly path. Deregisters the window, frees the allocation, finalizes the
//     communicator (polled with the deadline) and destroys it; any failure aborts instead. Local:
//     it does not wait for peers, but the caller must first make sure no kernel of this rank still
//     uses the windows (the Buffer synchronises its stream), since peer mappings go away.
//   abort(): never blocks on a peer: ncclCommAbort, then frees the allocation. The destructor
//     aborts a Windows that was not closed. Peers that still write into this rank's memory write
//     into physical memory that stays allocated until they too release it (CUDA VMM reference
//     counting), never into memory reused by someone else.
//
// Errors: NCCL failures as in nccl_library.h, with "nccl windows (rank r of n, device d): <step>"
// in front; a step that misses its deadline throws kCommTimeout; CUDA failures kCudaError; no
// usable device kGpuUnavailable; calling a step out of order kInvalidArgument. Not thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "transport/nccl/nccl_library.h"

#if MOELINK_HAVE_NCCL

namespace moelink::transport::nccl {

inline constexpr std::size_t kWindowAlignment = 4096;  // NCCL_WIN_REQUIRED_ALIGNMENT
inline constexpr std::size_t kControlBytes = 4096;
inline constexpr std::size_t kCounterOffset[2] = {0, 128};  // by link: 0 = nvl, 1 = rdma

struct LsaTeam {
  int rank = -1, size = 0, stride = 0;
};

class Windows {
 public:
  enum class State { kCreated, kCommReady, kAllocated, kRegistered, kClosed, kAborted };

  Windows(const Library& lib, int rank, int num_ranks, int device);
  Windows(const Windows&) = delete;
  Windows& operator=(const Windows&) = delete;
  ~Windows();  // abort() unless closed

  // Steps 2-4 of the bootstrap; each requires the previous one.
  void init_communicator(const ncclUniqueId& id, double timeout_s);
  void allocate(std::size_t data_bytes);
  void register_window(double timeout_s);

  // Identity and state.
  int rank() const { return rank_; }
  int num_ranks() const { return num_ranks_; }
  int device() const { return device_; }
  State state() const { return state_; }
  const Library& library() const { return lib_; }
  const ncclCommProperties_t& properties() const;  // after init_communicator

  // After register_window.
  std::size_t data_bytes() const { return data_bytes_; }
  std::size_t window_bytes() const { return data_bytes_ + kControlBytes; }
  LsaTeam lsa_team() const;
  std::vector<uintptr_t> lsa_window_ptrs() const;  // window base of every LSA rank, by LSA rank
  uintptr_t local_ptr() const;                     // this rank's own allocation (ncclMemAlloc)
  uintptr_t counter_ptr(int link) const;           // device address of bytes_moved[link]
  uint64_t read_counter(int link) const;           // copies it to the host (private stream)
  void reset_counters();

  void close(double timeout_s);
  void abort() noexcept;

  // For the GIN transport (gin_transport.h), after register_window: the communicator and the
  // window's device handle, and the non-blocking communicator's completion poll (aborts and
  // throws on error or when `timeout_s` passes, as every step here does).
  ncclComm_t comm() const;
  ncclWindow_t window() const;
  void wait_ready(const std::string& step, double timeout_s);
  std::string where(const std::string& step) const;

 private:
  void require(State expected, const char* step) const;
  [[noreturn]] void fail(ncclResult_t result, const std::string& step);  // aborts, then throws
  void check_communicator();
  void collect_lsa_pointers();

  const Library& lib_;
  int rank_, num_ranks_, device_;
  State state_ = State::kCreated;
  ncclConfig_t config_;  // kept alive: NCCL may read it while a non-blocking init runs
  ncclComm_t comm_ = nullptr;
  ncclWindow_t window_ = nullptr;  // written by NCCL when a non-blocking registration completes
  ncclCommProperties_t properties_;
  void* local_ = nullptr;
  std::size_t data_bytes_ = 0;
  LsaTeam lsa_;
  std::vector<uintptr_t> lsa_ptrs_;
};

const char* state_name(Windows::State state);

}  // namespace moelink::transport::nccl

#endif  // MOELINK_HAVE_NCCL
