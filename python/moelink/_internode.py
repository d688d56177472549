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

from . import _agreement, _validate, _host, runtime
from ._intranode import CombineCall, DispatchCall, DispatchHandle, _ptr, output_rows, receive_outputs
from ._pool import OutputPool
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
    """Both windows' sizes and the role split for a shape (InternodeLayout, from the extension)."""
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


@dataclasses.dataclass
class InternodeNode:
    """Where an internode call runs: this rank, the node's NVL windows and the scale-out transport."""

    rank: int
    num_nodes: int
    ranks_per_node: int
    nvl_window_ptrs: List[int]
    nvl_bytes: int
    nvl_counter: int
    scaleout: object  # _scaleout.ScaleOutWindows
    pool: Optional[OutputPool] = None  # the Buffer's output pool (None: fresh tensors)
    epoch: int = 0  # the Buffer operation this call is (a dispatch's handle serial, moelink._handles)

    def empty(self, shape, dtype) -> torch.Tensor:
        """An output tensor: from the Buffer's pool (no page faults once warm) or fresh."""
        return _validate.allocate(self.pool, shape, dtype)

    def context(self, op: str, config: Config, row_bytes: int, num_scales: int, num_topk: int, experts_per_rank: int,
                agreement: Optional[dict] = None):
        """The native context for one call; raises before anything runs if a window is too small.
        ``agreement``: the call's parameters for moelink._agreement.words (the global barrier
        carries them to every rank, each compares them with its own)."""
        shape = dict(num_nodes=self.num_nodes, ranks_per_node=self.ranks_per_node, num_channels=config.num_sms // 2,
                     block_warps=max(2, runtime.block_warps()), nvl_queue_tokens=config.num_max_nvl_chunked_recv_tokens,
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
        return _host.internode.Context(rank=self.rank, **shape, nvl_windows=self.nvl_window_ptrs,
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


def run_dispatch(plan: DispatchPlan, op=None):  # op: host target only (no stream)
    node, call, native = plan.node, plan.call, plan.native
    x, num_tokens = call.x, call.x.shape[0]
    ranks, nodes = node.num_nodes * node.ranks_per_node, node.num_nodes
    experts_per_rank = call.num_experts // ranks
    channels = call.config.num_sms // 2
    handle = call.handle
    if handle is None:
        recv_channel_start = torch.empty(ranks * channels + 1, dtype=torch.int32)
        forward_start = torch.empty(channels * nodes + 1, dtype=torch.int32)
        recv_counts = torch.empty(2 + experts_per_rank, dtype=torch.int32)
        _host.internode.notify(native, num_tokens, _ptr(call.is_token_in_rank), _ptr(call.num_tokens_per_expert),
                               call.expert_alignment, recv_channel_start.data_ptr(), forward_start.data_ptr(),
                               recv_counts.data_ptr(), rank=node.rank)
        is_token_in_rank, per_expert = call.is_token_in_rank, recv_counts[2:].tolist()
    else:
        recv_channel_start, forward_start, is_token_in_rank = (handle.recv_channel_start, handle.forward_start,
                                                               handle.is_token_in_rank)
        per_expert = handle.num_recv_tokens_per_expert_list
    num_recv, num_forwarded = int(recv_channel_start[-1]), int(forward_start[-1])
    rows = output_rows(call, handle, num_recv)
    recv_x, recv_scales, recv_topk_idx, recv_topk_weights = receive_outputs(node, call, rows, num_recv)
    recv_src_idx = torch.empty(num_recv, dtype=torch.int32)
    rdma_send_head = torch.empty((num_tokens, nodes), dtype=torch.int32)
    forward_head = torch.empty((num_forwarded, node.ranks_per_node), dtype=torch.int32)
    cfg = call.config
    _host.internode.dispatch(
        native, handle is not None, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_rdma_chunked_send_tokens,
        num_tokens, _ptr(x), _ptr(call.x_scales), _ptr(call.topk_idx), _ptr(call.topk_weights), _ptr(is_token_in_rank),
        recv_channel_start.data_ptr(), forward_start.data_ptr(), _ptr(rdma_send_head), _ptr(forward_head), _ptr(recv_x),
        _ptr(recv_scales), _ptr(recv_topk_idx), _ptr(recv_topk_weights), _ptr(recv_src_idx), rank=node.rank)
    if handle is None:
        handle = InternodeHandle(channels, call.num_experts, recv_channel_start, recv_src_idx, is_token_in_rank,
                                 rdma_send_head, per_expert, 1, rank=node.rank, num_ranks=ranks, num_rows=rows,
                                 forward_start=forward_start, forward_head=forward_head, num_nodes=nodes,
                                 serial=node.epoch)
    if recv_topk_idx is not None and call.topk_idx_dtype != torch.int64:
        recv_topk_idx = recv_topk_idx.to(call.topk_idx_dtype)
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


def run_combine(plan: CombinePlan, op=None):
    node, call, native = plan.node, plan.call, plan.native
    handle, x = call.handle, call.x
    num_topk = 0 if call.topk_weights is None else call.topk_weights.shape[1]
    hidden, num_tokens = x.shape[1], handle.is_token_in_rank.shape[0]
    combined_x = node.empty((num_tokens, hidden), torch.bfloat16)
    combined_weights = node.empty((num_tokens, num_topk), torch.float32) if num_topk else None
    cfg = call.config
    _host.internode.combine(
        native, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_rdma_chunked_send_tokens, hidden, _ptr(x),
        _ptr(call.topk_weights), handle.recv_channel_start.data_ptr(), handle.forward_start.data_ptr(),
        _ptr(handle.forward_head), num_tokens, _ptr(handle.send_head), _ptr(call.bias[0]), _ptr(call.bias[1]),
        _ptr(combined_x), _ptr(combined_weights), rank=node.rank)
    return combined_x, combined_weights
