// Build attributes of the codec kernels (both targets). Included by every codec_*.cuh.
#pragma once

#include "arch/arch.cuh"

// Host target: the standalone codec kernels are compiled three times -- baseline x86-64 (SSE2),
// x86-64-v3 (AVX2) and x86-64-v4 (AVX-512) -- and the loader picks the best the CPU runs (GCC
// target_clones, an ifunc). Their per-channel loops are where the host spends its time, and SSE2
// lacks the blends, unsigned compares and widths they want. No FMA can appear in any clone: the
// host build has -ffp-contract=off (setup.py), which the bit-exactness tests would catch if lost.
// Every codec device function (MOELINK_CODEC_INLINE) and the kernels' lambdas
// (MOELINK_CODEC_LAMBDA) are always_inline on the host, so that the whole body lands in each
// clone and every loop is compiled for its ISA (an out-of-line helper would be baseline code).
// The GPU build and other compilers get a plain kernel.
#if !defined(__CUDACC__) && defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MOELINK_CODEC_KERNEL \
  MOELINK_KERNEL __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define MOELINK_CODEC_INLINE __attribute__((always_inline)) inline
#define MOELINK_CODEC_LAMBDA __attribute__((always_inline))  // after a lambda's parameter list
#else
#define MOELINK_CODEC_KERNEL MOELINK_KERNEL
#define MOELINK_CODEC_INLINE MOELINK_DEVICE
#define MOELINK_CODEC_LAMBDA
#endif
