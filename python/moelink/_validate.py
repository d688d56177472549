"""Input checks shared by the public API. Each raises a typed moelink error that names the
argument, what was expected and what was received; nothing unchecked reaches a kernel."""

from __future__ import annotations

import os
import socket
from typing import Iterable, List, Optional

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
           device=None, rows: bool = False) -> torch.Tensor:
    """``value`` as a contiguous tensor of one of ``dtypes`` and exactly ``shape`` (``layout`` says
    what the dimensions are, for the message), on a device ``device(name, value)`` accepts
    (default :func:`supported_device`). ``rows``: a payload the kernels copy 16 bytes at a time,
    so its data must start at a 16-byte boundary (:func:`row_aligned`)."""
    tensor(name, value)
    dtype(name, value, dtypes)
    if tuple(value.shape) != shape:
        raise argument_error(InvalidShape, name, f"shape {shape} {layout}", f"shape {tuple(value.shape)}")
    contiguous(name, value)
    (device or supported_device)(name, value)
    if rows:
        row_aligned(name, value)
    return value


def row_aligned(name: str, value: torch.Tensor) -> None:
    """The kernels load and store payload rows 16 bytes at a time (and by bulk copies on the GPU,
    where a misaligned address is a fault that ends the process's CUDA context): a tensor's data
    must start at a 16-byte boundary. Every allocation does; a view at an element offset may not."""
    if value.numel() and value.data_ptr() % 16:
        raise argument_error(InvalidArgument, name, "data starting at a 16-byte boundary (payload rows are copied "
                             "16 bytes at a time; a view at an element offset is not: pass a copy)",
                             f"data_ptr() % 16 = {value.data_ptr() % 16}")


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


# ---- ranks per node --------------------------------------------------------------------------------

RANKS_PER_NODE_ENV = "MOELINK_RANKS_PER_NODE"


def host_names(group) -> List[str]:
    """Every rank's host name, by rank (collective over ``group``)."""
    import torch.distributed as dist
    names = [None] * group.size()
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return names


def ranks_per_node(value: Optional[int], group_size: int, hosts: Optional[List[str]] = None) -> int:
    """``ranks_per_node``, else MOELINK_RANKS_PER_NODE, else the ranks per host when ``hosts``
    (every rank's host name: the GPU target) is given, else the group size (one node). Any divisor
    of the group size, so one machine can pose as 2 x 2, 4 x 1, 2 x 4 ..."""
    name = "ranks_per_node"
    if value is None:
        text = os.environ.get(RANKS_PER_NODE_ENV, "")
        if text == "":
            return group_size if hosts is None else ranks_per_host(hosts)
        name = RANKS_PER_NODE_ENV
        try:
            value = int(text)
        except ValueError:
            raise argument_error(InvalidArgument, name, "an int", repr(text)) from None
    integer(name, value, minimum=1)
    if group_size % value:
        raise argument_error(InvalidArgument, name, f"a divisor of the group size {group_size}", value)
    return value


def ranks_per_host(hosts: List[str]) -> int:
    """The ranks of each host when every host holds the same number of consecutive ranks (as
    torchrun places them; DeepEP's split into NVLink nodes of 8 GPUs on 8-GPU hosts); otherwise
    InvalidArgument asking for ranks_per_node."""
    per_host = hosts.count(hosts[0])
    blocks = [hosts[start:start + per_host] for start in range(0, len(hosts), per_host)]
    if len(hosts) % per_host or any(len(set(block)) != 1 for block in blocks) or \
            len({block[0] for block in blocks}) != len(blocks):
        listing = ", ".join(f"rank {r}: {h}" for r, h in enumerate(hosts))
        raise argument_error(InvalidArgument, "ranks_per_node", "given (or MOELINK_RANKS_PER_NODE): the group's "
                             "ranks are not equal blocks of consecutive ranks per host, so the node split cannot "
                             "be inferred", listing)
    return per_host
