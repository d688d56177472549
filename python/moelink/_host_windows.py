"""Bootstrap of the host target's windows over a ``torch.distributed`` process group, and the
failure records that turn a cascade of timeouts into one root cause.

On the host target every rank is a process and its window is anonymous shared memory (a memfd)
shared by file descriptor: peers open it through ``/proc/<pid>/fd/<fd>`` of its creator, so no
name exists anywhere, at any instant (``csrc/transport/host/shm_segment.h`` gives the security
contract, ``host_windows.h`` the segment layout). The ranks of a node map each other's segments;
ranks are grouped into nodes by ``ranks_per_node`` (any divisor of the group size), so one machine
can pose as several nodes, and the windows of other nodes are never mapped for kernels.

Protocol: three exchanges over ``group`` (``moelink._rendezvous``: point-to-point messages, each
step under the ``MOELINK_TIMEOUT_S`` deadline, a late or dead peer is a ``CommTimeout`` naming the
step and the missing ranks on every rank that waits for it):

1. ``arguments``: every rank's arguments and any error its own checks found (and the caller's,
   ``local_error``). A rank with bad arguments raises its own error; every other rank raises
   ``InvalidArgument`` naming it. Arguments that differ between ranks fail every rank.
2. ``publish``: each rank creates its segment and sends ``(pid, fd, name, segment_bytes)``, or the
   error creating it raised.
3. ``map``: each rank maps the segments of its node (every segment with ``nic_maps_remote``) and
   sends the outcome. Then every rank closes its descriptor: nobody can open any segment again.

If anything fails, every rank closes what it holds and raises; the memory goes away with the
last mapping, whatever happens to the processes (SIGKILL included): there is nothing to clean up.

Failure records (part of each window's header): the first rank whose wait expires publishes what
it waited for (``NodeWindows.publish_failure``); a rank that times out afterwards follows the
records from the peer it waited on to the *root cause*, the rank that waits on nobody (dead,
stopped, failed, or never entered), and says so (``NodeWindows.explain_failure``).

Environment: ``MOELINK_SHM_TAG`` (letters, digits, ``_``; at most 32) goes into the memfd names,
``moelink-<tag>-<random>``, which show in ``/proc/<pid>/maps``, so a test harness can find the
segments its processes map.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import _host, _rendezvous
from .errors import CommTimeout, InvalidArgument, InvalidType, MoelinkError, argument_error

__all__ = ["NodeWindows", "PeerFailure", "RootCause", "bootstrap_host_windows", "shm_tag_from_env", "LINK_CLASSES"]

LINK_CLASSES = ("nvl", "rdma")
SHM_TAG_ENV = "MOELINK_SHM_TAG"


def shm_tag_from_env() -> str:
    """The segment-name tag from ``MOELINK_SHM_TAG`` (empty if unset)."""
    return os.environ.get(SHM_TAG_ENV, "")


def _deadline_s() -> tuple[float, Optional[MoelinkError]]:
    """The bootstrap's per-step deadline: the kernels' wait deadline (MOELINK_TIMEOUT_S or
    moelink.runtime.set_wait_timeout). A malformed variable is an argument error of this rank."""
    try:
        return _host.simt.wait_timeout(), None
    except MoelinkError as exc:
        return _rendezvous.DEFAULT_DEADLINE_S, exc


@dataclasses.dataclass(frozen=True)
class PeerFailure:
    """A rank's published failure record: it waited on ``peer`` (-1: on nobody) and gave up."""
    rank: int
    peer: int
    sequence: int
    time_ns: int
    text: str


@dataclasses.dataclass(frozen=True)
class RootCause:
    """Where a chain of waits ends: ``rank`` waits on nobody. ``chain``: the ranks from the direct
    peer to ``rank``; ``state``: what is known of ``rank`` (its record, or its process' state)."""
    rank: int
    chain: tuple
    state: str
    conclusive: bool = True  # False: a live rank that published nothing, or a cycle of waits

    def describe(self) -> str:
        hops = " -> ".join(f"rank {r}" for r in self.chain)
        via = f" (waits: {hops})" if len(self.chain) > 1 else ""
        return f"root cause: rank {self.rank} {self.state}{via}"


_ALIVE_ABSENT = "is alive but did not take part"


def _process_state(pid: int) -> str:
    """What /proc says about a peer's process (same machine, same pid namespace on the host target)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return f"has exited (process {pid} is gone)"
    if state in ("Z", "X"):
        return f"has exited (process {pid} is a zombie)"
    if state in ("T", "t"):
        return f"is stopped (SIGSTOP or a debugger; process {pid})"
    return f"{_ALIVE_ABSENT}: it never entered the operation or is stalled (process {pid})"


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

    def nic_ptr(self, rank: int, offset: int = 0, nbytes: int = 0) -> int:
        """Like :meth:`peer_ptr` for any mapped rank, other nodes included: for the emulated NIC."""
        return self.native.nic_ptr(rank, offset, nbytes)

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

    # ---- failure records ------------------------------------------------------------------------

    def mapped_ranks(self) -> list[int]:
        return [r for r in range(self.num_ranks) if self.native.is_mapped(r)]

    def publish_failure(self, text: str, peer: int = -1, sequence: int = 0) -> bool:
        """Publishes this rank's failure record (what it waited for, on ``peer``; -1: it failed on
        its own). Only the first one is kept: False if a record was already published."""
        return self.native.publish_failure(text, peer, sequence)

    def failure(self, rank: int) -> Optional[PeerFailure]:
        record = self.native.failure(rank)
        return None if record is None else PeerFailure(**record)

    def peer_failures(self) -> dict[int, PeerFailure]:
        """The published records of every mapped rank (this one included), by rank."""
        out = {}
        for r in self.mapped_ranks():
            record = self.failure(r)
            if record is not None:
                out[r] = record
        return out

    def root_cause(self, peer: int, also=(), grace_s: Optional[float] = None) -> RootCause:
        """Follows the records from ``peer`` (the rank whose wait expired) and from the ranks in
        ``also`` (the others this rank was waiting on) to a rank that waits on nobody. A conclusive
        root (exited, stopped, failed on its own) wins over a live rank that published nothing;
        such a live root may be a peer whose own wait expires just after ours, so it gets
        ``grace_s`` (default: a tenth of the deadline, at most 1 s) to publish. Still nothing
        conclusive: a dead or stopped rank anywhere among the mapped ones is named."""
        if grace_s is None:
            grace_s = min(1.0, 0.1 * _deadline_s()[0])
        starts = [peer] + [p for p in also if p != peer and p != self.rank and 0 <= p < self.num_ranks]
        give_up = time.monotonic() + grace_s
        while True:
            causes = [self._follow(p) for p in starts]
            conclusive = [c for c in causes if c.conclusive]
            if conclusive:
                return conclusive[0]
            if time.monotonic() >= give_up:
                break
            time.sleep(min(0.01, grace_s))
        for r in self.mapped_ranks():
            if r == self.rank:
                continue
            state = _process_state(self.native.header(r)["owner_pid"])
            if not state.startswith(_ALIVE_ABSENT):
                return RootCause(r, (r,), f"{state}; rank {peer}, which this rank waited on, said nothing conclusive")
        absent = [c for c in causes if c.state.startswith(_ALIVE_ABSENT)]
        return (absent or causes)[0]

    def _follow(self, peer: int) -> RootCause:
        chain = [peer]
        while True:
            current = chain[-1]
            if not self.native.is_mapped(current):
                return RootCause(current, tuple(chain), "(its window is not mapped here, so its state is unknown)",
                                 conclusive=False)
            record = self.failure(current)
            if record is None:
                state = _process_state(self.native.header(current)["owner_pid"])
                return RootCause(current, tuple(chain), state, conclusive=not state.startswith(_ALIVE_ABSENT))
            if record.peer < 0:
                first = record.text.strip().splitlines()[0] if record.text.strip() else "?"
                return RootCause(current, tuple(chain), f"failed on its own: {first[:300]}")
            if record.peer in chain or record.peer == self.rank:  # leads back here: says nothing more
                hops = chain + [record.peer]
                return RootCause(current, tuple(chain), "waits in a cycle: " + " -> ".join(map(str, hops)),
                                 conclusive=False)
            chain.append(record.peer)

    def explain_failure(self, exc: BaseException, sequence: int = 0) -> BaseException:
        """Publishes this rank's record for ``exc`` (a failure that ends an operation) and returns
        the exception to raise: for a CommTimeout, one whose message adds the root cause."""
        if self.closed:
            return exc
        info = _host.simt.last_timeout() if isinstance(exc, CommTimeout) else None
        peer = info["peer"] if info and 0 <= info["peer"] < self.num_ranks else -1
        # A wait on this rank's own window (room in its own queue) says nothing: the others do.
        waited = [p for p in ([peer] + list(info["peers_waited"] if info else [])) if 0 <= p < self.num_ranks]
        others = [p for p in waited if p != self.rank]
        self.publish_failure(f"{type(exc).__name__}: {exc}", others[0] if others else -1, sequence)
        if not others:
            return exc
        cause = self.root_cause(others[0], also=others[1:])
        return CommTimeout(f"{exc}\n  {cause.describe()}")

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self.native.is_closed

    def close(self) -> None:
        """Unmaps every window. Idempotent."""
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


def _failures(items: list, key: str) -> list[str]:
    return [f"rank {r}: {item[key]}" for r, item in enumerate(items) if item.get(key)]


def bootstrap_host_windows(
    group: Optional[dist.ProcessGroup],
    data_bytes: int,
    *,
    ranks_per_node: Optional[int] = None,
    nic_maps_remote: bool = False,
    tag: Optional[str] = None,
    agree: Optional[dict] = None,
    local_error: Optional[MoelinkError] = None,
    _fault: Optional[Callable[[str], None]] = None,
) -> NodeWindows:
    """Creates this rank's window of ``data_bytes`` bytes and maps those of its node's ranks.

    Collective over ``group`` (default: the world group); every rank passes the same arguments.
    ``ranks_per_node`` defaults to the group size (one node). ``nic_maps_remote`` also maps the
    windows of other nodes, reachable only through ``nic_ptr`` (for the emulated NIC). ``tag``
    defaults to ``MOELINK_SHM_TAG``. ``agree``: more JSON values the caller needs equal on every
    rank (a mismatch fails every rank, naming them). ``local_error``: an error the caller's own
    checks found; it travels in the first exchange, so every rank raises (this one its own error)
    and none waits. ``_fault`` (tests only) is called with the name of each protocol step:
    "created", "published", "attached", "done".
    """
    if group is None:
        group = dist.group.WORLD
    if group is None:
        raise InvalidArgument("group: expected a torch.distributed ProcessGroup, got None (not initialised)")
    num_ranks, rank = group.size(), group.rank()
    fault = _fault or (lambda step: None)
    deadline_s, error = _deadline_s()
    error = local_error or error

    # 1. Arguments: checked here, compared across ranks, errors shared.
    rpn = ranks_per_node
    try:
        if error is not None:
            raise error
        tag = shm_tag_from_env() if tag is None else tag
        _check_int("data_bytes", data_bytes, 1)
        rpn = num_ranks if ranks_per_node is None else _check_int("ranks_per_node", ranks_per_node, 1)
        if num_ranks % rpn != 0:
            raise argument_error(InvalidArgument, "ranks_per_node", f"a divisor of the group size {num_ranks}", rpn)
        try:
            json.dumps(agree or {})
        except (TypeError, ValueError) as exc:
            raise argument_error(InvalidType, "agree", "a dict of JSON values", f"{agree!r} ({exc})") from None
    except MoelinkError as exc:
        error = exc
    mine = dict(args=[repr(data_bytes), repr(rpn), bool(nic_maps_remote), agree or {}],
                error=None if error is None else f"{type(error).__name__}: {error}")
    arguments = _rendezvous.exchange(group, "arguments", mine, deadline_s, what="host windows bootstrap",
                                     later_steps=("publish", "map"))
    if error is not None:
        raise error
    bad = _failures(arguments, "error")
    if bad:
        raise InvalidArgument("host windows: invalid arguments on " + "; ".join(bad))
    if any(a["args"] != arguments[0]["args"] for a in arguments):
        listing = ", ".join(f"rank {r}: {a['args']}" for r, a in enumerate(arguments))
        raise InvalidArgument("(data_bytes, ranks_per_node, nic_maps_remote, agreed values): expected the same on "
                              f"every rank, got {listing}")

    native = None
    try:
        # 2. Create and publish.
        error = None
        try:
            native = _host.transport.HostWindows(rank, num_ranks, rpn, data_bytes, tag, bool(nic_maps_remote))
        except MoelinkError as exc:
            error = f"{type(exc).__name__}: {exc}"
        fault("created")
        segment = None if native is None else [native.owner_pid, native.descriptor, native.name, native.segment_bytes]
        published = _rendezvous.exchange(group, "publish", dict(segment=segment, error=error), deadline_s,
                                         what="host windows bootstrap", later_steps=("map",))
        failures = _failures(published, "error")
        if failures:
            raise InvalidArgument("host windows: creating the segments failed on " + "; ".join(failures))
        fault("published")
        # 3. Map.
        error = None
        try:
            for peer, item in enumerate(published):
                if peer != rank and (nic_maps_remote or native.is_node_peer(peer)):
                    pid, fd, name, size = item["segment"]
                    native.attach(peer, int(pid), int(fd), str(name), int(size))
        except (MoelinkError, TypeError, ValueError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        fault("attached")
        outcomes = _rendezvous.exchange(group, "map", dict(error=error), deadline_s, what="host windows bootstrap")
        failures = _failures(outcomes, "error")
        if failures:
            raise InvalidArgument("host windows: mapping the segments failed on " + "; ".join(failures))
        # Everyone mapped what it needed: nobody may open the segments any more.
        native.close_descriptor()
        fault("done")
    except BaseException:
        # Whatever happened (a peer died, an argument differed, KeyboardInterrupt), hold nothing.
        if native is not None:
            native.close()
        raise
    node_ranks = [native.node * rpn + i for i in range(rpn)]
    return NodeWindows(native, node_ranks)


def agree_without_window(group: dist.ProcessGroup, ranks_per_node: int, agree: Optional[dict]) -> None:
    """A Buffer without an NVL window makes no segment, but its ranks still meet once, so a rank
    that asked for a window does not wait alone: this is the first exchange of
    bootstrap_host_windows, with data_bytes 0, so that a rank inside that bootstrap sees the
    arguments differ and raises too, instead of waiting for the next step."""
    deadline_s, error = _deadline_s()
    if error is not None:
        raise error
    mine = dict(args=[repr(0), repr(ranks_per_node), False, agree or {}], error=None)
    items = _rendezvous.exchange(group, "arguments", mine, deadline_s, what="host windows bootstrap",
                                 later_steps=("publish", "map"))
    if any(item != mine for item in items):
        listing = ", ".join(f"rank {r}: {item.get('args') if isinstance(item, dict) else item}"
                            for r, item in enumerate(items))
        raise argument_error(InvalidArgument, "num_nvl_bytes", "the same value on every rank",
                             f"(num_nvl_bytes, ranks_per_node, ...) {listing}")
