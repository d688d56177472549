"""Overlap handles, DeepEP-compatible.

On the GPU target an :class:`EventOverlap` wraps a CUDA event recorded on the communication
stream. On the host target every operation has completed when the call returns (it runs on the
calling thread), so the event is empty and waiting on it returns at once: nothing pretends to be
asynchronous when it is not.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch

__all__ = ["EventOverlap"]


class EventOverlap:
    """``event``: a ``torch.cuda.Event`` or None (host target, or nothing to wait for).
    ``extra_tensors``: tensors kept alive until the event has been waited on (DeepEP's way of
    keeping inputs of an asynchronous operation from being freed early)."""

    def __init__(self, event: Optional[Any] = None, extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        """Makes torch's current stream wait for the event (no-op on the host target). An event
        with its own ``current_stream_wait`` (DeepEP's ``EventHandle``, which frameworks wrap
        themselves: ``EventOverlap(EventHandle())``) is asked to wait."""
        if self.event is None:
            return
        wait = getattr(self.event, "current_stream_wait", None)
        if wait is not None:
            wait()
        else:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, *exc) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap({'host: complete' if self.event is None else self.event})"
