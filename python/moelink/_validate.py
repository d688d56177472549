"""Input checks shared by the public API. Each raises a typed moelink error that names the
argument, what was expected and what was received; nothing unchecked reaches a kernel."""

from __future__ import annotations

from typing import Iterable

import torch

from .errors import InvalidArgument, InvalidDevice, InvalidDType, InvalidShape, InvalidType, argument_error


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise argument_error(InvalidType, name, "a torch.Tensor", type(value).__name__)
    return value


def dtype(name: str, value: torch.Tensor, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if value.dtype not in allowed:
        expected = " or ".join(str(d) for d in allowed)
        raise argument_error(InvalidDType, name, f"dtype {expected}", value.dtype)


def ndim(name: str, value: torch.Tensor, expected: int, layout: str) -> None:
    if value.dim() != expected:
        raise argument_error(InvalidShape, name, f"a {expected}-D tensor {layout}", f"shape {tuple(value.shape)}")


def contiguous(name: str, value: torch.Tensor) -> None:
    if not value.is_contiguous():
        raise argument_error(InvalidShape, name, "a contiguous tensor", f"strides {tuple(value.stride())}")


def integer(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise argument_error(InvalidType, name, "an int", type(value).__name__)
    if minimum is not None and value < minimum:
        raise argument_error(InvalidArgument, name, f"an int >= {minimum}", value)
    if maximum is not None and value > maximum:
        raise argument_error(InvalidArgument, name, f"an int <= {maximum}", value)
    return value


# Bounds of counts that size host allocations or travel as C++ int (docs/semantics.md, "Trust").
MAX_EXPERTS = 1 << 20
MAX_RANKS = 1 << 16
INT32_MAX = 2**31 - 1


def divides(divisor_name: str, divisor: int, dividend_name: str, dividend: int) -> None:
    if dividend % divisor != 0:
        raise argument_error(
            InvalidArgument, dividend_name, f"a multiple of {divisor_name} = {divisor}", f"{dividend}"
        )


def shaped(name: str, value: object, dtypes: Iterable[torch.dtype], shape: tuple, layout: str,
           device=None) -> torch.Tensor:
    """``value`` as a contiguous tensor of one of ``dtypes`` and exactly ``shape`` (``layout`` says
    what the dimensions are, for the message), on a device ``device(name, value)`` accepts
    (default :func:`supported_device`)."""
    tensor(name, value)
    dtype(name, value, dtypes)
    if tuple(value.shape) != shape:
        raise argument_error(InvalidShape, name, f"shape {shape} {layout}", f"shape {tuple(value.shape)}")
    contiguous(name, value)
    (device or supported_device)(name, value)
    return value


def supported_device(name: str, value: torch.Tensor) -> None:
    """A CPU (host target) or CUDA (GPU target) tensor; which one a call needs is the Buffer's
    to say (moelink._target: ``check_device``)."""
    if value.device.type not in ("cpu", "cuda"):
        raise argument_error(InvalidDevice, name, "a CPU tensor (host target) or a CUDA tensor (GPU target)",
                             f"device '{value.device}'")


def allocate(pool, shape, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """An output tensor (from ``pool`` when given); a size the host cannot allocate (absurd shapes,
    e.g. num_worst_tokens near 2^31) is an InvalidArgument naming the shape, not torch's RuntimeError."""
    try:
        return pool.empty(shape, dtype) if pool is not None else torch.empty(shape, dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:
        raise argument_error(InvalidArgument, "num_worst_tokens (or the shapes)",
                             "outputs the host can allocate", f"an output of shape {tuple(shape)} {dtype}: {exc}") from None
