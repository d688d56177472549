"""``moelink.Buffer``: DeepEP V1's ``Buffer`` API for expert-parallel dispatch and combine.

Names, arguments, return tuples and handle reuse follow DeepEP V1 (``deep_ep.Buffer``), so a
framework switches by changing an import. Where they differ, docs/semantics.md says so.

Targets: with a gloo process group and CPU tensors, every rank is a process and the kernels run
on the SIMT host runtime over shared-memory windows. The GPU transport (NCCL symmetric windows)
is not built yet: asking for it raises :class:`moelink.errors.GPUUnavailable`.
"""

from __future__ import annotations

from typing import ClassVar, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _intranode, _validate
from ._host_windows import bootstrap_host_windows
from .config import DEFAULT_NUM_SMS, Config, get_combine_config, get_dispatch_config
from .errors import BufferUnusable, GPUUnavailable, InvalidArgument, InvalidType, MoelinkError, argument_error
from .event import EventOverlap
from .layout import get_dispatch_layout as _get_dispatch_layout
from ._intranode import DispatchHandle

__all__ = ["Buffer", "DispatchHandle"]

Payload = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


class Buffer:
    """Communication buffers of one rank, shared with the ranks of its node.

    ``num_nvl_bytes``: bytes of this rank's window for intranode traffic. ``ranks_per_node``
    (moelink): ranks per node; default the group size, the only value the intranode path accepts
    today. ``num_rdma_bytes > 0`` and ``low_latency_mode`` (internode and low-latency paths) are
    not implemented yet and raise. Use as a context manager, or call :meth:`destroy`.
    """

    num_sms: ClassVar[int] = DEFAULT_NUM_SMS

    def __init__(self, group: dist.ProcessGroup, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, *, ranks_per_node: Optional[int] = None) -> None:
        if not isinstance(group, dist.ProcessGroup):
            raise argument_error(InvalidType, "group", "a torch.distributed ProcessGroup", type(group).__name__)
        self.group = group
        self.rank, self.group_size = group.rank(), group.size()
        if dist.get_backend(group) != "gloo":
            raise GPUUnavailable(f"group: moelink's GPU transport (NCCL windows) is not built yet; the host target "
                                 f"needs a gloo group, got backend '{dist.get_backend(group)}'")
        # Argument errors travel in the bootstrap's first exchange: every rank raises, none waits.
        error = None
        try:
            self.num_nvl_bytes = _validate.integer("num_nvl_bytes", num_nvl_bytes, minimum=1)
            self.num_rdma_bytes = _validate.integer("num_rdma_bytes", num_rdma_bytes, minimum=0)
            self.low_latency_mode = bool(low_latency_mode)
            self.explicitly_destroy = bool(explicitly_destroy)
            self.ranks_per_node = self.group_size if ranks_per_node is None else ranks_per_node
            _validate.integer("ranks_per_node", self.ranks_per_node, minimum=1)
            if self.num_rdma_bytes > 0 or self.low_latency_mode or self.ranks_per_node != self.group_size:
                raise InvalidArgument("Buffer: only the intranode normal mode exists so far (num_rdma_bytes=0, "
                                      "low_latency_mode=False, one node); internode and low-latency are not implemented")
        except MoelinkError as exc:
            error = exc
        self._windows = bootstrap_host_windows(
            group, self.num_nvl_bytes if error is None else 1, ranks_per_node=None if error else self.ranks_per_node,
            agree=None if error else dict(num_rdma_bytes=self.num_rdma_bytes, low_latency_mode=self.low_latency_mode),
            local_error=error)
        self._window_table = torch.tensor(self._windows.node_window_ptrs(), dtype=torch.int64)
        self._nvl_counter = self._windows.counter_ptr("nvl")
        self._epoch = 0
        self._unusable: Optional[str] = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def destroy(self) -> None:
        """Releases the windows. The Buffer is unusable afterwards. Idempotent."""
        if self._unusable is None or not self._windows.closed:
            self._unusable = self._unusable or "the Buffer was destroyed"
            self._windows.close()

    def __enter__(self) -> "Buffer":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __del__(self) -> None:
        windows = getattr(self, "_windows", None)
        if windows is not None and not windows.closed:
            windows.close()

    def _begin(self, op: str) -> _intranode.Node:
        if self._unusable is not None:
            raise BufferUnusable(f"{op}: this Buffer cannot be used: {self._unusable}")
        self._epoch += 1
        return _intranode.Node(rank=self.rank, num_ranks=self.group_size, window_table=self._window_table,
                               window_bytes=self.num_nvl_bytes, epoch=self._epoch, nvl_counter=self._nvl_counter)

    def _poison(self, op: str, exc: BaseException) -> BaseException:
        """Marks the Buffer unusable and returns the exception to raise: the windows publish this
        rank's failure and, for a CommTimeout, name the root cause (moelink._host_windows)."""
        self._unusable = (f"{op} (operation {self._epoch}) failed with {type(exc).__name__}, and peers may be "
                          f"mid-operation on the shared windows; create a new Buffer. Cause: {exc}")
        return self._windows.explain_failure(exc, sequence=self._epoch)

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
        """An event at the current point of the stream (empty on the host target)."""
        return EventOverlap()

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, config: Optional[Config] = None) -> int:
        return (config or self.get_dispatch_config(self.group_size)).get_nvl_buffer_size_hint(hidden_bytes, self.group_size)

    # ---- layout ----------------------------------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: Optional[EventOverlap] = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """``(num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank,
        event)``; ``num_tokens_per_rdma_rank`` (tokens per node) is None on one node."""
        layout = _get_dispatch_layout(topk_idx, num_experts, self.group_size, self.ranks_per_node, rank=self.rank)
        return (layout.num_tokens_per_rank, layout.num_tokens_per_node, layout.num_tokens_per_expert,
                layout.is_token_in_rank, EventOverlap())

    # ---- dispatch / combine ----------------------------------------------------------------------

    def dispatch(self, x: Payload, handle: Optional[DispatchHandle] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Sends each token of ``x`` to every rank hosting one of its experts.

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list,
        handle, event)``. ``recv_x`` is a tensor, or ``(recv_x, recv_scales)`` when ``x`` was an
        FP8 pair. Rows arrive by source rank, then token index. ``recv_topk_idx`` holds local
        expert ids, -1 (weight 0) for experts elsewhere. With ``handle`` (cached mode) the layout of
        an earlier dispatch is reused and the result is bit for bit that of a fresh dispatch.
        """
        config = config or self.get_dispatch_config(self.group_size)
        call = _intranode.DispatchCall.validate(
            x, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
            num_worst_tokens, config, self.group_size)
        node = self._begin("dispatch")
        try:
            recv_x, recv_topk_idx, recv_topk_weights, handle = _intranode.dispatch(node, call)
        except MoelinkError as exc:
            raise self._poison("dispatch", exc)
        # With num_worst_tokens the GPU path never brings the counts to the host (that is the point
        # of the mode), so, as in DeepEP, the list is empty on every target.
        per_expert = [] if num_worst_tokens else handle.num_recv_tokens_per_expert_list
        return recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle, EventOverlap()

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[None, torch.Tensor, Tuple[torch.Tensor, torch.Tensor]] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """Returns every token to its source rank summed over the ranks it went to (fp32
        accumulation, rank order), plus ``bias`` (a tensor or a pair). ``x``: bf16
        ``[num_recv_tokens, hidden]`` in the dispatch's receive order. Returns ``(combined_x,
        combined_topk_weights, event)``; ``combined_topk_weights`` sums ``topk_weights`` the same way
        (None without them)."""
        config = config or self.get_combine_config(self.group_size)
        call = _intranode.CombineCall.validate(x, handle, topk_weights, bias, config, self.group_size)
        node = self._begin("combine")
        try:
            combined_x, combined_topk_weights = _intranode.combine(node, call)
        except MoelinkError as exc:
            raise self._poison("combine", exc)
        return combined_x, combined_topk_weights, EventOverlap()

    # ---- diagnostics -----------------------------------------------------------------------------

    def bytes_moved(self) -> dict:
        """Payload bytes this rank wrote into other ranks' windows, per link class."""
        return self._windows.counters()

    def reset_bytes_moved(self) -> None:
        self._windows.reset_counters()
