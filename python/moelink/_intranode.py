"""Mechanics of the intranode dispatch and combine: input validation, output allocation and the
kernel calls (csrc/runtime/ops_intranode.h). ``moelink.Buffer`` is the public face.

Every call has two phases, so that an error found before any rank can observe the call never
poisons the Buffer (docs/semantics.md, "Failures"):

- ``DispatchCall.validate`` / ``CombineCall.validate`` (``_normal_calls``) check the arguments, and
  ``plan_dispatch`` / ``plan_combine`` size the window for the call (the error names the size
  needed). Nothing has touched a window yet.
- ``run_dispatch`` / ``run_combine`` launch the kernels: from the first one on, peers take part,
  and any exception leaves the Buffer poisoned (the Buffer's ``_operation`` does that).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Tuple

import torch

from . import _agreement, _validate
from ._target import HOST
from ._pool import OutputPool
from .config import Config
from .errors import InvalidArgument, argument_error
# The calls and the handle are defined with their validation; importable from here as before.
from ._normal_calls import TOPK_IDX_DTYPES, CombineCall, DispatchCall, DispatchHandle

__all__ = ["DispatchHandle", "Node", "DispatchCall", "CombineCall", "plan_dispatch", "run_dispatch", "plan_combine",
           "run_combine", "TOPK_IDX_DTYPES"]

@dataclasses.dataclass
class Node:
    """Where a call runs. ``window_ptrs`` is None for a Buffer without an NVL window
    (``num_nvl_bytes=0``); ``epoch`` is the epoch the call will run as."""

    rank: int
    num_ranks: int
    window_ptrs: Optional[List[int]]
    window_bytes: int
    epoch: int  # the Buffer's operation count, for messages (the kernels keep their own in the window)
    nvl_counter: int
    pool: Optional[OutputPool] = None  # the Buffer's output pool (None: fresh tensors)
    view: Optional[Callable[[int, int, torch.dtype], torch.Tensor]] = None  # (offset, bytes, dtype) of my window
    live_recv_region: Optional[Tuple[int, int]] = None  # [begin, end) of the last one-copy dispatch's outputs
    target: object = HOST  # moelink._target: where the kernels run (host target or a GPU)

    @property
    def module(self):
        """The extension whose kernels run this call (moelink._host or moelink._cuda)."""
        return self.target.module

    def empty(self, shape, dtype) -> torch.Tensor:
        """An output tensor: from the Buffer's pool (no page faults once warm) or fresh."""
        return _validate.allocate(self.pool, shape, dtype, self.target.device)

    def control(self, shape, dtype=torch.int32) -> torch.Tensor:
        """A small tensor the kernels fill for the host or a later kernel (counts, positions)."""
        return torch.empty(shape, dtype=dtype, device=self.target.device)

    def shape(self, op: str, config: Config, row_bytes: int, num_scales: int, num_topk: int,
              experts_per_rank: int, sub_channels: Optional[int] = None, check_queues: bool = True,
              agreement: Optional[dict] = None):
        """The native node for one call and its sub-channels (the handle's, or a fresh dispatch's
        default); raises before anything runs if the warp map or the window does not fit (the
        queues, or only the counters for a one-copy call: ``check_queues=False``). ``agreement``:
        the call's parameters for moelink._agreement.words (the node barrier compares them)."""
        channels, queue = config.num_sms // 2, config.num_max_nvl_chunked_recv_tokens
        warps = self.target.block_warps(self.num_ranks)
        if sub_channels is None:
            sub_channels = self.module.intranode.default_sub_channels(self.num_ranks, warps, channels, queue)
        native = self.module.intranode.Node(
            rank=self.rank, num_ranks=self.num_ranks, num_channels=channels, block_warps=warps,
            sub_channels=sub_channels, queue_tokens=queue, row_bytes=row_bytes, num_scales=num_scales,
            num_topk=num_topk, experts_per_rank=experts_per_rank, windows=self.window_ptrs or [0] * self.num_ranks,
            nvl_bytes=self.nvl_counter,
            agreement=[] if agreement is None else _agreement.words(
                **agreement, config=config, block_warps=warps, sub_channels=sub_channels, row_bytes=row_bytes))
        if not native.map_valid:
            raise argument_error(
                InvalidArgument, "config.num_max_nvl_chunked_recv_tokens",
                f"at least {min(self.num_ranks, warps) * sub_channels} slots for this {op} ({self.num_ranks} ranks, "
                f"{warps} warps per block, {sub_channels} sub-channels fixed by the dispatch)", queue)
        needed = native.window_bytes_needed if check_queues else native.layout["slots"]
        if needed > self.window_bytes:
            created = (" (this Buffer was created with num_nvl_bytes=0, DeepEP's default, which holds no "
                       "intranode window)" if self.window_bytes == 0 else "")
            raise argument_error(
                InvalidArgument, "num_nvl_bytes",
                f"at least {needed} bytes for this {op} ({channels} channels of "
                f"{queue} tokens of {row_bytes} bytes per rank pair; "
                f"Config.get_nvl_buffer_size_hint gives a size for every call of a shape){created}",
                self.window_bytes)
        return native, sub_channels



def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


@dataclasses.dataclass
class DispatchPlan:
    node: Node
    call: DispatchCall
    native: object
    sub_channels: int


def _window_error(op: str, needed: int, node: Node, what: str) -> InvalidArgument:
    return argument_error(InvalidArgument, "num_nvl_bytes", f"at least {needed} bytes for this {op} ({what}; "
                          "Config.get_nvl_buffer_size_hint(..., num_max_zero_copy_recv_tokens=...) gives a size)",
                          node.window_bytes)


def _recv_region(node: Node, native, rows: int):
    """The receive region of a one-copy dispatch of ``rows`` rows (DirectRecvLayout): (its layout,
    the window bytes it would need when it does not fit, else 0)."""
    region = native.direct_recv_layout(rows, node.window_bytes)
    return region, (0 if region["base"] >= 0 else native.layout["slots"] + region["bytes"])


def plan_dispatch(node: Node, call: DispatchCall) -> DispatchPlan:
    """Sizes the call against the window; raises before anything runs."""
    num_topk = 0 if call.topk_idx is None else call.topk_idx.shape[1]
    num_scales = 0 if call.x_scales is None else call.x_scales.shape[1]
    row_bytes = call.x.shape[1] * call.x.element_size()
    agreement = dict(op="dispatch" if call.handle is None else "cached dispatch", hidden=call.x.shape[1],
                     x_dtype=call.x.dtype, num_scales=num_scales,
                     scales_dtype=None if call.x_scales is None else call.x_scales.dtype, num_topk=num_topk,
                     num_experts=call.num_experts, handle_serial=0 if call.handle is None else call.handle.serial,
                     zero_copy=call.zero_copy)
    native, sub_channels = node.shape("dispatch", call.config, row_bytes, num_scales, num_topk,
                                      call.num_experts // node.num_ranks,
                                      None if call.handle is None else call.handle.sub_channels,
                                      check_queues=not call.zero_copy, agreement=agreement)
    if call.zero_copy and call.handle is not None:
        handle = call.handle
        rows = call.num_worst_tokens or handle.num_output_rows
        if rows > handle.direct_rows:
            raise argument_error(InvalidArgument, "num_worst_tokens", f"at most {handle.direct_rows} (the one-copy "
                                 "row capacity of the handle's dispatch)", rows)
        _, needed = _recv_region(node, native, handle.direct_rows)
        if needed:
            raise _window_error("dispatch", needed, node, f"a receive region of {handle.direct_rows} rows")
    return DispatchPlan(node, call, native, sub_channels)


def _direct_rows(rank_counts: torch.Tensor, ranks: int) -> int:
    """M: the most rows any rank receives, or asks for (num_worst_tokens); the same on every rank."""
    return int(max(rank_counts[:, :ranks].sum(0).max(), rank_counts[:, ranks].max())) if ranks else 0


def output_rows(call: DispatchCall, handle, num_recv: int) -> int:
    """Rows a dispatch returns: ``num_worst_tokens`` (at least the received ones), else as many
    as the handle's dispatch returned (cached, padded or not), else the received count."""
    if call.num_worst_tokens:
        if num_recv > call.num_worst_tokens:
            raise argument_error(InvalidArgument, "num_worst_tokens",
                                 f"at least {num_recv} (the rows this rank receives)", call.num_worst_tokens)
        return call.num_worst_tokens
    return handle.num_output_rows if handle is not None else num_recv


def receive_outputs(node, call: DispatchCall, rows: int, num_recv: int):
    """(recv_x, recv_scales, recv_topk_idx int64, recv_topk_weights) of ``rows`` rows from the
    node's pool, None where the call has none. The kernels overwrite every received row (payload,
    scales, every top-k slot); only the ``num_worst_tokens`` padding past ``num_recv`` is filled
    here (zeros, ids -1)."""
    num_topk = 0 if call.topk_idx is None else call.topk_idx.shape[1]
    recv_x = node.empty((rows, call.x.shape[1]), call.x.dtype)
    recv_x[num_recv:].zero_()
    recv_scales = recv_topk_idx = recv_topk_weights = None
    if call.x_scales is not None:
        recv_scales = node.empty((rows, call.x_scales.shape[1]), call.x_scales.dtype)
        recv_scales[num_recv:].zero_()
    if num_topk:
        recv_topk_idx = node.empty((rows, num_topk), torch.int64)
        recv_topk_idx[num_recv:] = -1
    if call.topk_weights is not None:
        recv_topk_weights = node.empty((rows, num_topk), torch.float32)
        recv_topk_weights[num_recv:] = 0
    return recv_x, recv_scales, recv_topk_idx, recv_topk_weights


def run_dispatch(plan: DispatchPlan, op):
    """``op``: the operation's stream scope (moelink._target). Returns (payload, recv_topk_idx, recv_topk_weights, handle, error, recv_region): error is an
    InvalidArgument the caller raises once the operation is over (a one-copy dispatch whose rows do
    not fit ran as an empty one on every rank, so the windows stay consistent), recv_region the
    [begin, end) of a one-copy dispatch's outputs in the window."""
    node, call, native = plan.node, plan.call.kernel_inputs(op), plan.native
    kernels, stream = node.module.intranode, op.stream_handle
    x, num_tokens, ranks = call.x, call.x.shape[0], node.num_ranks
    num_topk = 0 if call.topk_idx is None else call.topk_idx.shape[1]
    experts_per_rank = call.num_experts // ranks
    num_scales = 0 if call.x_scales is None else call.x_scales.shape[1]
    channels = call.config.num_sms // 2
    handle = call.handle
    if handle is None:
        recv_channel_start = node.control(ranks * native.virtual_channels + 1)
        recv_counts = node.control(1 + experts_per_rank)
        rank_counts = node.control((ranks, ranks + 1))
        send_row_start = node.control(ranks * native.virtual_channels)
        kernels.notify(native, num_tokens, _ptr(call.is_token_in_rank), _ptr(call.num_tokens_per_expert),
                       call.expert_alignment, recv_channel_start.data_ptr(), recv_counts.data_ptr(),
                       rank_counts.data_ptr(), send_row_start.data_ptr(), call.num_worst_tokens, stream=stream,
                       rank=node.rank)
        op.keep(recv_counts)
        # The sizes the outputs need, on the host (on the GPU: the one wait for the device per dispatch).
        starts_seen, counts_seen, rank_counts_seen = node.target.to_host(
            op, "dispatch: the notify kernel's receive counts", node.rank, recv_channel_start, recv_counts, rank_counts)
        is_token_in_rank, per_expert = call.is_token_in_rank, counts_seen[1:].tolist()
        direct_rows = _direct_rows(rank_counts_seen, ranks)
        num_recv = int(starts_seen[-1])
    else:
        recv_channel_start, is_token_in_rank = handle.recv_channel_start, handle.is_token_in_rank
        per_expert = handle.num_recv_tokens_per_expert_list
        rank_counts, send_row_start, direct_rows = handle.rank_counts, handle.send_row_start, handle.direct_rows
        num_recv = handle.num_recv_tokens
    rows = output_rows(call, handle, num_recv)
    send_head = node.control((num_tokens, ranks))
    common = (native, handle is not None, call.config.num_max_nvl_chunked_send_tokens, num_tokens, _ptr(x),
              _ptr(call.x_scales), _ptr(call.topk_idx), _ptr(call.topk_weights))
    error = region_extent = None
    if call.zero_copy:
        region, needed = _recv_region(node, native, direct_rows)
        if needed:
            # Every rank knows M and fails here alike: run an empty dispatch so that every window's
            # epoch and queue counters advance together, then report.
            with op.on_stream():  # zeroed before the kernel reads it, and kept for it
                empty = torch.zeros_like(recv_channel_start)
            op.keep(empty)
            kernels.dispatch(native, handle is not None, 1, 0, 0, 0, 0, 0, 0, empty.data_ptr(), 0, 0, 0, 0, 0, 0,
                             stream=stream, rank=node.rank)
            error = _window_error("dispatch", needed, node, f"a receive region of {direct_rows} rows, the most any "
                                  "rank receives or asks for")
            return None, None, None, None, error, None
        kernels.dispatch(*common, _ptr(is_token_in_rank), recv_channel_start.data_ptr(), _ptr(send_head),
                         0, 0, 0, 0, 0, direct=True, direct_rows=direct_rows, window_bytes=node.window_bytes,
                         send_row_start=send_row_start.data_ptr(), stream=stream, rank=node.rank)
        op.keep(send_head)
        with op.on_stream():  # what follows reads the kernel's rows: after it, on its stream
            base = region["base"]
            region_extent = (base, base + region["bytes"])
            row_bytes = x.shape[1] * x.element_size()
            recv_x = node.view(base + region["row"], rows * row_bytes, x.dtype).view(rows, x.shape[1])
            recv_x[num_recv:].zero_()
            recv_scales = None
            if num_scales:
                recv_scales = node.view(base + region["scales"], rows * num_scales * 4,
                                        call.x_scales.dtype).view(rows, num_scales)
                recv_scales[num_recv:].zero_()
            recv_topk_idx = recv_topk_weights = None
            if num_topk:
                recv_topk_idx = node.view(base + region["topk"], rows * num_topk * 8, torch.int64).view(rows, num_topk)
                recv_topk_idx[num_recv:] = -1
            if call.topk_weights is not None:
                recv_topk_weights = node.view(base + region["weights"], rows * num_topk * 4,
                                              torch.float32).view(rows, num_topk)
                recv_topk_weights[num_recv:] = 0
            # The handle outlives the region (a later dispatch rewrites it): its own copy of the indices.
            recv_src_idx = node.view(base + region["src"], num_recv * 4, torch.int32).clone()
    else:
        recv_x, recv_scales, recv_topk_idx, recv_topk_weights = receive_outputs(node, call, rows, num_recv)
        recv_src_idx = node.control(num_recv)
        kernels.dispatch(*common, _ptr(is_token_in_rank), recv_channel_start.data_ptr(), _ptr(send_head),
                         _ptr(recv_x), _ptr(recv_scales), _ptr(recv_topk_idx), _ptr(recv_topk_weights),
                         _ptr(recv_src_idx), stream=stream, rank=node.rank)
        op.keep(send_head, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx)
    op.keep(x, call.x_scales, call.topk_idx, call.topk_weights, is_token_in_rank, call.num_tokens_per_expert,
            recv_channel_start, rank_counts, send_row_start)
    if handle is None:
        handle = DispatchHandle(channels, call.num_experts, recv_channel_start, recv_src_idx, is_token_in_rank,
                                send_head, per_expert, plan.sub_channels, rank=node.rank, num_ranks=ranks,
                                num_rows=rows, rank_counts=rank_counts, send_row_start=send_row_start,
                                direct_rows=direct_rows, hidden=x.shape[1], serial=node.epoch, num_recv=num_recv)
    recv_topk_idx = narrow_topk_idx(node, op, recv_topk_idx, call.topk_idx_dtype)
    payload = recv_x if recv_scales is None else (recv_x, recv_scales)
    return payload, recv_topk_idx, recv_topk_weights, handle, error, region_extent



def narrow_topk_idx(node, op, recv_topk_idx: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The kernels' int64 ``recv_topk_idx`` in the caller's ``topk_idx`` dtype (a copy made after
    the kernels, in their stream's order)."""
    if recv_topk_idx is None or dtype == torch.int64:
        return recv_topk_idx
    narrow = node.empty(tuple(recv_topk_idx.shape), dtype)
    with op.on_stream():
        narrow.copy_(recv_topk_idx)
    op.keep(narrow)
    return narrow


@dataclasses.dataclass
class CombinePlan:
    node: Node
    call: CombineCall
    native: object
    input_region: Optional[dict] = None  # one-copy: CombineInputLayout


def _combine_agreement(handle: DispatchHandle, hidden: int, num_topk: int, zero_copy: bool) -> dict:
    return dict(op="combine", hidden=hidden, x_dtype=torch.bfloat16, num_topk=num_topk, num_experts=handle.num_experts,
                handle_serial=handle.serial, zero_copy=zero_copy)


def combine_input_region(node: Node, handle: DispatchHandle, hidden: int, num_topk: int, op: str, config: Config):
    """(native node, CombineInputLayout) of the one-copy combine input buffer of ``handle``'s rows;
    raises if the window cannot hold it below the live one-copy receive region (if any)."""
    native, _ = node.shape(op, config, hidden * 2, 0, num_topk, 0, handle.sub_channels, check_queues=False,
                           agreement=_combine_agreement(handle, hidden, num_topk, True))
    region = native.combine_input_layout(handle.direct_rows)
    end = region["base"] + (region["weights"] if num_topk == 0 else region["bytes"])
    limit = node.window_bytes if node.live_recv_region is None else node.live_recv_region[0]
    if end > limit:
        extra = 0 if node.live_recv_region is None else node.live_recv_region[1] - node.live_recv_region[0]
        raise _window_error(op, end + extra, node, f"a combine input buffer of {handle.direct_rows} rows of hidden "
                            f"{hidden}" + (" below the outputs of the last one-copy dispatch" if extra else ""))
    return native, region


def plan_combine(node: Node, call: CombineCall) -> CombinePlan:
    num_topk = 0 if call.topk_weights is None else call.topk_weights.shape[1]
    handle, hidden = call.handle, call.x.shape[1]
    if call.zero_copy:
        if handle.send_row_start is None:
            raise argument_error(InvalidArgument, "handle", "a handle from a dispatch of this build (with "
                                 "send_row_start)", "an older handle")
        native, region = combine_input_region(node, handle, hidden, num_topk, "combine", call.config)
        expected = node.window_ptrs[node.rank] + region["base"] + region["row"]
        if call.x.numel() and call.x.data_ptr() != expected:  # (no rows: nothing to read anyway)
            raise argument_error(InvalidArgument, "x", "Buffer.get_combine_input_buffer(handle) (or its first "
                                 "num_recv_tokens rows) with zero_copy=True", "another tensor")
        return CombinePlan(node, call, native, region)
    native, _ = node.shape("combine", call.config, hidden * 2, 0, num_topk, 0, handle.sub_channels,
                           agreement=_combine_agreement(handle, hidden, num_topk, False))
    live = node.live_recv_region
    if live is not None and native.window_bytes_needed > live[0]:
        raise _window_error("combine", native.window_bytes_needed + live[1] - live[0], node,
                            "its queues below the outputs of the last one-copy dispatch, which it must not overwrite")
    return CombinePlan(node, call, native)


def run_combine(plan: CombinePlan, op):
    node, call, native = plan.node, plan.call, plan.native
    handle, x = call.handle, call.x
    num_topk = 0 if call.topk_weights is None else call.topk_weights.shape[1]
    hidden = x.shape[1]
    num_tokens = handle.is_token_in_rank.shape[0]
    combined_x = node.empty((num_tokens, hidden), torch.bfloat16)
    combined_weights = node.empty((num_tokens, num_topk), torch.float32) if num_topk else None
    direct = {}
    if plan.input_region is not None:
        region = plan.input_region
        if num_topk:  # peers read the weights where the rows are: beside them in this rank's window
            rows = call.topk_weights.shape[0]
            with op.on_stream():
                node.view(region["base"] + region["weights"], rows * num_topk * 4,
                          torch.float32).view(rows, num_topk).copy_(call.topk_weights)
        direct = dict(direct=True, direct_rows=handle.direct_rows, send_row_start=handle.send_row_start.data_ptr())
    # Rows past the received ones (num_worst_tokens padding) are never read: the kernels address
    # rows through recv_channel_start (and send_row_start).
    node.module.intranode.combine(
        native, call.config.num_max_nvl_chunked_send_tokens, hidden, handle.num_recv_tokens,
        0 if direct else _ptr(x), 0 if direct else _ptr(call.topk_weights), handle.recv_channel_start.data_ptr(),
        num_tokens, _ptr(handle.is_token_in_rank), _ptr(handle.send_head), _ptr(call.bias[0]), _ptr(call.bias[1]),
        _ptr(combined_x), _ptr(combined_weights), **direct, stream=op.stream_handle, rank=node.rank)
    op.keep(x, call.topk_weights, handle.recv_channel_start, handle.is_token_in_rank, handle.send_head, *call.bias,
            combined_x, combined_weights, handle.send_row_start)
    return combined_x, combined_weights
