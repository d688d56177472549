"""Streams, events and host-visible counts for operations on CUDA tensors (DeepEP semantics).

Three pieces the Buffer uses around every GPU operation; each is a no-op on the host target (CPU
tensors), where an operation has finished when its call returns, and none of them touches
``torch.cuda`` for a CPU device.

:class:`CommStream` (``Buffer.get_comm_stream``): one high-priority stream per Buffer on which its
kernels run, so communication overlaps compute on torch's current stream.

:class:`CommOp`, around one operation (``previous_event``, ``async_finish``,
``allocate_on_comm_stream`` as in DeepEP)::

    with CommOp(device, comm_stream, previous_event, async_finish, allocate_on_comm_stream) as op:
        recv_x = torch.empty(...)                 # on the comm stream if allocate_on_comm_stream
        launch(..., stream=op.stream_handle)      # kernels go on the comm stream
        op.keep(x, recv_x, ...)                   # every tensor the kernels read or write
    return recv_x, op.event                       # an EventOverlap

  1. the comm stream first waits for ``previous_event`` if given, else for the current (compute)
     stream, so the kernels see everything queued before the call;
  2. with ``allocate_on_comm_stream`` the comm stream is torch's current stream inside the block,
     so the caching allocator ties the outputs to it; DeepEP's rule applies: it needs
     ``previous_event`` and ``async_finish`` (else the outputs could be used on the compute
     stream before anything orders them);
  3. on leaving: with ``async_finish`` an event is recorded on the comm stream and returned, and
     every kept tensor is ``record_stream``-ed on the comm stream (and on the compute stream with
     ``allocate_on_comm_stream``), so the allocator does not reuse its memory while the kernels or
     later compute still use it; without it, the compute stream waits for the comm stream and the
     event is empty. The caller's current stream is restored either way, also on an exception
     (then the compute stream waits for the comm stream too: whatever was queued stays ordered).

:class:`ReceiveCounts`: counts a kernel writes into pinned host memory itself and the host waits
for, with a deadline. No kernel writes there yet: the Buffer's dispatch copies the notify kernel's
counts to pinned memory on the comm stream instead (``_target.CudaTarget.to_host``).

:func:`poll`: the host's deadlined wait for a condition (a stream or event done), with back-off.
"""

from __future__ import annotations

import contextlib
import time
from typing import Optional, Union

import torch

from .errors import CommTimeout, InvalidArgument, InvalidType, argument_error
from .event import EventOverlap

__all__ = ["CommOp", "CommStream", "ReceiveCounts", "poll"]

Device = Union[int, str, torch.device]


def _device(name: str, device: Device) -> torch.device:
    try:
        parsed = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise argument_error(InvalidArgument, name, "a torch device", repr(device)) from exc
    if parsed.type not in ("cpu", "cuda"):
        raise argument_error(InvalidArgument, name, "a 'cpu' or 'cuda' device", f"'{parsed}'")
    if parsed.type == "cuda" and parsed.index is None:
        parsed = torch.device("cuda", torch.cuda.current_device())
    return parsed


def poll(ready, timeout_s: float) -> bool:
    """Calls ``ready()`` until it is true (True) or ``timeout_s`` passed (False), sleeping 10 us
    doubling to 1 ms between calls so that a long wait does not cost a CPU core."""
    deadline = time.monotonic() + timeout_s
    pause = 1e-5
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(pause)
        pause = min(2 * pause, 1e-3)
    return True


class CommStream:
    """The communication stream of one Buffer on ``device``: a ``torch.cuda.Stream`` of the
    highest priority, created on first use. On a CPU device there is none (``stream`` is None,
    ``handle`` 0: the host target runs on the calling thread)."""

    def __init__(self, device: Device):
        self.device = _device("device", device)
        self._stream: Optional[torch.cuda.Stream] = None

    @property
    def stream(self) -> Optional[torch.cuda.Stream]:
        if self.device.type != "cuda":
            return None
        if self._stream is None:
            # Lower is higher; torch clamps a value beyond the range to the highest priority.
            self._stream = torch.cuda.Stream(device=self.device, priority=-(1 << 20))
        return self._stream

    @property
    def handle(self) -> int:
        """The raw cudaStream_t for kernel launches (0 on the host target)."""
        stream = self.stream
        return 0 if stream is None else stream.cuda_stream


class CommOp:
    """Stream and event discipline around one operation (module docstring)."""

    def __init__(self, device: Device, comm_stream: CommStream, previous_event: Optional[EventOverlap] = None,
                 async_finish: bool = False, allocate_on_comm_stream: bool = False):
        if not isinstance(comm_stream, CommStream):
            raise argument_error(InvalidType, "comm_stream", "a moelink CommStream", type(comm_stream).__name__)
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise argument_error(InvalidType, "previous_event", "an EventOverlap or None", type(previous_event).__name__)
        self.device = _device("device", device)
        if comm_stream.device != self.device:
            raise argument_error(InvalidArgument, "comm_stream", f"the comm stream of {self.device}", f"one of {comm_stream.device}")
        self.is_cuda = self.device.type == "cuda"
        if self.is_cuda and allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise argument_error(InvalidArgument, "allocate_on_comm_stream",
                                 "previous_event and async_finish=True with it (as in DeepEP)",
                                 f"previous_event={previous_event!r}, async_finish={async_finish}")
        self.comm_stream = comm_stream
        self.previous_event = previous_event
        self.async_finish = bool(async_finish)
        self.allocate_on_comm_stream = bool(allocate_on_comm_stream)
        self.event = EventOverlap()  # the result; set when the block exits without an error
        self._kept: list[torch.Tensor] = []
        self._compute: Optional[torch.cuda.Stream] = None
        self._stream_scope = None
        self._device_scope = None

    @property
    def stream_handle(self) -> int:
        """cudaStream_t the kernels of this operation go on (0 on the host target)."""
        return self.comm_stream.handle

    def keep(self, *tensors: Optional[torch.Tensor]) -> None:
        """Tensors the operation's kernels read or write (None entries are skipped)."""
        self._kept.extend(t for t in tensors if t is not None)

    def on_stream(self):
        """A scope in which torch's current stream is the comm stream: for torch ops that must run
        after the operation's kernels (or before its next ones) in stream order. A no-op on the host."""
        if not self.is_cuda:
            return contextlib.nullcontext()
        return torch.cuda.stream(self.comm_stream.stream)

    def __enter__(self) -> "CommOp":
        if not self.is_cuda:
            return self
        comm = self.comm_stream.stream
        # Launches go to the Buffer's device whatever the caller's current device is.
        self._device_scope = torch.cuda.device(self.device)
        self._device_scope.__enter__()
        try:
            self._compute = torch.cuda.current_stream(self.device)
            if self.previous_event is not None and self.previous_event.event is not None:
                comm.wait_event(self.previous_event.event)
            else:
                comm.wait_stream(self._compute)
            if self.allocate_on_comm_stream:
                self._stream_scope = torch.cuda.stream(comm)
                self._stream_scope.__enter__()
        except BaseException:
            self._device_scope.__exit__(None, None, None)
            self._device_scope = None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.is_cuda:
            return
        comm = self.comm_stream.stream
        try:
            if exc_type is None and self.async_finish:
                event = torch.cuda.Event()
                event.record(comm)
                for t in self._kept:
                    if t.is_cuda:
                        t.record_stream(comm)
                        if self.allocate_on_comm_stream:
                            t.record_stream(self._compute)
                self.event = EventOverlap(event, extra_tensors=tuple(self._kept), device=self.device)
            else:
                self._compute.wait_stream(comm)
        finally:
            if self._stream_scope is not None:
                self._stream_scope.__exit__(exc_type, exc, tb)
                self._stream_scope = None
            if self._device_scope is not None:
                self._device_scope.__exit__(exc_type, exc, tb)
                self._device_scope = None


class ReceiveCounts:
    """``num_slots`` int64 counts in pinned host memory that a kernel fills and the host awaits.

    On the GPU target the memory is page-locked (``pin_memory``); under unified addressing its
    host address is also its device address (:attr:`device_ptr`), so a kernel stores the counts
    there with system-scope release stores. On the host target it is ordinary memory, filled by
    the host kernels before their launch returns. :meth:`reset` marks every slot unwritten (-1)
    and must run before the kernel is launched; :meth:`wait` polls until every slot is written or
    the deadline passes.
    """

    UNWRITTEN = -1

    def __init__(self, num_slots: int, device: Device):
        if isinstance(num_slots, bool) or not isinstance(num_slots, int):
            raise argument_error(InvalidType, "num_slots", "an int", type(num_slots).__name__)
        if num_slots < 1:
            raise argument_error(InvalidArgument, "num_slots", "an int >= 1", num_slots)
        self.device = _device("device", device)
        pinned = self.device.type == "cuda"
        self.host = torch.full((num_slots,), self.UNWRITTEN, dtype=torch.int64, pin_memory=pinned)

    @property
    def device_ptr(self) -> int:
        """Where a kernel writes slot 0 (the host address; identical on the device under UVA)."""
        return self.host.data_ptr()

    def reset(self) -> None:
        self.host.fill_(self.UNWRITTEN)

    def wait(self, timeout_s: float, what: str, rank: int = -1) -> list[int]:
        """The counts once no slot is -1; :class:`CommTimeout` naming ``what``, ``rank`` and the
        unwritten slots if that takes longer than ``timeout_s``. Never trusts a count: negative
        values other than -1 are reported too (they are a peer's bug, not a size)."""
        start = time.monotonic()
        deadline = start + timeout_s
        pause = 1e-5
        while True:
            values = self.host.tolist()  # a fresh read of the pinned memory every time
            bad = [i for i, v in enumerate(values) if v < self.UNWRITTEN]
            if bad:
                raise InvalidArgument(f"{what} (rank {rank}): slots {bad} hold negative counts {[values[i] for i in bad]}")
            missing = [i for i, v in enumerate(values) if v == self.UNWRITTEN]
            if not missing:
                return values
            if time.monotonic() >= deadline:
                shown = ", ".join(map(str, missing[:16])) + (", ..." if len(missing) > 16 else "")
                raise CommTimeout(f"{what} (rank {rank}): {len(missing)} of {len(values)} counts were not written "
                                  f"within {timeout_s:g} s (slots [{shown}])")
            # Spin for the first 200 us (the counts usually arrive within microseconds of the
            # notify kernel), then back off so a late peer does not cost a CPU core.
            if time.monotonic() - start > 2e-4:
                time.sleep(pause)
                pause = min(pause * 2, 1e-3)

