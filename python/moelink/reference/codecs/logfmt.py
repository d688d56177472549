"""LogFMT-nBit reference (n = 8, 9, 10), per token and 128-channel tile, with the portable
log2/exp2 polynomials the kernels evaluate. The rules are in the package docstring (sections
"Reproducible float32" and "LogFMT-nBit")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import InvalidArgument, InvalidDType, InvalidShape, argument_error
from .common import CODEC_GROUP, _check_input, _check_out_dtype, _groups_view, _to_out
from .fp32 import _bits, _div, _from_bits, _pow2, _rshift_rne

LOGFMT_BITS = (8, 9, 10)
LOGFMT_HEADER_BYTES = 8  # float32 M, float32 s
LOGFMT_MAX_LOG2_RANGE = 32.0  # the paper's log(2**32) clamp of min against max


# ---- portable log2 / exp2 (the polynomials both targets evaluate) -----------------------------


def _f32(h: str) -> float:
    v = float.fromhex(h)
    assert torch.tensor(v, dtype=torch.float32).item() == v, h
    return v


def _horner(x: torch.Tensor, coeffs: tuple[float, ...]) -> torch.Tensor:
    """coeffs[0] + x*(coeffs[1] + x*(... + x*coeffs[-1])) in float32, highest degree first, one
    rounded multiply and one rounded add per step (the kernels' unfused Horner order)."""
    acc = torch.full_like(x, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        acc = acc * x
        acc = acc + c
    return acc


# log2(f) = z * q(z^2), z = (f - 1)/(f + 1), f in [sqrt(1/2), sqrt 2): q's coefficients are the
# atanh series 2/(ln 2 * (2j + 1)) rounded to float32; truncation error < 1e-9, far below fp32.
_LOG2_Q = tuple(
    _f32(h)
    for h in ("0x1.715476p+1", "0x1.ec709ep-1", "0x1.2776c6p-1", "0x1.a61762p-2", "0x1.484b14p-2")
)
# 2**f on [0, 1): p(f) = 1 + f*(c1 + f*(c2 + ... f*c6)), a relative-error least-squares fit
# rounded to float32; max error 1.4 half-ulps, p(0) == 1 exactly, p(f) < 2 for f < 1.
_EXP2_C = tuple(
    _f32(h)
    for h in (
        "0x1.62e42ap-1",
        "0x1.ebfd66p-3",
        "0x1.c68a5ep-5",
        "0x1.3cf1f8p-7",
        "0x1.47ef4cp-10",
        "0x1.c165d4p-13",
    )
)
_SQRT2_FRAC = 0x3504F3  # fraction bits of float32(sqrt 2)


def _normalize(mag_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive finite nonzero float32 bits -> (binade exponent b, 23-bit fraction) so that the value
    is (1 + frac / 2**23) * 2**b. Subnormals are normalised with integer operations only."""
    exp_field = mag_bits >> 23
    frac = mag_bits & 0x7FFFFF
    sub = exp_field == 0
    # Subnormal: the leading one of the fraction is at bit `lead` (0..22), read off the exact
    # float64 value of the integer; shift it to bit 23 (the kernels do the same with a loop).
    _, e = torch.frexp(torch.where(sub, frac, torch.ones_like(frac)).double())
    shift = 24 - e.to(torch.int64)
    frac_sub = (frac << shift) & 0x7FFFFF
    b = torch.where(sub, -126 - shift, exp_field - 127)
    return b, torch.where(sub, frac_sub, frac)


def _log2_core(f: torch.Tensor) -> torch.Tensor:
    """log2(f) for float32 f in [sqrt(1/2), sqrt 2), as the kernels evaluate it."""
    z = _div(f - 1.0, f + 1.0)
    return z * _horner(z * z, _LOG2_Q)


def _log2_split(mag_bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive finite nonzero float32 bits -> (integer e, float32 l) with log2 = e + l, |l| <= 1/2."""
    b, frac = _normalize(mag_bits)
    high = (frac >= _SQRT2_FRAC).to(torch.int64)
    f = _from_bits(((127 - high) << 23) | frac)  # in [sqrt(1/2), sqrt 2)
    return b + high, _log2_core(f)


def _exp2_nonpos(y: torch.Tensor) -> torch.Tensor:
    """2**y for float32 y in [-34, 0], as the kernels evaluate it. Result in [2**-34, 1]."""
    i = torch.floor(y)
    f = y - i
    return _horner(f, (1.0, *_EXP2_C)) * _pow2(i.to(torch.int64))


# ---- wire layout, encoder, decoder ------------------------------------------------------------


@dataclass(frozen=True)
class LogfmtLayout:
    """Byte layout of one encoded row (all offsets from the row start)."""

    bits: int
    hidden: int
    num_tiles: int
    header_bytes: int  # num_tiles * 8, padded to 16
    tile_payload_bytes: int  # 16 * bits for a full tile
    last_tile_channels: int
    last_tile_payload_bytes: int
    row_bytes: int  # multiple of 16

    @property
    def num_codes(self) -> int:  # K
        return (1 << (self.bits - 1)) - 1

    def payload_offset(self, tile: int) -> int:
        return self.header_bytes + tile * self.tile_payload_bytes

    @property
    def bytes_per_element(self) -> float:
        return self.row_bytes / self.hidden


def _align16(n: int) -> int:
    return (n + 15) // 16 * 16


def logfmt_layout(hidden: int, bits: int) -> LogfmtLayout:
    if bits not in LOGFMT_BITS:
        raise argument_error(InvalidArgument, "bits", "8, 9 or 10", bits)
    if not isinstance(hidden, int) or hidden < 1:
        raise argument_error(InvalidArgument, "hidden", "a positive int", hidden)
    tiles = -(-hidden // CODEC_GROUP)
    last = hidden - (tiles - 1) * CODEC_GROUP
    header = _align16(tiles * LOGFMT_HEADER_BYTES)
    full = 16 * bits
    last_bytes = -(-last * bits // 8)
    row = _align16(header + (tiles - 1) * full + last_bytes)
    return LogfmtLayout(bits, hidden, tiles, header, full, last, last_bytes, row)


def _logfmt_tile_stats(mag_bits: torch.Tensor, data: torch.Tensor, num_codes: int):
    """Per tile: M bits, s (float32), and the float32 pieces the encoder and decoder share."""
    big = torch.full_like(mag_bits, 0x7F800000)
    m_bits = torch.where(data, mag_bits, big).amin(dim=-1)
    M_bits = torch.where(data, mag_bits, torch.zeros_like(mag_bits)).amax(dim=-1)
    has = data.any(dim=-1)
    safe_M = torch.where(has, M_bits, torch.full_like(M_bits, 0x3F800000))
    safe_m = torch.where(has, m_bits, torch.full_like(m_bits, 0x3F800000))
    eM, lM = _log2_split(safe_M)
    em, lm = _log2_split(safe_m)
    R = (eM - em).float() + (lM - lm)
    R = torch.clamp(R, 0.0, LOGFMT_MAX_LOG2_RANGE)
    s = _div(R, float(num_codes - 1))
    s = torch.where(has, s, torch.zeros_like(s))
    M_bits = torch.where(has, M_bits, torch.zeros_like(M_bits))
    return M_bits, s, eM, lM


def _logfmt_w(frac_M: torch.Tensor, steps_down: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """w = fM * 2**(-steps_down * s): a decoded value divided by 2**bM (float32, in (2**-34, 2))."""
    y = (-steps_down).float() * s
    return frac_M * _exp2_nonpos(y)


def _ldexp_rne(w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """w * 2**k for positive normal float32 w, rounding to nearest-even into the subnormal range
    with integer operations only (no FTZ dependence). The result never overflows here."""
    wb = _bits(w)
    exp_field = (wb >> 23) + k  # biased exponent of the result if it is normal
    normal = exp_field >= 1
    shift = torch.clamp(1 - exp_field, min=0, max=25)  # extra right shift into the subnormal range
    # a subnormal (or, after rounding up, the smallest normal) has exponent field 0
    sub_bits = _rshift_rne((wb & 0x7FFFFF) | (1 << 23), shift)
    normal_bits = (torch.clamp(exp_field, min=1) << 23) | (wb & 0x7FFFFF)
    return _from_bits(torch.where(normal, normal_bits, sub_bits))


def _logfmt_fields(xg: torch.Tensor, bits: int):
    """[T, G, 128] float32 -> (fields int64 [T, G, 128], M bits [T, G], s [T, G])."""
    K = (1 << (bits - 1)) - 1
    xb = _bits(xg)
    sign = (xb >> 31) & 1
    mag = xb & 0x7FFFFFFF
    finite = (mag >> 23) != 0xFF
    data = finite & (mag != 0)
    M_bits, s, eM, lM = _logfmt_tile_stats(mag, data, K)
    bM, frac_M = _normalize(torch.where(M_bits != 0, M_bits, torch.full_like(M_bits, 0x3F800000)))
    fM = _from_bits((127 << 23) | frac_M)

    safe_mag = torch.where(data, mag, torch.full_like(mag, 0x3F800000))
    ba, frac_a = _normalize(safe_mag)
    ea, la = _log2_split(safe_mag)
    bM_e, fM_e, s_e = bM.unsqueeze(-1), fM.unsqueeze(-1), s.unsqueeze(-1)
    eM_e, lM_e = eM.unsqueeze(-1), lM.unsqueeze(-1)

    far = ba <= bM_e - 35
    inv_s = _div(torch.ones_like(s), torch.where(s > 0, s, torch.ones_like(s))).unsqueeze(-1)
    delta = ((eM_e - ea).float() + (lM_e - la)) * inv_s
    d = torch.where(delta >= K - 1, torch.full_like(delta, K - 1), torch.floor(torch.clamp(delta, min=0.0)))
    d = d.to(torch.int64)
    k_up = K - d
    w_up = _logfmt_w(fM_e, d, s_e)
    w_dn = torch.where(k_up > 1, _logfmt_w(fM_e, d + 1, s_e), torch.zeros_like(w_up))
    mid = (w_dn + w_up) * 0.5
    a_scaled = _from_bits((torch.clamp(ba - bM_e + 127, min=1) << 23) | frac_a)
    code = torch.where(a_scaled >= mid, k_up, k_up - 1)
    code = torch.where(s_e == 0, torch.full_like(code, K), code)
    code = torch.where(far | ~data, torch.zeros_like(code), code)
    fields = torch.where(code > 0, (sign << (bits - 1)) | code, torch.zeros_like(code))
    fields = torch.where(finite, fields, torch.full_like(fields, 1 << (bits - 1)))
    return fields, M_bits, s


def _pack_fields(fields: torch.Tensor, bits: int) -> torch.Tensor:
    """[T, G, 128] n-bit fields -> [T, G, 16n] bytes, LSB-first bit stream per tile."""
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = (fields.unsqueeze(-1) >> shifts) & 1  # [T, G, 128, n]
    stream = stream.reshape(*fields.shape[:2], 16 * bits, 8)
    return (stream << torch.arange(8, dtype=torch.int64)).sum(-1)


def _unpack_fields(payload: torch.Tensor, bits: int) -> torch.Tensor:
    """[T, G, 16n] bytes -> [T, G, 128] fields."""
    stream = (payload.unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1
    stream = stream.reshape(*payload.shape[:2], CODEC_GROUP, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)


def logfmt_encode(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """[T, H] bf16/fp32 -> uint8 [T, logfmt_layout(H, bits).row_bytes]."""
    x = _check_input(x)
    layout = logfmt_layout(x.shape[1], bits)
    num_tokens = x.shape[0]
    xg = _groups_view(x.detach().cpu().float())
    fields, M_bits, s = _logfmt_fields(xg, bits)
    G = layout.num_tiles

    out = torch.zeros(num_tokens, layout.row_bytes, dtype=torch.uint8)
    header = torch.stack([_from_bits(M_bits), s], dim=-1).contiguous()  # [T, G, 2] float32
    out[:, : 8 * G] = header.view(torch.uint8).reshape(num_tokens, 8 * G)
    payload = _pack_fields(fields, bits).to(torch.uint8).reshape(num_tokens, -1)
    used = (G - 1) * layout.tile_payload_bytes + layout.last_tile_payload_bytes
    out[:, layout.header_bytes : layout.header_bytes + used] = payload[:, :used]
    return out


def logfmt_unpack(packed: torch.Tensor, hidden: int, bits: int):
    """Wire bytes -> (M float32 [T, G], s float32 [T, G], fields int64 [T, G, 128])."""
    layout = logfmt_layout(hidden, bits)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise argument_error(InvalidDType, "packed", "torch.uint8", getattr(packed, "dtype", type(packed).__name__))
    if packed.dim() != 2 or packed.shape[1] != layout.row_bytes:
        raise argument_error(InvalidShape, "packed", f"[num_tokens, {layout.row_bytes}]", tuple(packed.shape))
    packed = packed.detach().cpu().contiguous()
    num_tokens, G = packed.shape[0], layout.num_tiles
    header = packed[:, : 8 * G].contiguous().view(torch.float32).reshape(num_tokens, G, 2)
    used = (G - 1) * layout.tile_payload_bytes + layout.last_tile_payload_bytes
    payload = torch.zeros(num_tokens, G * layout.tile_payload_bytes, dtype=torch.int64)
    payload[:, :used] = packed[:, layout.header_bytes : layout.header_bytes + used].to(torch.int64)
    fields = _unpack_fields(payload.reshape(num_tokens, G, layout.tile_payload_bytes), bits)
    return header[..., 0].contiguous(), header[..., 1].contiguous(), fields


def logfmt_decode(packed: torch.Tensor, hidden: int, bits: int = 8,
                  out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """uint8 [T, row_bytes] -> [T, hidden] in out_dtype."""
    _check_out_dtype(out_dtype)
    M, s, fields = logfmt_unpack(packed, hidden, bits)
    K = (1 << (bits - 1)) - 1
    M_bits = _bits(M)
    bM, frac_M = _normalize(torch.where(M_bits != 0, M_bits, torch.full_like(M_bits, 0x3F800000)))
    fM = _from_bits((127 << 23) | frac_M).unsqueeze(-1)
    code = fields & K
    sign = (fields >> (bits - 1)) & 1
    w = _logfmt_w(fM, K - torch.clamp(code, min=1), s.unsqueeze(-1))
    v = _ldexp_rne(w, bM.unsqueeze(-1))
    v = torch.where(code > 0, v, torch.zeros_like(v))
    v = torch.where(sign == 1, -v, v)
    nonfinite = (code == 0) & (sign == 1)
    v = torch.where(nonfinite, torch.full_like(v, float("nan")), v)
    v = v.reshape(packed.shape[0], -1)[:, :hidden].contiguous()
    return _to_out(v, ~nonfinite.reshape(packed.shape[0], -1)[:, :hidden], out_dtype)


def logfmt_encode_exact(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle of LogFMT's rounding (no wire format): returns (codes [T, H] int64
    in 0..K, decoded float64 [T, H]) for the same grid, computed with libm in double precision and
    an exhaustive nearest-in-linear-space search. Only finite inputs. For tests and the study."""
    K = (1 << (bits - 1)) - 1
    xg = _groups_view(x.detach().cpu().double().float()).double()  # pad with zeros
    mag = xg.abs()
    data = mag > 0
    M = torch.where(data, mag, torch.zeros_like(mag)).amax(-1, keepdim=True)
    m = torch.where(data, mag, torch.full_like(mag, math.inf)).amin(-1, keepdim=True)
    has = data.any(-1, keepdim=True)
    R = torch.where(has, torch.log2(M / torch.where(has, m, M)), torch.zeros_like(M)).clamp(max=32.0)
    k = torch.arange(1, K + 1, dtype=torch.float64)
    grid = M.unsqueeze(-1) * torch.pow(2.0, -(K - k) * R.unsqueeze(-1) / (K - 1))  # [T, G, 1, K]
    grid = torch.cat([torch.zeros_like(grid[..., :1]), grid], dim=-1)  # code 0 = 0
    mids = (grid[..., 1:] + grid[..., :-1]) / 2  # [T, G, 1, K]
    code = (mag.unsqueeze(-1) >= mids).sum(-1)
    code = torch.where(data, code, torch.zeros_like(code))
    value = torch.gather(grid.squeeze(-2), -1, code) * torch.sign(xg)
    num_tokens, hidden = x.shape
    return code.reshape(num_tokens, -1)[:, :hidden], value.reshape(num_tokens, -1)[:, :hidden]
