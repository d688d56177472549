// libnccl.so.2, loaded at run time with dlopen: the only way moelink reaches NCCL.
//
// Why dlopen: moelink._cuda must import on machines without NCCL or a GPU, must not pick up
// whatever NCCL another library linked (torch's communicator is never used), and must say which
// file it loaded and why it refused one. The Python layer (moelink._nccl_windows) decides which
// path to load (MOELINK_NCCL_LIBRARY, else the nvidia-nccl wheel's lib/, else the loader's search
// path); this file loads exactly the path it is given.
//
// Contract of load_library(path):
//   - dlopen(path, RTLD_NOW | RTLD_LOCAL); every symbol in MOELINK_NCCL_SYMBOLS is resolved with
//     dlsym before anything is called, so a library lacking one is refused as a whole;
//   - ncclGetVersion() must report major 2, at least 2.28.0 (kMinimumVersion: the device API and
//     host-side LSA pointers) and at least the version of the headers moelink was compiled with
//     (kHeaderVersion). NCCL itself refuses device-API structs from newer headers than the
//     library (ncclCommQueryProperties checks the struct's version), so accepting an older
//     library here would only fail later with a vaguer message;
//   - the result is cached per path for the life of the process and never dlclose()d: NCCL keeps
//     threads and global state that must outlive every communicator;
//   - failures throw Error(kNcclUnavailable) naming the path and the reason (dlerror text, the
//     missing symbol, or both versions).
//
// NCCL errors. check() turns a failed ncclResult_t into a typed moelink error (error_kind):
//   ncclUnhandledCudaError -> kCudaError (a CUDA call inside NCCL failed)
//   ncclTimeout            -> kCommTimeout
//   any other failure      -> kNcclError
// with a message "<what> failed: <result name> (<NCCL's text>); NCCL: <ncclGetLastError>".
#pragma once

#include <string>
#include <vector>

#include "runtime/errors.h"
#include "transport/nccl/nccl_headers.h"

#if MOELINK_HAVE_NCCL

namespace moelink::transport::nccl {

// Every NCCL function moelink calls. X(name) is expanded once for the members of Library and
// once for the dlsym loop, so a function cannot be used without being resolved at load time.
#define MOELINK_NCCL_SYMBOLS(X) \
  X(ncclGetVersion)             \
  X(ncclGetErrorString)         \
  X(ncclGetLastError)           \
  X(ncclGetUniqueId)            \
  X(ncclCommInitRankConfig)     \
  X(ncclCommGetAsyncError)      \
  X(ncclCommFinalize)           \
  X(ncclCommDestroy)            \
  X(ncclCommAbort)              \
  X(ncclCommCount)              \
  X(ncclCommUserRank)           \
  X(ncclCommCuDevice)           \
  X(ncclCommQueryProperties)    \
  X(ncclMemAlloc)               \
  X(ncclMemFree)                \
  X(ncclCommWindowRegister)     \
  X(ncclCommWindowDeregister)   \
  X(ncclTeamLsa)                \
  X(ncclGetLsaDevicePointer)    \
  X(ncclDevCommCreate)          \
  X(ncclDevCommDestroy)

// NCCL_VERSION(2, 28, 0): symmetric windows with the device API, ncclGetLsaDevicePointer.
inline constexpr int kMinimumVersion = 22800;
// The version of the headers this build was compiled with (nccl.h's NCCL_VERSION_CODE).
inline constexpr int kHeaderVersion = NCCL_VERSION_CODE;

struct Library {
  std::string path;           // as given to dlopen
  std::string resolved_path;  // the file the loader mapped (dladdr), for messages
  int version = 0;            // ncclGetVersion()
#define MOELINK_NCCL_MEMBER(name) decltype(&::name) name = nullptr;
  MOELINK_NCCL_SYMBOLS(MOELINK_NCCL_MEMBER)
#undef MOELINK_NCCL_MEMBER
};

// Loads (once per path) and validates the library; see the contract above.
const Library& load_library(const std::string& path);

// Names of MOELINK_NCCL_SYMBOLS, in order (for diagnostics and tests).
std::vector<std::string> symbol_names();

// "2.32.3" for 23203 (and the pre-2.9 encoding, 2.8.4 for 2804).
std::string version_text(int code);

// Empty when a library reporting `library_version` may be used by a build made with headers of
// `header_version`; otherwise the reason, in a sentence.
std::string version_problem(int library_version, int header_version = kHeaderVersion);

// "ncclSystemError" etc.; "ncclResult(<n>)" for values the headers do not name.
std::string result_name(ncclResult_t result);

ErrorKind error_kind(ncclResult_t result);

// "<what> failed: <result name> (<NCCL's text>); NCCL: <last error>" for a failed `result`.
// `lib` and `comm` may be null; with `lib`, NCCL's error string and last-error text are added.
std::string failure_message(const Library* lib, ncclComm_t comm, ncclResult_t result, const std::string& what);

// Throws Error(error_kind(result), failure_message(...)) for a failed `result` (not ncclSuccess).
[[noreturn]] void throw_result(const Library* lib, ncclComm_t comm, ncclResult_t result,
                               const std::string& what);

inline void check(const Library& lib, ncclComm_t comm, ncclResult_t result, const std::string& what) {
  if (result != ncclSuccess) throw_result(&lib, comm, result, what);
}

}  // namespace moelink::transport::nccl

#endif  // MOELINK_HAVE_NCCL
