"""Overlap handles, DeepEP-compatible.

On the GPU target an :class:`EventOverlap` wraps a ``torch.cuda.Event`` recorded on the
communication stream when an operation was called with ``async_finish=True``;
:meth:`~EventOverlap.current_stream_wait` (or leaving a ``with`` block) makes torch's current
stream wait for it, so later work on the compute stream sees the operation's outputs. The tensors
the operation used are kept alive in ``extra_tensors`` until the handle goes away.

On the host target every operation has completed when the call returns (it runs on the calling
thread), so the event is empty and waiting on it returns at once: nothing pretends to be
asynchronous when it is not. An empty handle never touches ``torch.cuda``.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch

from .errors import InvalidArgument, InvalidType, argument_error

__all__ = ["EventOverlap"]


class EventOverlap:
    """``event``: a ``torch.cuda.Event`` or None (host target, or nothing to wait for).
    ``extra_tensors``: tensors kept alive until this handle is dropped (DeepEP's way of keeping the
    inputs and outputs of an asynchronous operation from being freed or reused early).
    ``device``: the CUDA device whose current stream :meth:`current_stream_wait` makes wait
    (default: torch's current device at wait time)."""

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None,
                 device: Union[None, int, str, torch.device] = None):
        # Frameworks also wrap DeepEP-style handles with their own current_stream_wait (Megatron:
        # EventOverlap(EventHandle())).
        if event is not None and not isinstance(event, torch.cuda.Event) and \
                not callable(getattr(event, "current_stream_wait", None)):
            raise argument_error(InvalidType, "event", "a torch.cuda.Event, an object with current_stream_wait(), "
                                 "or None", type(event).__name__)
        if extra_tensors is not None and not isinstance(extra_tensors, tuple):
            raise argument_error(InvalidType, "extra_tensors", "a tuple of tensors or None", type(extra_tensors).__name__)
        self.event = event
        self.extra_tensors = extra_tensors
        self.device = None if device is None else _cuda_device("device", device)

    @classmethod
    def capture(cls, device: Union[None, int, str, torch.device] = None) -> "EventOverlap":
        """An event recorded now on torch's current stream of ``device`` (``Buffer.capture``), to
        pass as ``previous_event``. A CPU device (the host target) gives an empty handle."""
        if device is not None and torch.device(device).type == "cpu":
            return cls()
        cuda_device = _cuda_device("device", device if device is not None else "cuda")
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(cuda_device))
        return cls(event, device=cuda_device)

    @property
    def is_empty(self) -> bool:
        """True when there is nothing to wait for (host target, or a synchronous GPU operation)."""
        return self.event is None

    def current_stream_wait(self) -> None:
        """Makes torch's current stream wait for the event; returns at once for an empty handle.
        Only the stream waits: the calling thread does not block. An event with its own
        ``current_stream_wait`` (DeepEP's ``EventHandle``, which frameworks wrap themselves:
        ``EventOverlap(EventHandle())``) is asked to wait."""
        if self.event is None:
            return
        wait = getattr(self.event, "current_stream_wait", None)
        if wait is not None:
            wait()
            return
        stream = torch.cuda.current_stream(self.device) if self.device is not None else torch.cuda.current_stream()
        stream.wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        if self.event is None:
            return "EventOverlap(empty: nothing to wait for)"
        return f"EventOverlap({self.event}, device={self.device}, {len(self.extra_tensors or ())} tensors kept)"


def _cuda_device(name: str, device: Union[int, str, torch.device]) -> torch.device:
    """``device`` as an indexed CUDA device (index: torch's current device when not given)."""
    try:
        parsed = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    except (RuntimeError, TypeError) as exc:
        raise argument_error(InvalidArgument, name, "a CUDA device", repr(device)) from exc
    if parsed.type != "cuda":
        raise argument_error(InvalidArgument, name, "a CUDA device", f"'{parsed}'")
    if parsed.index is None:
        parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed
