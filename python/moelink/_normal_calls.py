"""What a normal-mode call takes and leaves, for the intranode and internode paths alike: the
validation of ``Buffer.dispatch`` / ``Buffer.combine`` arguments (``DispatchCall``,
``CombineCall``: the first of a call's two phases, which never touches a window, so an error here
never poisons the Buffer; docs/semantics.md, "Failures") and the intranode dispatch handle. The
mechanics (window sizing, outputs, kernel calls) are in ``_intranode`` and ``_internode``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import List, Optional, Tuple

import torch

from . import _validate
from .config import Config
from .errors import InvalidArgument, InvalidShape, InvalidType, argument_error

__all__ = ["DispatchHandle", "DispatchCall", "CombineCall", "TOPK_IDX_DTYPES"]

_FP8 = tuple(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)
_DISPATCH_DTYPES = (torch.bfloat16, torch.float16, torch.float32, *_FP8)
# Payload of an (x, scales) pair: any 1-byte type (FP8 codes, or their raw bits as uint8/int8).
_PAIR_DTYPES = (*_FP8, torch.uint8, torch.int8)
# Scales travel as num_scales 4-byte words per row: float32, or int32 (four UE8M0 exponents each).
_SCALE_DTYPES = (torch.float32, torch.int32)
TOPK_IDX_DTYPES = (torch.int64, torch.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class DispatchHandle:
    """What a dispatch leaves for its combine and for cached dispatches.

    Pass it back unchanged. It also reads as DeepEP's intranode handle, the 6-tuple
    ``(rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
    is_token_in_rank, send_head)``, for frameworks that index or unpack it (:meth:`deep_ep_tuple`
    documents each element). ``R`` ranks, ``C`` channels, ``N`` tokens dispatched, ``M`` received.
    """

    num_channels: int
    num_experts: int
    recv_channel_start: torch.Tensor  # [R * V + 1] int32: first receive row of (sender s, virtual channel v) at s * V + v
    recv_src_idx: torch.Tensor  # [num_recv_tokens] int32: token index on the source rank
    is_token_in_rank: torch.Tensor  # [num_tokens, ranks] bool
    send_head: torch.Tensor  # [num_tokens, ranks] int32: queue position of each sent token
    num_recv_tokens_per_expert_list: List[int]
    sub_channels: int = 1  # the dispatch's warp map (runtime/ops_intranode.h: WarpMap)
    rank: int = 0
    num_ranks: int = 1
    num_rows: int = -1  # rows of the dispatch's outputs: M, or num_worst_tokens when padded
    # From notify, for the one-copy paths (docs/semantics.md, "One-copy dispatch and combine"):
    rank_counts: Optional[torch.Tensor] = None  # [R, R + 1] int32: [s][j] tokens s sends to j; [s][R] rows s asked for
    send_row_start: Optional[torch.Tensor] = None  # [R * V] int32: first row of (destination d, my v) in d's receive order
    direct_rows: int = 0  # one-copy row capacity M every rank of the dispatch agreed on
    hidden: int = 0  # the dispatch's hidden size (the combine input buffer's row length)
    serial: int = 0  # the Buffer operation of its dispatch, the same on every rank (moelink._handles)
    num_recv: int = -1  # recv_channel_start[-1], kept on the host (on the GPU target the tensor is not)

    @property
    def num_recv_tokens(self) -> int:
        return self.num_recv if self.num_recv >= 0 else int(self.recv_channel_start[-1])

    @property
    def num_output_rows(self) -> int:
        return self.num_recv_tokens if self.num_rows < 0 else self.num_rows

    # ---- DeepEP's tuple view --------------------------------------------------------------------

    @functools.cached_property
    def _deep_ep_tuple(self) -> Tuple[torch.Tensor, ...]:
        ranks, channels, rank = self.num_ranks, self.num_channels, self.rank
        virtual = channels * self.sub_channels  # channel c is virtual channels c*S .. c*S + S - 1
        starts = self.recv_channel_start
        # rank_prefix_matrix[s][j]: tokens ranks 0..s send to rank j (notify exchanges every rank's
        # totals, so the whole matrix is known).
        if self.rank_counts is not None:
            rank_prefix = self.rank_counts[:, :ranks].cumsum(0, dtype=torch.int32).contiguous()
        else:
            rank_prefix = torch.full((ranks, ranks), -1, dtype=torch.int32, device=starts.device)
            rank_prefix[:, rank] = starts[virtual::virtual][:ranks]
        # channel_prefix_matrix[d][c]: this rank's tokens sent to rank d in channels 0..c (inclusive),
        # with DeepEP's channels (ceil(N / C) tokens each; moelink's own split is finer).
        num_tokens = self.is_token_in_rank.shape[0]
        per_channel = -(-num_tokens // channels) if num_tokens else 0
        padded = torch.zeros((channels * per_channel, ranks), dtype=torch.int32, device=starts.device)
        padded[:num_tokens] = self.is_token_in_rank.to(torch.int32)
        counts = padded.view(channels, per_channel, ranks).sum(1, dtype=torch.int32)  # [C, R]
        channel_prefix = counts.t().cumsum(1, dtype=torch.int32).contiguous()
        # recv_channel_prefix_matrix[s][c]: first receive row of (source s, channel c): of its first
        # virtual channel c * S in moelink's split.
        recv_channel_prefix = starts[:ranks * virtual].view(ranks, channels, self.sub_channels)[:, :, 0].contiguous()
        # Copies of the handle's own tensors: a caller may modify what it is given (the handle checks
        # its tensors on every use and would refuse itself, moelink._handles).
        return (rank_prefix, channel_prefix, recv_channel_prefix, self.recv_src_idx.clone(),
                self.is_token_in_rank.clone(), self.send_head.clone())

    def deep_ep_tuple(self) -> Tuple[torch.Tensor, ...]:
        """DeepEP's intranode handle, element by element (all int32 unless noted):

        0. ``rank_prefix_matrix`` ``[R, R]``: entry ``[s][j]`` is the number of tokens ranks
           ``0..s`` send to rank ``j``, so ``[-1][rank]`` is this rank's received count and
           ``[s - 1][rank]`` the first row from source ``s`` (the same matrix on every rank).
        1. ``channel_prefix_matrix`` ``[R, C]``: this rank's tokens sent to rank ``d`` in channels
           ``0..c``, inclusive prefix sum (sender side).
        2. ``recv_channel_prefix_matrix`` ``[R, C]``: first receive row of the tokens from source
           ``s``, channel ``c`` (receiver side).
        3. ``recv_src_idx`` ``[M]``: index of each received row's token on its source rank
           (DeepEP pads this to ``num_worst_tokens`` rows; moelink keeps the ``M`` real ones).
        4. ``is_token_in_rank`` ``[N, R]`` bool: the layout the dispatch used.
        5. ``send_head`` ``[N, R]``: position of token ``t`` in rank ``d``'s queue, -1 if not sent.

        The tensors are computed once and shared; modifying them does not change the handle.
        """
        return self._deep_ep_tuple

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index):
        return self._deep_ep_tuple[index]

    def __iter__(self):
        return iter(self._deep_ep_tuple)

    def __repr__(self) -> str:
        return (f"DispatchHandle(rank {self.rank}/{self.num_ranks}, {self.is_token_in_rank.shape[0]} tokens sent, "
                f"{self.num_recv_tokens} received, {self.num_channels} channels, {self.num_experts} experts)")


_tensor = _validate.shaped  # a CPU or a CUDA tensor: which one, the Buffer's target says


def _scales(x_scales, num_tokens: int) -> torch.Tensor:
    """FP8 scales ``[num_tokens, num_scales]``, float32 or int32 (UE8M0 packed), any strides (made
    contiguous by :meth:`DispatchCall.kernel_inputs`: the kernels copy num_scales words per row)."""
    name = "x[1] (scales)"
    _validate.tensor(name, x_scales)
    _validate.dtype(name, x_scales, _SCALE_DTYPES)
    _validate.ndim(name, x_scales, 2, "[num_tokens, num_scales]")
    if x_scales.shape[0] != num_tokens or x_scales.shape[1] < 1:
        raise argument_error(InvalidShape, name, f"shape ({num_tokens}, num_scales >= 1) [num_tokens, num_scales]",
                             f"shape {tuple(x_scales.shape)}")
    _validate.supported_device(name, x_scales)
    return x_scales


@dataclasses.dataclass
class DispatchCall:
    x: torch.Tensor
    x_scales: Optional[torch.Tensor]
    handle: Optional[DispatchHandle]
    is_token_in_rank: Optional[torch.Tensor]
    num_tokens_per_expert: Optional[torch.Tensor]
    topk_idx: Optional[torch.Tensor]  # the caller's ids (int64 or int32; kernel_inputs widens them)
    topk_weights: Optional[torch.Tensor]
    num_experts: int
    expert_alignment: int
    num_worst_tokens: int
    config: Config
    topk_idx_dtype: torch.dtype = torch.int64  # the caller's; recv_topk_idx comes back in it
    zero_copy: bool = False  # one-copy: outputs are views of this rank's receive region

    @staticmethod
    def validate(x, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights, expert_alignment,
                 num_worst_tokens, config, num_ranks, zero_copy=False) -> "DispatchCall":
        x_scales = None
        if isinstance(x, tuple):
            if len(x) != 2:
                raise argument_error(InvalidType, "x", "a tensor or an (x, scales) pair", f"a {len(x)}-tuple")
            x, x_scales = x
        _validate.tensor("x", x)
        _validate.ndim("x", x, 2, "[num_tokens, hidden]")
        num_tokens, hidden = x.shape
        if x_scales is not None:
            _tensor("x[0]", x, _PAIR_DTYPES, (num_tokens, hidden), "[num_tokens, hidden] (1-byte FP8 codes)", rows=True)
            x_scales = _scales(x_scales, num_tokens)
        else:
            _tensor("x", x, _DISPATCH_DTYPES, (num_tokens, hidden), "[num_tokens, hidden]", rows=True)
        if (hidden * x.element_size()) % 16 != 0 or hidden == 0:
            raise argument_error(InvalidShape, "x", "rows of a positive multiple of 16 bytes", f"{hidden} x {x.dtype}")
        if not isinstance(config, Config):
            raise argument_error(InvalidType, "config", "a moelink.Config", type(config).__name__)
        _validate.integer("expert_alignment", expert_alignment, minimum=1, maximum=_validate.INT32_MAX)
        _validate.integer("num_worst_tokens", num_worst_tokens, minimum=0, maximum=_validate.INT32_MAX)
        if not isinstance(zero_copy, bool):
            raise argument_error(InvalidType, "zero_copy", "a bool", type(zero_copy).__name__)

        if handle is not None:
            if not isinstance(handle, DispatchHandle):
                raise argument_error(InvalidType, "handle", "a handle returned by Buffer.dispatch", type(handle).__name__)
            if handle.is_token_in_rank.shape[0] != num_tokens:
                raise argument_error(InvalidShape, "x", f"{handle.is_token_in_rank.shape[0]} tokens, as in the handle's "
                                     "dispatch", f"{num_tokens}")
            if handle.num_channels != config.num_sms // 2:
                raise argument_error(InvalidArgument, "config", f"num_sms = {2 * handle.num_channels}, as in the "
                                     "handle's dispatch", f"num_sms = {config.num_sms}")
            if num_worst_tokens and num_worst_tokens < handle.num_recv_tokens:
                raise argument_error(InvalidArgument, "num_worst_tokens",
                                     f"0 or at least {handle.num_recv_tokens} (the rows the handle's dispatch received)",
                                     num_worst_tokens)
            num_experts = handle.num_experts
        else:
            for name, value in (("topk_idx", topk_idx), ("is_token_in_rank", is_token_in_rank),
                                ("num_tokens_per_expert", num_tokens_per_expert)):
                if value is None:
                    raise argument_error(InvalidArgument, name, "a tensor (required without a handle; "
                                         "Buffer.get_dispatch_layout computes it)", None)
            _validate.tensor("num_tokens_per_expert", num_tokens_per_expert)
            num_experts = int(num_tokens_per_expert.shape[0]) if num_tokens_per_expert.dim() == 1 else -1
        topk_idx_dtype = torch.int64
        if topk_idx is not None:
            _validate.tensor("topk_idx", topk_idx)
            _validate.ndim("topk_idx", topk_idx, 2, "[num_tokens, num_topk]")
            _tensor("topk_idx", topk_idx, TOPK_IDX_DTYPES, (num_tokens, topk_idx.shape[1]), "[num_tokens, num_topk]")
            if topk_weights is not None:
                _tensor("topk_weights", topk_weights, (torch.float32,), tuple(topk_idx.shape), "like topk_idx")
        elif topk_weights is not None:
            raise argument_error(InvalidArgument, "topk_weights", "None when topk_idx is None", "a tensor")
        if num_experts <= 0 or num_experts % num_ranks != 0:
            raise argument_error(InvalidArgument, "num_experts", f"a positive multiple of the {num_ranks} ranks "
                                 "(num_tokens_per_expert.shape[0])", num_experts)
        if handle is None:
            _tensor("is_token_in_rank", is_token_in_rank, (torch.bool,), (num_tokens, num_ranks), "[num_tokens, ranks]")
            _tensor("num_tokens_per_expert", num_tokens_per_expert, (torch.int32,), (num_experts,), "[num_experts]")
        if topk_idx is not None:
            # (On the GPU this would cost a host sync per call; the kernels map any id outside a rank's
            # experts to -1 there, so a bad id cannot index out of bounds.)
            if topk_idx.numel() and not topk_idx.is_cuda and (int(topk_idx.min()) < -1 or
                                                              int(topk_idx.max()) >= num_experts):
                raise argument_error(InvalidArgument, "topk_idx", f"expert ids in [-1, {num_experts})",
                                     f"min {int(topk_idx.min())}, max {int(topk_idx.max())}")
            topk_idx_dtype = topk_idx.dtype
        return DispatchCall(x, x_scales, handle, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                            num_experts, expert_alignment, num_worst_tokens, config, topk_idx_dtype, zero_copy)


    def kernel_inputs(self, op) -> "DispatchCall":
        """The call with what the kernels read: int64 ids (int32 is widened) and contiguous scales,
        small copies made inside the operation on its stream (``op.on_stream``). On the GPU the comm
        stream waits for ``previous_event`` only, which orders the caller's tensors but not copies
        queued on the current stream after it."""
        with op.on_stream():
            topk_idx = None if self.topk_idx is None else self.topk_idx.to(torch.int64)
            x_scales = None if self.x_scales is None else self.x_scales.contiguous()
        op.keep(self.topk_idx, self.x_scales)  # the copies read the caller's tensors on the comm stream
        return dataclasses.replace(self, topk_idx=topk_idx, x_scales=x_scales)


@dataclasses.dataclass
class CombineCall:
    x: torch.Tensor
    handle: DispatchHandle
    topk_weights: Optional[torch.Tensor]
    bias: Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]
    config: Config
    zero_copy: bool = False  # x is this rank's combine input buffer (get_combine_input_buffer)

    @staticmethod
    def validate(x, handle, topk_weights, bias, config, num_ranks, zero_copy=False) -> "CombineCall":
        if not isinstance(handle, DispatchHandle):
            raise argument_error(InvalidType, "handle", "a handle returned by Buffer.dispatch", type(handle).__name__)
        _validate.tensor("x", x)
        _validate.ndim("x", x, 2, "[num_recv_tokens, hidden]")
        num_rows, hidden = x.shape
        received, padded = handle.num_recv_tokens, handle.num_output_rows
        if num_rows not in (received, padded):
            rows = f"{received}" if received == padded else f"{received} or {padded} (num_worst_tokens)"
            raise argument_error(InvalidShape, "x", f"{rows} rows (the dispatch's rows) of [num_recv_tokens, hidden]",
                                 f"shape {tuple(x.shape)}")
        _tensor("x", x, (torch.bfloat16,), (num_rows, hidden), "[num_recv_tokens, hidden] (the dispatch's rows)",
                rows=True)
        if hidden % 8 != 0 or hidden == 0:
            raise argument_error(InvalidShape, "x", "a hidden size that is a positive multiple of 8", hidden)
        if topk_weights is not None:
            _validate.tensor("topk_weights", topk_weights)
            _validate.ndim("topk_weights", topk_weights, 2, "[num_recv_tokens, num_topk]")
            _tensor("topk_weights", topk_weights, (torch.float32,), (num_rows, topk_weights.shape[1]),
                    "[num_recv_tokens, num_topk] (rows like x)")
        biases = bias if isinstance(bias, tuple) else (bias, None)
        if len(biases) != 2:
            raise argument_error(InvalidType, "bias", "None, a tensor or a pair of tensors", f"a {len(biases)}-tuple")
        num_tokens = handle.is_token_in_rank.shape[0]
        for i, b in enumerate(biases):
            if b is not None:
                _tensor(f"bias[{i}]", b, (torch.bfloat16,), (num_tokens, hidden), "[num_tokens, hidden]", rows=True)
        if not isinstance(config, Config):
            raise argument_error(InvalidType, "config", "a moelink.Config", type(config).__name__)
        if handle.num_channels != config.num_sms // 2:
            raise argument_error(InvalidArgument, "config", f"num_sms = {2 * handle.num_channels}, as in the handle's "
                                 "dispatch", f"num_sms = {config.num_sms}")
        if not isinstance(zero_copy, bool):
            raise argument_error(InvalidType, "zero_copy", "a bool", type(zero_copy).__name__)
        return CombineCall(x, handle, topk_weights, biases, config, zero_copy)

