"""What the FP8 and LogFMT references share besides float32 bits: argument checks, the split of
channels into 128-channel groups, and the rounding of decoded values to the output dtype."""

from __future__ import annotations

import torch

from ...errors import InvalidDType, InvalidShape, InvalidType, argument_error

CODEC_GROUP = 128  # channels per FP8 scale group / LogFMT tile

_BF16_MAX = float.fromhex("0x1.fep+127")  # 0x7F7F
_F32_MAX = float.fromhex("0x1.fffffep+127")


def _to_out(v: torch.Tensor, finite_code: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Saturate decoded values of finite codes to out_dtype's range, then round to out_dtype."""
    top = _BF16_MAX if out_dtype == torch.bfloat16 else _F32_MAX
    v = torch.where(finite_code & (v > top), torch.full_like(v, top), v)
    v = torch.where(finite_code & (v < -top), torch.full_like(v, -top), v)
    # torch's float32 -> bfloat16 is round-to-nearest-even with NaN -> 0x7FC0; the kernels match it.
    return v if out_dtype == torch.float32 else v.to(out_dtype)


def _check_out_dtype(out_dtype) -> None:
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise argument_error(InvalidDType, "out_dtype", "torch.bfloat16 or torch.float32", out_dtype)


def _check_input(x, name: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise argument_error(InvalidType, name, "a torch.Tensor", type(x).__name__)
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise argument_error(InvalidDType, name, "torch.bfloat16 or torch.float32", x.dtype)
    if x.dim() != 2:
        raise argument_error(InvalidShape, name, "a 2-D [num_tokens, hidden] tensor", tuple(x.shape))
    if x.shape[1] < 1:
        raise argument_error(InvalidShape, f"{name}.shape[1] (hidden)", ">= 1", x.shape[1])
    return x


def _groups_view(xf: torch.Tensor) -> torch.Tensor:
    """[T, H] float32 -> [T, G, 128], the partial last group zero padded."""
    num_tokens, hidden = xf.shape
    groups = -(-hidden // CODEC_GROUP)
    pad = groups * CODEC_GROUP - hidden
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.reshape(num_tokens, groups, CODEC_GROUP)
