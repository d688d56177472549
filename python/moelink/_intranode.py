"""Mechanics of the intranode dispatch and combine: input validation, output allocation and the
kernel calls (csrc/runtime/ops_intranode.h). ``moelink.Buffer`` is the public face."""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

from . import _host, _validate, runtime
from .config import Config
from .errors import InvalidArgument, InvalidShape, InvalidType, argument_error

__all__ = ["DispatchHandle", "Node", "DispatchCall", "CombineCall", "dispatch", "combine"]

_FP8 = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)
_DISPATCH_DTYPES = (torch.bfloat16, torch.float16, torch.float32, *_FP8)
_SCALE_GROUP = 128  # channels per FP8 scale


@dataclasses.dataclass(frozen=True)
class DispatchHandle:
    """What a dispatch leaves for its combine and for cached dispatches. Treat as opaque."""

    num_channels: int
    num_experts: int
    recv_channel_start: torch.Tensor  # [ranks * virtual channels + 1] int32: first row of (sender, virtual channel)
    recv_src_idx: torch.Tensor  # [num_recv_tokens] int32: token index on the source rank
    is_token_in_rank: torch.Tensor  # [num_tokens, ranks] bool
    send_head: torch.Tensor  # [num_tokens, ranks] int32: queue position of each sent token
    num_recv_tokens_per_expert_list: List[int]
    sub_channels: int = 1  # the dispatch's warp map (runtime/ops_intranode.h: WarpMap)

    @property
    def num_recv_tokens(self) -> int:
        return int(self.recv_channel_start[-1])


@dataclasses.dataclass
class Node:
    rank: int
    num_ranks: int
    window_ptrs: List[int]
    window_bytes: int
    epoch: int  # the Buffer's operation count, for messages (the kernels keep their own in the window)
    nvl_counter: int

    def shape(self, op: str, config: Config, row_bytes: int, num_scales: int, num_topk: int,
              experts_per_rank: int, sub_channels: Optional[int] = None):
        channels, queue = config.num_sms // 2, config.num_max_nvl_chunked_recv_tokens
        warps = runtime.block_warps()
        if sub_channels is None:
            sub_channels = _host.intranode.default_sub_channels(self.num_ranks, warps, channels, queue)
        native = _host.intranode.Node(
            rank=self.rank, num_ranks=self.num_ranks, num_channels=channels, block_warps=warps,
            sub_channels=sub_channels, queue_tokens=queue, row_bytes=row_bytes, num_scales=num_scales,
            num_topk=num_topk, experts_per_rank=experts_per_rank, windows=self.window_ptrs,
            nvl_bytes=self.nvl_counter)
        if not native.map_valid:
            raise argument_error(
                InvalidArgument, "config.num_max_nvl_chunked_recv_tokens",
                f"at least {min(self.num_ranks, warps) * sub_channels} slots for this {op} ({self.num_ranks} ranks, "
                f"{warps} warps per block, {sub_channels} sub-channels fixed by the dispatch)", queue)
        if native.window_bytes_needed > self.window_bytes:
            raise argument_error(
                InvalidArgument, "num_nvl_bytes",
                f"at least {native.window_bytes_needed} bytes for this {op} ({channels} channels of "
                f"{queue} tokens of {row_bytes} bytes per rank pair; "
                "Config.get_nvl_buffer_size_hint gives a size for every call of a shape)",
                self.window_bytes)
        return native, sub_channels


def _tensor(name: str, value, dtypes, shape: Tuple[int, ...], layout: str) -> torch.Tensor:
    _validate.tensor(name, value)
    _validate.dtype(name, value, dtypes)
    if tuple(value.shape) != shape:
        raise argument_error(InvalidShape, name, f"shape {shape} {layout}", f"shape {tuple(value.shape)}")
    _validate.contiguous(name, value)
    if value.device.type != "cpu":
        raise argument_error(InvalidArgument, name, "a CPU tensor (host target)", f"device '{value.device}'")
    return value


@dataclasses.dataclass
class DispatchCall:
    x: torch.Tensor
    x_scales: Optional[torch.Tensor]
    handle: Optional[DispatchHandle]
    is_token_in_rank: Optional[torch.Tensor]
    num_tokens_per_expert: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]
    topk_weights: Optional[torch.Tensor]
    num_experts: int
    expert_alignment: int
    num_worst_tokens: int
    config: Config

    @staticmethod
    def validate(x, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                 num_worst_tokens, config, num_ranks) -> "DispatchCall":
        x_scales = None
        if isinstance(x, tuple):
            if len(x) != 2:
                raise argument_error(InvalidType, "x", "a tensor or an (x, scales) pair", f"a {len(x)}-tuple")
            x, x_scales = x
        _validate.tensor("x", x)
        _validate.ndim("x", x, 2, "[num_tokens, hidden]")
        num_tokens, hidden = x.shape
        _tensor("x", x, _DISPATCH_DTYPES, (num_tokens, hidden), "[num_tokens, hidden]")
        if (hidden * x.element_size()) % 16 != 0 or hidden == 0:
            raise argument_error(InvalidShape, "x", "rows of a positive multiple of 16 bytes", f"{hidden} x {x.dtype}")
        if x_scales is not None:
            groups = -(-hidden // _SCALE_GROUP)
            _tensor("x[1] (scales)", x_scales, (torch.float32,), (num_tokens, groups), "[num_tokens, ceil(hidden / 128)]")
        if not isinstance(config, Config):
            raise argument_error(InvalidType, "config", "a moelink.Config", type(config).__name__)
        _validate.integer("expert_alignment", expert_alignment, minimum=1)
        _validate.integer("num_worst_tokens", num_worst_tokens, minimum=0)

        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise argument_error(InvalidType, "handle", "a handle returned by Buffer.dispatch", type(handle).__name__)
            if handle.is_token_in_rank.shape[0] != num_tokens:
                raise argument_error(InvalidShape, "x", f"{handle.is_token_in_rank.shape[0]} tokens, as in the handle's "
                                     "dispatch", f"{num_tokens}")
            if handle.num_channels != config.num_sms // 2:
                raise argument_error(InvalidArgument, "config", f"num_sms = {2 * handle.num_channels}, as in the "
                                     "handle's dispatch", f"num_sms = {config.num_sms}")
            num_experts = handle.num_experts
        else:
            for name, value in (("topk_idx", topk_idx), ("is_token_in_rank", is_token_in_rank),
                                ("num_tokens_per_expert", num_tokens_per_expert)):
                if value is None:
                    raise argument_error(InvalidArgument, name, "a tensor (required without a handle; "
                                         "Buffer.get_dispatch_layout computes it)", None)
            _validate.tensor("num_tokens_per_expert", num_tokens_per_expert)
            num_experts = int(num_tokens_per_expert.shape[0])
        if topk_idx is not None:
            _validate.tensor("topk_idx", topk_idx)
            _validate.ndim("topk_idx", topk_idx, 2, "[num_tokens, num_topk]")
            _tensor("topk_idx", topk_idx, (torch.int64,), (num_tokens, topk_idx.shape[1]), "[num_tokens, num_topk]")
            if topk_weights is not None:
                _tensor("topk_weights", topk_weights, (torch.float32,), tuple(topk_idx.shape), "like topk_idx")
        elif topk_weights is not None:
            raise argument_error(InvalidArgument, "topk_weights", "None when topk_idx is None", "a tensor")
        if num_experts is not None and num_experts % num_ranks != 0:
            raise argument_error(InvalidArgument, "num_experts", f"a multiple of the {num_ranks} ranks", num_experts)
        if handle is None:
            _tensor("is_token_in_rank", is_token_in_rank, (torch.bool,), (num_tokens, num_ranks), "[num_tokens, ranks]")
            _tensor("num_tokens_per_expert", num_tokens_per_expert, (torch.int32,), (num_experts,), "[num_experts]")
        if topk_idx is not None:
            if topk_idx.numel() and (int(topk_idx.min()) < -1 or int(topk_idx.max()) >= num_experts):
                raise argument_error(InvalidArgument, "topk_idx", f"expert ids in [-1, {num_experts})",
                                     f"min {int(topk_idx.min())}, max {int(topk_idx.max())}")
        return DispatchCall(x, x_scales, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                            num_experts, expert_alignment, num_worst_tokens, config)


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


def dispatch(node: Node, call: DispatchCall):
    x, num_tokens, ranks = call.x, call.x.shape[0], node.num_ranks
    num_topk = 0 if call.topk_idx is None else call.topk_idx.shape[1]
    experts_per_rank = call.num_experts // ranks
    num_scales = 0 if call.x_scales is None else call.x_scales.shape[1]
    row_bytes = x.shape[1] * x.element_size()
    handle = call.handle
    native, sub_channels = node.shape("dispatch", call.config, row_bytes, num_scales, num_topk, experts_per_rank,
                                      None if handle is None else handle.sub_channels)
    channels = call.config.num_sms // 2
    if handle is None:
        recv_channel_start = torch.empty(ranks * native.virtual_channels + 1, dtype=torch.int32)
        recv_counts = torch.empty(1 + experts_per_rank, dtype=torch.int32)
        _host.intranode.notify(native, num_tokens, _ptr(call.is_token_in_rank), _ptr(call.num_tokens_per_expert),
                               call.expert_alignment, recv_channel_start.data_ptr(), recv_counts.data_ptr(),
                               rank=node.rank)
        is_token_in_rank, per_expert = call.is_token_in_rank, recv_counts[1:].tolist()
    else:
        recv_channel_start, is_token_in_rank = handle.recv_channel_start, handle.is_token_in_rank
        per_expert = handle.num_recv_tokens_per_expert_list
    num_recv = int(recv_channel_start[-1])
    rows = num_recv
    if call.num_worst_tokens:
        if num_recv > call.num_worst_tokens:
            raise argument_error(InvalidArgument, "num_worst_tokens",
                                 f"at least {num_recv} (the rows this rank receives)", call.num_worst_tokens)
        rows = call.num_worst_tokens
    # Every received row is overwritten by the kernel; only num_worst_tokens padding is zeroed.
    recv_x = torch.empty((rows, x.shape[1]), dtype=x.dtype)
    recv_x[num_recv:].zero_()
    recv_scales = torch.zeros((rows, num_scales), dtype=torch.float32) if num_scales else None
    recv_topk_idx = torch.full((rows, num_topk), -1, dtype=torch.int64) if num_topk else None
    recv_topk_weights = torch.zeros((rows, num_topk), dtype=torch.float32) if call.topk_weights is not None else None
    recv_src_idx = torch.empty(num_recv, dtype=torch.int32)
    send_head = torch.empty((num_tokens, ranks), dtype=torch.int32)
    _host.intranode.dispatch(
        native, handle is not None, call.config.num_max_nvl_chunked_send_tokens, num_tokens, _ptr(x),
        _ptr(call.x_scales), _ptr(call.topk_idx), _ptr(call.topk_weights), _ptr(is_token_in_rank),
        recv_channel_start.data_ptr(), _ptr(send_head), _ptr(recv_x), _ptr(recv_scales), _ptr(recv_topk_idx),
        _ptr(recv_topk_weights), _ptr(recv_src_idx), rank=node.rank)
    if handle is None:
        handle = DispatchHandle(channels, call.num_experts, recv_channel_start, recv_src_idx, is_token_in_rank,
                                send_head, per_expert, sub_channels)
    payload = recv_x if recv_scales is None else (recv_x, recv_scales)
    return payload, recv_topk_idx, recv_topk_weights, handle


@dataclasses.dataclass
class CombineCall:
    x: torch.Tensor
    handle: DispatchHandle
    topk_weights: Optional[torch.Tensor]
    bias: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
    config: Config

    @staticmethod
    def validate(x, handle, topk_weights, bias, config, num_ranks) -> "CombineCall":
        if not isinstance(handle, DispatchHandle):
            raise argument_error(InvalidType, "handle", "a handle returned by Buffer.dispatch", type(handle).__name__)
        _validate.tensor("x", x)
        _validate.ndim("x", x, 2, "[num_recv_tokens, hidden]")
        num_recv, hidden = x.shape
        _tensor("x", x, (torch.bfloat16,), (handle.num_recv_tokens, hidden), "[num_recv_tokens, hidden] (the dispatch's rows)")
        if hidden % 8 != 0 or hidden == 0:
            raise argument_error(InvalidShape, "x", "a hidden size that is a positive multiple of 8", hidden)
        if topk_weights is not None:
            _validate.tensor("topk_weights", topk_weights)
            _validate.ndim("topk_weights", topk_weights, 2, "[num_recv_tokens, num_topk]")
            _tensor("topk_weights", topk_weights, (torch.float32,), (num_recv, topk_weights.shape[1]), "[num_recv_tokens, num_topk]")
        biases = bias if isinstance(bias, tuple) else (bias, None)
        if len(biases) != 2:
            raise argument_error(InvalidType, "bias", "None, a tensor or a pair of tensors", f"a {len(biases)}-tuple")
        num_tokens = handle.is_token_in_rank.shape[0]
        for i, b in enumerate(biases):
            if b is not None:
                _tensor(f"bias[{i}]", b, (torch.bfloat16,), (num_tokens, hidden), "[num_tokens, hidden]")
        if not isinstance(config, Config):
            raise argument_error(InvalidType, "config", "a moelink.Config", type(config).__name__)
        if handle.num_channels != config.num_sms // 2:
            raise argument_error(InvalidArgument, "config", f"num_sms = {2 * handle.num_channels}, as in the handle's "
                                 "dispatch", f"num_sms = {config.num_sms}")
        return CombineCall(x, handle, topk_weights, biases, config)


def combine(node: Node, call: CombineCall):
    handle, x = call.handle, call.x
    num_topk = 0 if call.topk_weights is None else call.topk_weights.shape[1]
    hidden = x.shape[1]
    native, _ = node.shape("combine", call.config, hidden * 2, 0, num_topk, 0, handle.sub_channels)
    num_tokens = handle.is_token_in_rank.shape[0]
    combined_x = torch.empty((num_tokens, hidden), dtype=torch.bfloat16)
    combined_weights = torch.empty((num_tokens, num_topk), dtype=torch.float32) if num_topk else None
    _host.intranode.combine(
        native, call.config.num_max_nvl_chunked_send_tokens, hidden, x.shape[0], _ptr(x), _ptr(call.topk_weights),
        handle.recv_channel_start.data_ptr(), num_tokens, _ptr(handle.is_token_in_rank), _ptr(handle.send_head),
        _ptr(call.bias[0]), _ptr(call.bias[1]), _ptr(combined_x), _ptr(combined_weights), rank=node.rank)
    return combined_x, combined_weights
