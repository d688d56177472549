"""Typed errors raised by moelink.

Input errors subclass the builtin a caller would expect (``ValueError`` / ``TypeError``) and name
the argument, the expected and the received value. Runtime failures of a kernel (a wait that
reached its deadline, a device-side assertion, a schedule that can never finish) come from the
extension with the kernel, rank, block and thread in the message.
"""

from __future__ import annotations

__all__ = [
    "MoelinkError",
    "InvalidArgument",
    "InvalidType",
    "InvalidDType",
    "InvalidShape",
    "InvalidDevice",
    "CommTimeout",
    "DeviceAssert",
    "RankMismatch",
    "Deadlock",
    "GPUUnavailable",
    "CudaError",
    "NcclUnavailable",
    "NcclError",
    "BufferUnusable",
    "AliasConflict",
    "argument_error",
]


class MoelinkError(Exception):
    """Base class of every error moelink raises on purpose."""


class InvalidArgument(MoelinkError, ValueError):
    """An argument has a value outside its contract (range, divisibility, layout)."""


class InvalidType(MoelinkError, TypeError):
    """An argument has the wrong Python type (for example a list where a tensor is required)."""


class InvalidDType(MoelinkError, TypeError):
    """A tensor argument has the wrong dtype."""


class InvalidShape(InvalidArgument):
    """A tensor argument has the wrong rank, shape or strides."""


class InvalidDevice(InvalidArgument):
    """Tensors that must live together live on different devices, or on one moelink cannot use."""


class CommTimeout(MoelinkError, TimeoutError):
    """A spin-wait inside a kernel reached its deadline (MOELINK_TIMEOUT_S).

    The message names the kernel, rank, block, thread, what was awaited (peer, channel) and the
    last value seen.
    """


class DeviceAssert(MoelinkError, RuntimeError):
    """A device-side check (MOELINK_DEVICE_CHECK) failed inside a kernel."""


class RankMismatch(DeviceAssert):
    """The ranks of an operation disagree on one of its parameters (shapes, dtypes, top-k, experts,
    scales, SMs, queue sizes, the handle's dispatch): found in the operation's first
    synchronisation, raised on every rank, naming the two ranks, the field and both values
    (``ranks``, ``field``). Nothing was exchanged; the Buffer is unusable (docs/semantics.md, "Trust")."""

    def __init__(self, message: str, ranks: tuple = (), field: str = "") -> None:
        super().__init__(message)
        self.ranks, self.field = tuple(ranks), field


class Deadlock(MoelinkError, RuntimeError):
    """Every thread of a host-target launch is blocked on a barrier or warp collective that can
    never complete (for example a barrier with a thread count no group of threads reaches)."""


class GPUUnavailable(MoelinkError, RuntimeError):
    """A GPU operation was requested but the CUDA extension is missing or no device is usable."""


class CudaError(MoelinkError, RuntimeError):
    """A CUDA runtime call failed; the message carries CUDA's error name and text."""


class NcclUnavailable(GPUUnavailable):
    """NCCL cannot be used: ``libnccl.so.2`` was not found or does not load, lacks a symbol moelink
    needs, or has a version moelink does not support (older than 2.28 or than the headers it was
    built with). The message names the library path and what is wrong."""


class NcclError(MoelinkError, RuntimeError):
    """An NCCL call failed; the message names the step, the call, NCCL's result and its last error
    text. (A failed CUDA call inside NCCL raises CudaError, an NCCL timeout CommTimeout.)"""


class BufferUnusable(MoelinkError, RuntimeError):
    """A Buffer was destroyed, or poisoned by a failed collective; the message says which."""


def argument_error(cls: type[MoelinkError], name: str, expected: str, received: object) -> MoelinkError:
    """Builds ``cls`` with the one message format every input error uses."""
    return cls(f"{name}: expected {expected}, got {received}")


class AliasConflict(MoelinkError, ImportError):
    """``moelink.compat.install_deep_ep_alias`` found a real ``deep_ep`` already imported."""
