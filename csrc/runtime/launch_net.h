// MOELINK_WITH_NET(net, ctx, launch...): runs the launch statement of a kernel that may post to the
// scale-out transport `net` (a transport::ScaleOut). On the GPU build a transport of kind kGin
// needs its pump beside the kernel (transport/nccl/gin_pump.h: started before, stopped after, on
// the kernel's stream, so whatever follows on that stream sees every put handed to the NIC); any
// other kind, and every launch on the host target (whose NIC is a thread of its own), runs the
// launch alone. Used by the internode and low-latency ops, whose kernels post puts and signals.
#pragma once

#if defined(__CUDACC__)
#include "transport/nccl/gin_pump.h"
#define MOELINK_WITH_NET(net, ctx, ...) ::moelink::transport::nccl::with_gin_pump((net), (ctx), [&] { __VA_ARGS__; })
#else
#define MOELINK_WITH_NET(net, ctx, ...) \
  do {                                  \
    __VA_ARGS__;                        \
  } while (0)
#endif
