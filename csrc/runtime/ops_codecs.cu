// Compiled by g++ into moelink._host and by nvcc into moelink._cuda.
#include "runtime/ops_codecs.h"

#include <string>

#include "kernels/codec_fp8.cuh"
#include "kernels/codec_logfmt_kernels.cuh"
#include "kernels/codec_mxfp8.cuh"
#include "kernels/codec_nvfp4.cuh"
#include "runtime/errors.h"

namespace moelink {

namespace {

[[noreturn]] void fail(const char* op, const std::string& what) {
  throw Error(ErrorKind::kInvalidArgument, std::string(op) + ": " + what);
}

// What would let a kernel index out of bounds or misread its own output; the Python layer has
// already checked user input with named arguments.
void check_rows(const char* op, int64_t num_tokens, int64_t hidden) {
  if (num_tokens < 0) fail(op, "negative num_tokens");
  if (hidden < 1) fail(op, "hidden must be >= 1");
}

bool valid_dtype(CodecDType d) { return d == CodecDType::kFloat32 || d == CodecDType::kBFloat16; }

void check_split(const char* op, CodecLaneSplit split) {
  if (split != CodecLaneSplit::kAuto && split != CodecLaneSplit::kWarp) fail(op, "unknown lane split");
}

int64_t blocks_of(int64_t hidden, int block) { return (hidden + block - 1) / block; }

void check_fp8_kinds(const char* op, Fp8Format format, Fp8ScaleFormat scale_format) {
  if (format != Fp8Format::kE4M3 && format != Fp8Format::kE5M2) fail(op, "unknown FP8 format");
  if (scale_format != Fp8ScaleFormat::kFloat32 && scale_format != Fp8ScaleFormat::kUe8m0)
    fail(op, "unknown scale format");
}

int64_t scale_columns(int64_t hidden, Fp8ScaleFormat scale_format) {
  const int64_t groups = kernels::codec::num_groups(hidden);
  return scale_format == Fp8ScaleFormat::kFloat32 ? groups : (groups + 3) / 4;
}

// LogFMT rows hold at least row_bytes and start 16-byte aligned (the kernels' word accesses).
void check_packed_rows(const char* op, const uint8_t* packed, int64_t row_stride, int64_t row_bytes) {
  if (row_stride < row_bytes) fail(op, "a row stride is shorter than its row");
  if (reinterpret_cast<uintptr_t>(packed) % 16 != 0 || row_stride % 16 != 0)
    fail(op, "packed rows must be 16-byte aligned");
}

}  // namespace

int64_t logfmt_row_bytes(int64_t hidden, int bits) {
  if (bits < 8 || bits > 10) fail("logfmt_row_bytes", "bits must be 8, 9 or 10");
  if (hidden < 1) fail("logfmt_row_bytes", "hidden must be >= 1");
  return kernels::codec::logfmt_row_layout(hidden, bits).row_bytes;
}

void fp8_quantize(const Fp8QuantizeArgs& args, const LaunchContext& ctx) {
  constexpr const char* op = "fp8_quantize";
  check_rows(op, args.num_tokens, args.hidden);
  check_split(op, args.split);
  check_fp8_kinds(op, args.format, args.scale_format);
  if (!valid_dtype(args.x_dtype)) fail(op, "x must be float32 or bfloat16");
  if (args.num_tokens == 0) return;
  if (!args.x || !args.q || !args.scales) fail(op, "null pointer");
  if (args.x_row_stride < args.hidden || args.q_row_stride < args.hidden ||
      args.scales_row_stride < scale_columns(args.hidden, args.scale_format))
    fail(op, "a row stride is shorter than its row");
  kernels::codec::launch_fp8_quantize(args, ctx);
}

void fp8_dequantize(const Fp8DequantizeArgs& args, const LaunchContext& ctx) {
  constexpr const char* op = "fp8_dequantize";
  check_rows(op, args.num_tokens, args.hidden);
  check_split(op, args.split);
  check_fp8_kinds(op, args.format, args.scale_format);
  if (!valid_dtype(args.out_dtype)) fail(op, "out must be float32 or bfloat16");
  if (args.num_tokens == 0) return;
  if (!args.q || !args.scales || !args.out) fail(op, "null pointer");
  if (args.q_row_stride < args.hidden || args.out_row_stride < args.hidden ||
      args.scales_row_stride < scale_columns(args.hidden, args.scale_format))
    fail(op, "a row stride is shorter than its row");
  kernels::codec::launch_fp8_dequantize(args, ctx);
}

void logfmt_encode(const LogfmtEncodeArgs& args, const LaunchContext& ctx) {
  constexpr const char* op = "logfmt_encode";
  check_rows(op, args.num_tokens, args.hidden);
  check_split(op, args.split);
  const int64_t row_bytes = logfmt_row_bytes(args.hidden, args.bits);
  if (!valid_dtype(args.x_dtype)) fail(op, "x must be float32 or bfloat16");
  if (args.num_tokens == 0) return;
  if (!args.x || !args.packed) fail(op, "null pointer");
  if (args.x_row_stride < args.hidden) fail(op, "a row stride is shorter than its row");
  check_packed_rows(op, args.packed, args.packed_row_stride, row_bytes);
  kernels::codec::launch_logfmt_encode(args, ctx);
}

void logfmt_decode(const LogfmtDecodeArgs& args, const LaunchContext& ctx) {
  constexpr const char* op = "logfmt_decode";
  check_rows(op, args.num_tokens, args.hidden);
  check_split(op, args.split);
  const int64_t row_bytes = logfmt_row_bytes(args.hidden, args.bits);
  if (!valid_dtype(args.out_dtype)) fail(op, "out must be float32 or bfloat16");
  if (args.num_tokens == 0) return;
  if (!args.packed || !args.out) fail(op, "null pointer");
  if (args.out_row_stride < args.hidden) fail(op, "a row stride is shorter than its row");
  check_packed_rows(op, args.packed, args.packed_row_stride, row_bytes);
  kernels::codec::launch_logfmt_decode(args, ctx);
}

void mxfp8_quantize(const Mxfp8QuantizeArgs& args, const LaunchContext& ctx) {
  constexpr const char* op = "mxfp8_quantize";
  check_rows(op, args.num_tokens, args.hidden);
  check_split(op, args.split);
  if (args.scale_mode != Mxfp8ScaleMode::kFloor && args.scale_mode != Mxfp8ScaleMode::kRceil)
    fail(op, "unknown scale mode");
  if (!valid_dtype(args.x_dtype)) fail(op, "x must be float32 or bfloat16");
  if (args.num_tokens == 0) return;
  if (!args.x || !args.q || !args.scales) fail(op, "null pointer");
  if (args.x_row_stride < args.hidden || args.q_row_stride < args.hidden ||
      args.scales_row_stride < blocks_of(args.hidden, kMxfp8Block))
    fail(op, "a row stride is shorter than its row");
  kernels::codec::launch_mxfp8_quantize(args, ctx);
}

void mxfp8_dequantize(const Mxfp8DequantizeArgs& args, const LaunchContext& ctx) {
  constexpr const char* op = "mxfp8_dequantize";
  check_rows(op, args.num_tokens, args.hidden);
  check_split(op, args.split);
  if (!valid_dtype(args.out_dtype)) fail(op, "out must be float32 or bfloat16");
  if (args.num_tokens == 0) return;
  if (!args.q || !args.scales || !args.out) fail(op, "null pointer");
  if (args.q_row_stride < args.hidden || args.out_row_stride < args.hidden ||
      args.scales_row_stride < blocks_of(args.hidden, kMxfp8Block))
    fail(op, "a row stride is shorter than its row");
  kernels::codec::launch_mxfp8_dequantize(args, ctx);
}

void nvfp4_quantize(const Nvfp4QuantizeArgs& args, const LaunchContext& ctx) {
  constexpr const char* op = "nvfp4_quantize";
  check_rows(op, args.num_tokens, args.hidden);
  check_split(op, args.split);
  if (!valid_dtype(args.x_dtype)) fail(op, "x must be float32 or bfloat16");
  if (args.num_tokens == 0) return;
  if (!args.x || !args.packed || !args.scales || !args.global_scale) fail(op, "null pointer");
  if (args.x_row_stride < args.hidden || args.packed_row_stride < blocks_of(args.hidden, 2) ||
      args.scales_row_stride < blocks_of(args.hidden, kNvfp4Block))
    fail(op, "a row stride is shorter than its row");
  kernels::codec::launch_nvfp4_quantize(args, ctx);
}

void nvfp4_dequantize(const Nvfp4DequantizeArgs& args, const LaunchContext& ctx) {
  constexpr const char* op = "nvfp4_dequantize";
  check_rows(op, args.num_tokens, args.hidden);
  check_split(op, args.split);
  if (!valid_dtype(args.out_dtype)) fail(op, "out must be float32 or bfloat16");
  if (args.num_tokens == 0) return;
  if (!args.packed || !args.scales || !args.global_scale || !args.out) fail(op, "null pointer");
  if (args.packed_row_stride < blocks_of(args.hidden, 2) || args.out_row_stride < args.hidden ||
      args.scales_row_stride < blocks_of(args.hidden, kNvfp4Block))
    fail(op, "a row stride is shorter than its row");
  kernels::codec::launch_nvfp4_dequantize(args, ctx);
}

}  // namespace moelink
