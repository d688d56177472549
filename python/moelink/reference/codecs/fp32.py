"""float32 bit manipulation shared by the codec references: bit views, exact powers of two,
correctly rounded division, integer round-to-nearest-even (the kernels' kernels/numeric.cuh)."""

from __future__ import annotations

import torch


def _bits(v: torch.Tensor) -> torch.Tensor:
    """float32 tensor -> its IEEE bits as int64 in [0, 2**32)."""
    assert v.dtype == torch.float32
    return v.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _from_bits(b: torch.Tensor) -> torch.Tensor:
    """int64 bits in [0, 2**32) -> float32."""
    b = torch.where(b >= 2**31, b - 2**32, b)
    return b.to(torch.int32).view(torch.float32)


def _pow2(k: torch.Tensor) -> torch.Tensor:
    """2**k as float32 for integer k in [-126, 127] (exact)."""
    return _from_bits((k.to(torch.int64) + 127) << 23)


def _div(a: torch.Tensor, b) -> torch.Tensor:
    """Correctly rounded float32 division, tensor by same-shaped tensor (no scalar fast path)."""
    if not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return a / b.expand_as(a).contiguous()


def _rshift_rne(v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """v >> shift rounded to nearest, ties to even, for int64 v >= 0 and shift in [0, 31] (shift 0
    is exact): the rounding step of a float -> narrower-float conversion done on the bits."""
    r = v >> shift
    rem = v & ((1 << shift) - 1)
    half = torch.where(shift > 0, 1 << torch.clamp(shift - 1, min=0), torch.zeros_like(shift))
    return r + ((shift > 0) & ((rem > half) | ((rem == half) & ((r & 1) == 1)))).to(torch.int64)
