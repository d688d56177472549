"""Differentiable dispatch and combine: ``torch.autograd.Function``s over a :class:`moelink.Buffer`.

    recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle = moelink.autograd.dispatch(
        buffer, x, topk_idx, topk_weights, num_experts)
    ...                                     # experts on the received rows
    y = moelink.autograd.combine(buffer, expert_out, handle)

- **dispatch**'s backward is a **combine** of the gradients: each token's gradient is the sum of
  the gradients of its copies (for ``x``), and each top-k weight's gradient comes from the one rank
  that owns that expert (for ``topk_weights``; the slots a rank received as -1 carry none).
- **combine**'s backward is a **cached dispatch** of the gradient with the forward's handle: every
  received row gets the gradient of the token it was summed into (rows of ``num_worst_tokens``
  padding get zero).
- Both are collectives: every rank must run the forward *and* the backward of the same calls in
  the same order, as with DeepEP (Megatron's ``fused_a2a`` has the same rule).
- Gradients travel in bf16, combine's wire format (fp32 accumulation on the receiving side), and
  come back in the forward input's dtype. FP8 payloads carry no gradient: use ``Buffer.dispatch``.
- Double backward (``create_graph=True`` through these functions, then a second backward) raises
  an error saying so: the backward of a backward would need a combine of a combine's gradients,
  which no MoE training needs.
- Inputs may be ``__dlpack__`` arrays (they become torch tensors without a copy); outputs are torch
  tensors, since the autograd graph lives in torch.

Options: ``dispatch(..., expert_alignment=1, num_worst_tokens=0, config=None, backward_config=None)``
and ``combine(..., bias=None, config=None, backward_config=None)``; ``config`` goes to the forward
call, ``backward_config`` to the backward one (default: the Buffer's config for that call with
the handle's SM count).

Low-latency mode: ``low_latency_dispatch`` / ``low_latency_combine`` (bf16 payloads), in
``moelink.autograd_low_latency`` (its docstring has what they compute and refuse).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, List, Optional, Tuple

import torch

from ._interop import accepts_arrays
from ._intranode import DispatchHandle
from .config import Config
from .errors import InvalidArgument, InvalidDType, InvalidType, argument_error

__all__ = ["dispatch", "combine", "low_latency_dispatch", "low_latency_combine",
           "DOUBLE_BACKWARD_MESSAGE"]

DOUBLE_BACKWARD_MESSAGE = (
    "moelink.autograd: double backward is not supported: the gradient of {op}'s backward (a {backward}) "
    "would itself need a collective inside a backward. Differentiate through dispatch/combine once "
    "(create_graph=False), or keep this part of the graph out of the second derivative.")

_DIFFERENTIABLE = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _once_differentiable(op: str, backward: str):
    """Like ``torch.autograd.function.once_differentiable``, with a message naming the op."""
    message = DOUBLE_BACKWARD_MESSAGE.format(op=op, backward=backward).encode()

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(ctx, *grads):
            with torch.no_grad():
                outputs = fn(ctx, *grads)
            if not torch.is_grad_enabled() or not any(isinstance(g, torch.Tensor) and g.requires_grad for g in grads):
                return outputs
            delayed = getattr(getattr(torch._C, "_functions", None), "DelayedError", None)
            if delayed is None:  # pragma: no cover - torch without the helper: refuse at once
                raise RuntimeError(message.decode())
            error_fn = delayed(message, len(outputs))

            def fake_requires_grad(value):
                if value is not None:
                    value = value.detach()
                    value.requires_grad = True
                return value

            return error_fn(*[fake_requires_grad(v) for v in outputs])

        return wrapper

    return decorate


def _with_num_sms(config: Config, num_sms: int) -> Config:
    return config if config.num_sms == num_sms else dataclasses.replace(config, num_sms=num_sms)


@dataclasses.dataclass
class _DispatchState:
    buffer: Any
    topk_idx: torch.Tensor
    num_experts: int
    options: dict
    backward_config: Optional[Config]
    handle: Optional[DispatchHandle] = None
    recv_local: Optional[torch.Tensor] = None  # [rows, K] bool: slots received for a local expert
    x_dtype: Optional[torch.dtype] = None
    has_weights: bool = False


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, state: _DispatchState):
        buffer = state.buffer
        per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(state.topk_idx, state.num_experts)
        recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert, topk_idx=state.topk_idx, topk_weights=topk_weights, **state.options)
        state.handle, state.x_dtype, state.has_weights = handle, x.dtype, topk_weights is not None
        state.recv_local = recv_topk_idx >= 0
        ctx.state = state
        ctx.mark_non_differentiable(recv_topk_idx)
        return recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle

    @staticmethod
    @_once_differentiable("moelink.autograd.dispatch", "combine")
    def backward(ctx, grad_recv_x, _grad_idx, grad_recv_weights, _grad_list=None, _grad_handle=None):
        state: _DispatchState = ctx.state
        buffer, handle = state.buffer, state.handle
        config = state.backward_config or _with_num_sms(buffer.get_combine_config(buffer.group_size),
                                                        2 * handle.num_channels)
        grad_x = grad_recv_x.to(torch.bfloat16).contiguous()
        weights = None
        if state.has_weights and ctx.needs_input_grad[1]:
            # Only the rank owning a slot's expert holds that weight; the others received 0 there.
            weights = (grad_recv_weights.float() * state.recv_local).contiguous()
        combined_x, combined_weights, _ = buffer.combine(grad_x, handle, topk_weights=weights, config=config)
        grad_input = combined_x.to(state.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_input, combined_weights, None


@accepts_arrays(returns_torch=True)
def dispatch(buffer, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: Optional[torch.Tensor],
             num_experts: int, *, backward_config: Optional[Config] = None, **options
             ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], List[int], DispatchHandle]:
    """Differentiable :meth:`moelink.Buffer.dispatch` of ``x`` ``[num_tokens, hidden]`` by
    ``topk_idx`` (the layout is computed here). Returns ``(recv_x, recv_topk_idx,
    recv_topk_weights, num_recv_tokens_per_expert_list, handle)``; gradients flow to ``x`` and
    ``topk_weights``. ``options``: ``expert_alignment``, ``num_worst_tokens``, ``config``."""
    if not isinstance(x, torch.Tensor):
        raise argument_error(InvalidType, "x", "a tensor (FP8 pairs carry no gradient: use Buffer.dispatch)",
                             type(x).__name__)
    if x.dtype not in _DIFFERENTIABLE:
        raise argument_error(InvalidDType, "x", "a floating-point dtype (bf16, fp16, fp32, fp64)", x.dtype)
    unknown = set(options) - {"expert_alignment", "num_worst_tokens", "config"}
    if unknown:
        raise argument_error(InvalidArgument, "options", "expert_alignment, num_worst_tokens, config or "
                             "backward_config", ", ".join(sorted(unknown)))
    if x.dtype == torch.float64:  # the wire carries at most fp32 rows
        x = x.float()
    state = _DispatchState(buffer, topk_idx, num_experts, options, backward_config)
    return _Dispatch.apply(x, topk_weights, state)


@dataclasses.dataclass
class _CombineState:
    buffer: Any
    handle: DispatchHandle
    config: Optional[Config]
    backward_config: Optional[Config]
    x_rows: int = 0
    x_dtype: Optional[torch.dtype] = None
    bias_dtypes: Tuple[Optional[torch.dtype], Optional[torch.dtype]] = (None, None)


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias0, bias1, state: _CombineState):
        bias = (bias0, bias1) if bias1 is not None else bias0
        combined_x, _, _ = state.buffer.combine(x, state.handle, bias=bias, config=state.config)
        state.x_rows, state.x_dtype = x.shape[0], x.dtype
        state.bias_dtypes = (None if bias0 is None else bias0.dtype, None if bias1 is None else bias1.dtype)
        ctx.state = state
        return combined_x

    @staticmethod
    @_once_differentiable("moelink.autograd.combine", "cached dispatch")
    def backward(ctx, grad_out):
        state: _CombineState = ctx.state
        buffer, handle = state.buffer, state.handle
        config = state.backward_config or _with_num_sms(buffer.get_dispatch_config(buffer.group_size),
                                                        2 * handle.num_channels)
        grad = grad_out.to(torch.bfloat16).contiguous()
        grad_x = None
        if ctx.needs_input_grad[0]:
            recv, _, _, _, _, _ = buffer.dispatch(grad, handle=handle, config=config)
            # A cached dispatch returns the handle's dispatch rows (num_worst_tokens when padded,
            # padding zeroed); x may have had only the received ones.
            grad_x = recv[:state.x_rows].to(state.x_dtype)
        grads = [grad_out.to(d) if d is not None and need else None
                 for d, need in zip(state.bias_dtypes, ctx.needs_input_grad[1:3])]
        return grad_x, grads[0], grads[1], None


@accepts_arrays(returns_torch=True)
def combine(buffer, x: torch.Tensor, handle: DispatchHandle, *, bias=None, config: Optional[Config] = None,
            backward_config: Optional[Config] = None) -> torch.Tensor:
    """Differentiable :meth:`moelink.Buffer.combine` of ``x`` (bf16, the dispatch's rows) with the
    dispatch's ``handle``; returns ``combined_x`` ``[num_tokens, hidden]`` bf16. Gradients flow
    to ``x`` and to ``bias`` (a tensor or a pair)."""
    if not isinstance(handle, DispatchHandle):
        raise argument_error(InvalidType, "handle", "a handle returned by a dispatch", type(handle).__name__)
    biases = bias if isinstance(bias, tuple) else (bias, None)
    if len(biases) != 2:
        raise argument_error(InvalidType, "bias", "None, a tensor or a pair of tensors", f"a {len(biases)}-tuple")
    state = _CombineState(buffer, handle, config, backward_config)
    return _Combine.apply(x, biases[0], biases[1], state)


# After _once_differentiable, which the low-latency module uses.
from .autograd_low_latency import low_latency_combine, low_latency_dispatch  # noqa: E402
