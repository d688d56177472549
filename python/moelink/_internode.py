"""Mechanics of the internode dispatch and combine (csrc/runtime/ops_internode.h): sizing, output
allocation and the kernel calls. Arguments are validated by the same ``DispatchCall`` /
``CombineCall`` as the intranode path (``_intranode``), and calls have the same two phases
(``plan_*`` raises before anything runs; ``run_*`` launches, and a failure there poisons). Every
call's first kernel compares the call's parameters across all ranks in its global barrier
(moelink._agreement): ranks that disagree raise RankMismatch together, and the Buffer is poisoned.

A token crosses the network once per destination node, to the rank with its source's local index
there, and fans out over NVLink (docs/internode.md). Receive order is the intranode path's: by
source rank, then token index, so ``moelink.reference`` describes both.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import torch

from . import _agreement, _validate, _host
from ._intranode import CombineCall, DispatchCall, DispatchHandle, _ptr, narrow_topk_idx, output_rows, receive_outputs
from ._pool import OutputPool
from ._target import HOST
from .config import Config
from .errors import InvalidArgument, InvalidType, argument_error

__all__ = ["InternodeHandle", "InternodeNode", "plan_dispatch", "run_dispatch", "plan_combine", "run_combine",
           "num_signals", "window_sizes"]


def num_signals(num_nodes: int, ranks_per_node: int) -> int:
    """Signals the internode layout uses (fixed per Buffer: InternodeLayout::num_signals)."""
    return window_sizes(num_nodes=num_nodes, ranks_per_node=ranks_per_node, num_channels=1, block_warps=2,
                        nvl_queue_tokens=2, rdma_queue_tokens=2, row_bytes=16, num_scales=0, num_topk=0,
                        experts_per_rank=0)["num_signals"]


def window_sizes(**shape) -> dict:
    """Both windows' sizes and the role split for a shape (InternodeLayout; arithmetic only, the
    same in both extensions, so the host one answers for either target)."""
    return dict(_host.internode.layout(**shape))


@dataclasses.dataclass(frozen=True, eq=False)
class InternodeHandle(DispatchHandle):
    """What an internode dispatch leaves for its combine and for cached dispatches (opaque).

    Besides the intranode handle's fields (``send_head`` here holds the positions in the network
    queues, ``[N, nodes]``): ``forward_start`` ``[C * nodes + 1]`` the first message this rank
    forwarded for (channel, source node) and ``forward_head`` ``[messages, ranks_per_node]``
    where each forwarded message went in each local rank's NVL queue (-1: not there)."""

    forward_start: Optional[torch.Tensor] = None
    forward_head: Optional[torch.Tensor] = None
    num_nodes: int = 1
    num_forwarded: int = 0  # forward_start[-1], kept on the host (on the GPU target the tensor is not)


@dataclasses.dataclass
class InternodeNode:
    """Where an internode call runs: this rank, the node's NVL windows and the scale-out transport."""

    rank: int
    num_nodes: int
    ranks_per_node: int
    nvl_window_ptrs: List[int]
    nvl_bytes: int
    nvl_counter: int
    scaleout: object  # _scaleout.ScaleOutWindows (host target) or _gin.GinScaleOut (GPU target)
    pool: Optional[OutputPool] = None  # the Buffer's output pool (None: fresh tensors)
    epoch: int = 0  # the Buffer operation this call is (a dispatch's handle serial, moelink._handles)
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

    def context(self, op: str, config: Config, row_bytes: int, num_scales: int, num_topk: int, experts_per_rank: int,
                agreement: Optional[dict] = None):
        """The native context for one call; raises before anything runs if a window is too small.
        ``agreement``: the call's parameters for moelink._agreement.words (the global barrier
        carries them to every rank, each compares them with its own)."""
        shape = dict(num_nodes=self.num_nodes, ranks_per_node=self.ranks_per_node, num_channels=config.num_sms // 2,
                     block_warps=max(2, self.target.block_warps()), nvl_queue_tokens=config.num_max_nvl_chunked_recv_tokens,
                     rdma_queue_tokens=config.num_max_rdma_chunked_recv_tokens, row_bytes=row_bytes,
                     num_scales=num_scales, num_topk=num_topk, experts_per_rank=experts_per_rank)
        # A low-latency Buffer keeps its signals and persistent words after the internode signals.
        reserved = getattr(self.scaleout, "reserved_head_bytes", 0)
        sizes = window_sizes(**shape, reserved_head_bytes=reserved)
        if not sizes["roles_valid"]:
            warps = shape["block_warps"]
            raise argument_error(InvalidArgument, "config", f"queues of at least {warps} (NVL) and "
                                 f"{warps + sizes['combine_reducers']} (RDMA) slots for this {op} with blocks of {warps} "
                                 "warps (docs/internode.md: why)", f"num_max_nvl_chunked_recv_tokens="
                                 f"{config.num_max_nvl_chunked_recv_tokens}, num_max_rdma_chunked_recv_tokens="
                                 f"{config.num_max_rdma_chunked_recv_tokens}")
        if config.num_sms // 2 > _host.internode.MAX_CHANNELS:
            raise argument_error(InvalidArgument, "config.num_sms", f"at most {2 * _host.internode.MAX_CHANNELS}",
                                 config.num_sms)
        for name, have, need in (("num_nvl_bytes", self.nvl_bytes, sizes["nvl_bytes"]),
                                 ("num_rdma_bytes", self.scaleout.data_bytes, sizes["rdma_bytes"])):
            if need > have:
                raise argument_error(InvalidArgument, name, f"at least {need} bytes for this {op} "
                                     "(Config.get_nvl_buffer_size_hint / get_rdma_buffer_size_hint give a size for "
                                     "every call of a shape)", have)
        words = [] if agreement is None else _agreement.words(
            **agreement, config=config, block_warps=shape["block_warps"], row_bytes=row_bytes, internode=True)
        return self.module.internode.Context(rank=self.rank, **shape, nvl_windows=self.nvl_window_ptrs,
                                       nvl_bytes=self.nvl_counter, reserved_head_bytes=reserved,
                                       agreement=words, **self.scaleout.handle())


@dataclasses.dataclass
class DispatchPlan:
    node: InternodeNode
    call: DispatchCall
    native: object


def _check_handle(call_handle) -> None:
    if call_handle is not None and not isinstance(call_handle, InternodeHandle):
        raise argument_error(InvalidType, "handle", "a handle of this Buffer's internode dispatch",
                             type(call_handle).__name__ + " of an intranode dispatch")


def _check_not_zero_copy(call) -> None:
    if call.zero_copy:
        raise argument_error(InvalidArgument, "zero_copy", "False (the one-copy paths are intranode only; "
                             "this Buffer spans several nodes)", True)


def plan_dispatch(node: InternodeNode, call: DispatchCall) -> DispatchPlan:
    _check_handle(call.handle)
    _check_not_zero_copy(call)
    num_topk = 0 if call.topk_idx is None else call.topk_idx.shape[1]
    num_scales = 0 if call.x_scales is None else call.x_scales.shape[1]
    row_bytes = call.x.shape[1] * call.x.element_size()
    ranks = node.num_nodes * node.ranks_per_node
    agreement = dict(op="dispatch" if call.handle is None else "cached dispatch", hidden=call.x.shape[1],
                     x_dtype=call.x.dtype, num_scales=num_scales,
                     scales_dtype=None if call.x_scales is None else call.x_scales.dtype, num_topk=num_topk,
                     num_experts=call.num_experts, handle_serial=0 if call.handle is None else call.handle.serial)
    native = node.context("dispatch", call.config, row_bytes, num_scales, num_topk, call.num_experts // ranks,
                          agreement)
    return DispatchPlan(node, call, native)


def run_dispatch(plan: DispatchPlan, op):
    """``op``: the operation's stream scope (moelink._target). Returns what _intranode.run_dispatch
    does (no error, no one-copy region: the one-copy paths are intranode only)."""
    node, call, native = plan.node, plan.call.kernel_inputs(op), plan.native
    kernels, stream = node.module.internode, op.stream_handle
    x, num_tokens = call.x, call.x.shape[0]
    ranks, nodes = node.num_nodes * node.ranks_per_node, node.num_nodes
    experts_per_rank = call.num_experts // ranks
    channels = call.config.num_sms // 2
    handle = call.handle
    if handle is None:
        recv_channel_start = node.control(ranks * channels + 1)
        forward_start = node.control(channels * nodes + 1)
        recv_counts = node.control(2 + experts_per_rank)
        kernels.notify(native, num_tokens, _ptr(call.is_token_in_rank), _ptr(call.num_tokens_per_expert),
                       call.expert_alignment, recv_channel_start.data_ptr(), forward_start.data_ptr(),
                       recv_counts.data_ptr(), stream=stream, rank=node.rank)
        op.keep(recv_counts)
        # The sizes the outputs need, on the host (on the GPU: the one wait for the device per
        # dispatch; unlike the intranode path, num_worst_tokens does not spare it: the forwarded
        # messages size forward_head).
        starts_seen, forward_seen, counts_seen = node.target.to_host(
            op, "internode dispatch: the notify kernel's receive counts", node.rank, recv_channel_start, forward_start,
            recv_counts)
        is_token_in_rank, per_expert = call.is_token_in_rank, counts_seen[2:].tolist()
        num_recv, num_forwarded = int(starts_seen[-1]), int(forward_seen[-1])
    else:
        recv_channel_start, forward_start, is_token_in_rank = (handle.recv_channel_start, handle.forward_start,
                                                               handle.is_token_in_rank)
        per_expert = handle.num_recv_tokens_per_expert_list
        num_recv, num_forwarded = handle.num_recv_tokens, handle.num_forwarded
    rows = output_rows(call, handle, num_recv)
    recv_x, recv_scales, recv_topk_idx, recv_topk_weights = receive_outputs(node, call, rows, num_recv)
    recv_src_idx = node.control(num_recv)
    rdma_send_head = node.control((num_tokens, nodes))
    forward_head = node.control((num_forwarded, node.ranks_per_node))
    cfg = call.config
    kernels.dispatch(
        native, handle is not None, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_rdma_chunked_send_tokens,
        num_tokens, _ptr(x), _ptr(call.x_scales), _ptr(call.topk_idx), _ptr(call.topk_weights), _ptr(is_token_in_rank),
        recv_channel_start.data_ptr(), forward_start.data_ptr(), _ptr(rdma_send_head), _ptr(forward_head), _ptr(recv_x),
        _ptr(recv_scales), _ptr(recv_topk_idx), _ptr(recv_topk_weights), _ptr(recv_src_idx), stream=stream,
        rank=node.rank)
    op.keep(x, call.x_scales, call.topk_idx, call.topk_weights, is_token_in_rank, call.num_tokens_per_expert,
            recv_channel_start, forward_start,
            rdma_send_head, forward_head, recv_x, recv_scales, recv_topk_idx, recv_topk_weights, recv_src_idx)
    if handle is None:
        handle = InternodeHandle(channels, call.num_experts, recv_channel_start, recv_src_idx, is_token_in_rank,
                                 rdma_send_head, per_expert, 1, rank=node.rank, num_ranks=ranks, num_rows=rows,
                                 forward_start=forward_start, forward_head=forward_head, num_nodes=nodes,
                                 serial=node.epoch, num_recv=num_recv, num_forwarded=num_forwarded)
    recv_topk_idx = narrow_topk_idx(node, op, recv_topk_idx, call.topk_idx_dtype)
    payload = recv_x if recv_scales is None else (recv_x, recv_scales)
    return payload, recv_topk_idx, recv_topk_weights, handle, None, None  # as _intranode: no error, no region


@dataclasses.dataclass
class CombinePlan:
    node: InternodeNode
    call: CombineCall
    native: object


def plan_combine(node: InternodeNode, call: CombineCall) -> CombinePlan:
    _check_not_zero_copy(call)
    if not isinstance(call.handle, InternodeHandle):
        _check_handle(call.handle)
    num_topk = 0 if call.topk_weights is None else call.topk_weights.shape[1]
    agreement = dict(op="combine", hidden=call.x.shape[1], x_dtype=torch.bfloat16, num_topk=num_topk,
                     num_experts=call.handle.num_experts, handle_serial=call.handle.serial)
    return CombinePlan(node, call, node.context("combine", call.config, call.x.shape[1] * 2, 0, num_topk, 0,
                                                agreement))


def run_combine(plan: CombinePlan, op):
    node, call, native = plan.node, plan.call, plan.native
    handle, x = call.handle, call.x
    num_topk = 0 if call.topk_weights is None else call.topk_weights.shape[1]
    hidden, num_tokens = x.shape[1], handle.is_token_in_rank.shape[0]
    combined_x = node.empty((num_tokens, hidden), torch.bfloat16)
    combined_weights = node.empty((num_tokens, num_topk), torch.float32) if num_topk else None
    cfg = call.config
    node.module.internode.combine(
        native, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_rdma_chunked_send_tokens, hidden, _ptr(x),
        _ptr(call.topk_weights), handle.recv_channel_start.data_ptr(), handle.forward_start.data_ptr(),
        _ptr(handle.forward_head), num_tokens, _ptr(handle.send_head), _ptr(call.bias[0]), _ptr(call.bias[1]),
        _ptr(combined_x), _ptr(combined_weights), stream=op.stream_handle, rank=node.rank)
    op.keep(x, call.topk_weights, call.bias[0], call.bias[1], combined_x, combined_weights, handle.recv_channel_start,
            handle.forward_start, handle.forward_head, handle.send_head)
    return combined_x, combined_weights
