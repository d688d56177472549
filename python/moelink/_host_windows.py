"""Bootstrap of the host target's windows over a ``torch.distributed`` process group.

On the host target every rank is a process and its window is a POSIX shared-memory segment
(``csrc/transport/host/host_windows.h`` documents the segment layout). The ranks of a node map each
other's segments; ranks are grouped into nodes by ``ranks_per_node`` (any divisor of the group
size), so one machine can pose as several nodes, and the windows of other nodes are never mapped
for kernels.

Protocol (every step is a collective over ``group``, so every rank raises the same error instead
of leaving its peers waiting):

1. ``all_gather_object`` of the arguments: every rank must pass the same ``data_bytes``,
   ``ranks_per_node`` and ``nic_maps_remote``. This also makes sure every rank has arrived before
   any segment exists, which keeps the time a name is linked short.
2. each rank creates its segment (``O_CREAT|O_EXCL``, mode 0600, a 128-bit random name);
3. ``all_gather_object`` of ``(name, segment_bytes)`` or the creation error;
4. each rank maps the segments of its node (every segment if ``nic_maps_remote``). The process
   whose mapping completes a segment's expected count unlinks its name right away;
5. ``all_gather_object`` of the mapping outcome, then ``unlink_own`` as a safety net.

After step 5 ``/dev/shm`` holds nothing of ours: a crash from then on leaks nothing, the memory
goes away with the last process that maps it. If anything fails (a peer dies, a name vanished, an
argument differs), every surviving rank unlinks every name it has learnt, closes its mappings and
raises. An ``atexit`` hook unlinks names still linked when the interpreter exits. What remains is
the short stretch between step 2 and step 3: a rank killed there (SIGKILL: no handler runs) leaves
its own segment behind, since nobody else knows its name yet.

Environment: ``MOELINK_SHM_TAG`` (letters, digits, ``_``; at most 32) is inserted into the segment
names, ``/moelink-<tag>-<random>``, so a test harness can find its own leftovers among those of
other processes on the machine.
"""

from __future__ import annotations

import atexit
import ctypes
import os
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import _host
from .errors import InvalidArgument, InvalidType, MoelinkError, argument_error

__all__ = ["NodeWindows", "bootstrap_host_windows", "shm_tag_from_env", "LINK_CLASSES"]

LINK_CLASSES = ("nvl", "rdma")
SHM_TAG_ENV = "MOELINK_SHM_TAG"

# Own segment names that may still be linked, unlinked at interpreter exit.
_names_to_unlink: set[str] = set()


@atexit.register
def _unlink_at_exit() -> None:
    for name in list(_names_to_unlink):
        try:
            _host.transport.ShmSegment.unlink_name(name)
        except Exception:  # noqa: BLE001 - nothing left to report to at exit
            pass
    _names_to_unlink.clear()


def shm_tag_from_env() -> str:
    """The segment-name tag from ``MOELINK_SHM_TAG`` (empty if unset)."""
    return os.environ.get(SHM_TAG_ENV, "")


class NodeWindows:
    """This rank's window plus the mapped windows of the other ranks of its node.

    Wraps ``moelink._host.transport.HostWindows`` (``native``). Pointers are integers valid until
    :meth:`close`; tensors from :meth:`view` alias the shared memory and must not be used after it.
    """

    def __init__(self, native, node_ranks: list[int]):
        self.native = native
        self.rank: int = native.rank
        self.num_ranks: int = native.num_ranks
        self.ranks_per_node: int = native.ranks_per_node
        self.node: int = native.node
        self.local_rank: int = native.local_rank
        self.node_ranks: list[int] = node_ranks  # global ranks of this node, by local rank
        self.data_bytes: int = native.data_bytes

    def peer_ptr(self, peer: int, offset: int = 0, nbytes: int = 0) -> int:
        """Address of byte ``offset`` of ``peer``'s window (``peer`` on this node, self included)."""
        return self.native.peer_ptr(peer, offset, nbytes)

    def node_window_ptrs(self) -> list[int]:
        """Window base of every rank of this node, by local rank: the table kernels receive."""
        return self.native.node_window_ptrs()

    def view(self, peer: int, offset: int = 0, nbytes: Optional[int] = None, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """A 1-D CPU tensor aliasing ``nbytes`` bytes of ``peer``'s window from ``offset``."""
        if nbytes is None:
            nbytes = self.data_bytes - offset
        address = self.native.peer_ptr(peer, offset, nbytes)
        if nbytes == 0:
            return torch.empty(0, dtype=dtype)
        raw = (ctypes.c_uint8 * nbytes).from_address(address)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype)

    def counters(self, rank: Optional[int] = None) -> dict[str, int]:
        """``{"nvl": bytes, "rdma": bytes}`` moved by ``rank`` (default this rank; any mapped rank)."""
        return dict(self.native.counters(self.rank if rank is None else rank))

    def reset_counters(self) -> None:
        self.native.reset_counters()

    def add_bytes(self, link: str, nbytes: int) -> None:
        self.native.add_bytes(link, nbytes)

    def counter_ptr(self, link: str) -> int:
        """Address of this rank's ``std::atomic<uint64_t>`` byte counter for ``link`` ("nvl" /
        "rdma"), for kernels that count as they move (IntranodeContext.nvl_bytes)."""
        return self.native.counter_ptr(link)

    @property
    def closed(self) -> bool:
        return self.native.is_closed

    def close(self) -> None:
        """Unmaps every window. Idempotent."""
        _names_to_unlink.discard(self.native.name)
        self.native.close()

    def __enter__(self) -> "NodeWindows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.data_bytes} bytes"
        return f"<NodeWindows rank {self.rank}/{self.num_ranks} node {self.node} ranks {self.node_ranks} {state}>"


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise argument_error(InvalidType, name, "an int", type(value).__name__)
    if value < minimum:
        raise argument_error(InvalidArgument, name, f"an int >= {minimum}", value)
    return value


def _gather(group, item) -> list:
    out = [None] * group.size()
    dist.all_gather_object(out, item, group=group)
    return out


def _unlink_quietly(names) -> None:
    for name in names:
        if name:
            try:
                _host.transport.ShmSegment.unlink_name(name)
            except Exception:  # noqa: BLE001 - best effort on a path that is already failing
                pass


def bootstrap_host_windows(
    group: Optional[dist.ProcessGroup],
    data_bytes: int,
    *,
    ranks_per_node: Optional[int] = None,
    nic_maps_remote: bool = False,
    tag: Optional[str] = None,
    _fault: Optional[Callable[[str], None]] = None,
) -> NodeWindows:
    """Creates this rank's window of ``data_bytes`` bytes and maps those of its node's ranks.

    Collective over ``group`` (default: the world group); every rank passes the same arguments.
    ``ranks_per_node`` defaults to the group size (one node). ``nic_maps_remote`` also maps the
    windows of other nodes, reachable only through ``native.nic_ptr`` (for the emulated NIC).
    ``tag`` defaults to ``MOELINK_SHM_TAG``. ``_fault`` (tests only) is called with the name of
    each protocol step: "created", "published", "attached", "done".
    """
    if group is None:
        group = dist.group.WORLD
    if group is None:
        raise InvalidArgument("group: expected a torch.distributed ProcessGroup, got None (not initialised)")
    num_ranks, rank = group.size(), group.rank()
    tag = shm_tag_from_env() if tag is None else tag
    fault = _fault or (lambda step: None)

    # 1. Check the arguments, then compare them across ranks: a rank with bad or different
    #    arguments makes every rank raise, none waits (and everybody is present before any name exists).
    try:
        _check_int("data_bytes", data_bytes, 1)
        rpn = num_ranks if ranks_per_node is None else _check_int("ranks_per_node", ranks_per_node, 1)
        if num_ranks % rpn != 0:
            raise argument_error(InvalidArgument, "ranks_per_node", f"a divisor of the group size {num_ranks}", rpn)
        local_error = None
    except MoelinkError as exc:
        rpn, local_error = ranks_per_node, exc
    arguments = _gather(group, (data_bytes, rpn, bool(nic_maps_remote), None if local_error is None else str(local_error)))
    if local_error is not None:
        raise local_error
    bad = [f"rank {r}: {a[3]}" for r, a in enumerate(arguments) if a[3] is not None]
    if bad:
        raise InvalidArgument("host windows: invalid arguments on " + "; ".join(bad))
    if any(a[:3] != arguments[0][:3] for a in arguments):
        listing = ", ".join(f"rank {r}: {a[:3]}" for r, a in enumerate(arguments))
        raise InvalidArgument(f"(data_bytes, ranks_per_node, nic_maps_remote): expected the same on every rank, got {listing}")

    native = None
    published: list = []
    try:
        # 2. Create.
        error = None
        try:
            native = _host.transport.HostWindows(rank, num_ranks, rpn, data_bytes, tag, bool(nic_maps_remote))
            if native.attach_expected > 1:
                _names_to_unlink.add(native.name)
        except MoelinkError as exc:
            error = f"{type(exc).__name__}: {exc}"
        fault("created")
        # 3. Publish.
        mine = (native.name, native.segment_bytes) if native is not None else None
        published = _gather(group, (mine, error))
        failures = [f"rank {r}: {e}" for r, (_, e) in enumerate(published) if e is not None]
        if failures:
            raise InvalidArgument("host windows: creating the segments failed on " + "; ".join(failures))
        fault("published")
        # 4. Map.
        error = None
        try:
            for peer, ((name, size), _) in enumerate(published):
                if peer != rank and (nic_maps_remote or native.is_node_peer(peer)):
                    native.attach(peer, name, size)
        except MoelinkError as exc:
            error = f"{type(exc).__name__}: {exc}"
        fault("attached")
        # 5. Everyone mapped what it needed: the names can go.
        outcomes = _gather(group, error)
        failures = [f"rank {r}: {e}" for r, e in enumerate(outcomes) if e is not None]
        if failures:
            raise InvalidArgument("host windows: mapping the segments failed on " + "; ".join(failures))
        native.unlink_own()
        _names_to_unlink.discard(native.name)
        fault("done")
    except BaseException:
        # Whatever happened (a peer died, an argument differed, KeyboardInterrupt), leave nothing.
        _unlink_quietly(entry[0] for entry, _ in published if entry)
        if native is not None:
            _names_to_unlink.discard(native.name)
            native.close()
        raise
    node_ranks = [native.node * rpn + i for i in range(rpn)]
    return NodeWindows(native, node_ranks)
