// NCCL's public headers, included once for every file of csrc/transport/nccl/ and its bindings.
//
// moelink never links libnccl: these headers provide types, constants and declarations only.
// The declarations are used through decltype (nccl_library.h), so every function pointer has
// exactly the signature the headers give, and the compiler checks each call against them.
// nccl_device/host.h defines a static helper it does not use itself, hence the pragma.
//
// MOELINK_HAVE_NCCL is 1 when the build found NCCL >= 2.28 headers (setup.py adds the include
// directory of the nvidia-nccl wheel or MOELINK_NCCL_HOME), else 0: then csrc/transport/nccl/
// compiles to nothing and moelink._cuda.nccl says why it is unavailable.
#pragma once

#if __has_include(<nccl.h>) && __has_include(<nccl_device/host.h>)
#define MOELINK_HAVE_NCCL 1
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <nccl.h>
#include <nccl_device/host.h>
#pragma GCC diagnostic pop
#else
#define MOELINK_HAVE_NCCL 0
#endif
