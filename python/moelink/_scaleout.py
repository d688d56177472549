"""Scale-out ("RDMA") transports (the device-side interface is ``csrc/transport/scaleout.cuh``):

- :class:`ScaleOutWindows`, the host target's: every rank's scale-out window and its emulated
  IBGDA NIC (``csrc/transport/host/nic.h``);
- :class:`NodeScaleOut`, for a low-latency Buffer on ONE node on the GPU target (where GIN has no
  peer to reach across a network, and may have no NIC at all): every rank is an LSA peer, so a
  "network" put is a store through NVLink into the peer's window (the loopback binding,
  ``csrc/transport/proof/loopback.cuh``, over the node's window table). Target-neutral: on the
  host target it runs over shared-memory windows, which is how CI tests it
  (tests/test_gpu_contract.py). The GPU target's multi-node transport is ``moelink._gin``.

The host NIC:

Each rank creates one more shared-memory window, mapped by *every* rank's NIC (``nic_maps_remote``)
but by no kernel of another node, and starts its NIC thread. Kernels reach ranks of other nodes
only by posting work-queue entries to their own rank's NIC. The NIC thread is joined when the
Buffer is destroyed or collected, and at interpreter exit at the latest.

Environment (docs/env.md): ``MOELINK_HOST_NIC_GBPS`` (bandwidth per NIC, GB/s; unset or 0 = as
fast as memcpy) and ``MOELINK_HOST_NIC_LATENCY_US`` (one-way latency added to every entry).
"""

from __future__ import annotations

import atexit
import math
import os
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from . import _host
from ._host_windows import NodeWindows, bootstrap_host_windows
from .errors import InvalidArgument, argument_error

__all__ = ["ScaleOutWindows", "NodeScaleOut", "nic_shaping_from_env", "SCALE_OUT_KIND_HOST_NIC", "NIC_RING_ENTRIES"]

SCALE_OUT_KIND_HOST_NIC = 1  # transport::ScaleOutKind::kHostNic
SCALE_OUT_KIND_LOOPBACK = 2  # transport::ScaleOutKind::kLoopback
NIC_RING_ENTRIES = 4096
DRAIN_S = 2.0  # how long close() lets the NIC deliver what is still in its queue
_GBPS_ENV = "MOELINK_HOST_NIC_GBPS"
_LATENCY_ENV = "MOELINK_HOST_NIC_LATENCY_US"

_open_nics: "weakref.WeakSet[ScaleOutWindows]" = weakref.WeakSet()


@atexit.register
def _close_at_exit() -> None:
    for windows in list(_open_nics):
        windows.close()


def _non_negative(name: str) -> float:
    text = os.environ.get(name, "")
    if text == "":
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise argument_error(InvalidArgument, name, "a number >= 0", repr(text)) from None
    if not math.isfinite(value) or value < 0:
        raise argument_error(InvalidArgument, name, "a number >= 0", repr(text))
    return value


def nic_shaping_from_env() -> tuple[float, float]:
    """``(GB/s, latency in µs)`` of the emulated NIC; 0 means unshaped."""
    return _non_negative(_GBPS_ENV), _non_negative(_LATENCY_ENV)


class ScaleOutWindows:
    """This rank's scale-out window, every rank's mapped for the NIC, and the NIC itself."""

    def __init__(self, group: dist.ProcessGroup, data_bytes: int, *, ranks_per_node: int, num_signals: int):
        gbps, latency_us = nic_shaping_from_env()
        self.windows: NodeWindows = bootstrap_host_windows(group, data_bytes, ranks_per_node=ranks_per_node,
                                                           nic_maps_remote=True)
        try:
            self.nic = _host.transport.HostNic(self.windows.native, NIC_RING_ENTRIES, num_signals, gbps, latency_us)
        except BaseException:
            self.windows.close()
            raise
        self.num_signals = num_signals
        # Bytes at the window's start that belong to the low-latency layout for good (set by a
        # low-latency Buffer; the internode layout starts its positions after them).
        self.reserved_head_bytes = 0
        self.data_bytes = self.windows.data_bytes
        self.shaping = (gbps, latency_us)
        _open_nics.add(self)

    @property
    def closed(self) -> bool:
        return self.windows.closed

    def handle(self) -> dict:
        """The keyword arguments a kernel context takes for this transport (ScaleOut)."""
        return dict(net_kind=SCALE_OUT_KIND_HOST_NIC, net_window=self.windows.native.local_ptr(),
                    net_window_bytes=self.data_bytes, num_signals=self.num_signals, net_queue=self.nic.ring_ptr)

    def error(self) -> Optional[str]:
        """Why the NIC stopped, if it did (an entry outside a window: a kernel bug)."""
        return self.nic.error() or None

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Waits until this rank's NIC delivered everything posted so far (a kernel returns once
        its own work is done; its last puts and signals may still be in flight)."""
        return self.nic.wait_idle(timeout_s)

    def counters(self) -> dict:
        """Byte counters after the NIC delivered everything posted so far."""
        self.wait_idle()
        return self.windows.counters()

    def reset_counters(self) -> None:
        """Zeroes the byte counters once the NIC delivered what earlier calls posted (so that their
        last puts are not counted against the next call)."""
        self.wait_idle()
        self.windows.reset_counters()

    def close(self) -> None:
        """Delivers what kernels posted (up to ``DRAIN_S``), joins the NIC thread, then unmaps the
        windows. Idempotent. The drain matters after a failed operation: a kernel that failed a
        check (an agreement mismatch, say) had posted its barrier signals first, and peers wait for
        them to raise the same error rather than time out (docs/semantics.md, "Trust")."""
        if not self.nic.is_closed:
            self.nic.wait_idle(DRAIN_S)
        self.nic.close()
        self.windows.close()
        _open_nics.discard(self)


class StreamOrderedScaleOut:
    """A scale-out window whose puts are done once the kernels that made them are, i.e. once the
    caller drained the stream they ran on: the one-node NVLink binding (:class:`NodeScaleOut`) and
    GIN (``moelink._gin.GinScaleOut``, whose pump joins each launch's stream). Nothing is left to
    wait for on the host. Same surface as :class:`ScaleOutWindows` where Buffer, the internode path
    and the low-latency mode use it; ``windows`` are NCCL's on the GPU, shared memory on the host."""

    def __init__(self, windows, num_signals: int):
        self.windows = windows
        self.num_signals = num_signals
        self.data_bytes = windows.data_bytes
        self.reserved_head_bytes = 0  # as ScaleOutWindows: set by a low-latency Buffer

    @property
    def closed(self) -> bool:
        return self.windows.closed

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        return True

    def counters(self) -> dict:
        return self.windows.counters()

    def reset_counters(self) -> None:
        self.windows.reset_counters()

    def close(self) -> None:
        if not self.windows.closed:
            self.windows.close()


class NodeScaleOut(StreamOrderedScaleOut):
    """The scale-out window of a one-node Buffer whose "network" is NVLink: this rank's window in
    ``windows`` (the node's windows), and a table of every rank's window on the target's device,
    which the loopback binding indexes by rank. Puts are counted as NVLink bytes ("nvl"): on one
    node that is the link they cross."""

    def __init__(self, windows, num_signals: int, device: torch.device):
        if windows.ranks_per_node != windows.num_ranks:
            raise argument_error(InvalidArgument, "ranks_per_node", f"{windows.num_ranks} (one node: every rank "
                                 "reached over NVLink)", windows.ranks_per_node)
        super().__init__(windows, num_signals)
        ptrs = windows.node_window_ptrs()
        self._own = ptrs[windows.rank]
        self._table = torch.tensor(ptrs, dtype=torch.int64, device=device)  # char*[num_ranks] for the kernels

    def handle(self) -> dict:
        """The keyword arguments a kernel context takes for this transport (ScaleOut, kind kLoopback)."""
        if self.closed:
            raise InvalidArgument("handle: the scale-out windows are closed")
        return dict(net_kind=SCALE_OUT_KIND_LOOPBACK, net_window=self._own, net_window_bytes=self.data_bytes,
                    num_signals=self.num_signals, net_queue=self._table.data_ptr(),
                    net_rdma_bytes=self.windows.counter_ptr("nvl"))
