"""Where a Buffer's kernels run: the host target (CPU tensors, ``moelink._host``) or the GPU target
(CUDA tensors, ``moelink._cuda``). The mode modules (``_intranode``, ``_internode``,
``_low_latency``) are written once against this interface; only what truly differs between the
targets lives here. ``tests/test_gpu_contract.py`` runs them on the host under the contract the GPU
target needs of them (the fixed block, the operation's stream, every tensor a kernel uses kept).

=================  ==================================  ===========================================
                   :class:`HostTarget`                 :class:`CudaTarget`
=================  ==================================  ===========================================
``module``         ``moelink._host``                   ``moelink._cuda``
``device``         ``cpu``                             ``cuda:<i>``, torch's current device when
                                                       the Buffer was created
windows            shared memory (``_host_windows``)   NCCL symmetric windows (``_nccl_windows``)
scale-out window   shared memory + emulated NIC        an NCCL window + GIN (``_gin.GinScaleOut``)
                   (``_scaleout.ScaleOutWindows``)
``operation()``    runs on the calling thread; the     ``_gpu.CommOp``: kernels on the Buffer's
                   event is empty                      comm stream, DeepEP's event rules
``to_host()``      the tensors themselves              pinned copies on the comm stream, awaited
                                                       with the MOELINK_TIMEOUT_S deadline
``check_abort()``  nothing (a host wait raises)        a device wait that expired filled the
                                                       AbortRecord: CommTimeout, as on the host
``block_warps()``  ``runtime.block_warps`` (one warp   the GPU build's fixed block, 16 warps
                   per rank by default)                (``GPU_BLOCK_WARPS``; the kernels refuse
                                                       any other)
``grid_blocks()``  1 (the host runs fibers on one      what is asked, below the SM count: one SM
                   thread anyway)                      stays free for the GIN pump
``scale_out()``    "nic" (the emulated IBGDA NIC)      "gin" across nodes; "node" on one node (a
                                                       low-latency Buffer: NVLink stores through
                                                       the LSA table, ``_scaleout.NodeScaleOut``)
=================  ==================================  ===========================================

Nothing on this page has run on a GPU yet (no machine here has one); ``tests/test_gpu_buffer.py``
(``pytest -m gpu``, run by ``tools/device_check.sh``) is the check that will prove it.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed as dist

from . import _backend, _host, runtime
from ._gpu import CommOp, CommStream, poll
from .errors import CommTimeout, GPUUnavailable, InvalidArgument, InvalidDevice, MoelinkError, argument_error
from .event import EventOverlap

__all__ = ["HostTarget", "CudaTarget", "HOST", "bootstrap_gpu"]


class _HostOperation:
    """What ``HostTarget.operation`` yields: the same surface as ``_gpu.CommOp``."""

    stream_handle = 0

    def __init__(self) -> None:
        self.event = EventOverlap()

    def keep(self, *tensors) -> None:
        pass

    def on_stream(self):
        return contextlib.nullcontext()


class HostTarget:
    """CPU tensors, kernels on the SIMT host runtime (they have finished when their call returns)."""

    is_cuda = False
    module = _host
    device = torch.device("cpu")

    @staticmethod
    def block_warps(num_ranks: Optional[int] = None) -> int:
        return runtime.block_warps(num_ranks)

    @staticmethod
    def grid_blocks(wanted: int) -> int:
        return 1

    @staticmethod
    def scale_out(num_nodes: int) -> str:
        return "nic"

    def check_device(self, name: str, value: torch.Tensor) -> None:
        if value.device.type != "cpu":
            raise argument_error(InvalidDevice, name, "a CPU tensor (this Buffer is on the host target: a gloo "
                                 "group)", f"device '{value.device}'")

    @contextlib.contextmanager
    def operation(self, previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                  allocate_on_comm_stream: bool = False) -> Iterator[_HostOperation]:
        yield _HostOperation()

    def to_host(self, op, what: str, rank: int, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tensors

    def check_abort(self, what: str) -> None:
        pass

    def comm_stream(self):
        return None

    def drain(self, what: str) -> None:
        pass

    def comm_scope(self):
        return contextlib.nullcontext()


HOST = HostTarget()


_LIVE_CUDA_TARGETS: "weakref.WeakSet[CudaTarget]" = weakref.WeakSet()  # for check_abort's drain


class HostStaging:
    """Reusable host buffers for device-to-host copies: one per position in a call (two tensors
    of one call never share one, whatever their shapes), kept per (position, dtype, numel)."""

    def __init__(self, pin_memory: bool):
        self.pin_memory = pin_memory
        self._buffers: dict = {}

    def buffers(self, tensors) -> list:
        out = []
        for position, t in enumerate(tensors):
            key = (position, t.dtype, t.numel())
            host = self._buffers.get(key)
            if host is None:
                host = self._buffers[key] = torch.empty(t.numel(), dtype=t.dtype, pin_memory=self.pin_memory)
            out.append(host.view(t.shape))
        return out


class CudaTarget:
    """CUDA tensors on ``device``; kernels on the Buffer's comm stream (``moelink._gpu``)."""

    is_cuda = True

    def __init__(self, device: torch.device, timeout_s: float):
        self.module = _backend.cuda()  # GPUUnavailable naming what this machine lacks
        self.device = device
        self.timeout_s = timeout_s
        self._comm = CommStream(device)
        self._staging = HostStaging(pin_memory=True)  # to_host's reusable pinned buffers
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        _LIVE_CUDA_TARGETS.add(self)

    def block_warps(self, num_ranks: Optional[int] = None) -> int:
        """Every GPU kernel runs blocks of the build's fixed size (ops_intranode.h: kGpuBlockWarps)."""
        return int(self.module.intranode.GPU_BLOCK_WARPS)

    def grid_blocks(self, wanted: int) -> int:
        """A grid of ``wanted`` blocks, at most the SM count less one: the cooperative kernels wait
        across blocks, so all must be resident, and the GIN pump needs an SM beside them
        (transport/nccl/gin_pump.h)."""
        return max(1, min(int(wanted), self.sm_count - 1))

    @staticmethod
    def scale_out(num_nodes: int) -> str:
        """GIN needs two nodes or more (and a NIC); on one node every peer is an LSA peer."""
        return "gin" if num_nodes > 1 else "node"

    def check_device(self, name: str, value: torch.Tensor) -> None:
        if value.device != self.device:
            raise argument_error(InvalidDevice, name, f"a tensor on {self.device} (this Buffer's GPU)",
                                 f"device '{value.device}'")

    def operation(self, previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                  allocate_on_comm_stream: bool = False) -> CommOp:
        """The operation's stream scope; its arguments are checked here, before it starts (an error
        then does not poison the Buffer). Buffer calls ``check_abort`` once it has started."""
        return CommOp(self.device, self._comm, previous_event, async_finish, allocate_on_comm_stream)

    def to_host(self, op: CommOp, what: str, rank: int, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Host copies of ``tensors`` (device tensors the operation's kernels wrote on the comm
        stream), queued on that stream and awaited with a deadline: the kernels' own waits have
        deadlines too, so the event always completes; the deadline here guards the host against
        a stream that something else blocks. A device wait that expired is the CommTimeout."""
        stream = op.comm_stream.stream
        copies = self._staging.buffers(tensors)
        with torch.cuda.stream(stream):
            for host, t in zip(copies, tensors):
                host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        if not poll(lambda: self._finished(done, what), self.timeout_s):
            raise CommTimeout(f"{what} (rank {rank}): the comm stream did not finish within {self.timeout_s:g} s "
                              "(MOELINK_TIMEOUT_S), though every kernel wait has that deadline")
        self.check_abort(what)
        # The pinned buffers are reused by the next call: hand out copies the caller may keep.
        return tuple(c.clone() for c in copies)

    def _finished(self, event, what: str) -> bool:
        """``event.query()``; when CUDA reports a failed kernel, a CommTimeout the AbortRecord holds
        is raised first (it names the root cause). A failed device check traps: CUDA's error is
        raised, and its message went to the kernel's printf (docs/semantics.md, "Trust")."""
        try:
            return event.query()
        except RuntimeError:
            self.check_abort(what)
            raise

    def check_abort(self, what: str) -> None:
        """CommTimeout from the process's AbortRecord, if a device wait expired. While a wait has
        claimed the record every kernel drains at once, so the comm stream is drained first: the
        record is cleared only once nothing launched before it can still be waiting."""
        abort = self.module.abort
        if abort.pending():
            # The record is the process's: any Buffer's kernel may have claimed it, so every GPU
            # Buffer's comm stream is drained (each drains at once while the record is claimed).
            for target in list(_LIVE_CUDA_TARGETS):
                target.drain(what)
            if abort.pending() and abort.record() is None:  # claimed, and its kernel never published
                abort.clear()
                raise CommTimeout(f"{what}: a device wait claimed the abort record but never published it (its "
                                  "kernel did not finish within the deadline)")
        abort.raise_if_aborted(what)

    def comm_stream(self):
        return self._comm.stream

    @contextlib.contextmanager
    def comm_scope(self):
        """torch ops in stream order with the Buffer's kernels (shrink mode's mask words): on the
        comm stream, after what the caller queued; the caller's stream waits for them after."""
        caller, comm = torch.cuda.current_stream(self.device), self._comm.stream
        comm.wait_stream(caller)
        try:
            with torch.cuda.stream(comm):
                yield
        finally:
            caller.wait_stream(comm)

    def drain(self, what: str) -> None:
        """Waits (with the deadline) until the comm stream ran everything queued on it: before the
        windows its kernels use are freed. Raises nothing: a Buffer being torn down reports no
        timeout (the AbortRecord keeps it for the next operation of the process)."""
        try:
            poll(self._comm.stream.query, self.timeout_s)
        except RuntimeError:  # a faulted CUDA context: nothing runs on the stream any more
            pass


def bootstrap_gpu(group, num_nvl_bytes: int, ranks_per_node: Optional[int], agree: Optional[dict],
                  local_error: Optional[MoelinkError], timeout_s: float):
    """``(CudaTarget, NcclWindows or None)`` of a Buffer on the GPU target, on torch's current CUDA
    device (DeepEP's rule: one Buffer per device, created after ``torch.cuda.set_device``).
    Collective over ``group``: ``local_error`` (this rank's argument error) and a machine that
    cannot run the GPU target travel in the first exchange, so every rank raises the same class,
    naming each failed rank, and none waits for a peer that gave up."""
    from . import _nccl_windows
    target, error = None, local_error
    if error is None:
        try:
            try:
                _backend.cuda()
                if not torch.cuda.is_available():
                    raise GPUUnavailable("torch sees no CUDA device: a CPU build of torch, or no driver")
            except GPUUnavailable as exc:
                raise GPUUnavailable(f"group: a '{dist.get_backend(group)}' group selects the GPU target, but this "
                                     f"machine cannot run moelink's GPU target ({exc}); the host target needs a gloo "
                                     "group and CPU tensors") from None
            target = CudaTarget(torch.device("cuda", torch.cuda.current_device()), timeout_s)
        except MoelinkError as exc:
            error = exc
    if num_nvl_bytes == 0:
        # No window: one exchange of the arguments and outcomes, as the windows' first step.
        outcomes = _nccl_windows._gather(group, ((ranks_per_node, repr(sorted((agree or {}).items()))),
                                                 _nccl_windows._outcome(error)))
        _nccl_windows._raise_if_failed("Buffer arguments", [o for _, o in outcomes], error)
        if any(args != outcomes[0][0] for args, _ in outcomes):
            listing = ", ".join(f"rank {r}: {args}" for r, (args, _) in enumerate(outcomes))
            raise InvalidArgument(f"(ranks_per_node, num_rdma_bytes, ...): expected the same on every rank, got {listing}")
        return target, None
    windows = _nccl_windows.bootstrap_nccl_windows(
        group, num_nvl_bytes, ranks_per_node=ranks_per_node,
        device=None if target is None else target.device.index, timeout_s=timeout_s, agree=agree,
        local_error=error)
    return target, windows
