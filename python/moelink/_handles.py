"""Handles are checked by identity (docs/semantics.md, "Trust").

A dispatch handle (``DispatchHandle``, ``InternodeHandle``) is a frozen dataclass whose tensors
the kernels index with. A Buffer keeps a ``HandleBook``: a weak map from every handle it made to
that handle's serial (the Buffer operation of its dispatch, the same on every rank, which the
agreement words carry: ranks that combine with different dispatches' handles fail together) and
the fingerprint of its tensors (dtype, shape, strides, device, storage address and torch's
in-place version counter) and scalar fields. Every use looks the handle up (one dict lookup) and
compares the fingerprint (a few attribute reads per tensor), then runs a couple of vectorised
range checks on what the kernels index with (a write that bypassed the version counter, e.g.
through numpy, still cannot become an out-of-bounds read). A handle from another Buffer, one
built or copied by hand (``dataclasses.replace`` included), or one whose tensors were modified,
is an InvalidArgument naming the argument and what differs; nothing reaches a kernel.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Tuple

import torch

from .errors import InvalidArgument, InvalidType, argument_error

__all__ = ["HandleBook"]


def _tensor_print(t: torch.Tensor) -> Tuple:
    return (t.dtype, tuple(t.shape), tuple(t.stride()), str(t.device), t.data_ptr() if t.numel() else 0, t._version)


def _fingerprint(handle) -> dict:
    out = {}
    for f in dataclasses.fields(handle):
        value = getattr(handle, f.name)
        if isinstance(value, torch.Tensor):
            out[f.name] = _tensor_print(value)
        elif isinstance(value, list):
            out[f.name] = tuple(value)
        else:
            out[f.name] = value
    return out


def _describe(before, after) -> str:
    if isinstance(before, tuple) and len(before) == 6 and isinstance(before[0], torch.dtype):
        labels = ("dtype", "shape", "strides", "device", "storage", "contents (in-place version)")
        for label, b, a in zip(labels, before, after if isinstance(after, tuple) and len(after) == 6 else ()):
            if b != a:
                return f"its {label} changed" if label != "contents (in-place version)" else "it was modified in place"
        return "it was replaced"
    return f"{before!r} changed to {after!r}"


class HandleBook:
    """The handles one Buffer made (see the module docstring)."""

    def __init__(self) -> None:
        self._made: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def record(self, handle, serial: int) -> None:
        self._made[handle] = (serial, _fingerprint(handle))

    def check(self, handle, handle_type: type, name: str = "handle") -> int:
        """The handle's serial; raises InvalidType/InvalidArgument naming ``name`` otherwise."""
        if not isinstance(handle, handle_type):
            raise argument_error(InvalidType, name, f"a handle returned by Buffer.dispatch (a {handle_type.__name__} "
                                 "of this Buffer)", type(handle).__name__)
        entry = self._made.get(handle)
        if entry is None:
            raise argument_error(InvalidArgument, name, "a handle returned by Buffer.dispatch of this Buffer",
                                 "a handle this Buffer did not make (from another Buffer, or built or copied by hand)")
        serial, before = entry
        after = _fingerprint(handle)
        if after != before:
            for field, value in before.items():
                if after.get(field) != value:
                    raise argument_error(InvalidArgument, f"{name}.{field}", "the tensor its dispatch returned, unchanged",
                                         _describe(value, after.get(field)))
        _check_values(handle, name)
        return serial


def _check_values(handle, name: str) -> None:
    """What the kernels index with, in range (cheap: a few vectorised reductions). Not on the GPU
    target: there the reads would be a host sync per call, on a stream that need not yet be ordered
    after the dispatch that wrote them (async_finish); the kernels range-check what they index with."""
    starts = handle.recv_channel_start
    if starts.is_cuda:
        return
    if starts.numel() == 0 or int(starts[0]) != 0 or (starts.numel() > 1 and bool((starts[1:] < starts[:-1]).any())):
        raise argument_error(InvalidArgument, f"{name}.recv_channel_start", "non-decreasing receive rows from 0",
                             "values out of order")
    if handle.recv_src_idx.numel() != int(starts[-1]):
        raise argument_error(InvalidArgument, f"{name}.recv_src_idx", f"{int(starts[-1])} rows (recv_channel_start)",
                             handle.recv_src_idx.numel())
    head = handle.send_head
    if head.numel():
        low, high = int(head.min()), int(head.max())
        if low < -1 or high >= max(1, head.shape[0]):
            raise argument_error(InvalidArgument, f"{name}.send_head", f"positions in [-1, {head.shape[0]})",
                                 f"min {low}, max {high}")
