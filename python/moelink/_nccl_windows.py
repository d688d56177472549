"""Bootstrap of the GPU target's windows through NCCL over a ``torch.distributed`` process group.

On the GPU target every rank's window is an NCCL symmetric window (``ncclMemAlloc`` +
``ncclCommWindowRegister``), and the kernels' window table holds NCCL's LSA pointers to the
windows of the rank's node (``csrc/transport/nccl/nccl_windows.h`` documents the layout). moelink
loads ``libnccl.so.2`` itself with ``dlopen`` and creates its own communicator from a unique id
exchanged over the user's group, whatever its backend: torch's communicator is never used.

Which library (the first that applies; nothing is linked at build time):

1. ``MOELINK_NCCL_LIBRARY``: exactly that file (or soname); if it cannot be used, that is the error;
2. the ``nvidia-nccl-cu12``/``-cu13`` wheel: ``nvidia/{nccl,cu13,cu12}/lib/libnccl.so.2`` in any
   ``nvidia`` package directory on ``sys.path``;
3. the NCCL the build found (``moelink._cuda.build_info()["nccl_include"]``'s ``../lib``);
4. ``libnccl.so.2`` through the dynamic loader's search path.

It must be NCCL 2.x, >= 2.28 and >= the headers moelink was built with (2.32.3 from the wheel),
else :class:`moelink.errors.NcclUnavailable` names the file and both versions.

Protocol (every step ends with a collective over ``group``, so a rank that fails makes every rank
raise the same error class, naming each failed rank, instead of leaving the others waiting):

1. ``prepare``: check the arguments, load the library, choose the device, create the native
   object; ``all_gather_object`` of the outcome and of ``(data_bytes, ranks_per_node)``, which
   must be equal on every rank;
2. ``unique id``: rank 0 calls ``ncclGetUniqueId`` (only now, so a failed step 1 leaves no NCCL
   bootstrap thread behind); the 128 bytes travel by ``all_gather_object``;
3. ``communicator``: non-blocking ``ncclCommInitRankConfig``, polled until ``timeout_s``;
4. ``allocate``: ``ncclMemAlloc`` of the window and its control page, zeroed (local);
5. ``register``: ``ncclCommWindowRegister`` with ``NCCL_WIN_COLL_SYMMETRIC``, polled, then the
   LSA team and the LSA pointers of every LSA peer.

A step that misses its deadline aborts the communicator (``ncclCommAbort``) and raises
:class:`moelink.errors.CommTimeout`. On any failure every rank aborts what it created: no
communicator, allocation or registration outlives a failed bootstrap.

``ranks_per_node`` is NCCL's LSA team size (the ranks whose windows this rank can load from and
store to), or a divisor of it the caller asks for, to pose as smaller nodes.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import _backend
from . import errors as _errors
from .errors import InvalidArgument, InvalidType, MoelinkError, NcclUnavailable, argument_error

__all__ = ["LIBRARY_ENV", "NcclWindows", "bootstrap_nccl_windows", "library_candidates", "load_library",
           "nccl_library_info"]

LIBRARY_ENV = "MOELINK_NCCL_LIBRARY"
SONAME = "libnccl.so.2"
LINK_CLASSES = ("nvl", "rdma")


# --- the library -----------------------------------------------------------------------------

def _nccl_module():
    """``moelink._cuda.nccl``; GPUUnavailable if the CUDA extension is missing (not if no GPU)."""
    module = _backend._load_cuda()
    if module is None:
        _backend.cuda()  # raises GPUUnavailable with the import error
    nccl = module.nccl
    if not nccl.AVAILABLE:
        raise NcclUnavailable(nccl.UNAVAILABLE_REASON)
    return nccl


def library_candidates() -> list[str]:
    """Where the library is looked for, in order (see the module docstring); the last entry is the
    bare soname for the dynamic loader. With ``MOELINK_NCCL_LIBRARY`` set, only that."""
    override = os.environ.get(LIBRARY_ENV, "").strip()
    if override:
        return [override]
    found: list[str] = []
    try:
        nvidia = importlib.import_module("nvidia")  # namespace package of NVIDIA's wheels
        bases = [Path(p) for p in getattr(nvidia, "__path__", [])]
    except ImportError:
        bases = []
    bases += [Path(p, "nvidia") for p in sys.path if p]
    for base in bases:
        for sub in ("nccl", "cu13", "cu12"):
            found.append(str(base / sub / "lib" / SONAME))
    module = _backend._load_cuda()
    if module is not None:
        include = module.build_info().get("nccl_include")
        if include:
            found.append(str(Path(include).parent / "lib" / SONAME))
    unique = list(dict.fromkeys(str(Path(p).resolve()) for p in found if Path(p).is_file()))
    return unique + [SONAME]


def load_library():
    """The loaded, checked library (``moelink._cuda.nccl.Library``), cached per path.

    Loads the first candidate that exists as a file, else the soname; never falls back past a
    library that exists but cannot be used, so the error names the file that is wrong."""
    nccl = _nccl_module()
    candidates = library_candidates()
    try:
        return nccl.load_library(candidates[0])
    except NcclUnavailable as exc:
        if os.environ.get(LIBRARY_ENV, "").strip():
            raise NcclUnavailable(f"{exc} (from {LIBRARY_ENV})") from None
        if candidates[0] == SONAME:
            raise NcclUnavailable(f"{exc}. No nvidia-nccl wheel was found on sys.path; install "
                                  f"nvidia-nccl-cu12 (or -cu13) or set {LIBRARY_ENV}") from None
        raise


def nccl_library_info() -> dict:
    """``{"path", "resolved_path", "version", "version_text", "header_version"}`` of the library
    moelink would use. Needs no GPU; raises NcclUnavailable when there is none usable."""
    lib = load_library()
    return {"path": lib.path, "resolved_path": lib.resolved_path, "version": lib.version,
            "version_text": lib.version_text, "header_version": _nccl_module().HEADER_VERSION}


# --- windows ---------------------------------------------------------------------------------

class NcclWindows:
    """This rank's NCCL window plus the LSA pointers of its node's windows.

    Same surface as the host target's :class:`moelink._host_windows.NodeWindows` where Buffer uses
    it: ``rank``, ``num_ranks``, ``ranks_per_node``, ``node``, ``local_rank``, ``node_ranks``,
    ``data_bytes``, :meth:`node_window_ptrs` (device pointers), :meth:`counter_ptr`,
    :meth:`counters`, :meth:`close`. Pointers are integers valid until :meth:`close`.
    """

    def __init__(self, native, ranks_per_node: int, timeout_s: float):
        self.native = native
        self.rank: int = native.rank
        self.num_ranks: int = native.num_ranks
        self.device: int = native.device
        self.lsa_size: int = native.lsa_team()["size"]
        self.ranks_per_node: int = ranks_per_node
        self.node: int = self.rank // ranks_per_node
        self.local_rank: int = self.rank % ranks_per_node
        self.node_ranks: list[int] = [self.node * ranks_per_node + i for i in range(ranks_per_node)]
        self.data_bytes: int = native.data_bytes
        self.timeout_s = timeout_s
        lsa_ptrs = native.lsa_window_ptrs()
        first = self.node_ranks[0] % self.lsa_size  # LSA rank of this node's first rank
        self._node_ptrs = lsa_ptrs[first:first + ranks_per_node]

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise InvalidArgument(f"{what}: the NCCL windows are closed")

    def node_window_ptrs(self) -> list[int]:
        """Window base of every rank of this node, by local rank: the table kernels receive."""
        self._check_open("node_window_ptrs")
        return list(self._node_ptrs)

    def peer_ptr(self, peer: int, offset: int = 0, nbytes: int = 0) -> int:
        """Device address of byte ``offset`` of ``peer``'s window (``peer`` on this node)."""
        self._check_open("peer_ptr")
        if peer not in self.node_ranks:
            raise argument_error(InvalidArgument, "peer", f"a rank of this node {self.node_ranks}", peer)
        if offset < 0 or nbytes < 0 or offset + nbytes > self.data_bytes:
            raise argument_error(InvalidArgument, "offset, nbytes", f"a range inside [0, {self.data_bytes})",
                                 (offset, nbytes))
        return self._node_ptrs[peer - self.node_ranks[0]] + offset

    def view(self, peer: int, offset: int = 0, nbytes: Optional[int] = None,
             dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """``nbytes`` (default: to the end) of ``peer``'s window from ``offset`` as a 1-D CUDA tensor
        of ``dtype`` on this rank's device, aliasing the window (as the host windows' ``view``).
        torch takes the address through ``__cuda_array_interface__``; the tensor must not outlive
        :meth:`close`."""
        if nbytes is None:
            nbytes = self.data_bytes - offset
        address = self.peer_ptr(peer, offset, nbytes)
        element = torch.empty(0, dtype=dtype).element_size()
        if nbytes % element or address % element:
            raise argument_error(InvalidArgument, "offset, nbytes", f"multiples of {element} (the size of {dtype})",
                                 (offset, nbytes))
        raw = torch.as_tensor(_DeviceBytes(address, nbytes), device=torch.device("cuda", self.device))
        return raw.view(dtype)

    @property
    def local_ptr(self) -> int:
        """This rank's own allocation (``ncclMemAlloc``), the same memory as its table entry."""
        self._check_open("local_ptr")
        return self.native.local_ptr

    def counter_ptr(self, link: str) -> int:
        """Device address of this rank's u64 byte counter for ``link`` ("nvl" / "rdma")."""
        self._check_open("counter_ptr")
        return self.native.counter_ptr(link)

    def counters(self, rank: Optional[int] = None) -> dict[str, int]:
        """``{"nvl": bytes, "rdma": bytes}`` moved by this rank (copied from the device)."""
        self._check_open("counters")
        if rank is not None and rank != self.rank:
            raise argument_error(InvalidArgument, "rank", f"this rank ({self.rank}) on the GPU target", rank)
        return {link: self.native.read_counter(link) for link in LINK_CLASSES}

    def reset_counters(self) -> None:
        self._check_open("reset_counters")
        self.native.reset_counters()

    def properties(self) -> dict:
        """What NCCL reports about the communicator (device-API and multimem support, GIN type)."""
        self._check_open("properties")
        return dict(self.native.properties())

    @property
    def closed(self) -> bool:
        return self.native.is_closed

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Deregisters, frees and destroys, in that order; aborts instead if any step fails or
        misses ``timeout_s`` (default: the bootstrap's). Local, idempotent. No kernel of this
        rank may still use the windows (synchronise its stream first)."""
        self.native.close(self.timeout_s if timeout_s is None else timeout_s)

    def abort(self) -> None:
        """Tears everything down without waiting for anyone (ncclCommAbort). Idempotent."""
        self.native.abort()

    def __enter__(self) -> "NcclWindows":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.data_bytes} bytes"
        return (f"<NcclWindows rank {self.rank}/{self.num_ranks} device {self.device} node {self.node} "
                f"ranks {self.node_ranks} (LSA team {self.lsa_size}) {state}>")


class _DeviceBytes:
    """``nbytes`` bytes of device memory at ``address``, as torch.as_tensor reads them (the CUDA
    array interface, version 3: shape, typestr, data, no stream to synchronise)."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = dict(shape=(nbytes,), typestr="|u1", data=(address, False), version=3,
                                             strides=None, stream=None)


# --- bootstrap -------------------------------------------------------------------------------

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


def _outcome(exc: Optional[BaseException]):
    return None if exc is None else (type(exc).__name__, str(exc))


def _raise_if_failed(step: str, outcomes: list, local: Optional[BaseException]) -> None:
    """Every rank raises the class of the first failed rank's error, listing every failed rank."""
    failed = [(rank, o) for rank, o in enumerate(outcomes) if o is not None]
    if not failed:
        return
    cls = getattr(_errors, failed[0][1][0], None)
    if not (isinstance(cls, type) and issubclass(cls, MoelinkError)):
        cls = MoelinkError
    listing = "; ".join(f"rank {rank}: {name}: {message}" for rank, (name, message) in failed)
    raise cls(f"nccl windows: {step} failed on {len(failed)} of {len(outcomes)} ranks: {listing}") from local


def _default_device(rank: int, cuda) -> int:
    if torch.cuda.is_available():
        return torch.cuda.current_device()
    count = cuda.device_count()
    return rank % count if count else 0


def bootstrap_nccl_windows(
    group: Optional[dist.ProcessGroup],
    data_bytes: int,
    *,
    ranks_per_node: Optional[int] = None,
    device: Optional[int] = None,
    timeout_s: Optional[float] = None,
    agree: Optional[dict] = None,
    local_error: Optional[MoelinkError] = None,
    _fault: Optional[Callable[[str], None]] = None,
) -> NcclWindows:
    """Creates this rank's NCCL window of ``data_bytes`` bytes (rounded up to 4096) and the LSA
    table of its node. Collective over ``group`` (default: the world group, any backend); every
    rank passes the same ``data_bytes`` and ``ranks_per_node``.

    ``device``: CUDA device index; default torch's current device, or ``rank % device_count`` when
    torch has no CUDA. ``timeout_s``: deadline of each NCCL step; default ``MOELINK_TIMEOUT_S``
    (100 s). ``_fault`` (tests only) is called with the name of each step once it succeeded
    locally: "prepared", "unique_id", "communicator", "allocated", "registered".

    ``agree``: more arguments every rank must pass alike (compared in step 1, as ``data_bytes``);
    ``local_error``: an argument error the caller found on this rank, which travels in step 1 so
    that every rank raises (Buffer's own checks).
    """
    if group is None:
        group = dist.group.WORLD
    if group is None:
        raise InvalidArgument("group: expected a torch.distributed ProcessGroup, got None (not initialised)")
    num_ranks, rank = group.size(), group.rank()
    fault = _fault or (lambda step: None)
    native = None
    try:
        # 1. Prepare locally, then compare across ranks.
        local: Optional[BaseException] = local_error
        try:
            if local_error is not None:
                raise local_error
            _check_int("data_bytes", data_bytes, 1)
            if ranks_per_node is not None:
                _check_int("ranks_per_node", ranks_per_node, 1)
            if timeout_s is not None and not (isinstance(timeout_s, (int, float)) and 0 < timeout_s < float("inf")):
                raise argument_error(InvalidArgument, "timeout_s", "a positive number of seconds", timeout_s)
            lib = load_library()
            cuda = _backend.cuda()
            chosen = _default_device(rank, cuda) if device is None else _check_int("device", device, 0)
            deadline = float(timeout_s) if timeout_s is not None else float(cuda.build_info()["wait_timeout_s"])
            native = cuda.nccl.Windows(lib, rank, num_ranks, chosen)
            fault("prepared")
        except MoelinkError as exc:
            local = exc
        outcomes = _gather(group, ((data_bytes, ranks_per_node, repr(sorted((agree or {}).items()))), _outcome(local)))
        _raise_if_failed("prepare", [o for _, o in outcomes], local)
        if any(args != outcomes[0][0] for args, _ in outcomes):
            listing = ", ".join(f"rank {r}: {args}" for r, (args, _) in enumerate(outcomes))
            raise InvalidArgument(f"(data_bytes, ranks_per_node, ...): expected the same on every rank, got {listing}")

        # 2. The unique id, from rank 0.
        local, unique_id = None, None
        if rank == 0:
            try:
                unique_id = lib.unique_id()
                fault("unique_id")
            except MoelinkError as exc:
                local = exc
        published = _gather(group, (unique_id, _outcome(local)))
        _raise_if_failed("ncclGetUniqueId", [o for _, o in published], local)
        unique_id = published[0][0]

        # 3-5. Communicator, allocation, registration: each a local NCCL step, then an exchange.
        steps = [("communicator", lambda: native.init_communicator(unique_id, deadline)),
                 ("allocated", lambda: native.allocate(data_bytes)),
                 ("registered", lambda: native.register_window(deadline))]
        for name, step in steps:
            local = None
            try:
                step()
                fault(name)
            except MoelinkError as exc:
                local = exc
            team = native.lsa_team()["size"] if local is None and name == "registered" else None
            outcomes = _gather(group, (team, _outcome(local)))
            _raise_if_failed(name, [o for _, o in outcomes], local)

        lsa_sizes = {size for size, _ in outcomes}
        if len(lsa_sizes) != 1:
            raise InvalidArgument(f"nccl windows: ranks disagree on the LSA team size: {[s for s, _ in outcomes]}")
        lsa_size = lsa_sizes.pop()
        rpn = lsa_size if ranks_per_node is None else ranks_per_node
        if lsa_size % rpn != 0:
            raise argument_error(InvalidArgument, "ranks_per_node",
                                 f"a divisor of NCCL's LSA team size {lsa_size} (ranks that reach each other's memory)", rpn)
        return NcclWindows(native, rpn, deadline)
    except BaseException:
        # Whatever happened (a peer failed, an argument differed, KeyboardInterrupt): leave nothing.
        if native is not None:
            native.abort()
        raise
