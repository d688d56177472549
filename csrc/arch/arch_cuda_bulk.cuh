// moelink device primitives, GPU half: 16-byte vectors and bulk (TMA) movement. Included by
// arch_cuda.cuh after the memory, waiting and warp primitives it builds on; the contract is in
// arch.cuh.
#pragma once

#if !defined(__CUDACC__)
#error "arch_cuda_bulk.cuh is part of the nvcc half of arch/arch.cuh: include arch/arch.cuh instead"
#endif

namespace moelink::arch {


MOELINK_DEVICE Vec16 load16(const void* p) {
  const int4 v = *static_cast<const int4*>(p);
  return Vec16{{static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                static_cast<uint32_t>(v.w)}};
}
// ld.global.nc: the read-only (texture) path. Only for memory nobody writes during the kernel:
// that cache is not coherent with writes made while the kernel runs.
MOELINK_DEVICE Vec16 load16_input(const void* p) {
  const int4 v = __ldg(static_cast<const int4*>(p));
  return Vec16{{static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y), static_cast<uint32_t>(v.z),
                static_cast<uint32_t>(v.w)}};
}
MOELINK_DEVICE void store16(void* p, const Vec16& v) {
  *static_cast<int4*>(p) = make_int4(static_cast<int>(v.w[0]), static_cast<int>(v.w[1]), static_cast<int>(v.w[2]),
                                     static_cast<int>(v.w[3]));
}

namespace detail {

// Lane-strided 16-byte accesses: on each step the participating lanes touch consecutive int4s,
// so a full warp moves 512 contiguous bytes per instruction. Four loads are issued before their
// stores so that each lane keeps several requests in flight (latency over NVLink is microseconds).
template <bool kInput>
MOELINK_DEVICE void warp_copy_impl(uint32_t mask, void* dst, const void* src, size_t bytes) {
  constexpr int kUnroll = 4;
  const unsigned lane = lane_id();
  const size_t stride = static_cast<size_t>(__popc(mask));
  const size_t count = bytes / sizeof(int4);
  // No __restrict__ for the coherent form: with it nvcc turns the loads into ld.global.nc, whose
  // read-only cache is not coherent with writes made by peers during the kernel (exactly what
  // src usually holds). The input form asks for that path on purpose.
  int4* d = static_cast<int4*>(dst);
  const int4* s = static_cast<const int4*>(src);
  auto load = [&](size_t i) { if constexpr (kInput) return __ldg(s + i); else return s[i]; };

  size_t i = static_cast<size_t>(__popc(mask & ((1u << lane) - 1)));  // rank among mask's lanes
  for (; i + (kUnroll - 1) * stride < count; i += kUnroll * stride) {
    int4 r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) r[u] = load(i + u * stride);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) d[i + u * stride] = r[u];
  }
  for (; i < count; i += stride) d[i] = load(i);
}

MOELINK_DEVICE uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

}  // namespace detail

MOELINK_DEVICE void warp_copy(uint32_t mask, void* dst, const void* src, size_t bytes) {
  detail::warp_copy_impl<false>(mask, dst, src, bytes);
}
MOELINK_DEVICE void warp_copy_input(uint32_t mask, void* dst, const void* src, size_t bytes) {
  detail::warp_copy_impl<true>(mask, dst, src, bytes);
}

// Staging of warp_bulk_copy: halves [0, H) and [H, 2H) (H = kBulkHalfBytes), mbarriers at 2H and 2H + 8. `phases`
// holds each mbarrier's current phase parity (bit h for half h); only the elected lane uses it.
struct BulkStage {
  unsigned char* smem;
  uint32_t phases;
};

MOELINK_DEVICE BulkStage bulk_stage(void* warp_smem) {
  BulkStage stage{static_cast<unsigned char*>(warp_smem), 0u};
  if (lane_id() == 0) {
    const uint32_t bar = detail::smem_address(stage.smem + 2 * kBulkHalfBytes);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar) : "memory");
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar + 8) : "memory");
    // The async proxy (the TMA unit) must see the initialised barriers.
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  __syncwarp();
  return stage;
}

// One elected lane streams `bytes` global -> shared -> global through the two halves: the load of
// chunk i+1 starts while the store of chunk i drains. The mbarrier's transaction count tells when
// a load landed; `wait_group.read 1` tells that the half about to be refilled was read out by its
// store; `wait_group 0` at the end that every store is performed, and the proxy fence orders those
// async-proxy writes before this thread's later generic accesses (the release that publishes them).
MOELINK_DEVICE void warp_bulk_copy(uint32_t mask, BulkStage& stage, void* dst, const void* src, size_t bytes) {
  if (lane_id() == static_cast<unsigned>(__ffs(mask) - 1)) {
    const uint32_t half0 = detail::smem_address(stage.smem);
    const uint32_t bar0 = half0 + 2 * kBulkHalfBytes;
    char* d = static_cast<char*>(dst);
    const char* s = static_cast<const char*>(src);
    int h = 0;
    for (size_t offset = 0; offset < bytes; offset += kBulkHalfBytes, h ^= 1) {
      const uint32_t chunk = static_cast<uint32_t>(bytes - offset < kBulkHalfBytes ? bytes - offset : kBulkHalfBytes);
      const uint32_t buffer = half0 + static_cast<uint32_t>(h) * kBulkHalfBytes;
      const uint32_t bar = bar0 + 8u * static_cast<uint32_t>(h);
      asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(chunk) : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                   ::"r"(buffer), "l"(s + offset), "r"(chunk), "r"(bar) : "memory");
      const uint32_t parity = (stage.phases >> h) & 1u;
      uint32_t done = 0;
      while (!done) {
        asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
      }
      stage.phases ^= 1u << h;
      asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(d + offset), "r"(buffer),
                   "r"(chunk) : "memory");
      asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    asm volatile("fence.proxy.async.global;" ::: "memory");
  }
  __syncwarp(mask);
}

}  // namespace moelink::arch
