"""The GPU target's scale-out transport: an NCCL symmetric window laid out as a scale-out window
(signals first, ``csrc/transport/scaleout.cuh``) plus this rank's GIN transport
(``csrc/transport/nccl/gin_transport.h``): a device communicator with GIN, the work-queue ring the
kernels post to, and the pump that turns entries into ``ncclGin`` calls (docs/gpu-transport.md §2).

Same surface as the host target's :class:`moelink._scaleout.ScaleOutWindows` where ``Buffer``, the
internode path and the low-latency mode use it: ``windows`` (here :class:`NcclWindows`),
``data_bytes``, ``num_signals``, ``reserved_head_bytes``, :meth:`handle`, :meth:`counters`,
:meth:`reset_counters`, :meth:`wait_idle`, :meth:`close`, ``closed``.

Bootstrap (collective over ``group``; every step ends with an exchange of outcomes, so one failing
rank makes every rank raise the same error class): the NCCL windows
(:func:`moelink._nccl_windows.bootstrap_nccl_windows`), the GIN transport's local checks (plan,
signals, a GIN backend: ``check_gin``), then the transport itself (``ncclDevCommCreate`` is
collective: every rank enters it only once every rank passed the checks). Nothing of this
has run on a GPU yet: the host-side checks (library symbols, version, the plan, argument errors,
no-GPU errors) are tested without one; the device communicator, the ring, the pump and the
teardown are untested (docs/gpu-transport.md §2.7 lists the checks for the first cluster).

``MOELINK_GIN_QUEUE_DEPTH`` (docs/env.md): descriptors per GIN queue; default 1024.
"""

from __future__ import annotations

import os
from typing import Optional

import torch.distributed as dist

from . import _backend
from ._nccl_windows import _gather, _outcome, _raise_if_failed, _nccl_module, bootstrap_nccl_windows
from ._scaleout import StreamOrderedScaleOut
from .errors import InvalidArgument, MoelinkError, argument_error

__all__ = ["GinScaleOut", "bootstrap_gin_scaleout", "plan", "queue_depth_from_env", "QUEUE_DEPTH_ENV"]

QUEUE_DEPTH_ENV = "MOELINK_GIN_QUEUE_DEPTH"


def queue_depth_from_env() -> int:
    nccl = _nccl_module()
    text = os.environ.get(QUEUE_DEPTH_ENV, "").strip()
    if not text:
        return int(nccl.GIN_DEFAULT_QUEUE_DEPTH)
    try:
        value = int(text)
    except ValueError:
        raise argument_error(InvalidArgument, QUEUE_DEPTH_ENV, "an int", repr(text)) from None
    if not nccl.GIN_MIN_QUEUE_DEPTH <= value <= 65536:
        raise argument_error(InvalidArgument, QUEUE_DEPTH_ENV, f"an int in [{nccl.GIN_MIN_QUEUE_DEPTH}, 65536]", value)
    return value


def plan(num_ranks: int, lsa_size: int, ranks_per_node: int, *, all_to_all: bool = True,
         queue_depth: Optional[int] = None) -> dict:
    """What the GIN transport asks NCCL for: ``{"connection": "full"|"rail", "queue_depth",
    "context_count", "why"}``. Needs no GPU; InvalidArgument names the argument it cannot serve."""
    nccl = _nccl_module()
    depth = queue_depth_from_env() if queue_depth is None else queue_depth
    return dict(nccl.plan_gin(num_ranks=num_ranks, lsa_size=lsa_size, ranks_per_node=ranks_per_node,
                              all_to_all=all_to_all, queue_depth=depth))


class GinScaleOut(StreamOrderedScaleOut):
    """This rank's scale-out window (an NCCL window) and its GIN transport. Once the stream the
    kernels ran on has drained, every put they posted was handed to the NIC and flushed (each
    launch's pump joins that stream: transport/nccl/gin_pump.h), so counters are complete and
    wait_idle has nothing to wait for."""

    def __init__(self, windows, native, num_signals: int):
        super().__init__(windows, num_signals)
        self.native = native

    def handle(self) -> dict:
        """The keyword arguments a kernel context takes for this transport (ScaleOut, kind kGin)."""
        if self.closed:
            raise InvalidArgument("handle: the GIN scale-out windows are closed")
        nccl = _nccl_module()
        return dict(net_kind=int(nccl.SCALE_OUT_KIND_GIN), net_window=self.windows.local_ptr,
                    net_window_bytes=self.data_bytes, num_signals=self.num_signals, net_queue=self.native.ring_ptr)

    def close(self) -> None:
        """The transport first (device communicator, ring, pump stream), then the windows.
        Idempotent; no kernel of this rank may still run (synchronise its streams first)."""
        try:
            if not self.native.closed:
                self.native.close()
        finally:
            if not self.windows.closed:
                self.windows.close()


def bootstrap_gin_scaleout(group: Optional[dist.ProcessGroup], data_bytes: int, *, ranks_per_node: int,
                           num_signals: int, all_to_all: bool = True, device: Optional[int] = None,
                           timeout_s: Optional[float] = None) -> GinScaleOut:
    """Creates this rank's scale-out window of ``data_bytes`` bytes and its GIN transport.
    Collective over ``group`` (default: the world group, any backend)."""
    if group is None:
        group = dist.group.WORLD
    # The Buffer's node split, so that node_window_ptrs() (the low-latency NVLink path) is its node's.
    windows = bootstrap_nccl_windows(group, data_bytes, ranks_per_node=ranks_per_node, device=device,
                                     timeout_s=timeout_s)
    native, local, nccl = None, None, _nccl_module()
    try:
        # The local checks first, exchanged, so no rank enters ncclDevCommCreate (a collective)
        # while another already knows it cannot.
        try:
            depth = queue_depth_from_env()
            nccl.check_gin(windows.native, num_signals, ranks_per_node, all_to_all, depth)
        except MoelinkError as exc:
            local = exc
        _raise_if_failed("GIN transport checks", _gather(group, _outcome(local)), local)
        try:
            native = nccl.GinTransport(windows.native, num_signals, ranks_per_node, all_to_all, depth, windows.timeout_s)
        except MoelinkError as exc:
            local = exc
        _raise_if_failed("GIN transport", _gather(group, _outcome(local)), local)
        return GinScaleOut(windows, native, num_signals)
    except BaseException:
        if native is not None:
            native.close()
        windows.abort()
        raise


def available() -> Optional[str]:
    """None when this build can create a GIN transport, else why not (no CUDA extension, no NCCL
    headers, no GPU). Never raises."""
    module = _backend._load_cuda()
    if module is None:
        return "moelink._cuda is not built"
    if not module.nccl.AVAILABLE:
        return module.nccl.UNAVAILABLE_REASON
    if module.device_count() == 0:
        return "no CUDA device is usable here"
    return None
