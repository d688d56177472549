// Payload codecs as standalone ops: FP8 (E4M3/E5M2, per-128-channel scales, float32 or UE8M0),
// MXFP8, NVFP4 and LogFMT-nBit (n = 8, 9, 10). Target-neutral declarations; ops_codecs.cu is compiled by g++ into
// moelink._host and by nvcc into moelink._cuda. The semantics, bit for bit, are those of
// python/moelink/reference/codecs/; docs/codecs.md has the wire layouts.
//
// Tensors are [num_tokens, hidden] with rows `*_row_stride` apart and unit stride along hidden.
// The Python layer (python/moelink/codecs.py) validates shapes, dtypes and devices and allocates
// outputs; the entry points below re-check only what would make a kernel write out of bounds.
#pragma once

#include <cstdint>

#include "launch_context.h"

namespace moelink {

enum class CodecDType : int32_t { kFloat32 = 0, kBFloat16 = 1 };
enum class Fp8Format : int32_t { kE4M3 = 0, kE5M2 = 1 };
enum class Fp8ScaleFormat : int32_t { kFloat32 = 0, kUe8m0 = 1 };

constexpr int kCodecGroup = 128;  // channels per FP8 scale group / LogFMT tile / kernel work item

// How the standalone kernels split a row's 128-channel tiles among a warp's lanes
// (kernels/codec_common.cuh). kAuto: as arch::lane_range suggests (whole tiles per lane on the
// host, one tile per warp on the GPU). kWarp: always one tile per warp through the warp-collective
// device functions -- the GPU's form, which tests run on the host to check it bit for bit.
enum class CodecLaneSplit : int32_t { kAuto = 0, kWarp = 1 };

struct Fp8QuantizeArgs {
  const void* x = nullptr;  // [num_tokens][hidden], x_dtype
  CodecDType x_dtype = CodecDType::kBFloat16;
  int64_t x_row_stride = 0;  // elements
  int64_t num_tokens = 0;
  int64_t hidden = 0;  // >= 1; the last group may be partial
  Fp8Format format = Fp8Format::kE4M3;
  Fp8ScaleFormat scale_format = Fp8ScaleFormat::kFloat32;
  uint8_t* q = nullptr;  // [num_tokens][hidden] FP8 bits
  int64_t q_row_stride = 0;  // bytes
  // float32 [num_tokens][ceil(hidden/128)], or int32 [num_tokens][ceil(hidden/512)] holding UE8M0
  // bytes (byte i of word j = group 4j + i, little-endian; missing groups 0). Fully overwritten.
  void* scales = nullptr;
  int64_t scales_row_stride = 0;  // elements (floats or int32 words)
  CodecLaneSplit split = CodecLaneSplit::kAuto;
};

struct Fp8DequantizeArgs {
  const uint8_t* q = nullptr;
  int64_t q_row_stride = 0;
  Fp8Format format = Fp8Format::kE4M3;
  Fp8ScaleFormat scale_format = Fp8ScaleFormat::kFloat32;
  const void* scales = nullptr;
  int64_t scales_row_stride = 0;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  void* out = nullptr;  // [num_tokens][hidden], out_dtype
  CodecDType out_dtype = CodecDType::kBFloat16;
  int64_t out_row_stride = 0;  // elements
  CodecLaneSplit split = CodecLaneSplit::kAuto;
};

struct LogfmtEncodeArgs {
  const void* x = nullptr;
  CodecDType x_dtype = CodecDType::kBFloat16;
  int64_t x_row_stride = 0;  // elements
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int bits = 8;  // 8, 9 or 10
  // [num_tokens][row_stride] bytes; each row gets logfmt_row_bytes(hidden, bits) bytes (padding
  // included, so every byte of a row is written). 16-byte aligned base and a row stride that is
  // a multiple of 16.
  uint8_t* packed = nullptr;
  int64_t packed_row_stride = 0;  // bytes
  CodecLaneSplit split = CodecLaneSplit::kAuto;
};

struct LogfmtDecodeArgs {
  const uint8_t* packed = nullptr;  // 16-byte aligned rows, as written by logfmt_encode
  int64_t packed_row_stride = 0;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  int bits = 8;
  void* out = nullptr;
  CodecDType out_dtype = CodecDType::kBFloat16;
  int64_t out_row_stride = 0;  // elements
  CodecLaneSplit split = CodecLaneSplit::kAuto;
};

// MXFP8 (OCP MX v1.0): E4M3 elements, one UE8M0 scale byte per 32 channels. kFloor: the spec's
// X = 2**(floor(log2 amax) - 8); kRceil: X = 2**ceil(log2(amax / 448)) (no element saturates).
enum class Mxfp8ScaleMode : int32_t { kFloor = 0, kRceil = 1 };
constexpr int kMxfp8Block = 32;

struct Mxfp8QuantizeArgs {
  const void* x = nullptr;  // [num_tokens][hidden], x_dtype
  CodecDType x_dtype = CodecDType::kBFloat16;
  int64_t x_row_stride = 0;  // elements
  int64_t num_tokens = 0;
  int64_t hidden = 0;  // >= 1; the last block may be partial
  Mxfp8ScaleMode scale_mode = Mxfp8ScaleMode::kFloor;
  uint8_t* q = nullptr;  // [num_tokens][hidden] E4M3 bits
  int64_t q_row_stride = 0;  // bytes
  uint8_t* scales = nullptr;  // [num_tokens][ceil(hidden/32)] UE8M0 bytes, byte j = block j
  int64_t scales_row_stride = 0;  // bytes
  CodecLaneSplit split = CodecLaneSplit::kAuto;
};

struct Mxfp8DequantizeArgs {
  const uint8_t* q = nullptr;
  int64_t q_row_stride = 0;
  const uint8_t* scales = nullptr;
  int64_t scales_row_stride = 0;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  void* out = nullptr;  // [num_tokens][hidden], out_dtype
  CodecDType out_dtype = CodecDType::kBFloat16;
  int64_t out_row_stride = 0;  // elements
  CodecLaneSplit split = CodecLaneSplit::kAuto;
};

// NVFP4: E2M1 elements (two per byte, even channel in the low nibble), one E4M3 scale byte per 16
// channels, and a float32 per-tensor encode scale g (decode = value * (block scale / g)).
constexpr int kNvfp4Block = 16;

struct Nvfp4QuantizeArgs {
  const void* x = nullptr;  // [num_tokens][hidden], x_dtype
  CodecDType x_dtype = CodecDType::kBFloat16;
  int64_t x_row_stride = 0;  // elements
  int64_t num_tokens = 0;
  int64_t hidden = 0;  // >= 1; the last block may be partial, an odd hidden leaves a 0 high nibble
  const float* global_scale = nullptr;  // one float32 g in [2**-100, 2**100], in the kernel's memory
  uint8_t* packed = nullptr;  // [num_tokens][ceil(hidden/2)] bytes
  int64_t packed_row_stride = 0;  // bytes
  uint8_t* scales = nullptr;  // [num_tokens][ceil(hidden/16)] E4M3 bytes
  int64_t scales_row_stride = 0;  // bytes
  CodecLaneSplit split = CodecLaneSplit::kAuto;
};

struct Nvfp4DequantizeArgs {
  const uint8_t* packed = nullptr;
  int64_t packed_row_stride = 0;
  const uint8_t* scales = nullptr;
  int64_t scales_row_stride = 0;
  const float* global_scale = nullptr;
  int64_t num_tokens = 0;
  int64_t hidden = 0;
  void* out = nullptr;
  CodecDType out_dtype = CodecDType::kBFloat16;
  int64_t out_row_stride = 0;  // elements
  CodecLaneSplit split = CodecLaneSplit::kAuto;
};

// Bytes of one LogFMT row: 8-byte header per tile padded to 16, dense payload padded to 16.
int64_t logfmt_row_bytes(int64_t hidden, int bits);

void fp8_quantize(const Fp8QuantizeArgs& args, const LaunchContext& ctx);
void fp8_dequantize(const Fp8DequantizeArgs& args, const LaunchContext& ctx);
void logfmt_encode(const LogfmtEncodeArgs& args, const LaunchContext& ctx);
void logfmt_decode(const LogfmtDecodeArgs& args, const LaunchContext& ctx);
void mxfp8_quantize(const Mxfp8QuantizeArgs& args, const LaunchContext& ctx);
void mxfp8_dequantize(const Mxfp8DequantizeArgs& args, const LaunchContext& ctx);
void nvfp4_quantize(const Nvfp4QuantizeArgs& args, const LaunchContext& ctx);
void nvfp4_dequantize(const Nvfp4DequantizeArgs& args, const LaunchContext& ctx);

}  // namespace moelink
