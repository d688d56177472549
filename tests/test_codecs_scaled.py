"""The MXFP8 and NVFP4 kernels (moelink.codecs) against moelink.reference.codecs, bit for bit, on
fresh random inputs, random float32 bit patterns and the edge-case zoo of test_codecs.py, in both
lane splits (the host's and the GPU's form) and under several SIMT schedules; every output byte
defined; every validation."""

from __future__ import annotations

import pytest
import torch

import moelink
from moelink import _backend, codecs, errors, runtime
from moelink.reference import codecs as ref
from test_codecs import SCHEDULES, SPLITS, assert_bitwise, edge_case_input, random_input

OUT_DTYPES = (torch.float32, torch.bfloat16)


def _run(schedule, fn, *args, **kwargs):
    with runtime.scheduled(schedule):
        return fn(*args, **kwargs)


def _check_mxfp8(x, mode, schedule, split, what):
    q, s = _run(schedule, codecs.mxfp8_quantize, x, mode, split=split)
    q_ref, s_ref = ref.mxfp8_quantize(x, mode)
    assert_bitwise(q, q_ref, f"{what}: q")
    assert_bitwise(s, s_ref, f"{what}: scales")
    for out_dtype in OUT_DTYPES:
        y = _run(schedule, codecs.mxfp8_dequantize, q, s, out_dtype, split=split)
        assert_bitwise(y, ref.mxfp8_dequantize(q_ref, s_ref, out_dtype), f"{what}: dequantized {out_dtype}")


def _check_nvfp4(x, global_scale, schedule, split, what):
    packed, bs, g = _run(schedule, codecs.nvfp4_quantize, x, global_scale, split=split)
    packed_ref, bs_ref, g_ref = ref.nvfp4_quantize(x, global_scale)
    assert_bitwise(g, g_ref, f"{what}: global scale")
    assert_bitwise(packed, packed_ref, f"{what}: packed")
    assert_bitwise(bs, bs_ref, f"{what}: block scales")
    for out_dtype in OUT_DTYPES:
        y = _run(schedule, codecs.nvfp4_dequantize, packed, bs, g, x.shape[1], out_dtype, split=split)
        want = ref.nvfp4_dequantize(packed_ref, bs_ref, g_ref, x.shape[1], out_dtype)
        assert_bitwise(y, want, f"{what}: dequantized {out_dtype}")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_random_inputs_match_reference(seed, schedule, split):
    gen = torch.Generator().manual_seed(seed)
    for case in range(6):
        x = random_input(gen)
        what = f"case {case}: {x.dtype}{tuple(x.shape)} strides {x.stride()}"
        for mode in ("floor", "rceil"):
            _check_mxfp8(x, mode, schedule, split, f"{what} mxfp8/{mode}")
        g = float(torch.exp(torch.randn(1, generator=gen) * 5).item())
        for global_scale in (None, g, torch.tensor([g])):
            _check_nvfp4(x, global_scale, schedule, split, f"{what} nvfp4 g={global_scale}")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [200, 256, 19])
def test_edge_cases_match_reference(dtype, hidden, split):
    x = edge_case_input(dtype, max(hidden, 200))[:, :hidden]
    for mode in ("floor", "rceil"):
        _check_mxfp8(x, mode, "deterministic", split, f"edge cases mxfp8/{mode} {dtype}")
    for global_scale in (None, 1.0, 2.0**100, 2.0**-100):
        _check_nvfp4(x, global_scale, "deterministic", split, f"edge cases nvfp4 g={global_scale} {dtype}")


@pytest.mark.parametrize("split", SPLITS)
def test_random_bit_patterns_match_reference(seed, split):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**31), 2**31 - 1, (12, 384), generator=gen, dtype=torch.int64).to(torch.int32)
    x = raw.view(torch.float32)
    x[6:] = x[6:] * 2.0**-100
    for mode in ("floor", "rceil"):
        _check_mxfp8(x, mode, "random:3", split, f"bit patterns mxfp8/{mode}")
    _check_nvfp4(x, None, "random:4", split, "bit patterns nvfp4")
    _check_nvfp4(x, 7.5, "deterministic", split, "bit patterns nvfp4, g 7.5")


@pytest.mark.parametrize("split", SPLITS)
def test_decoders_accept_any_scale_byte(seed, split):
    """Scales read off the wire may be anything: 0, 0xFF, negative or NaN E4M3 bytes."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 256, (7, 200), generator=gen, dtype=torch.uint8)
    s = torch.randint(0, 256, (7, 7), generator=gen, dtype=torch.uint8)
    s[0, :4] = torch.tensor([0, 255, 254, 1], dtype=torch.uint8)
    for out_dtype in OUT_DTYPES:
        assert_bitwise(codecs.mxfp8_dequantize(q.view(torch.float8_e4m3fn), s, out_dtype, split=split),
                       ref.mxfp8_dequantize(q.view(torch.float8_e4m3fn), s, out_dtype), "mxfp8 any byte")
    packed = torch.randint(0, 256, (7, 100), generator=gen, dtype=torch.uint8)
    bs = torch.randint(0, 256, (7, 13), generator=gen, dtype=torch.uint8).view(torch.float8_e4m3fn)
    for g in (1.0, 2.0**-100, 2.0**100, 3.7):
        for out_dtype in OUT_DTYPES:
            assert_bitwise(codecs.nvfp4_dequantize(packed, bs, g, 200, out_dtype, split=split),
                           ref.nvfp4_dequantize(packed, bs, g, 200, out_dtype), f"nvfp4 any byte, g {g}")


@pytest.mark.parametrize("split", [0, 1])
def test_encoders_write_every_byte(split):
    host = _backend.host()
    for hidden in (200, 19, 1):
        x = torch.randn(3, hidden)
        g = ref.nvfp4_global_scale(x)
        for junk in (0x00, 0xA5, 0xFF):
            q = torch.full((3, hidden), junk, dtype=torch.uint8)
            s = torch.full((3, ref.mxfp8_num_blocks(hidden)), junk, dtype=torch.uint8)
            host.mxfp8_quantize(x.data_ptr(), 0, hidden, 3, hidden, 0, q.data_ptr(), hidden, s.data_ptr(), s.shape[1],
                                split)
            q_ref, s_ref = ref.mxfp8_quantize(x)
            assert torch.equal(q, q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
            p = torch.full((3, ref.nvfp4_row_bytes(hidden)), junk, dtype=torch.uint8)
            b = torch.full((3, ref.nvfp4_num_blocks(hidden)), junk, dtype=torch.uint8)
            host.nvfp4_quantize(x.data_ptr(), 0, hidden, 3, hidden, g.data_ptr(), p.data_ptr(), p.shape[1],
                                b.data_ptr(), b.shape[1], split)
            p_ref, b_ref, _ = ref.nvfp4_quantize(x)
            assert torch.equal(p, p_ref) and torch.equal(b, b_ref.view(torch.uint8))


def test_round_trip_error_bounds(seed):
    """Documented bounds (docs/codecs.md): MXFP8 with rceil scales within half an E4M3 step of
    every element; NVFP4's relative RMS error on Gaussian rows below 12 %."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 7168, generator=gen).bfloat16()
    xf = x.float()
    q, s = codecs.mxfp8_quantize(x, "rceil")
    y = codecs.mxfp8_dequantize(q, s, torch.float32)
    scale = ref.mxfp8_scale_value(s).repeat_interleave(32, dim=1)
    assert ((y - xf).abs() <= torch.maximum(xf.abs() / 16, scale * 2.0**-10)).all()
    y4 = codecs.nvfp4_dequantize(*codecs.nvfp4_quantize(x), 7168, torch.float32)
    assert ((y4 - xf).norm() / xf.norm()).item() < 0.12


def test_strided_rows_and_empty_inputs():
    wide = torch.randn(5, 300)
    x = wide[:, 7:263]  # rows 300 apart, a start that breaks 16-byte alignment
    _check_mxfp8(x, "floor", "deterministic", "auto", "strided mxfp8")
    _check_nvfp4(x, None, "deterministic", "auto", "strided nvfp4")
    for dtype in (torch.bfloat16, torch.float32):
        e = torch.empty(0, 100, dtype=dtype)
        q, s = codecs.mxfp8_quantize(e)
        assert q.shape == (0, 100) and s.shape == (0, 4)
        assert codecs.mxfp8_dequantize(q, s).shape == (0, 100)
        p, b, g = codecs.nvfp4_quantize(e)
        assert p.shape == (0, 50) and b.shape == (0, 7) and g.item() == 2.0**100
        assert codecs.nvfp4_dequantize(p, b, g, 100).shape == (0, 100)


def test_python_validation_errors():
    x = torch.randn(4, 64)
    with pytest.raises(errors.InvalidArgument, match="scale_mode"):
        codecs.mxfp8_quantize(x, "ceil")
    with pytest.raises(errors.InvalidDType, match="x"):
        codecs.mxfp8_quantize(x.half())
    with pytest.raises(errors.InvalidShape, match="unit stride"):
        codecs.nvfp4_quantize(x[:, ::2])
    with pytest.raises(errors.InvalidArgument, match="split"):
        codecs.mxfp8_quantize(x, split="lanes")
    with pytest.raises(errors.InvalidDevice, match="x"):
        codecs.mxfp8_quantize(torch.empty(2, 64, device="meta"))
    q, s = codecs.mxfp8_quantize(x)
    with pytest.raises(errors.InvalidDType, match="q"):
        codecs.mxfp8_dequantize(q.view(torch.uint8), s)
    with pytest.raises(errors.InvalidDType, match="scales"):
        codecs.mxfp8_dequantize(q, s.int())
    with pytest.raises(errors.InvalidShape, match="scales"):
        codecs.mxfp8_dequantize(q, s[:, :1])
    with pytest.raises(errors.InvalidArgument, match="out_dtype"):
        codecs.mxfp8_dequantize(q, s, torch.float16)
    for bad in (0.0, -2.0, float("nan"), float("inf"), 2.0**101, True, "3", torch.ones(2), torch.ones(1).double(),
                torch.tensor([0.0])):
        with pytest.raises((errors.InvalidArgument, errors.InvalidType, errors.InvalidDType, errors.InvalidShape),
                           match="global_scale"):
            codecs.nvfp4_quantize(x, bad)
    p, b, g = codecs.nvfp4_quantize(x)
    with pytest.raises(errors.InvalidShape, match="packed"):
        codecs.nvfp4_dequantize(p, b, g, 66)
    with pytest.raises(errors.InvalidDType, match="packed"):
        codecs.nvfp4_dequantize(p.view(torch.int8), b, g, 64)
    with pytest.raises(errors.InvalidShape, match="block_scales"):
        codecs.nvfp4_dequantize(p, b[:, :1], g, 64)
    with pytest.raises(errors.InvalidDType, match="block_scales"):
        codecs.nvfp4_dequantize(p, b.view(torch.uint8), g, 64)
    with pytest.raises(errors.InvalidType, match="hidden"):
        codecs.nvfp4_dequantize(p, b, g, 64.0)
    with pytest.raises(errors.InvalidArgument, match="global_scale"):
        codecs.nvfp4_dequantize(p, b, 0.0, 64)
    with pytest.raises(errors.InvalidDevice, match="block_scales"):
        codecs.nvfp4_dequantize(p, torch.empty(4, 4, dtype=torch.float8_e4m3fn, device="meta"), g, 64)


def test_extension_rejects_what_would_go_out_of_bounds():
    host = _backend.host()
    x = torch.randn(4, 64)
    q = torch.empty(4, 64, dtype=torch.uint8)
    s = torch.empty(4, 2, dtype=torch.uint8)
    g = torch.ones(1)
    with pytest.raises(errors.InvalidArgument, match="row stride"):
        host.mxfp8_quantize(x.data_ptr(), 0, 64, 4, 64, 0, q.data_ptr(), 64, s.data_ptr(), 1)
    with pytest.raises(errors.InvalidArgument, match="scale mode"):
        host.mxfp8_quantize(x.data_ptr(), 0, 64, 4, 64, 2, q.data_ptr(), 64, s.data_ptr(), 2)
    with pytest.raises(errors.InvalidArgument, match="null"):
        host.nvfp4_quantize(x.data_ptr(), 0, 64, 4, 64, 0, q.data_ptr(), 32, s.data_ptr(), 4)
    with pytest.raises(errors.InvalidArgument, match="row stride"):
        host.nvfp4_quantize(x.data_ptr(), 0, 64, 4, 64, g.data_ptr(), q.data_ptr(), 31, q.data_ptr(), 4)
    with pytest.raises(errors.InvalidArgument, match="lane split"):
        host.nvfp4_dequantize(q.data_ptr(), 32, s.data_ptr(), 4, g.data_ptr(), 4, 64, x.data_ptr(), 0, 64, 9)
    with pytest.raises(errors.InvalidArgument, match="hidden"):
        host.mxfp8_dequantize(q.data_ptr(), 64, s.data_ptr(), 2, 4, 0, x.data_ptr(), 0, 64)


@pytest.mark.skipif(not moelink.cuda_available(), reason="no usable CUDA device")
@pytest.mark.parametrize("split", SPLITS)
def test_cuda_kernels_match_reference(seed, split):
    gen = torch.Generator().manual_seed(seed)
    for case in range(6):
        x = random_input(gen) if case else edge_case_input(torch.bfloat16)
        for mode in ("floor", "rceil"):
            q, s = codecs.mxfp8_quantize(x.cuda(), mode, split=split)
            q_ref, s_ref = ref.mxfp8_quantize(x, mode)
            assert_bitwise(q.cpu(), q_ref, "cuda mxfp8 q")
            assert_bitwise(s.cpu(), s_ref, "cuda mxfp8 scales")
            assert_bitwise(codecs.mxfp8_dequantize(q, s, torch.float32, split=split).cpu(),
                           ref.mxfp8_dequantize(q_ref, s_ref, torch.float32), "cuda mxfp8 dequantized")
        packed, bs, g = codecs.nvfp4_quantize(x.cuda(), split=split)
        packed_ref, bs_ref, g_ref = ref.nvfp4_quantize(x)
        assert_bitwise(g.cpu(), g_ref, "cuda nvfp4 global scale")
        assert_bitwise(packed.cpu(), packed_ref, "cuda nvfp4 packed")
        assert_bitwise(bs.cpu(), bs_ref, "cuda nvfp4 block scales")
        assert_bitwise(codecs.nvfp4_dequantize(packed, bs, g, x.shape[1], torch.float32, split=split).cpu(),
                       ref.nvfp4_dequantize(packed_ref, bs_ref, g_ref, x.shape[1], torch.float32), "cuda nvfp4 out")
