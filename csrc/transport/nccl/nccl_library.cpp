// libnccl.so.2 through dlopen (contract in nccl_library.h).
#include "transport/nccl/nccl_library.h"

#if MOELINK_HAVE_NCCL

#include <dlfcn.h>

#include <map>
#include <memory>
#include <mutex>

namespace moelink::transport::nccl {
namespace {

[[noreturn]] void unavailable(const std::string& path, const std::string& why) {
  throw Error(ErrorKind::kNcclUnavailable,
              "NCCL library '" + path + "' cannot be used: " + why +
                  ". moelink loads the nvidia-nccl-cu12/-cu13 wheel's lib/libnccl.so.2, or the file "
                  "named by MOELINK_NCCL_LIBRARY");
}

std::unique_ptr<Library> open_library(const std::string& path) {
  dlerror();  // clear any stale message
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    unavailable(path, std::string("dlopen failed: ") + (why ? why : "unknown error"));
  }
  // From here on the handle is deliberately never closed, even on failure: a library that ran
  // its constructors may have started threads, and unloading it under them would crash.
  auto lib = std::make_unique<Library>();
  lib->path = path;
  std::vector<std::string> missing;
#define MOELINK_NCCL_RESOLVE(name)                                            \
  lib->name = reinterpret_cast<decltype(&::name)>(dlsym(handle, #name));      \
  if (lib->name == nullptr) missing.push_back(#name);
  MOELINK_NCCL_SYMBOLS(MOELINK_NCCL_RESOLVE)
#undef MOELINK_NCCL_RESOLVE
  if (!missing.empty()) {
    std::string list;
    for (const std::string& name : missing) list += (list.empty() ? "" : ", ") + name;
    unavailable(path, "it does not export " + list + " (not an NCCL >= 2.28 library)");
  }
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(lib->ncclGetVersion), &info) != 0 && info.dli_fname != nullptr) {
    lib->resolved_path = info.dli_fname;
  } else {
    lib->resolved_path = path;
  }
  int version = 0;
  const ncclResult_t result = lib->ncclGetVersion(&version);
  if (result != ncclSuccess) unavailable(path, "ncclGetVersion failed with " + result_name(result));
  lib->version = version;
  if (const std::string problem = version_problem(version); !problem.empty()) unavailable(path, problem);
  return lib;
}

}  // namespace

const Library& load_library(const std::string& path) {
  if (path.empty()) throw Error(ErrorKind::kInvalidArgument, "path: expected a library path or name, got ''");
  static std::mutex mutex;
  static auto* loaded = new std::map<std::string, std::unique_ptr<Library>>();  // never destroyed
  std::lock_guard<std::mutex> lock(mutex);
  auto it = loaded->find(path);
  if (it == loaded->end()) it = loaded->emplace(path, open_library(path)).first;
  return *it->second;
}

std::vector<std::string> symbol_names() {
  std::vector<std::string> names;
#define MOELINK_NCCL_NAME(name) names.emplace_back(#name);
  MOELINK_NCCL_SYMBOLS(MOELINK_NCCL_NAME)
#undef MOELINK_NCCL_NAME
  return names;
}

std::string version_text(int code) {
  // NCCL_VERSION(X, Y, Z): X*1000 + Y*100 + Z up to 2.8, X*10000 + Y*100 + Z from 2.9 on.
  const bool old_encoding = code < 20900;
  const int major = old_encoding ? code / 1000 : code / 10000;
  const int minor = old_encoding ? (code % 1000) / 100 : (code % 10000) / 100;
  const int patch = code % 100;
  return std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch);
}

std::string version_problem(int library_version, int header_version) {
  const auto major = [](int code) { return code < 20900 ? code / 1000 : code / 10000; };
  const std::string have = "the library is NCCL " + version_text(library_version);
  if (major(library_version) != major(header_version)) {
    return have + " but moelink was built with the headers of NCCL " + version_text(header_version) +
           " (a different major version)";
  }
  if (library_version < kMinimumVersion) {
    return have + "; moelink needs NCCL >= " + version_text(kMinimumVersion) +
           " (symmetric windows and the device API)";
  }
  if (library_version < header_version) {
    return have + ", older than the NCCL " + version_text(header_version) +
           " headers moelink was built with (NCCL rejects device-API structs from newer headers); "
           "upgrade the nvidia-nccl wheel, or rebuild moelink with MOELINK_NCCL_HOME pointing at "
           "headers of this version";
  }
  return std::string();
}

std::string result_name(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "ncclSuccess";
    case ncclUnhandledCudaError: return "ncclUnhandledCudaError";
    case ncclSystemError: return "ncclSystemError";
    case ncclInternalError: return "ncclInternalError";
    case ncclInvalidArgument: return "ncclInvalidArgument";
    case ncclInvalidUsage: return "ncclInvalidUsage";
    case ncclRemoteError: return "ncclRemoteError";
    case ncclInProgress: return "ncclInProgress";
    case ncclTimeout: return "ncclTimeout";
    case ncclNumResults: break;
  }
  return "ncclResult(" + std::to_string(static_cast<int>(result)) + ")";
}

ErrorKind error_kind(ncclResult_t result) {
  switch (result) {
    case ncclUnhandledCudaError: return ErrorKind::kCudaError;
    case ncclTimeout: return ErrorKind::kCommTimeout;
    default: return ErrorKind::kNcclError;
  }
}

std::string failure_message(const Library* lib, ncclComm_t comm, ncclResult_t result, const std::string& what) {
  std::string message = what + " failed: " + result_name(result);
  if (lib != nullptr) {
    const char* text = lib->ncclGetErrorString(result);
    if (text != nullptr && *text != '\0') message += std::string(" (") + text + ")";
    const char* last = lib->ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') message += std::string("; NCCL: ") + last;
  }
  return message;
}

void throw_result(const Library* lib, ncclComm_t comm, ncclResult_t result, const std::string& what) {
  throw Error(error_kind(result), failure_message(lib, comm, result, what));
}

}  // namespace moelink::transport::nccl

#endif  // MOELINK_HAVE_NCCL
