"""``moelink.Buffer``: DeepEP V1's ``Buffer`` API for expert-parallel dispatch and combine.

Names, arguments, return tuples and handle reuse follow DeepEP V1 (``deep_ep.Buffer``), so a
framework switches by changing an import. Where they differ, docs/semantics.md says so.

Targets (moelink._target): with a gloo process group and CPU tensors, every rank is a process and
the kernels run on the SIMT host runtime over shared-memory windows. With any other group (NCCL)
the Buffer is on the GPU target: CUDA tensors on torch's current device, NCCL symmetric windows,
kernels on the Buffer's comm stream, and for the internode path and the low-latency mode an NCCL
window driven through GIN (moelink._gin) as the scale-out window. The mode modules (_intranode,
_internode, _low_latency) are written once for both targets. Nothing of the GPU target has run on
a GPU yet (docs/gpu-transport.md §3 lists what is untested).
"""

from __future__ import annotations

import contextlib
from typing import ClassVar, Iterator, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _agreement, _backend, _host_windows, _internode, _intranode, _low_latency, _target, _validate
from ._handles import HandleBook
from ._host_windows import bootstrap_host_windows
from ._gin import bootstrap_gin_scaleout
from ._nccl_windows import bootstrap_nccl_windows
from ._scaleout import NodeScaleOut, ScaleOutWindows
from ._interop import accepts_arrays
from ._pool import OutputPool
from .config import DEFAULT_NUM_SMS, Config, get_combine_config, get_dispatch_config
from .errors import BufferUnusable, InvalidArgument, InvalidType, MoelinkError, argument_error
from .event import EventOverlap
from .layout import get_dispatch_layout as _get_dispatch_layout
from ._intranode import DispatchHandle
from ._buffer_low_latency import LowLatencyMethods

__all__ = ["Buffer", "DispatchHandle"]

Payload = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class Buffer(LowLatencyMethods):
    """Communication buffers of one rank, shared with the ranks of its node.

    ``num_nvl_bytes``: bytes of this rank's window for intranode traffic; 0 (DeepEP's default)
    creates no window, and an intranode call then raises naming the size it needs.
    ``ranks_per_node`` (moelink): ranks per node, any divisor of the group size; default
    MOELINK_RANKS_PER_NODE, else on the host target the group size (one node), on the GPU target
    the group's ranks per host (DeepEP's 8 on 8-GPU hosts; on a multi-node NVLink domain, MNNVL,
    pass the domain's size: host names cannot tell). ``num_rdma_bytes``: the scale-out window (internode path with
    ``ranks_per_node`` < the group size; the low-latency mode with ``low_latency_mode=True``, whose
    methods are in ``_buffer_low_latency``). Use as a context manager, or call :meth:`destroy`.

    Arrays: every method taking tensors also takes any ``__dlpack__`` array (NumPy on the host) and
    then returns arrays of that library (``moelink._interop``).
    """

    num_sms: ClassVar[int] = DEFAULT_NUM_SMS

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, *,
                 ranks_per_node: Optional[int] = None) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise argument_error(InvalidType, "group", "a torch.distributed ProcessGroup", type(group).__name__)
        self.group = group
        self._windows = None
        self._unusable: Optional[str] = None
        self.rank, self.group_size = group.rank(), group.size()
        on_gpu = dist.get_backend(group) != "gloo"
        # On the GPU target a node is a host unless ranks_per_node says otherwise: one exchange of
        # host names, on every rank and before any check can raise, so that every rank takes part.
        hosts = _validate.host_names(group) if on_gpu else None
        self._target = _target.HOST
        # Argument errors travel in the bootstrap's first exchange: every rank raises, none waits.
        error = None
        try:
            self.num_nvl_bytes = _validate.integer("num_nvl_bytes", num_nvl_bytes, minimum=0)
            self.num_rdma_bytes = _validate.integer("num_rdma_bytes", num_rdma_bytes, minimum=0)
            self.low_latency_mode = bool(low_latency_mode)
            self.explicitly_destroy = bool(explicitly_destroy)
            if not isinstance(enable_shrink, bool):
                raise argument_error(InvalidType, "enable_shrink", "a bool", type(enable_shrink).__name__)
            self.enable_shrink = enable_shrink  # low-latency shrink mode (docs/low-latency.md "Shrink mode")
            self.ranks_per_node = _validate.ranks_per_node(ranks_per_node, self.group_size, hosts)
            self.num_nodes = self.group_size // self.ranks_per_node
            if self.low_latency_mode:
                _validate.integer("num_qps_per_rank", num_qps_per_rank, minimum=1)
                if self.num_rdma_bytes == 0:
                    raise argument_error(InvalidArgument, "num_rdma_bytes", "> 0 with low_latency_mode=True "
                                         "(Buffer.get_low_latency_rdma_size_hint gives a size)", 0)
            if self.num_nodes > 1 and self.num_rdma_bytes == 0:
                raise argument_error(InvalidArgument, "num_rdma_bytes",
                                     f"> 0 for {self.num_nodes} nodes of {self.ranks_per_node} ranks (the internode "
                                     "path needs a scale-out window; Config.get_rdma_buffer_size_hint gives its size)", 0)
        except MoelinkError as exc:
            error = exc
        agree = None if error else dict(num_rdma_bytes=self.num_rdma_bytes, low_latency_mode=self.low_latency_mode,
                                        enable_shrink=self.enable_shrink)
        self._scaleout = None
        self._ll = None  # _low_latency.LowLatencyState of a low_latency_mode Buffer
        if on_gpu:
            self._target, self._windows = _target.bootstrap_gpu(
                group, self.num_nvl_bytes if error is None else 1, None if error else self.ranks_per_node, agree,
                error, _host_windows._deadline_s()[0])
            self._window_ptrs = None if self._windows is None else self._windows.node_window_ptrs()
            self._nvl_counter = 0 if self._windows is None else self._windows.counter_ptr("nvl")
        elif error is None and self.num_nvl_bytes == 0:
            _host_windows.agree_without_window(group, self.ranks_per_node, agree)
            self._window_ptrs, self._nvl_counter = None, 0
        else:
            self._windows = bootstrap_host_windows(
                group, self.num_nvl_bytes if error is None else 1,
                ranks_per_node=None if error else self.ranks_per_node, agree=agree, local_error=error)
            self._window_ptrs = self._windows.node_window_ptrs()
            self._nvl_counter = self._windows.counter_ptr("nvl")
        if self.num_nodes > 1 or self.low_latency_mode:
            try:
                self._create_scaleout(bool(allow_nvlink_for_low_latency_mode))
            except BaseException:
                self.destroy()
                raise
        self._mode = _internode if self.num_nodes > 1 else _intranode
        self._epoch = 0
        # Every handle this Buffer's dispatches made, checked by identity on every use (moelink._handles).
        self._handles = HandleBook()
        self._handle_type = _internode.InternodeHandle if self.num_nodes > 1 else DispatchHandle
        # Outputs (recv_x, combined_x, ...) come from here and are reused once the caller dropped
        # them, so a steady-state call takes no page faults (moelink._pool). On the GPU target
        # torch's caching allocator already does that.
        self._pool = None if self._target.is_cuda else OutputPool()
        if self._ll is not None:
            self._ll.pool = self._pool
        # [begin, end) of the window bytes the last one-copy dispatch's outputs live in (None when the
        # last dispatch was queue-based): later combines must leave it intact.
        self._live_recv_region = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Releases the windows (and joins the NIC thread). The Buffer is unusable afterwards.
        Idempotent."""
        scaleout = getattr(self, "_scaleout", None)
        live_scaleout = scaleout is not None and not scaleout.closed
        live_windows = self._windows is not None and not self._windows.closed
        if live_scaleout or live_windows:
            self._target.drain("destroy")  # GPU target: no kernel of this Buffer still runs
        if live_scaleout:
            # What this rank's NIC still holds (a kernel returns once it posted its last puts and
            # signals, e.g. a clean's barrier) reaches the peers first; the NIC never stalls, so
            # this is short even when a peer died. (GIN: the pump joined the drained stream.)
            if self._unusable is None:
                scaleout.wait_idle(2.0)
            scaleout.close()
        self._unusable = self._unusable or "the Buffer was destroyed"
        if getattr(self, "_ll", None) is not None:
            self._ll.pending = None  # a receive hook still held raises BufferUnusable, launching nothing
        pool = getattr(self, "_pool", None)  # absent when __init__ failed before creating it
        if pool is not None:
            pool.clear()
        if live_windows:
            self._windows.close()

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __del__(self) -> None:
        target = getattr(self, "_target", None)
        if target is not None:
            target.drain("garbage collection")  # GPU target: no kernel may outlive the windows
        scaleout = getattr(self, "_scaleout", None)
        if scaleout is not None and not scaleout.closed:
            scaleout.close()
        windows = getattr(self, "_windows", None)
        if windows is not None and not windows.closed:
            windows.close()

    def _create_scaleout(self, allow_nvlink: bool) -> None:
        """The scale-out windows and their transport (``target.scale_out``: the host target's
        emulated NIC; on the GPU target GIN across nodes, NVLink stores on one node): for the
        internode path, and for the low-latency mode (even on one node), whose signals and
        persistent words follow the internode signals."""
        if self.low_latency_mode:
            regions = _low_latency.window_regions(self.num_nodes, self.ranks_per_node, self.num_rdma_bytes)
            num_signals = regions["num_signals"]
        else:
            num_signals = _internode.num_signals(self.num_nodes, self.ranks_per_node)
        kind = self._target.scale_out(self.num_nodes)
        if kind == "gin":
            # Both modes signal ranks of another local index on other nodes (the low-latency mode
            # sends to every rank; the internode barrier and notify reach every remote rank), so
            # GIN's FULL connection, not RAIL (docs/internode.md, GIN).
            self._scaleout = bootstrap_gin_scaleout(self.group, self.num_rdma_bytes, ranks_per_node=self.ranks_per_node,
                                                    num_signals=num_signals, all_to_all=True,
                                                    device=self._target.device.index,
                                                    timeout_s=self._target.timeout_s)
        elif kind == "node":  # one node: every peer over NVLink (_scaleout.NodeScaleOut)
            if self._target.is_cuda:
                windows = bootstrap_nccl_windows(self.group, self.num_rdma_bytes, ranks_per_node=self.ranks_per_node,
                                                 device=self._target.device.index, timeout_s=self._target.timeout_s)
            else:
                windows = bootstrap_host_windows(self.group, self.num_rdma_bytes, ranks_per_node=self.ranks_per_node)
            try:
                self._scaleout = NodeScaleOut(windows, num_signals, self._target.device)
            except BaseException:
                windows.close()
                raise
        else:
            self._scaleout = ScaleOutWindows(self.group, self.num_rdma_bytes, ranks_per_node=self.ranks_per_node,
                                             num_signals=num_signals)
        if self.low_latency_mode:
            self._scaleout.reserved_head_bytes = regions["reserved_head"]
            self._ll = _low_latency.LowLatencyState(self._scaleout, self.rank, self.group_size, self.num_nodes,
                                                    self.ranks_per_node, allow_nvlink, shrink=self.enable_shrink,
                                                    target=self._target)

    # Two phases per operation (see _intranode): `_node` describes the call's node without
    # touching anything, so a validation or sizing error leaves the Buffer usable; `_operation`
    # marks the start (the epoch every rank advances together) and poisons the Buffer on any
    # exception from there on, since peers may be mid-operation on the shared windows.

    def _node(self, op: str):
        """The mode's description of where this call runs (_intranode.Node or _internode.InternodeNode)."""
        if self._unusable is not None:
            raise BufferUnusable(f"{op}: this Buffer cannot be used: {self._unusable}")
        if self._ll is not None:  # low-latency rules (docs/semantics.md): no pending hook; clean afterwards
            self._ll.check_idle(op)
            if self.num_nodes > 1:
                self._ll.dirty = op
        if self.num_nodes > 1:
            return _internode.InternodeNode(self.rank, self.num_nodes, self.ranks_per_node,
                                            self._window_ptrs or [0] * self.ranks_per_node, self.num_nvl_bytes,
                                            self._nvl_counter, self._scaleout, pool=self._pool,
                                            epoch=self._epoch + 1, target=self._target)
        return _intranode.Node(rank=self.rank, num_ranks=self.group_size, window_ptrs=self._window_ptrs,
                               window_bytes=self.num_nvl_bytes, epoch=self._epoch + 1, nvl_counter=self._nvl_counter,
                               pool=self._pool, view=self._window_view, live_recv_region=self._live_recv_region,
                               target=self._target)

    def _window_view(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        return self._windows.view(self.rank, offset, nbytes, dtype)

    @contextlib.contextmanager
    def _operation(self, op: str, previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                   allocate_on_comm_stream: bool = False) -> Iterator[object]:
        """Yields the operation's stream scope (moelink._target: ``stream_handle``, ``keep``,
        ``on_stream``, and ``event`` once the block is left)."""
        if self._unusable is not None:  # (each call checks first; this guards a receive hook as well)
            raise BufferUnusable(f"{op}: this Buffer cannot be used: {self._unusable}")
        scope = self._target.operation(previous_event, async_finish, allocate_on_comm_stream)  # checks its arguments
        self._epoch += 1
        try:
            # An earlier asynchronous operation whose device wait expired left the AbortRecord
            # claimed (GPU target): its CommTimeout is raised now, before kernels that would drain.
            self._target.check_abort("an earlier asynchronous operation")
            with scope as entered:
                yield entered
        except BaseException as original:
            exc = _agreement.translate(op, original)  # ranks that disagree: RankMismatch on every rank
            explained = self._poison(op, exc)
            if explained is original:
                raise
            raise explained from None

    def _poison(self, op: str, exc: BaseException) -> BaseException:
        """Marks the Buffer unusable and returns the exception to raise: the windows publish this
        rank's failure and, for a CommTimeout, name the root cause (moelink._host_windows)."""
        self._unusable = (f"{op} (operation {self._epoch}) failed with {type(exc).__name__}, and peers may be "
                          f"mid-operation on the shared windows; create a new Buffer. Cause: {exc}")
        # The scale-out windows map every rank (for the NIC), the NVL windows only the node's.
        scaleout = getattr(self, "_scaleout", None)
        windows = scaleout.windows if scaleout is not None else self._windows
        if windows is None or windows.closed or not isinstance(exc, MoelinkError) or \
                not hasattr(windows, "explain_failure"):  # (the GPU's AbortRecord already names the wait)
            return exc
        return windows.explain_failure(exc, sequence=self._epoch)

    # ---- DeepEP's accessors ----------------------------------------------------------------------

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True when moelink's CUDA extension was built with an sm_90 target (whether or not a GPU
        is present: this reports the build, as DeepEP's does)."""
        module = _backend._load_cuda()
        return module is not None and any(arch.startswith("90") for arch in module.build_info()["archs"])

    def get_comm_stream(self):
        """The ``torch.cuda.Stream`` the kernels run on (GPU target). The host target has no streams
        (every operation runs on the calling thread and has finished when it returns): None."""
        return self._target.comm_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """This rank's NVL window as a 1-D tensor (on the Buffer's device) of ``dtype`` from byte ``offset`` (a multiple
        of the element size) to the end, or its first ``size.numel()`` elements viewed as ``size``.

        The tensor aliases the shared window: peers write into it during every operation, and it
        also holds moelink's queue counters, so treat it as read-only scratch between operations;
        it must not be used after :meth:`destroy`. There is no RDMA buffer yet
        (``use_rdma_buffer=True`` raises)."""
        if not isinstance(dtype, torch.dtype):
            raise argument_error(InvalidType, "dtype", "a torch.dtype", type(dtype).__name__)
        if use_rdma_buffer:
            raise argument_error(InvalidArgument, "use_rdma_buffer", "False (this Buffer has no RDMA buffer: "
                                 "num_rdma_bytes=0; the internode path is not built yet)", use_rdma_buffer)
        if self._unusable is not None and self._windows is not None and self._windows.closed:
            raise BufferUnusable(f"get_local_buffer_tensor: this Buffer cannot be used: {self._unusable}")
        element = torch.empty(0, dtype=dtype).element_size()
        _validate.integer("offset", offset, minimum=0)
        if offset > self.num_nvl_bytes or offset % element:
            raise argument_error(InvalidArgument, "offset", f"a multiple of {element} (the size of {dtype}) in "
                                 f"[0, num_nvl_bytes = {self.num_nvl_bytes}]", offset)
        count = (self.num_nvl_bytes - offset) // element
        if self._windows is None or count == 0:
            tensor = torch.empty(0, dtype=dtype, device=self._target.device)
        else:
            tensor = self._windows.view(self.rank, offset, count * element, dtype)
        if size is None:
            return tensor
        if not isinstance(size, (tuple, list)) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0
                                                      for d in size):
            raise argument_error(InvalidType, "size", "a torch.Size (or a tuple of ints >= 0)", repr(size))
        shape = torch.Size(size)
        if shape.numel() > tensor.numel():
            raise argument_error(InvalidArgument, "size", f"at most {tensor.numel()} elements of {dtype} from byte "
                                 f"{offset} of the {self.num_nvl_bytes}-byte window", f"{tuple(shape)} ({shape.numel()})")
        return tensor[:shape.numel()].view(shape)

    # ---- configuration ---------------------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """SM budget of the normal kernels: an even number >= 2 (num_sms / 2 channels)."""
        _validate.integer("new_num_sms", new_num_sms, minimum=2)
        if new_num_sms % 2 != 0:
            raise argument_error(InvalidArgument, "new_num_sms", "an even number", new_num_sms)
        Buffer.num_sms = new_num_sms

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return get_dispatch_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return get_combine_config(num_ranks, Buffer.num_sms)

    @staticmethod
    def capture() -> EventOverlap:
        """An event at the current point of torch's current CUDA stream, to pass as
        ``previous_event``; empty where torch has no CUDA (the host target, whose operations
        ignore it)."""
        return EventOverlap.capture() if torch.cuda.is_available() else EventOverlap()

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, config: Optional[Config] = None) -> int:
        return (config if config is not None else self.get_dispatch_config(self.group_size)).get_nvl_buffer_size_hint(hidden_bytes, self.group_size)

    # ---- layout ----------------------------------------------------------------------------------

    @accepts_arrays
    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
        event)``; ``num_tokens_per_rdma_rank`` (tokens per node) is None on one node."""
        layout = _get_dispatch_layout(topk_idx, num_experts, self.group_size, self.ranks_per_node, rank=self.rank)
        return (layout.num_tokens_per_rank, layout.num_tokens_per_node, layout.num_tokens_per_expert,
                layout.is_token_in_rank, EventOverlap())

    # ---- dispatch / combine ----------------------------------------------------------------------

    @accepts_arrays(bits={"x": torch.bfloat16})
    def dispatch(self, x: Payload, handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, *, zero_copy: bool = False):
        """Sends each token of ``x`` to every rank hosting one of its experts.

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``. ``recv_x`` is a tensor, or ``(recv_x, recv_scales)`` when ``x`` was an
        FP8 pair ``(codes, scales)``: 1-byte codes and ``[num_tokens, num_scales]`` float32 or int32
        (UE8M0-packed) scales of any strides; the received scales are contiguous, of the input's
        dtype. Rows arrive by source rank, then token index. ``recv_topk_idx`` holds local expert
        ids, -1 (weight 0) for experts elsewhere, in ``topk_idx``'s dtype (int64 or int32). With
        ``handle`` (cached mode) the layout of an earlier dispatch is reused and the result is bit
        for bit that of a fresh dispatch. The handle also reads as DeepEP's 6-tuple
        (:meth:`DispatchHandle.deep_ep_tuple`).

        ``zero_copy=True`` (moelink; every rank passes the same): the one-copy dispatch. Senders write
        every row straight into its receiver's window, and ``recv_x``, the scales, ``recv_topk_idx``
        (int64) and ``recv_topk_weights`` are views of this rank's window, valid until this rank's
        next dispatch on this Buffer (like DeepEP's low-latency buffers; a combine of either kind
        leaves them intact). The window needs room for a receive region of M rows, the most any rank
        receives (or asks for with ``num_worst_tokens``): ``Config.get_nvl_buffer_size_hint(...,
        num_max_zero_copy_recv_tokens=M)``; when it has none, every rank raises InvalidArgument and
        the Buffer stays usable. Same results, bit for bit (docs/semantics.md).
        """
        config = config if config is not None else self.get_dispatch_config(self.group_size)
        if handle is not None:
            self._handles.check(handle, self._handle_type)
        call = _intranode.DispatchCall.validate(
            x, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
            num_worst_tokens, config, self.group_size, zero_copy)
        self._check_devices(x=call.x, x_scales=call.x_scales, is_token_in_rank=call.is_token_in_rank,
                            num_tokens_per_expert=call.num_tokens_per_expert, topk_idx=call.topk_idx,
                            topk_weights=call.topk_weights)
        plan = self._mode.plan_dispatch(self._node("dispatch"), call)
        with self._operation("dispatch", previous_event, async_finish, allocate_on_comm_stream) as op:
            recv_x, recv_topk_idx, recv_topk_weights, handle, error, region = self._mode.run_dispatch(plan, op)
            # Any dispatch may overwrite the last one-copy dispatch's outputs; this one's are live now.
            self._live_recv_region = region
        if error is not None:  # every rank ran an empty dispatch: the windows are consistent
            raise error
        if call.handle is None:
            self._handles.record(handle, self._epoch)
        # With num_worst_tokens the list is empty on every target, as in DeepEP (whose GPU path never
        # brings the counts to the host in that mode; moelink's still does: docs/gpu-transport.md §3).
        per_expert = [] if num_worst_tokens else handle.num_recv_tokens_per_expert_list
        return recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, op.event

    @accepts_arrays(bits={"x": torch.bfloat16, "bias": torch.bfloat16})
    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False, *, zero_copy: bool = False):
        """Returns every token to its source rank summed over the ranks it went to (fp32
        accumulation, rank order), plus ``bias`` (a tensor or a pair). ``x``: bf16
        ``[num_recv_tokens, hidden]`` in the dispatch's receive order, or the dispatch's padded
        ``[num_worst_tokens, hidden]`` rows (those past the received ones are ignored). Returns ``(combined_x,
        combined_topk_weights, event)``; ``combined_topk_weights`` sums ``topk_weights`` the same way
        (None without them).

        ``zero_copy=True`` (moelink; every rank passes the same): ``x`` is this rank's combine input
        buffer (:meth:`get_combine_input_buffer`), into which the caller wrote the expert outputs;
        each rank reads every copy of its tokens straight from the window of the rank that holds it
        (one copy less), and no rank returns before every peer finished reading its buffer. Same
        results, bit for bit."""
        config = config if config is not None else self.get_combine_config(self.group_size)
        self._handles.check(handle, self._handle_type)
        call = _intranode.CombineCall.validate(x, handle, topk_weights, bias, config, self.group_size, zero_copy)
        self._check_devices(x=call.x, topk_weights=call.topk_weights, bias=call.bias[0], **{"bias[1]": call.bias[1]})
        plan = self._mode.plan_combine(self._node("combine"), call)
        with self._operation("combine", previous_event, async_finish, allocate_on_comm_stream) as op:
            combined_x, combined_topk_weights = self._mode.run_combine(plan, op)
        return combined_x, combined_topk_weights, op.event

    def _check_devices(self, **tensors: Optional[torch.Tensor]) -> None:
        """Every tensor of a call on this Buffer's device: CPU on the host target, its GPU else."""
        for name, value in tensors.items():
            if value is not None:
                self._target.check_device(name, value)

    def get_combine_input_buffer(self, handle: DispatchHandle) -> torch.Tensor:
        """This rank's combine input buffer for ``handle``'s dispatch (moelink; as DeepEP's
        ``get_next_low_latency_combine_buffer``): a bf16 ``[num_rows, hidden]`` view of its window
        (the dispatch's rows, in its receive order, padding included). Write the expert outputs into
        it, then call ``combine(buffer, handle, ..., zero_copy=True)``. It is valid until the next
        dispatch or combine on this Buffer, and holds the rows of no other call: write it only between
        the dispatch and its one-copy combine. The window needs room for it below the last one-copy
        dispatch's outputs (``Config.get_nvl_buffer_size_hint(..., num_max_zero_copy_recv_tokens=M)``).
        """
        self._handles.check(handle, self._handle_type)
        if handle.send_row_start is None or handle.hidden <= 0:
            raise argument_error(InvalidArgument, "handle", "a handle from a dispatch of this build", "an older handle")
        node = self._node("get_combine_input_buffer")
        config = get_combine_config(self.group_size, 2 * handle.num_channels)
        _, region = _intranode.combine_input_region(node, handle, handle.hidden, 0, "get_combine_input_buffer", config)
        rows = handle.num_output_rows
        return self._window_view(region["base"] + region["row"], rows * handle.hidden * 2,
                                 torch.bfloat16).view(rows, handle.hidden)

    # ---- diagnostics -----------------------------------------------------------------------------

    def bytes_moved(self) -> dict:
        """Bytes this rank moved, per link class: "nvl", what its kernels wrote into the NVL
        windows of other ranks of its node (whole queue slots); "rdma", what its NIC delivered to
        other nodes (put bytes: wire messages, notify messages; signals not counted). A one-node
        low-latency Buffer on the GPU counts its scale-out puts as "nvl" (they are NVLink stores;
        with ``allow_nvlink_for_low_latency_mode=False`` its puts to itself too). On the GPU target
        it first waits (with the deadline) for the operations queued on the comm stream."""
        self._target.drain("bytes_moved")
        nvl = self._windows.counters()["nvl"] if self._windows is not None else 0
        scaleout = self._scaleout.counters() if self._scaleout is not None else {"nvl": 0, "rdma": 0}
        # The low-latency mode's NVLink path counts into the scale-out windows' "nvl" counter.
        return {"nvl": nvl + scaleout["nvl"], "rdma": scaleout["rdma"]}

    def reset_bytes_moved(self) -> None:
        self._target.drain("reset_bytes_moved")
        if self._windows is not None:
            self._windows.reset_counters()
        if self._scaleout is not None:
            self._scaleout.reset_counters()
