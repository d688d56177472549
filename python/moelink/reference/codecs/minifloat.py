"""Rounding float32 to small float formats (E4M3, E5M2, E2M1) from their definition, in float64.

An independent statement of the element rule the FP8, MXFP8 and NVFP4 references use (``fp8.py``
does it with integer code on the bits; the kernels with the magic-number addition of
``csrc/kernels/codec_minifloat.cuh``): round to nearest, ties to even, finite values saturate to
the format's largest magnitude. Both agree with torch's ``float8`` casts where those exist
(tests/test_codecs_reference.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MiniFloat:
    name: str
    mantissa_bits: int
    bias: int
    max_code: int  # largest finite magnitude code

    @property
    def max_value(self) -> float:
        return magnitude_values(self)[self.max_code].item()


E4M3 = MiniFloat("e4m3", 3, 7, 0x7E)
E2M1 = MiniFloat("e2m1", 1, 1, 0x7)


def magnitude_values(f: MiniFloat) -> torch.Tensor:
    """float64 value of every magnitude code 0 .. max_code."""
    codes = torch.arange(f.max_code + 1, dtype=torch.int64)
    exp_field = codes >> f.mantissa_bits
    mant = (codes & ((1 << f.mantissa_bits) - 1)).double() / 2.0**f.mantissa_bits
    return torch.where(exp_field == 0, mant * 2.0 ** (1 - f.bias),
                       (1.0 + mant) * torch.pow(2.0, (exp_field - f.bias).double()))


def round_magnitude(a: torch.Tensor, f: MiniFloat) -> torch.Tensor:
    """Magnitude codes (int64) of finite non-negative float32 values ``a``: RNE, saturating.

    In float64, where every step below is exact: below the smallest normal 2**(1-B) the code is
    round_half_even(a / 2**(1-B-m)) (that may reach 2**m, the smallest normal's code); above it,
    a = (1 + f) * 2**e and the code is (e + B) * 2**m + round_half_even(f * 2**m) (a fraction that
    rounds up to 2**m carries into the exponent: the same formula)."""
    a = a.double()
    m = f.mantissa_bits
    tiny = a < 2.0 ** (1 - f.bias)
    sub = torch.round(a * 2.0 ** (f.bias - 1 + m))  # torch.round: half to even
    _, e = torch.frexp(torch.where(tiny, torch.ones_like(a), a))  # a = frac * 2**e, frac in [0.5, 1)
    e = e.to(torch.int64) - 1  # a = (1 + f) * 2**e
    scaled = torch.ldexp(torch.where(tiny, torch.ones_like(a), a), -e)  # in [1, 2)
    normal = (e + f.bias) * 2**m + torch.round((scaled - 1.0) * 2**m).to(torch.int64)
    code = torch.where(tiny, sub.to(torch.int64), normal)
    return torch.clamp(code, max=f.max_code)


def value_of_magnitude(codes: torch.Tensor, f: MiniFloat) -> torch.Tensor:
    """float32 values of magnitude codes (exact)."""
    return magnitude_values(f).float()[codes.to(torch.int64)]
