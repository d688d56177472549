"""The codec kernels (moelink.codecs) against moelink.reference.codecs: encoders bit for bit,
decoders bit for bit too (NaN payloads aside), on fresh random inputs and on every edge case,
under several SIMT schedules; plus every input validation."""

from __future__ import annotations

import math

import pytest
import torch

import moelink
from moelink import _backend, codecs, errors, runtime
from moelink.reference import codecs as ref

BF16_MAX = float.fromhex("0x1.fep+127")
F32_MAX = float.fromhex("0x1.fffffep+127")
SCHEDULES = ["deterministic", "random:7", "random:8:0.5"]
# "auto": the host's form (lanes own whole tiles); "warp": the GPU's form (warp collectives), run here.
SPLITS = ["auto", "warp"]

if not hasattr(_backend.host(), "fp8_quantize"):
    pytest.skip("moelink._host has no codec ops: bindings::bind_codecs is not registered in "
                "csrc/bindings/host_module.cpp", allow_module_level=True)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal dtype, shape and bits; NaNs only need to be NaN in the same places."""
    assert got.dtype == want.dtype and got.shape == want.shape, f"{what}: {got.dtype}{tuple(got.shape)}"
    if got.is_floating_point() and got.element_size() > 1:
        nan_got, nan_want = torch.isnan(got.float()), torch.isnan(want.float())
        assert torch.equal(nan_got, nan_want), f"{what}: NaN positions differ"
        got, want = got.float()[~nan_got], want.float()[~nan_want]
        diff = (_bits(got) != _bits(want)).nonzero()
        assert diff.numel() == 0, f"{what}: {diff.numel()} elements differ, first {got[diff[0]].item()} vs {want[diff[0]].item()}"
    else:
        g, w = got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)
        diff = (g != w).nonzero()
        assert diff.numel() == 0, f"{what}: {diff.shape[0]} bytes differ, first at {diff[0].tolist()}"


# ---- inputs ---------------------------------------------------------------------------------------


def random_input(gen: torch.Generator) -> torch.Tensor:
    """A fresh [T, H] bf16/fp32 tensor: activation-like values with random row scales, sometimes
    zeros, outliers, a wide dynamic range, or a strided (non-contiguous) row layout."""

    def pick(*choices):
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    num_tokens = pick(1, 2, 5, 17, 33)
    hidden = pick(1, 3, 4, 100, 128, 130, 200, 512, 640, 2880)
    dtype = pick(torch.bfloat16, torch.float32)
    x = torch.randn(num_tokens, hidden, generator=gen)
    kind = pick("gauss", "laplace", "wide", "sparse", "outliers")
    if kind == "laplace":
        x = torch.sign(x) * -torch.log(torch.rand(num_tokens, hidden, generator=gen).clamp_min(1e-12))
    elif kind == "wide":
        x = x * torch.exp(torch.randn(num_tokens, hidden, generator=gen) * 8)
    elif kind == "sparse":
        x[torch.rand(num_tokens, hidden, generator=gen) < 0.7] = 0.0
    elif kind == "outliers":
        idx = torch.randint(hidden, (num_tokens, 3), generator=gen)
        x.scatter_(1, idx, torch.randn(num_tokens, 3, generator=gen) * 1000)
    x = x * torch.exp(torch.randn(num_tokens, 1, generator=gen) * 4)
    x = x.to(dtype)
    if pick(False, True):  # rows further apart than hidden, and a start that breaks 8/16-byte alignment
        wide = torch.zeros(num_tokens, hidden + 5, dtype=dtype)
        wide[:, 3 : 3 + hidden] = x
        x = wide[:, 3 : 3 + hidden]
    return x


def edge_case_input(dtype: torch.dtype, hidden: int = 200) -> torch.Tensor:
    """One row per edge case (hidden=200: a full group/tile and a 72-channel one)."""
    tiny = float.fromhex("0x1p-149")
    rows = []

    def row():
        r = torch.zeros(hidden)
        rows.append(r)
        return r

    r = row()  # all zeros, some negative
    r[::3] = -0.0
    r = row()  # constant tiles, and a constant magnitude with mixed signs
    r[:128] = 0.375
    r[128:] = torch.tensor([0.375, -0.375]).repeat((hidden - 128 + 1) // 2)[: hidden - 128]
    r = row()  # a single nonzero per tile
    r[17], r[150] = -3.0e-3, 12.5
    r = row()  # subnormals only, then subnormals beside normals
    r[:6] = torch.tensor([1e-40, -3e-41, 7e-42, tiny, -1e-39, 5e-45])
    r[128:134] = torch.tensor([1.0, 1e-40, -1e-39, 2.0e-38, 3e-39, -4e-40])
    r = row()  # largest bf16 values, and largest float32 values (inf once cast to bf16)
    r[:4] = torch.tensor([BF16_MAX, -BF16_MAX, 1.0, -0.5])
    r[130:133] = torch.tensor([F32_MAX, -F32_MAX, 3.3e38])
    r = row()  # NaN and infinities among ordinary values
    r[:] = torch.linspace(-2, 2, hidden)
    r[5], r[64], r[140], r[199 % hidden] = float("nan"), float("inf"), -float("inf"), float("nan")
    r = row()  # a dynamic range far beyond 32 octaves: the LogFMT clamp
    r[:] = torch.logspace(-30, 30, hidden) * torch.tensor([1.0, -1.0]).repeat(hidden // 2 + 1)[:hidden]
    r = row()  # a maximum just above FLT_MIN: decoded LogFMT values in the subnormal range
    r[:3] = torch.tensor([2.0e-38, 3e-39, -4e-40])
    r[128:131] = torch.tensor([1.5e-38, -1.2e-38, 1.1754944e-38])
    r = row()  # exact FP8 ties and saturation boundaries under a scale of 1
    r[:8] = torch.tensor([448.0, 464.0, 480.0, -452.0, 1.0 + 1 / 16, 2.0**-9 * 1.5, 2.0**-10, 57344.0])
    r = row()  # outliers in an otherwise small row
    r[:] = torch.linspace(-1e-3, 1e-3, hidden)
    r[7], r[133] = 6.0e4, -7.0e3
    return torch.stack(rows).to(dtype)


def _run(schedule: str, fn, *args, **kwargs):
    with runtime.scheduled(schedule):
        return fn(*args, **kwargs)


def test_split_forms_run_as_documented():
    """"auto" on the host never meets at a collective after the launch's one vote; "warp" does, per
    tile (the GPU's form). Counted with the SIMT runtime's switch counter."""
    x = torch.randn(64, 1024).bfloat16()

    def switches(**kw):
        before = runtime.stats()["switches"]
        codecs.fp8_quantize(x, **kw)
        return runtime.stats()["switches"] - before

    auto, warp = switches(split="auto"), switches(split="warp")
    assert auto <= 4 * 64  # one vote of each fiber, and the fibers' exits
    assert warp >= 64 * 8 * 31  # at least one 32-lane reduction per tile


# ---- FP8 -----------------------------------------------------------------------------------------


def _check_fp8(x, fmt, scale_format, schedule, what, split="auto"):
    q, s = _run(schedule, codecs.fp8_quantize, x, fmt, scale_format, split=split)
    q_ref, s_ref = ref.fp8_quantize(x, fmt, scale_format)
    assert_bitwise(q, q_ref, f"{what}: q")
    assert_bitwise(s, s_ref, f"{what}: scales")
    for out_dtype in (torch.float32, torch.bfloat16):
        y = _run(schedule, codecs.fp8_dequantize, q, s, out_dtype, split=split)
        assert_bitwise(y, ref.fp8_dequantize(q_ref, s_ref, out_dtype), f"{what}: dequantized {out_dtype}")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
def test_fp8_random_inputs_match_reference(seed, schedule, fmt, scale_format, split):
    gen = torch.Generator().manual_seed(seed)
    for case in range(6):
        x = random_input(gen)
        _check_fp8(x, fmt, scale_format, schedule, f"case {case}: {x.dtype}{tuple(x.shape)} strides {x.stride()}", split)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [200, 256])
def test_fp8_edge_cases_match_reference(schedule, dtype, hidden, split):
    x = edge_case_input(dtype, hidden)
    for fmt in ("e4m3", "e5m2"):
        for scale_format in ("float32", "ue8m0"):
            _check_fp8(x, fmt, scale_format, schedule, f"edge cases {fmt}/{scale_format} {dtype}", split)


def test_fp8_edge_case_semantics_through_the_kernels():
    """The decided behaviours, observed on kernel output (the reference tests pin them in detail)."""
    x = edge_case_input(torch.float32)
    q, s = codecs.fp8_quantize(x, "e4m3")
    y = codecs.fp8_dequantize(q, s, torch.float32)
    assert torch.equal(_bits(y[0]), _bits(x[0]))  # zeros, with their signs
    assert (s[0] == ref.FP8_SCALE_FLOOR).all()  # the floor scale of an all-zero group
    assert torch.isnan(y[5, 5]) and torch.isnan(y[5, 64]) and torch.isnan(y[5, 140])  # no inf in E4M3
    y5 = codecs.fp8_dequantize(*codecs.fp8_quantize(x, "e5m2"), torch.float32)
    assert y5[5, 64].item() == math.inf and y5[5, 140].item() == -math.inf
    yb = codecs.fp8_dequantize(*codecs.fp8_quantize(x, "e4m3", "ue8m0"), torch.bfloat16)
    assert yb[4, 0].item() == BF16_MAX and yb[4, 1].item() == -BF16_MAX  # saturated, not inf


# ---- LogFMT --------------------------------------------------------------------------------------


def _check_logfmt(x, bits, schedule, what, split="auto"):
    packed = _run(schedule, codecs.logfmt_encode, x, bits, split=split)
    packed_ref = ref.logfmt_encode(x, bits)
    assert_bitwise(packed, packed_ref, f"{what}: packed")
    for out_dtype in (torch.float32, torch.bfloat16):
        y = _run(schedule, codecs.logfmt_decode, packed, x.shape[1], bits, out_dtype, split=split)
        want = ref.logfmt_decode(packed_ref, x.shape[1], bits, out_dtype)
        assert_bitwise(y, want, f"{what}: decoded {out_dtype}")


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("bits", [8, 9, 10])
def test_logfmt_random_inputs_match_reference(seed, schedule, bits, split):
    gen = torch.Generator().manual_seed(seed)
    for case in range(5):
        x = random_input(gen)
        _check_logfmt(x, bits, schedule, f"case {case}: {x.dtype}{tuple(x.shape)} strides {x.stride()}", split)


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hidden", [200, 256])
def test_logfmt_edge_cases_match_reference(schedule, dtype, hidden, split):
    x = edge_case_input(dtype, hidden)
    for bits in (8, 9, 10):
        _check_logfmt(x, bits, schedule, f"edge cases LogFMT-{bits} {dtype}", split)


@pytest.mark.parametrize("bits", [8, 9, 10])
def test_logfmt_edge_case_semantics_through_the_kernels(bits):
    x = edge_case_input(torch.float32)
    y = codecs.logfmt_decode(codecs.logfmt_encode(x, bits), x.shape[1], bits, torch.float32)
    assert torch.equal(_bits(y[0]), _bits(torch.zeros_like(y[0])))  # zeros decode to +0.0
    assert torch.equal(y[1], x[1]) and torch.equal(y[2], x[2])  # constant tiles, single nonzeros
    bad = ~torch.isfinite(x[5])
    assert torch.isnan(y[5][bad]).all() and not torch.isnan(y[5][~bad]).any()
    assert y[4, 0].item() == BF16_MAX and y[4, 130].item() == F32_MAX  # tile maxima are exact
    yb = codecs.logfmt_decode(codecs.logfmt_encode(x, bits), x.shape[1], bits, torch.bfloat16)
    assert yb[4, 130].item() == BF16_MAX  # saturates to bf16's range


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("schedule", SCHEDULES[:2])
def test_random_bit_patterns_match_reference(seed, schedule, split):
    """Arbitrary float32 bit patterns: every exponent, subnormals, NaN payloads, infinities."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(-(2**31), 2**31 - 1, (12, 384), generator=gen, dtype=torch.int64).to(torch.int32)
    x = raw.view(torch.float32)
    x[6:] = x[6:] * 2.0**-100  # shift half the rows toward the subnormal range
    for fmt in ("e4m3", "e5m2"):
        _check_fp8(x, fmt, "ue8m0" if fmt == "e5m2" else "float32", schedule, f"bit patterns {fmt}", split)
    for bits in (8, 9, 10):
        _check_logfmt(x, bits, schedule, f"bit patterns LogFMT-{bits}", split)


@pytest.mark.parametrize("split", [0, 1])
def test_encoders_write_every_byte(split):
    """Outputs come from torch.empty, so the kernels must define every byte, padding included
    (UE8M0 pad bytes, LogFMT header and tail padding): run them on buffers full of junk."""
    host = _backend.host()
    x = torch.randn(3, 200)
    for junk in (0x00, 0xA5, 0xFF):
        s = torch.full((3, 1), -1, dtype=torch.int32)
        s.view(torch.uint8).fill_(junk)
        q = torch.full((3, 200), junk, dtype=torch.uint8)
        host.fp8_quantize(x.data_ptr(), 0, 200, 3, 200, 0, 1, q.data_ptr(), 200, s.data_ptr(), 1, split)
        assert torch.equal(s, ref.fp8_quantize(x, "e4m3", "ue8m0")[1])
        for bits in (8, 9, 10):
            row = codecs.logfmt_row_bytes(200, bits)
            packed = torch.full((3, row), junk, dtype=torch.uint8)
            host.logfmt_encode(x.data_ptr(), 0, 200, 3, 200, bits, packed.data_ptr(), row, split)
            assert torch.equal(packed, ref.logfmt_encode(x, bits))


def test_empty_inputs():
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.empty(0, 300, dtype=dtype)
        q, s = codecs.fp8_quantize(x, "e5m2", "ue8m0")
        assert q.shape == (0, 300) and s.shape == (0, 1) and s.dtype == torch.int32
        assert codecs.fp8_dequantize(q, s).shape == (0, 300)
        p = codecs.logfmt_encode(x, 9)
        assert p.shape == (0, codecs.logfmt_row_bytes(300, 9))
        assert codecs.logfmt_decode(p, 300, 9, torch.float32).shape == (0, 300)


def test_logfmt_decode_accepts_row_slices():
    x = torch.randn(6, 384)
    packed = codecs.logfmt_encode(x, 10)
    part = packed[2:5]  # starts row_bytes * 2 in: still 16-byte aligned
    assert torch.equal(codecs.logfmt_decode(part, 384, 10), ref.logfmt_decode(packed, 384, 10)[2:5])


# ---- validation ----------------------------------------------------------------------------------


def test_python_validation_errors():
    x = torch.randn(4, 256)
    with pytest.raises(errors.InvalidType, match="x"):
        codecs.fp8_quantize(x.tolist())  # NumPy arrays are accepted (DLPack, tests/test_interop.py); lists are not
    with pytest.raises(errors.InvalidDType, match="x"):
        codecs.fp8_quantize(x.half())
    with pytest.raises(errors.InvalidDType, match="x"):
        codecs.logfmt_encode(x.to(torch.int32))
    with pytest.raises(errors.InvalidShape, match="x"):
        codecs.logfmt_encode(x[0])
    with pytest.raises(errors.InvalidShape, match="hidden"):
        codecs.fp8_quantize(torch.zeros(3, 0))
    with pytest.raises(errors.InvalidShape, match="unit stride"):
        codecs.logfmt_encode(x[:, ::2])
    with pytest.raises(errors.InvalidShape, match="unit stride"):
        codecs.fp8_quantize(x.t())
    with pytest.raises(errors.InvalidArgument, match="fmt"):
        codecs.fp8_quantize(x, "e4m4")
    with pytest.raises(errors.InvalidArgument, match="scale_format"):
        codecs.fp8_quantize(x, "e4m3", "e8m0")
    for bad_bits in (7, 11, True, "8"):
        with pytest.raises(errors.InvalidArgument, match="bits"):
            codecs.logfmt_encode(x, bad_bits)
    with pytest.raises(errors.InvalidDevice, match="x"):
        codecs.fp8_quantize(torch.empty(2, 128, device="meta"))
    for fn in (lambda: codecs.fp8_quantize(x, split="lane"), lambda: codecs.logfmt_encode(x, 8, split=None)):
        with pytest.raises(errors.InvalidArgument, match="split"):
            fn()

    q, s = codecs.fp8_quantize(x)
    with pytest.raises(errors.InvalidDType, match="q"):
        codecs.fp8_dequantize(q.view(torch.uint8), s)
    with pytest.raises(errors.InvalidDType, match="scales"):
        codecs.fp8_dequantize(q, s.double())
    with pytest.raises(errors.InvalidShape, match="scales"):
        codecs.fp8_dequantize(q, s[:, :1])
    with pytest.raises(errors.InvalidShape, match="scales"):
        codecs.fp8_dequantize(q, codecs.fp8_quantize(x, scale_format="ue8m0")[1][:, :0])
    with pytest.raises(errors.InvalidDevice, match="scales"):
        codecs.fp8_dequantize(q, torch.empty(4, 2, device="meta"))
    with pytest.raises(errors.InvalidArgument, match="out_dtype"):
        codecs.fp8_dequantize(q, s, torch.float16)

    packed = codecs.logfmt_encode(x, 9)
    with pytest.raises(errors.InvalidShape, match="packed"):
        codecs.logfmt_decode(packed[:, :-16], 256, 9)
    with pytest.raises(errors.InvalidShape, match="packed"):
        codecs.logfmt_decode(packed, 256, 10)  # bits disagree with the row size
    with pytest.raises(errors.InvalidDType, match="packed"):
        codecs.logfmt_decode(packed.to(torch.int16), 256, 9)
    misaligned = torch.empty(packed.numel() + 1, dtype=torch.uint8)[1:].view(packed.shape)
    misaligned.copy_(packed)
    with pytest.raises(errors.InvalidShape, match="16-byte"):
        codecs.logfmt_decode(misaligned, 256, 9)
    with pytest.raises(errors.InvalidType, match="hidden"):
        codecs.logfmt_decode(packed, 256.0, 9)
    with pytest.raises(errors.InvalidArgument, match="hidden"):
        codecs.logfmt_row_bytes(0, 8)
    with pytest.raises(errors.InvalidArgument, match="out_dtype"):
        codecs.logfmt_decode(packed, 256, 9, torch.int8)


def test_extension_rejects_what_would_go_out_of_bounds():
    """The C++ entry points re-check what a kernel relies on (in case Python is bypassed)."""
    host = _backend.host()
    x = torch.randn(4, 256)
    q = torch.empty(4, 256, dtype=torch.uint8)
    s = torch.empty(4, 2)
    with pytest.raises(errors.InvalidArgument, match="row stride"):
        host.fp8_quantize(x.data_ptr(), 0, 100, 4, 256, 0, 0, q.data_ptr(), 256, s.data_ptr(), 2)
    with pytest.raises(errors.InvalidArgument, match="scale format"):
        host.fp8_quantize(x.data_ptr(), 0, 256, 4, 256, 0, 5, q.data_ptr(), 256, s.data_ptr(), 2)
    with pytest.raises(errors.InvalidArgument, match="bits"):
        host.logfmt_encode(x.data_ptr(), 0, 256, 4, 256, 7, q.data_ptr(), 256)
    packed = torch.empty(4 * 320 + 16, dtype=torch.uint8)
    with pytest.raises(errors.InvalidArgument, match="16-byte"):
        host.logfmt_encode(x.data_ptr(), 0, 256, 4, 256, 9, packed.data_ptr() + 1, 320)
    with pytest.raises(errors.InvalidArgument, match="null"):
        host.logfmt_decode(0, 320, 4, 256, 9, x.data_ptr(), 0, 256)
    with pytest.raises(errors.InvalidArgument, match="lane split"):
        host.fp8_quantize(x.data_ptr(), 0, 256, 4, 256, 0, 0, q.data_ptr(), 256, s.data_ptr(), 2, 7)
    assert host.logfmt_row_bytes(7168, 8) == ref.logfmt_layout(7168, 8).row_bytes


# ---- GPU -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not moelink.cuda_available(), reason="no usable CUDA device")
@pytest.mark.parametrize("split", SPLITS)
def test_cuda_kernels_match_reference(seed, split):
    gen = torch.Generator().manual_seed(seed)
    for case in range(8):
        x = random_input(gen) if case else edge_case_input(torch.bfloat16)
        for fmt in ("e4m3", "e5m2"):
            for scale_format in ("float32", "ue8m0"):
                q, s = codecs.fp8_quantize(x.cuda(), fmt, scale_format, split=split)
                q_ref, s_ref = ref.fp8_quantize(x, fmt, scale_format)
                assert_bitwise(q.cpu(), q_ref, "cuda q")
                assert_bitwise(s.cpu(), s_ref, "cuda scales")
                assert_bitwise(codecs.fp8_dequantize(q, s, torch.float32, split=split).cpu(),
                               ref.fp8_dequantize(q_ref, s_ref, torch.float32), "cuda dequantized")
        for bits in (8, 9, 10):
            packed = codecs.logfmt_encode(x.cuda(), bits, split=split)
            assert_bitwise(packed.cpu(), ref.logfmt_encode(x, bits), "cuda packed")
            assert_bitwise(codecs.logfmt_decode(packed, x.shape[1], bits, torch.float32, split=split).cpu(),
                           ref.logfmt_decode(packed.cpu(), x.shape[1], bits, torch.float32), "cuda decoded")
