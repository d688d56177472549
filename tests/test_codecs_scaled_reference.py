"""The MXFP8 and NVFP4 references (moelink.reference.codecs.mxfp8 / .nvfp4) against their
specifications: element rounding against torch's float8 casts and a brute-force nearest search,
the OCP MX and NVFP4-recipe scale rules recomputed independently in float64, round-trip error
bounds, edge cases, wire layout and every validation."""

from __future__ import annotations

import math

import pytest
import torch

from moelink import errors
from moelink.reference import codecs as ref
from moelink.reference.codecs import minifloat

BF16_MAX = float.fromhex("0x1.fep+127")
E2M1_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def random_bits(gen, n):
    raw = torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    return raw.view(torch.float32)


# ---- element rounding ------------------------------------------------------------------------------


def test_definition_rounding_matches_torch_e4m3_and_the_bit_code(seed):
    gen = torch.Generator().manual_seed(seed)
    v = random_bits(gen, 200_000)
    v = v[torch.isfinite(v)].abs()
    v = torch.cat([v * 2.0**-120, v.clamp(max=448.0), torch.tensor([0.0, 2.0**-10, 3 * 2.0**-10, 464.0, 480.0])])
    mine = minifloat.round_magnitude(v, minifloat.E4M3)
    torch_codes = v.clamp(max=448.0).to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
    assert torch.equal(mine, torch_codes)
    assert torch.equal(mine, ref.float_to_fp8_code(v, "e4m3").to(torch.int64))


def test_e2m1_rounding_table():
    cases = {0.0: 0, 0.2: 0, 0.25: 0, 0.26: 1, 0.75: 2, 1.25: 2, 1.26: 3, 1.75: 4, 2.5: 4, 2.51: 5,
             3.5: 6, 5.0: 6, 5.01: 7, 6.0: 7, 7.0: 7, 1e30: 7, 2.0**-130: 0}
    x = torch.tensor(list(cases), dtype=torch.float32)
    assert ref.float_to_fp4_code(x).tolist() == list(cases.values())
    assert ref.float_to_fp4_code(-x).tolist() == [c | 8 if c else 0 for c in cases.values()]  # never -0
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    assert ref.float_to_fp4_code(special).tolist() == [8, 8, 8, 0]
    assert ref.fp4_code_to_float(torch.arange(16)).tolist()[:8] == E2M1_VALUES
    decoded = ref.fp4_code_to_float(torch.arange(16))
    assert math.isnan(decoded[8]) and decoded[9:].tolist() == [-v for v in E2M1_VALUES[1:]]


def test_e2m1_is_nearest_even_by_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    v = torch.rand(50_000, generator=gen) * 7.0
    v = torch.cat([v, torch.tensor([(a + b) / 2 for a, b in zip(E2M1_VALUES, E2M1_VALUES[1:])])])
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    dist = (v.double()[:, None] - grid[None, :]).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = (dist == best)
    even = torch.tensor([c % 2 == 0 for c in range(8)])
    # nearest; on a tie the even code (mantissa bit 0)
    want = torch.where(ties.sum(1) > 1, (ties & even).int().argmax(1), ties.int().argmax(1))
    assert torch.equal(ref.float_to_fp4_code(v), want.to(torch.int64))


# ---- MXFP8 -----------------------------------------------------------------------------------------


def _blocks(x, size):
    t, h = x.shape
    n = -(-h // size)
    return torch.nn.functional.pad(x.float(), (0, n * size - h)).reshape(t, n, size)


def test_mxfp8_scale_rules_recomputed_in_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 320, generator=gen) * torch.exp(torch.randn(64, 1, generator=gen) * 6)
    for mode in ("floor", "rceil"):
        _, scales = ref.mxfp8_quantize(x, mode)
        amax = _blocks(x, 32).abs().amax(-1).double()
        for a, b in zip(amax.flatten().tolist(), scales.flatten().tolist()):
            if mode == "floor":
                want = math.frexp(a)[1] - 1 - 8  # floor(log2 amax) - emax(E4M3)
            else:
                want = math.ceil(math.log2(a / 448.0))
                if abs(a / 448.0 - 2.0**want) <= 2.0**want * 2**-23:  # float32 division at a power of two
                    want = round(math.log2(a / 448.0))
            assert b - 127 == max(want, -100), (mode, a, b)


def test_mxfp8_round_trip_bounds(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 1000, generator=gen) * torch.exp(torch.randn(32, 1, generator=gen) * 3)
    for mode in ("floor", "rceil"):
        q, s = ref.mxfp8_quantize(x, mode)
        y = ref.mxfp8_dequantize(q, s, torch.float32).double()
        scale = ref.mxfp8_scale_value(s).double().repeat_interleave(32, dim=1)[:, :1000]
        xd = x.double()
        bound = torch.maximum(xd.abs() * 2.0**-4, scale * 2.0**-10)  # half an E4M3 step, normal / subnormal
        saturated = xd.abs() > 448 * scale
        assert ((y - xd).abs() <= bound)[~saturated].all()
        if mode == "rceil":
            assert not saturated.any()
        else:  # the spec's clamp: such elements decode to +-448 X, at most 12.5 % off
            assert torch.equal(y[saturated].abs(), 448 * scale[saturated])
            assert ((xd - y).abs() <= xd.abs() / 8)[saturated].all()


def test_mxfp8_edge_cases():
    x = torch.zeros(4, 70)
    x[0, ::3] = -0.0  # an all-zero row, signs kept
    x[1, :] = torch.linspace(-1, 1, 70)
    x[1, 5], x[1, 40], x[1, 41] = float("nan"), float("inf"), -float("inf")
    x[2, :4] = torch.tensor([BF16_MAX, -BF16_MAX, 1.0, 3.0e-39])
    x[3, 64:] = torch.tensor([500.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # the partial last block (6 channels)
    for mode in ("floor", "rceil"):
        q, s = ref.mxfp8_quantize(x, mode)
        y = ref.mxfp8_dequantize(q, s, torch.float32)
        assert (s[0] == ref.MXFP8_MIN_SCALE_BYTE).all()
        assert torch.equal(y[0].view(torch.int32), x[0].view(torch.int32))
        assert torch.isnan(y[1, [5, 40, 41]]).all() and torch.isnan(y[1]).sum() == 3
        clean = x[1].clone()
        clean[[5, 40, 41]] = 0.0
        y_clean = ref.mxfp8_dequantize(*ref.mxfp8_quantize(clean[None], mode), torch.float32)[0]
        keep = torch.ones(70, dtype=torch.bool)
        keep[[5, 40, 41]] = False
        assert torch.equal(y[1][keep], y_clean[keep])  # non-finite elements do not move the scale
        assert torch.isfinite(y[2]).all() and y[2, 0] > 1e38
    # the last block's scale comes from its 6 channels only
    q, s = ref.mxfp8_quantize(x[3:4], "floor")
    assert s[0, 2].item() == 135 - 8  # 500 = 1.95 * 2**8: exponent field 135
    assert ref.mxfp8_dequantize(q, s, torch.float32)[0, 64].item() == 448.0  # saturated, by the spec
    q, s = ref.mxfp8_quantize(x[3:4], "rceil")
    assert s[0, 2].item() == 128  # 500 / 448 rounds up to 2**1
    assert ref.mxfp8_dequantize(q, s, torch.float32)[0, 64].item() == 512.0  # 250 -> 256 in E4M3, times 2


def test_mxfp8_decoder_accepts_any_scale_byte():
    q = torch.full((1, 32 * 4), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)  # 1.0
    s = torch.tensor([[0, 1, 254, 255]], dtype=torch.uint8)
    y = ref.mxfp8_dequantize(q, s, torch.float32)[0]
    assert y[0].item() == 2.0**-127 and y[32].item() == 2.0**-126 and y[64].item() == 2.0**127
    assert torch.isnan(y[96:]).all()
    yb = ref.mxfp8_dequantize(torch.full((1, 32), 0x7E, dtype=torch.uint8).view(torch.float8_e4m3fn),
                              torch.tensor([[254]], dtype=torch.uint8), torch.bfloat16)
    assert yb[0, 0].item() == BF16_MAX  # 448 * 2**127 saturates instead of becoming inf


# ---- NVFP4 -----------------------------------------------------------------------------------------


def test_nvfp4_global_scale_rule():
    x = torch.tensor([[1.0, -3.5, float("nan"), float("inf")]])
    assert ref.nvfp4_global_scale(x).item() == torch.tensor(2688.0 / 3.5, dtype=torch.float32).item()
    assert ref.nvfp4_global_scale(torch.zeros(2, 5)).item() == 2.0**100
    assert ref.nvfp4_global_scale(torch.full((1, 3), 3e38)).item() == 2.0**-100
    assert ref.nvfp4_global_scale(torch.full((1, 3), 1e-35)).item() == 2.0**100


def test_nvfp4_block_scales_and_codes_recomputed_in_float64(seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 200, generator=gen) * torch.exp(torch.randn(16, 1, generator=gen) * 2)
    for global_scale in (None, 3.0, 1e4):
        packed, bs, g = ref.nvfp4_quantize(x, global_scale)
        gd = g.double().item()
        amax = _blocks(x, 16).abs().amax(-1).double()
        sf = (amax / 6.0 * gd).clamp(max=448.0)
        # RNE to E4M3, then the decode multipliers
        sf_val = sf.float().to(torch.float8_e4m3fn).double()
        assert torch.equal(bs.double(), sf_val)
        codes = ref.nvfp4_unpack(packed, 200)
        y = ref.fp4_code_to_float(codes).double() * (sf_val / gd).repeat_interleave(16, dim=1)[:, :200]
        y_ref = ref.nvfp4_dequantize(packed, bs, g, 200, torch.float32).double()
        assert ((y - y_ref).abs() <= y.abs() * 2**-23).all()  # d = value(s) / g is one float32 division
        scaled = x.double() * (gd / sf_val.clamp(min=1e-300)).repeat_interleave(16, dim=1)[:, :200]
        expected = scaled.clamp(min=-6.0, max=6.0)  # E2M1 saturates at 6
        got = ref.fp4_code_to_float(codes).double()
        assert ((expected - got).abs() <= torch.clamp(expected.abs() / 4, min=0.25) + 1e-6).all()
        if global_scale is None:  # the tensor's own scale: only RNE of a normal block scale pushes past 6
            normal = (sf_val >= 2.0**-6).repeat_interleave(16, dim=1)[:, :200]
            assert (scaled.abs() <= 6.0 / (1 - 1 / 16) + 1e-9)[normal].all()


def test_nvfp4_round_trip_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 7168, generator=gen)
    y = ref.nvfp4_dequantize(*ref.nvfp4_quantize(x), 7168, torch.float32)
    rel = ((y - x).norm() / x.norm()).item()
    assert 0.05 < rel < 0.12  # E2M1's 3 significant levels per octave, 16-channel blocks


def test_nvfp4_layout_and_edge_cases():
    g = 6.0  # a block with amax 6 gets the scale (6 / 6) * 6 = 6 -> enc = 1, values pass unchanged
    x = torch.zeros(2, 19)
    x[0, :5] = torch.tensor([0.5, 1.0, -6.0, 3.0, 2.0])
    x[0, 16:19] = torch.tensor([6.0, -0.5, 4.0])
    x[1, :4] = torch.tensor([float("nan"), 1.0, float("inf"), -6.0])
    packed, bs, gg = ref.nvfp4_quantize(x, g)
    assert gg.item() == 6.0 and packed.shape == (2, 10) and bs.shape == (2, 2)
    assert packed[0, :3].tolist() == [0x1 | (0x2 << 4), 0xF | (0x5 << 4), 0x4]
    assert packed[0, 8:].tolist() == [0x7 | (0x9 << 4), 0x6]  # odd hidden: the last high nibble is 0
    assert bs[0].float().tolist() == [6.0, 6.0]
    y = ref.nvfp4_dequantize(packed, bs, gg, 19, torch.float32)
    assert torch.equal(y[0], x[0])
    assert torch.isnan(y[1, [0, 2]]).all() and y[1, [1, 3]].tolist() == [1.0, -6.0]
    assert packed[1, 0].item() & 0xF == 0x8 and packed[1, 1].item() & 0xF == 0x8
    # an all-zero block: scale 0, codes 0, zeros back; tiny negatives give +0
    z = ref.nvfp4_quantize(torch.full((1, 16), -1e-30), 1.0)
    assert z[1].float().tolist() == [[0.0]] and (z[0] == 0).all()
    assert torch.equal(ref.nvfp4_dequantize(*z, 16, torch.float32).view(torch.int32), torch.zeros(1, 16, dtype=torch.int32))


def test_nvfp4_saturates_large_blocks():
    x = torch.tensor([[3e38, 1.0, -3e38, 0.0]])
    packed, bs, g = ref.nvfp4_quantize(x, 2.0**100)  # (amax / 6) * g overflows: the scale saturates at 448
    assert bs.float().tolist() == [[448.0]]
    y = ref.nvfp4_dequantize(packed, bs, g, 4, torch.float32)
    assert torch.isfinite(y).all() and y[0, 0] > 0 and y[0, 2] < 0


# ---- validation ------------------------------------------------------------------------------------


def test_validation_errors():
    x = torch.randn(3, 64)
    with pytest.raises(errors.InvalidArgument, match="scale_mode"):
        ref.mxfp8_quantize(x, "ceil")
    q, s = ref.mxfp8_quantize(x)
    with pytest.raises(errors.InvalidDType, match="scales"):
        ref.mxfp8_dequantize(q, s.int())
    with pytest.raises(errors.InvalidShape, match="scales"):
        ref.mxfp8_dequantize(q, s[:, :1])
    with pytest.raises(errors.InvalidDType, match="q"):
        ref.mxfp8_dequantize(q.view(torch.uint8), s)
    for bad in (0.0, -1.0, float("inf"), float("nan"), 2.0**101, 2.0**-101, True, "1", torch.ones(2),
                torch.ones(1, dtype=torch.float64)):
        with pytest.raises((errors.InvalidArgument, errors.InvalidType, errors.InvalidDType, errors.InvalidShape),
                           match="global_scale"):
            ref.nvfp4_quantize(x, bad)
    packed, bs, g = ref.nvfp4_quantize(x)
    with pytest.raises(errors.InvalidShape, match="packed"):
        ref.nvfp4_dequantize(packed, bs, g, 66)
    with pytest.raises(errors.InvalidShape, match="block_scales"):
        ref.nvfp4_dequantize(packed, bs[:, :2], g, 64)
    with pytest.raises(errors.InvalidDType, match="block_scales"):
        ref.nvfp4_dequantize(packed, bs.view(torch.uint8), g, 64)
    with pytest.raises(errors.InvalidDType, match="packed"):
        ref.nvfp4_dequantize(packed.int(), bs, g, 64)
