"""Properties of the codec reference (moelink.reference.codecs) itself.

The kernels are compared against this module bit for bit (tests/test_codecs.py), so these tests
pin down that the reference is the codec the docs describe: error bounds, the float64 oracle,
edge cases, the wire layouts.
"""

from __future__ import annotations

import math

import pytest
import torch

from moelink.errors import InvalidArgument, InvalidDType, InvalidShape, InvalidType
from moelink.reference import codecs as C

BF16_MAX = float.fromhex("0x1.fep+127")


@pytest.fixture
def rng(seed):
    """A generator from a fresh seed per test (tests/seeding.py: printed on failure, and
    MOELINK_TEST_SEED replays it)."""
    return torch.Generator().manual_seed(seed)


def randn(rng, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=rng).to(dtype)


def bits32(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


# ---- portable math ------------------------------------------------------------------------------


def test_exp2_polynomial_is_accurate_bounded_and_exact_at_zero():
    # Every float32 in [0.5, 1) (the binade where p(f) approaches 2), plus a sweep of [0, 0.5).
    top = torch.arange(0x3F000000, 0x3F800000, dtype=torch.int64).to(torch.int32).view(torch.float32)
    sweep = torch.linspace(0, 0.5, 100001)
    for f in (top, sweep):
        p = C.logfmt._exp2_nonpos(f - 1.0) * 2.0  # y = f - 1 in [-1, 0): i = -1, fraction f
        exact = torch.pow(2.0, f.double())
        assert ((p.double() - exact).abs() / exact).max() < 1.2e-7
    assert (C.logfmt._exp2_nonpos(top - 1.0) <= 1.0).all()
    assert C.logfmt._exp2_nonpos(torch.tensor([0.0, -0.0])).tolist() == [1.0, 1.0]
    y = -torch.rand(10000) * 34
    rel = (C.logfmt._exp2_nonpos(y).double() - torch.pow(2.0, y.double())).abs() / torch.pow(2.0, y.double())
    assert rel.max() < 2e-7


def test_log2_split_is_accurate_including_subnormals():
    mags = torch.cat([
        torch.rand(100000) * 10,
        torch.tensor([1.0, 2.0, 0.5, math.sqrt(2), 3.0e38, 1.5e-45, 1e-40, 1.17e-38]),
    ])
    mags = mags[mags > 0]
    e, l = C.logfmt._log2_split(C.fp32._bits(mags))
    got = e.double() + l.double()
    exact = torch.log2(mags.double())
    assert (got - exact).abs().max() < 2e-7
    assert (l.abs() <= 0.5).all()


# ---- FP8 element conversion -----------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_code_conversion_matches_torch_rne_with_saturation(fmt, rng):
    f = C.FP8_FORMATS[fmt]
    # random float32 bit patterns over the whole finite range, and values around the format's grid
    raw = torch.randint(-(2**31), 2**31 - 1, (400000,), generator=rng, dtype=torch.int64)
    v = raw.to(torch.int32).view(torch.float32)
    v = v[torch.isfinite(v)]
    near = (torch.rand(400000, generator=rng) - 0.5) * 2 * f.max_value * 1.2
    tiny = (torch.rand(100000, generator=rng) - 0.5) * 2.0**-5
    halfway = C.fp8_code_to_float(torch.arange(256, dtype=torch.uint8), fmt)
    halfway = halfway[torch.isfinite(halfway)]
    ties = (halfway[:-1] + halfway[1:]) / 2  # exact midpoints of neighbouring codes
    v = torch.cat([v, near, tiny, ties, torch.tensor([0.0, -0.0, f.max_value, -f.max_value, 1e30, -1e30])])
    ours = C.float_to_fp8_code(v, fmt)
    torch_codes = v.clamp(-f.max_value, f.max_value).to(f.torch_dtype).view(torch.uint8)
    assert torch.equal(ours, torch_codes)


def test_fp8_nonfinite_codes():
    v = torch.tensor([float("nan"), -float("nan"), float("inf"), -float("inf")])
    assert C.float_to_fp8_code(v, "e4m3").tolist() == [0x7F, 0x7F, 0x7F, 0x7F]
    assert C.float_to_fp8_code(v, "e5m2").tolist() == [0x7F, 0x7F, 0x7C, 0xFC]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_fp8_value_table_matches_torch(fmt):
    f = C.FP8_FORMATS[fmt]
    codes = torch.arange(256, dtype=torch.uint8)
    ours = C.fp8_code_to_float(codes, fmt)
    theirs = codes.view(f.torch_dtype).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    ok = ~ours.isnan()
    assert torch.equal(bits32(ours[ok]), bits32(theirs[ok]))  # including the sign of zero
    assert ours[f.max_code].item() == f.max_value


# ---- FP8 quantization ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
@pytest.mark.parametrize("hidden", [7168, 2880, 200, 1])
def test_fp8_round_trip_error_bound(fmt, scale_format, hidden, rng):
    f = C.FP8_FORMATS[fmt]
    x = randn(rng, 33, hidden) * torch.exp(randn(rng, 33, 1) * 3)
    q, scales = C.fp8_quantize(x, fmt, scale_format)
    assert q.dtype == f.torch_dtype and q.shape == x.shape
    assert tuple(scales.shape) == C.fp8_scale_shape(33, hidden, scale_format)
    y = C.fp8_dequantize(q, scales, torch.float32)
    groups = C.fp8_num_groups(hidden)
    if scale_format == "float32":
        scale = scales
    else:
        scale = torch.pow(2.0, (C.ue8m0_unpack(scales, groups) - 127).double()).float()
        assert (scale >= C.common._groups_view(x).abs().amax(-1) / f.max_value).all()
    per_channel = scale.repeat_interleave(128, dim=1)[:, :hidden].double()
    # half an fp8 ulp relative, or half the subnormal quantum, plus float32 rounding of the scale
    ulp_rel = 2.0 ** -(f.mantissa_bits + 1)
    sub_abs = 2.0 ** (f.min_exponent - f.mantissa_bits - 1)
    bound = (ulp_rel + 2**-21) * x.double().abs() + sub_abs * per_channel * (1 + 2**-20)
    assert ((y.double() - x.double()).abs() <= bound).all()


def test_fp8_group_max_decodes_to_itself_with_float_scales(rng):
    x = randn(rng, 64, 1024)
    q, s = C.fp8_quantize(x, "e4m3")
    y = C.fp8_dequantize(q, s, torch.float32)
    xg, yg = C.common._groups_view(x), C.common._groups_view(y)
    idx = xg.abs().argmax(-1, keepdim=True)
    assert torch.allclose(yg.gather(-1, idx), xg.gather(-1, idx), rtol=2**-22, atol=0)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
def test_fp8_all_zero_group_decodes_to_exact_zeros(fmt, scale_format):
    x = torch.zeros(2, 384)
    x[0, 128:256] = -0.0
    x[1, 256:] = torch.linspace(-3, 3, 128)
    q, s = C.fp8_quantize(x, fmt, scale_format)
    y = C.fp8_dequantize(q, s, torch.float32)
    assert torch.equal(bits32(y[:, :256]), bits32(x[:, :256]))  # -0.0 stays -0.0
    if scale_format == "float32":
        assert s[0, 0].item() == C.FP8_SCALE_FLOOR
    else:
        assert (C.ue8m0_unpack(s, 3)[0, 0].item() - 127) == -100


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
def test_fp8_nan_inf_do_not_disturb_the_group(fmt, scale_format, rng):
    x = randn(rng, 3, 256)
    dirty = x.clone()
    dirty[0, 5] = float("nan")
    dirty[1, 7] = float("inf")
    dirty[2, 9] = -float("inf")
    clean = dirty.clone()
    clean[~torch.isfinite(clean)] = 0.0
    q, s = C.fp8_quantize(dirty, fmt, scale_format)
    q0, s0 = C.fp8_quantize(clean, fmt, scale_format)
    assert torch.equal(s, s0)
    mask = torch.isfinite(dirty)
    assert torch.equal(q.view(torch.uint8)[mask], q0.view(torch.uint8)[mask])
    y = C.fp8_dequantize(q, s, torch.float32)
    assert math.isnan(y[0, 5])
    if fmt == "e5m2":
        assert y[1, 7].item() == math.inf and y[2, 9].item() == -math.inf
    else:  # no infinity in E4M3: non-finite stays non-finite
        assert math.isnan(y[1, 7]) and math.isnan(y[2, 9])


def test_fp8_subnormal_inputs():
    # Subnormals beside normal values are below half the smallest fp8 step: signed zeros.
    x = torch.zeros(2, 128)
    x[0, :4] = torch.tensor([1e-40, -1e-40, 1.0, -2.0])
    # A group of only subnormals: the 2**-100 scale floor flushes it to zeros, deliberately
    # (values below ~1e-28 in a whole group carry no signal, and no FTZ setting can change this).
    x[1, :3] = torch.tensor([1e-40, -5e-41, 1e-45])
    for fmt in ("e4m3", "e5m2"):
        q, s = C.fp8_quantize(x, fmt)
        y = C.fp8_dequantize(q, s, torch.float32)
        assert y[0, :2].tolist() == [0.0, 0.0] and torch.signbit(y[0, 1])
        assert y[0, 2:4].tolist() == [1.0, -2.0]
        assert (y[1] == 0).all()


@pytest.mark.parametrize("scale_format", ["float32", "ue8m0"])
def test_fp8_largest_bf16_values_saturate_not_overflow(scale_format):
    x = torch.tensor([[BF16_MAX, -BF16_MAX, 1.0] + [0.5] * 125]).bfloat16()
    q, s = C.fp8_quantize(x, "e4m3", scale_format)
    y = C.fp8_dequantize(q, s, torch.bfloat16)
    assert y[0, 0].item() == BF16_MAX and y[0, 1].item() == -BF16_MAX
    assert torch.isfinite(C.fp8_dequantize(q, s, torch.float32)).all()


def test_ue8m0_packing_layout():
    exps = torch.tensor([[1, 2, 3, 4, 5, 6], [127, 128, 200, 27, 250, 0]])
    packed = C.ue8m0_pack(exps)
    assert packed.dtype == torch.int32 and packed.shape == (2, 2)
    # byte i of word j = group 4j + i, missing groups are zero
    assert (packed[0, 0].item() & 0xFFFFFFFF) == 0x04030201
    assert (packed[0, 1].item() & 0xFFFFFFFF) == 0x00000605
    assert (packed[1, 0].item() & 0xFFFFFFFF) == 0x1BC8807F
    assert torch.equal(C.ue8m0_unpack(packed, 6), exps)
    # the int32 words are the little-endian view of the byte array [T, 4 * words]
    as_bytes = packed.contiguous().view(torch.uint8).reshape(2, 8)
    assert as_bytes[1, :6].tolist() == [127, 128, 200, 27, 250, 0]


def test_ue8m0_scale_is_the_power_of_two_at_or_above_amax_over_max(rng):
    x = randn(rng, 16, 640) * torch.exp(randn(rng, 16, 1) * 5)
    x[0, :128] = 448.0 * 2.0**-3  # amax / max exactly a power of two: no rounding up
    _, s = C.fp8_quantize(x, "e4m3", "ue8m0")
    assert s.shape == (16, 2)
    scale = torch.pow(2.0, (C.ue8m0_unpack(s, 5) - 127).double())
    ratio = C.common._groups_view(x).abs().amax(-1).double() / 448.0
    assert ((scale >= ratio) & (scale < 2 * ratio)).all()
    assert scale[0, 0].item() == 2.0**-3


def test_fp8_partial_last_group_uses_only_its_channels(rng):
    x = randn(rng, 5, 200)
    x[:, :128] *= 1000  # a huge first group must not influence the 72-channel tail group
    q, s = C.fp8_quantize(x, "e4m3")
    q_tail, s_tail = C.fp8_quantize(x[:, 128:].contiguous(), "e4m3")
    assert torch.equal(s[:, 1:], s_tail)
    assert torch.equal(q.view(torch.uint8)[:, 128:], q_tail.view(torch.uint8))


# ---- LogFMT -------------------------------------------------------------------------------------


def _tile_bounds(x, bits):
    """Per-element bound on |x_hat - x| implied by the format (plus float32 slack)."""
    K = (1 << (bits - 1)) - 1
    xg = C.common._groups_view(x.float()).double()
    mag = xg.abs()
    nz = mag > 0
    M = torch.where(nz, mag, 0).amax(-1, keepdim=True)
    m = torch.where(nz, mag, math.inf).amin(-1, keepdim=True)
    has = nz.any(-1, keepdim=True)
    R = torch.where(has, torch.log2(M / torch.where(has, m, M)), torch.zeros_like(M)).clamp(max=32)
    step = torch.pow(2.0, R / (K - 1)) - 1
    v1 = M * torch.pow(2.0, -R)
    bound = torch.maximum(mag * step / 2, v1 / 2) + mag * 4e-7
    return bound.reshape(x.shape[0], -1)[:, : x.shape[1]]


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
@pytest.mark.parametrize("hidden", [7168, 2880, 200, 1])
def test_logfmt_round_trip_error_bound(bits, hidden, rng):
    x = randn(rng, 17, hidden) * torch.exp(randn(rng, 17, 1) * 3)
    x[3, ::7] = 0.0
    packed = C.logfmt_encode(x, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (17, C.logfmt_layout(hidden, bits).row_bytes)
    y = C.logfmt_decode(packed, hidden, bits, torch.float32)
    err = (y.double() - x.double()).abs()
    assert (err <= _tile_bounds(x, bits)).all()
    assert (y[x == 0] == 0).all()
    assert (torch.sign(y) == torch.sign(x))[y != 0].all()


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_codes_agree_with_float64_oracle(bits, rng):
    x = torch.cat([
        randn(rng, 32, 1024),
        torch.distributions.Laplace(0.0, 1.0).sample((32, 1024)),
        randn(rng, 32, 1024) * torch.exp(randn(rng, 32, 1024) * 6),  # wide ranges: the 32 clamp
    ])
    K = (1 << (bits - 1)) - 1
    _, _, fields = C.logfmt_unpack(C.logfmt_encode(x, bits), 1024, bits)
    codes = (fields & K).reshape(x.shape)
    oracle, _ = C.logfmt_encode_exact(x, bits)
    mismatch = codes != oracle
    # Only at near-ties of the float64 midpoint may float32 decide differently, by one code.
    assert mismatch.float().mean() < 1e-4
    assert ((codes - oracle).abs() <= 1).all()


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_linear_rounding_is_unbiased(bits, rng):
    """Values spread uniformly (in linear space) between adjacent decoded values: the mean signed
    error vanishes with linear-midpoint rounding; rounding in log space would be biased upward."""
    K = (1 << (bits - 1)) - 1
    tiles = 4096
    x = torch.rand(tiles, 128, generator=rng) * 0.9 + 0.1
    x[:, 0] = 1.0
    x[:, 1] = 2.0**-30  # every tile: M = 1, R = 30 octaves
    packed = C.logfmt_encode(x, bits)
    grid = C.logfmt_decode(
        C.logfmt_encode(torch.tensor([[1.0, 2.0**-30]]), bits), 2, bits, torch.float32)  # v_K, v_1
    assert grid[0].tolist() == [1.0, pytest.approx(2.0**-30, rel=1e-5)]
    # decoded grid of this header, v_1..v_K
    M, s, _ = C.logfmt_unpack(packed, 128, bits)
    k = torch.arange(1, K + 1)
    v = C.logfmt._logfmt_w(torch.ones(K), K - k, s[0, 0].expand(K)).double()
    j = torch.randint(0, K - 1, (tiles * 128,), generator=rng)
    u = torch.rand(tiles * 128, generator=rng, dtype=torch.float64)
    samples = (v[j] + u * (v[j + 1] - v[j])).float().reshape(tiles, 128)
    samples[:, 0], samples[:, 1] = 1.0, 2.0**-30
    y = C.logfmt_decode(C.logfmt_encode(samples, bits), 128, bits, torch.float32).double()
    err = (y - samples.double())[:, 2:]
    gap = (v[j + 1] - v[j]).reshape(tiles, 128)[:, 2:]
    bias = (err / gap).mean()  # in units of the local gap between codes
    spread = (err / gap).std() / math.sqrt(err.numel())
    assert abs(bias) < 5 * spread
    # the same samples rounded to the nearer code in log space are biased upward (the geometric
    # midpoint sits below the linear one), by about (2**s - 1) / 8 of a gap
    lo, hi = v[j].reshape(tiles, 128)[:, 2:], v[j + 1].reshape(tiles, 128)[:, 2:]
    s2 = samples.double()[:, 2:]
    log_round = torch.where(s2 >= torch.sqrt(lo * hi), hi, lo)
    assert ((log_round - s2) / gap).mean() > 8 * spread


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_tile_maximum_and_single_nonzero_are_exact(bits, rng):
    x = randn(rng, 8, 512)
    x[0] = 0.0
    x[0, 300] = -3.1415e-3  # a single nonzero
    y = C.logfmt_decode(C.logfmt_encode(x, bits), 512, bits, torch.float32)
    xg, yg = C.common._groups_view(x), C.common._groups_view(y)
    idx = xg.abs().argmax(-1, keepdim=True)
    assert torch.equal(yg.gather(-1, idx), xg.gather(-1, idx))
    assert torch.equal(y[0], x[0])


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_constant_and_all_zero_tiles(bits):
    K = (1 << (bits - 1)) - 1
    x = torch.zeros(3, 256)
    x[0, :128] = 0.75
    x[0, 128:] = torch.tensor([0.75, -0.75] * 64)
    x[1, 128:] = -0.0  # all-zero tile, with negative zeros
    packed = C.logfmt_encode(x, bits)
    M, s, fields = C.logfmt_unpack(packed, 256, bits)
    assert M[0].tolist() == [0.75, 0.75] and s[0].tolist() == [0.0, 0.0]
    assert ((fields[0] & K) == K).all()
    assert M[1].tolist() == [0.0, 0.0] and s[1].tolist() == [0.0, 0.0] and (fields[1] == 0).all()
    y = C.logfmt_decode(packed, 256, bits, torch.float32)
    assert torch.equal(y[0], x[0])
    assert torch.equal(bits32(y[1:]), bits32(torch.zeros(2, 256)))  # +0.0: -0.0 is not kept


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_nan_inf_are_marked_and_do_not_disturb_the_tile(bits, rng):
    x = randn(rng, 2, 256)
    dirty = x.clone()
    dirty[0, 3], dirty[0, 200], dirty[1, 64] = float("nan"), float("inf"), -float("inf")
    clean = dirty.clone()
    clean[~torch.isfinite(clean)] = 0.0
    p_dirty, p_clean = C.logfmt_encode(dirty, bits), C.logfmt_encode(clean, bits)
    M, s, f = C.logfmt_unpack(p_dirty, 256, bits)
    M0, s0, f0 = C.logfmt_unpack(p_clean, 256, bits)
    assert torch.equal(M, M0) and torch.equal(s, s0)
    bad = ~torch.isfinite(dirty)
    assert (f.reshape(2, 256)[bad] == 1 << (bits - 1)).all()
    assert torch.equal(f.reshape(2, 256)[~bad], f0.reshape(2, 256)[~bad])
    y = C.logfmt_decode(p_dirty, 256, bits, torch.float32)
    assert torch.isnan(y[bad]).all() and not torch.isnan(y[~bad]).any()


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_subnormals(bits):
    tiny = float.fromhex("0x1p-149")
    x = torch.zeros(3, 128)
    # a tile of only subnormals is encoded like any other tile (normalised with integer ops)
    x[0, :5] = torch.tensor([1e-40, -3e-41, 7e-42, tiny, -1e-39])
    # subnormals beside 1.0 are more than 32 octaves below: they round to zero
    x[1, :3] = torch.tensor([1.0, 1e-40, -1e-41])
    # a normal maximum just above FLT_MIN with subnormal companions: decoded values land in the
    # subnormal range and are rounded there with integer arithmetic
    x[2, :3] = torch.tensor([2.0e-38, 3e-39, -4e-40])
    y = C.logfmt_decode(C.logfmt_encode(x, bits), 128, bits, torch.float32)
    assert (y.double() - x.double()).abs().le(_tile_bounds(x, bits) + tiny).all()
    assert y[0, 4].item() == x[0, 4].item()  # the tile maximum is exact, subnormal or not
    assert y[1, :3].tolist() == [1.0, 0.0, 0.0]
    assert y[0, 3] >= 0 and torch.equal(torch.sign(y[2, :3]), torch.sign(x[2, :3]))


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_largest_bf16_values(bits, rng):
    x = randn(rng, 2, 128).bfloat16()
    x[0, 0], x[0, 1], x[1, 5] = BF16_MAX, -BF16_MAX, -BF16_MAX
    for out in (torch.bfloat16, torch.float32):
        y = C.logfmt_decode(C.logfmt_encode(x, bits), 128, bits, out)
        assert torch.isfinite(y).all()
        assert y[0, 0].item() == BF16_MAX and y[0, 1].item() == -BF16_MAX and y[1, 5].item() == -BF16_MAX
    # float32 inputs above the bf16 range saturate to bf16's largest value instead of overflowing
    big = torch.full((1, 128), 3.4e38)
    assert C.logfmt_decode(C.logfmt_encode(big, bits), 128, bits, torch.bfloat16)[0, 0].item() == BF16_MAX


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_range_clamp_at_32_octaves(bits):
    K = (1 << (bits - 1)) - 1
    x = torch.zeros(1, 128)
    x[0, :4] = torch.tensor([1.0, 2.0**-40, 2.0**-32, 2.0**-33.2])
    M, s, fields = C.logfmt_unpack(C.logfmt_encode(x, bits), 128, bits)
    assert s.item() == pytest.approx(32.0 / (K - 1), rel=1e-7)
    codes = (fields & K)[0, 0, :4].tolist()
    assert codes == [K, 0, 1, 0]  # 2**-33.2 < v_1 / 2 = 2**-33


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_scale_invariance_and_sign_symmetry(bits, rng):
    x = randn(rng, 8, 384)
    K = (1 << (bits - 1)) - 1
    M, s, f = C.logfmt_unpack(C.logfmt_encode(x, bits), 384, bits)
    for k in (-60, -1, 7, 50):
        Mk, sk, fk = C.logfmt_unpack(C.logfmt_encode(x * 2.0**k, bits), 384, bits)
        assert torch.equal(fk, f) and torch.equal(sk, s) and torch.equal(Mk, M * 2.0**k)
    _, _, fn = C.logfmt_unpack(C.logfmt_encode(-x, bits), 384, bits)
    flip = torch.where((f & K) > 0, f ^ (1 << (bits - 1)), f)
    assert torch.equal(fn, flip)


def test_logfmt_negative_values_that_round_to_zero_are_plus_zero():
    x = torch.zeros(1, 128)
    x[0, :2] = torch.tensor([1.0, -1e-20])
    y = C.logfmt_decode(C.logfmt_encode(x, 8), 128, 8, torch.float32)
    assert y[0, 1].item() == 0.0 and not torch.signbit(y[0, 1])


# ---- LogFMT wire layout -------------------------------------------------------------------------


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
@pytest.mark.parametrize("hidden", [1, 100, 128, 129, 2880, 7168])
def test_logfmt_layout_invariants(bits, hidden):
    L = C.logfmt_layout(hidden, bits)
    assert L.row_bytes % 16 == 0 and L.header_bytes % 16 == 0
    assert L.num_tiles == -(-hidden // 128)
    assert L.tile_payload_bytes == 16 * bits
    assert all(L.payload_offset(t) % 16 == 0 for t in range(L.num_tiles))
    assert L.last_tile_payload_bytes == -(-L.last_tile_channels * bits // 8)
    assert L.row_bytes - 16 < L.payload_offset(L.num_tiles - 1) + L.last_tile_payload_bytes <= L.row_bytes


def test_logfmt_layout_sizes_for_deepseek_hidden():
    for bits, row in ((8, 448 + 7168), (9, 448 + 8064), (10, 448 + 8960)):
        L = C.logfmt_layout(7168, bits)
        assert L.row_bytes == row
    assert C.logfmt_layout(7168, 8).bytes_per_element == 1.0625


@pytest.mark.parametrize("bits", C.LOGFMT_BITS)
def test_logfmt_bit_packing_order(bits, rng):
    hidden = 200  # a full tile and a 72-channel tile
    x = randn(rng, 2, hidden)
    packed = C.logfmt_encode(x, bits)
    L = C.logfmt_layout(hidden, bits)
    M, s, fields = C.logfmt_unpack(packed, hidden, bits)
    for t in range(2):
        # header: two little-endian float32 at 8 * tile
        hdr = packed[t, : 16].contiguous().view(torch.float32)
        assert hdr[0].item() == M[t, 0].item() and hdr[1].item() == s[t, 0].item()
        assert hdr[2].item() == M[t, 1].item() and hdr[3].item() == s[t, 1].item()
        row = packed[t].tolist()
        for tile, channels in ((0, 128), (1, 72)):
            base = L.payload_offset(tile)
            stream = int.from_bytes(bytes(row[base : base + (L.tile_payload_bytes if tile == 0 else L.last_tile_payload_bytes)]), "little")
            for i in range(channels):
                assert (stream >> (bits * i)) & ((1 << bits) - 1) == fields[t, tile, i].item()
            assert stream >> (bits * channels) == 0
        # everything after the payload and between header and payload is zero padding
        assert all(b == 0 for b in row[16 : L.header_bytes])
        assert all(b == 0 for b in row[L.payload_offset(1) + L.last_tile_payload_bytes :])
    if bits == 8:  # byte i is element i
        assert torch.equal(packed[:, L.header_bytes : L.header_bytes + 128].to(torch.int64), fields[:, 0, :])


# ---- input validation ---------------------------------------------------------------------------


def test_validation_errors():
    x = torch.randn(4, 256)
    with pytest.raises(InvalidType, match="x"):
        C.logfmt_encode(x.tolist())
    with pytest.raises(InvalidDType, match="x"):
        C.fp8_quantize(x.half())
    with pytest.raises(InvalidDType):
        C.logfmt_encode(x.to(torch.int32))
    with pytest.raises(InvalidShape, match="2-D"):
        C.fp8_quantize(x[0])
    with pytest.raises(InvalidShape, match="hidden"):
        C.logfmt_encode(torch.zeros(3, 0))
    with pytest.raises(InvalidArgument, match="fmt"):
        C.fp8_quantize(x, "e3m4")
    with pytest.raises(InvalidArgument, match="scale_format"):
        C.fp8_quantize(x, "e4m3", "fp16")
    with pytest.raises(InvalidArgument, match="bits"):
        C.logfmt_encode(x, 7)
    q, s = C.fp8_quantize(x)
    with pytest.raises(InvalidShape, match="scales"):
        C.fp8_dequantize(q, s[:, :1])
    with pytest.raises(InvalidDType, match="scales"):
        C.fp8_dequantize(q, s.double())
    with pytest.raises(InvalidType, match="scales"):
        C.fp8_dequantize(q, s.tolist())
    with pytest.raises(InvalidDType, match="q"):
        C.fp8_dequantize(q.view(torch.uint8), s)
    with pytest.raises(InvalidDType, match="out_dtype"):
        C.fp8_dequantize(q, s, torch.float16)
    packed = C.logfmt_encode(x, 9)
    with pytest.raises(InvalidShape, match="packed"):
        C.logfmt_decode(packed[:, :-16], 256, 9)
    with pytest.raises(InvalidDType, match="packed"):
        C.logfmt_decode(packed.to(torch.int16), 256, 9)
