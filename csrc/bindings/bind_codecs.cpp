// Python bindings of the codec ops (csrc/runtime/ops_codecs.h). moelink.codecs validates tensors
// and passes data_ptr() integers; dtype and format enums cross as ints.
#include "bindings/common.h"
#include "runtime/ops_codecs.h"

namespace moelink::bindings {

void bind_codecs(py::module_& m) {
  m.def(
      "fp8_quantize",
      [](uintptr_t x, int x_dtype, int64_t x_row_stride, int64_t num_tokens, int64_t hidden, int format,
         int scale_format, uintptr_t q, int64_t q_row_stride, uintptr_t scales, int64_t scales_row_stride, int split,
         uintptr_t stream, int rank) {
        Fp8QuantizeArgs args;
        args.split = static_cast<CodecLaneSplit>(split);
        args.x = ptr<const void>(x);
        args.x_dtype = static_cast<CodecDType>(x_dtype);
        args.x_row_stride = x_row_stride;
        args.num_tokens = num_tokens;
        args.hidden = hidden;
        args.format = static_cast<Fp8Format>(format);
        args.scale_format = static_cast<Fp8ScaleFormat>(scale_format);
        args.q = ptr<uint8_t>(q);
        args.q_row_stride = q_row_stride;
        args.scales = ptr<void>(scales);
        args.scales_row_stride = scales_row_stride;
        fp8_quantize(args, context(stream, rank));
      },
      "FP8 quantization kernel; dtype 0 = float32, 1 = bfloat16; format 0 = E4M3, 1 = E5M2; "
      "scale_format 0 = float32, 1 = UE8M0 packed in int32.",
      py::arg("x"), py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("num_tokens"), py::arg("hidden"),
      py::arg("format"), py::arg("scale_format"), py::arg("q"), py::arg("q_row_stride"), py::arg("scales"),
      py::arg("scales_row_stride"), py::arg("split") = 0, MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "fp8_dequantize",
      [](uintptr_t q, int64_t q_row_stride, int format, int scale_format, uintptr_t scales, int64_t scales_row_stride,
         int64_t num_tokens, int64_t hidden, uintptr_t out, int out_dtype, int64_t out_row_stride, int split,
         uintptr_t stream, int rank) {
        Fp8DequantizeArgs args;
        args.split = static_cast<CodecLaneSplit>(split);
        args.q = ptr<const uint8_t>(q);
        args.q_row_stride = q_row_stride;
        args.format = static_cast<Fp8Format>(format);
        args.scale_format = static_cast<Fp8ScaleFormat>(scale_format);
        args.scales = ptr<const void>(scales);
        args.scales_row_stride = scales_row_stride;
        args.num_tokens = num_tokens;
        args.hidden = hidden;
        args.out = ptr<void>(out);
        args.out_dtype = static_cast<CodecDType>(out_dtype);
        args.out_row_stride = out_row_stride;
        fp8_dequantize(args, context(stream, rank));
      },
      "FP8 dequantization kernel (enums as in fp8_quantize).", py::arg("q"), py::arg("q_row_stride"),
      py::arg("format"), py::arg("scale_format"), py::arg("scales"), py::arg("scales_row_stride"),
      py::arg("num_tokens"), py::arg("hidden"), py::arg("out"), py::arg("out_dtype"), py::arg("out_row_stride"),
      py::arg("split") = 0, MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "logfmt_encode",
      [](uintptr_t x, int x_dtype, int64_t x_row_stride, int64_t num_tokens, int64_t hidden, int bits,
         uintptr_t packed, int64_t packed_row_stride, int split, uintptr_t stream, int rank) {
        LogfmtEncodeArgs args;
        args.split = static_cast<CodecLaneSplit>(split);
        args.x = ptr<const void>(x);
        args.x_dtype = static_cast<CodecDType>(x_dtype);
        args.x_row_stride = x_row_stride;
        args.num_tokens = num_tokens;
        args.hidden = hidden;
        args.bits = bits;
        args.packed = ptr<uint8_t>(packed);
        args.packed_row_stride = packed_row_stride;
        logfmt_encode(args, context(stream, rank));
      },
      "LogFMT-n encoding kernel (n = bits); rows of logfmt_row_bytes(hidden, bits) bytes.", py::arg("x"),
      py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("num_tokens"), py::arg("hidden"), py::arg("bits"),
      py::arg("packed"), py::arg("packed_row_stride"), py::arg("split") = 0, MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "logfmt_decode",
      [](uintptr_t packed, int64_t packed_row_stride, int64_t num_tokens, int64_t hidden, int bits, uintptr_t out,
         int out_dtype, int64_t out_row_stride, int split, uintptr_t stream, int rank) {
        LogfmtDecodeArgs args;
        args.split = static_cast<CodecLaneSplit>(split);
        args.packed = ptr<const uint8_t>(packed);
        args.packed_row_stride = packed_row_stride;
        args.num_tokens = num_tokens;
        args.hidden = hidden;
        args.bits = bits;
        args.out = ptr<void>(out);
        args.out_dtype = static_cast<CodecDType>(out_dtype);
        args.out_row_stride = out_row_stride;
        logfmt_decode(args, context(stream, rank));
      },
      "LogFMT-n decoding kernel.", py::arg("packed"), py::arg("packed_row_stride"), py::arg("num_tokens"),
      py::arg("hidden"), py::arg("bits"), py::arg("out"), py::arg("out_dtype"), py::arg("out_row_stride"),
      py::arg("split") = 0, MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "mxfp8_quantize",
      [](uintptr_t x, int x_dtype, int64_t x_row_stride, int64_t num_tokens, int64_t hidden, int scale_mode, uintptr_t q,
         int64_t q_row_stride, uintptr_t scales, int64_t scales_row_stride, int split, uintptr_t stream, int rank) {
        Mxfp8QuantizeArgs args;
        args.x = ptr<const void>(x);
        args.x_dtype = static_cast<CodecDType>(x_dtype);
        args.x_row_stride = x_row_stride;
        args.num_tokens = num_tokens;
        args.hidden = hidden;
        args.scale_mode = static_cast<Mxfp8ScaleMode>(scale_mode);
        args.q = ptr<uint8_t>(q);
        args.q_row_stride = q_row_stride;
        args.scales = ptr<uint8_t>(scales);
        args.scales_row_stride = scales_row_stride;
        args.split = static_cast<CodecLaneSplit>(split);
        mxfp8_quantize(args, context(stream, rank));
      },
      "MXFP8 quantization kernel; scale_mode 0 = floor (OCP MX), 1 = rceil; scales are bytes.", py::arg("x"),
      py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("num_tokens"), py::arg("hidden"), py::arg("scale_mode"),
      py::arg("q"), py::arg("q_row_stride"), py::arg("scales"), py::arg("scales_row_stride"), py::arg("split") = 0,
      MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "mxfp8_dequantize",
      [](uintptr_t q, int64_t q_row_stride, uintptr_t scales, int64_t scales_row_stride, int64_t num_tokens,
         int64_t hidden, uintptr_t out, int out_dtype, int64_t out_row_stride, int split, uintptr_t stream, int rank) {
        Mxfp8DequantizeArgs args;
        args.q = ptr<const uint8_t>(q);
        args.q_row_stride = q_row_stride;
        args.scales = ptr<const uint8_t>(scales);
        args.scales_row_stride = scales_row_stride;
        args.num_tokens = num_tokens;
        args.hidden = hidden;
        args.out = ptr<void>(out);
        args.out_dtype = static_cast<CodecDType>(out_dtype);
        args.out_row_stride = out_row_stride;
        args.split = static_cast<CodecLaneSplit>(split);
        mxfp8_dequantize(args, context(stream, rank));
      },
      "MXFP8 dequantization kernel.", py::arg("q"), py::arg("q_row_stride"), py::arg("scales"),
      py::arg("scales_row_stride"), py::arg("num_tokens"), py::arg("hidden"), py::arg("out"), py::arg("out_dtype"),
      py::arg("out_row_stride"), py::arg("split") = 0, MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "nvfp4_quantize",
      [](uintptr_t x, int x_dtype, int64_t x_row_stride, int64_t num_tokens, int64_t hidden, uintptr_t global_scale,
         uintptr_t packed, int64_t packed_row_stride, uintptr_t scales, int64_t scales_row_stride, int split,
         uintptr_t stream, int rank) {
        Nvfp4QuantizeArgs args;
        args.x = ptr<const void>(x);
        args.x_dtype = static_cast<CodecDType>(x_dtype);
        args.x_row_stride = x_row_stride;
        args.num_tokens = num_tokens;
        args.hidden = hidden;
        args.global_scale = ptr<const float>(global_scale);
        args.packed = ptr<uint8_t>(packed);
        args.packed_row_stride = packed_row_stride;
        args.scales = ptr<uint8_t>(scales);
        args.scales_row_stride = scales_row_stride;
        args.split = static_cast<CodecLaneSplit>(split);
        nvfp4_quantize(args, context(stream, rank));
      },
      "NVFP4 quantization kernel; global_scale points at one float32 in the kernel's memory.", py::arg("x"),
      py::arg("x_dtype"), py::arg("x_row_stride"), py::arg("num_tokens"), py::arg("hidden"), py::arg("global_scale"),
      py::arg("packed"), py::arg("packed_row_stride"), py::arg("scales"), py::arg("scales_row_stride"),
      py::arg("split") = 0, MOELINK_CONTEXT_ARGS, release_gil());

  m.def(
      "nvfp4_dequantize",
      [](uintptr_t packed, int64_t packed_row_stride, uintptr_t scales, int64_t scales_row_stride, uintptr_t global_scale,
         int64_t num_tokens, int64_t hidden, uintptr_t out, int out_dtype, int64_t out_row_stride, int split,
         uintptr_t stream, int rank) {
        Nvfp4DequantizeArgs args;
        args.packed = ptr<const uint8_t>(packed);
        args.packed_row_stride = packed_row_stride;
        args.scales = ptr<const uint8_t>(scales);
        args.scales_row_stride = scales_row_stride;
        args.global_scale = ptr<const float>(global_scale);
        args.num_tokens = num_tokens;
        args.hidden = hidden;
        args.out = ptr<void>(out);
        args.out_dtype = static_cast<CodecDType>(out_dtype);
        args.out_row_stride = out_row_stride;
        args.split = static_cast<CodecLaneSplit>(split);
        nvfp4_dequantize(args, context(stream, rank));
      },
      "NVFP4 dequantization kernel.", py::arg("packed"), py::arg("packed_row_stride"), py::arg("scales"),
      py::arg("scales_row_stride"), py::arg("global_scale"), py::arg("num_tokens"), py::arg("hidden"), py::arg("out"),
      py::arg("out_dtype"), py::arg("out_row_stride"), py::arg("split") = 0, MOELINK_CONTEXT_ARGS, release_gil());

  m.def("logfmt_row_bytes", &logfmt_row_bytes, "Bytes of one LogFMT row (a multiple of 16).", py::arg("hidden"),
        py::arg("bits"));
}

}  // namespace moelink::bindings
