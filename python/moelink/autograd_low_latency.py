"""Differentiable low-latency dispatch and combine (DeepEP V1's low-latency API), re-exported as
``moelink.autograd.low_latency_dispatch`` / ``low_latency_combine``.

    recv_x, recv_count, handle, event, hook = moelink.autograd.low_latency_dispatch(
        buffer, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts)
    ...                                     # experts on rows [0, recv_count[e]) of each expert
    combined_x, event, hook = moelink.autograd.low_latency_combine(
        buffer, expert_out, topk_idx, topk_weights, handle)

- **low_latency_dispatch**'s backward is a low-latency **combine** of the gradient of ``recv_x``
  (unit weights): each token's gradient is the sum of its top-k copies' gradients. With
  ``topk_weights`` the dispatch applies the weights on the expert side (the receiver stores
  ``w[t, k] * x[t]``, bf16 rows carrying their weights); then the backward combine uses the weights
  and also returns each slot's gradient row, whose dot product with ``x[t]`` is the gradient of
  ``w[t, k]``.
- **low_latency_combine**'s backward is a low-latency dispatch of ``grad_out`` replayed into the
  forward dispatch's receive slots, each row scaled by its weight (``w[t, k] * grad_out[t]``;
  slots past ``recv_count`` and slots the combine skipped get 0); the gradient of
  ``topk_weights[t, k]`` is ``<grad_out[t], row(t, k)>``, with the rows the forward combine
  received (kept per slot, ``[num_tokens, num_topk, hidden]`` bf16, only when the weights need a
  gradient).
- Only bf16 payloads are differentiable. When a gradient is required these raise
  :class:`moelink.errors.InvalidArgument` naming the option: ``use_fp8=True``, ``round_scale``,
  ``use_ue8m0``, ``payload`` other than ``"bf16"``, ``nvfp4_global_scale``, ``return_recv_hook``
  (dispatch); ``use_logfmt``, ``zero_copy``, ``return_recv_hook``, ``out`` (combine). Without a
  gradient (``torch.no_grad()``, or no input requiring one) every option of the Buffer method works
  and the call is the Buffer's. ``use_fp8`` defaults to False here (bf16).
- Both backward passes are low-latency calls, i.e. collectives: every rank runs the same forward
  and backward calls in the same order. A pending receive hook refuses them as it refuses any call.
- ``x`` may be any floating dtype (it travels as bf16; its gradient comes back in its dtype);
  ``topk_weights`` travel as float32. Double backward raises an error naming the op.
- Inputs may be ``__dlpack__`` arrays (bf16 as raw ``uint16`` bits); outputs are torch tensors.

The rows of ``recv_x`` past ``recv_count[e]`` are unspecified (as in DeepEP): mask them before an
expert reads them, or garbage (possibly inf/NaN) reaches the expert weights' gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from . import _low_latency
from ._interop import accepts_arrays
from .autograd import _once_differentiable
from .errors import InvalidArgument, InvalidDType, InvalidType, argument_error
from .event import EventOverlap

__all__ = ["low_latency_dispatch", "low_latency_combine"]

_DISPATCH_OPTIONS = ("cumulative_local_expert_recv_stats", "dispatch_wait_recv_cost_stats", "use_fp8", "round_scale",
                     "use_ue8m0", "async_finish", "return_recv_hook", "payload", "nvfp4_global_scale")
_COMBINE_OPTIONS = ("use_logfmt", "zero_copy", "async_finish", "return_recv_hook", "out",
                    "combine_wait_recv_cost_stats", "logfmt_bits")
# Options that change the payload or split the call: (name, the value that keeps bf16 / one call).
_DISPATCH_NOT_DIFFERENTIABLE = (("use_fp8", False), ("round_scale", False), ("use_ue8m0", False),
                                ("return_recv_hook", False), ("payload", None), ("nvfp4_global_scale", None))
_COMBINE_NOT_DIFFERENTIABLE = (("use_logfmt", False), ("zero_copy", False), ("return_recv_hook", False), ("out", None))
_WHY = {"use_fp8": "FP8 codes carry no gradient", "round_scale": "FP8 only", "use_ue8m0": "FP8 only",
        "payload": "only bf16 payloads are differentiable", "nvfp4_global_scale": "NVFP4 only",
        "return_recv_hook": "the backward needs the whole call", "use_logfmt": "LogFMT rows carry no gradient",
        "zero_copy": "the rows live in the combine buffer, not in x", "out": "autograd allocates the output"}


def _check_options(op: str, options: dict, known: tuple) -> None:
    unknown = set(options) - set(known)
    if unknown:
        raise argument_error(InvalidArgument, "options", f"{op}'s options ({', '.join(known)})",
                             ", ".join(sorted(unknown)))


def _refuse_not_differentiable(options: dict, table: tuple) -> None:
    for name, neutral in table:
        value = options.get(name, neutral)
        if value is neutral or (name == "payload" and value == "bf16"):
            continue
        if isinstance(value, torch.Tensor) or value != neutral:
            raise argument_error(InvalidArgument, name, f"{neutral!r} when a gradient is required ({_WHY[name]}; "
                                 "run the call under torch.no_grad() or use the Buffer method)", repr(value))


def _wants_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


def _as_bf16(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise argument_error(InvalidType, name, "a tensor (quantised payloads carry no gradient)", type(x).__name__)
    if not x.is_floating_point():
        raise argument_error(InvalidDType, name, "a floating-point dtype (it travels as bf16)", x.dtype)
    return x.to(torch.bfloat16).contiguous()


def _as_weights(topk_weights) -> Optional[torch.Tensor]:
    if topk_weights is None:
        return None
    if not isinstance(topk_weights, torch.Tensor):
        raise argument_error(InvalidType, "topk_weights", "a tensor", type(topk_weights).__name__)
    if not topk_weights.is_floating_point():
        raise argument_error(InvalidDType, "topk_weights", "a floating-point dtype (it travels as float32)",
                             topk_weights.dtype)
    return topk_weights.float().contiguous()


def _ids(topk_idx) -> torch.Tensor:
    """int64 ids (int32 widened); other dtypes are left for the call's validation to name."""
    if not isinstance(topk_idx, torch.Tensor):
        raise argument_error(InvalidType, "topk_idx", "a tensor", type(topk_idx).__name__)
    return topk_idx.to(torch.int64) if topk_idx.dtype in (torch.int32, torch.int64) else topk_idx


def _valid_rows(handle) -> torch.Tensor:
    """[EL, R*T, 1] bool: the rows a dispatch of ``handle`` wrote (the rest are unspecified)."""
    rows = handle[0].shape[1]
    count = handle.recv_count.to(torch.int64)
    return (torch.arange(rows, device=count.device).unsqueeze(0) < count.unsqueeze(1)).unsqueeze(2)


# ---- dispatch ----------------------------------------------------------------------------------

@dataclasses.dataclass
class _DispatchState:
    buffer: Any
    topk_idx: torch.Tensor  # int64, the ids the kernel routed by
    num_max_tokens: int
    num_experts: int
    stats: dict
    handle: Any = None


def _dispatch_call(state: _DispatchState, x, weights, **options):
    buffer = state.buffer
    ll = buffer._low_latency_state("low_latency_dispatch")
    _low_latency._flag("async_finish", options.pop("async_finish", False))
    recv_x, recv_count, handle, hook, _ = _low_latency.dispatch(
        ll, buffer._operation, x, state.topk_idx, state.num_max_tokens, state.num_experts, **state.stats, **options,
        topk_weights=weights, scale_by_weight=weights is not None)
    handle.dispatch_topk_idx = state.topk_idx  # for the backward of a combine of this handle (its replay)
    state.handle = handle
    return recv_x, recv_count, hook


class _LowLatencyDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, state: _DispatchState):
        recv_x, recv_count, _ = _dispatch_call(state, x, weights, use_fp8=False)
        ctx.state = state
        ctx.save_for_backward(x if weights is not None else None, weights)
        ctx.mark_non_differentiable(recv_count)
        return recv_x, recv_count

    @staticmethod
    @_once_differentiable("moelink.autograd.low_latency_dispatch", "low-latency combine")
    def backward(ctx, grad_recv_x, _grad_count=None):
        state: _DispatchState = ctx.state
        x, weights = ctx.saved_tensors
        buffer, handle, topk = state.buffer, state.handle, state.topk_idx
        ll = buffer._low_latency_state("low_latency_combine")
        need_w = weights is not None and ctx.needs_input_grad[1]
        grad = grad_recv_x.to(torch.bfloat16).contiguous()
        unit = torch.ones(topk.shape, dtype=torch.float32, device=grad.device) if weights is None else weights
        slot_values = torch.zeros(*topk.shape, x.shape[1], dtype=torch.bfloat16, device=grad.device) if need_w else None
        combined, _, _ = _low_latency.combine(ll, buffer._operation, grad, topk, unit, handle, slot_values=slot_values)
        grad_w = None
        if need_w:  # d(w * x[t]) / dw = x[t]: <the slot's gradient row, x[t]>
            grad_w = torch.einsum("tkh,th->tk", slot_values.float(), x.float()) * (topk >= 0)
        return (combined if ctx.needs_input_grad[0] else None), grad_w, None


@accepts_arrays(returns_torch=True, bits={"x": torch.bfloat16})
def low_latency_dispatch(buffer, x, topk_idx, num_max_dispatch_tokens_per_rank: int, num_experts: int,
                         topk_weights=None, **options):
    """Differentiable :meth:`moelink.Buffer.low_latency_dispatch` (module docstring). Returns
    ``(recv_x, recv_count, handle, event, hook)`` as the Buffer method; ``recv_x`` is bf16 ``[EL,
    R * T, H]`` (``w[t, k] * x[t]`` with ``topk_weights``, which need a bf16 payload). ``options``:
    the Buffer method's keywords; ``use_fp8`` defaults to False."""
    _check_options("low_latency_dispatch", options, _DISPATCH_OPTIONS)
    options.setdefault("use_fp8", False)
    ids = _ids(topk_idx)
    x, weights = _as_bf16("x", x), _as_weights(topk_weights)
    stats = {name: options.pop(name, None) for name in _DISPATCH_OPTIONS[:2]}
    state = _DispatchState(buffer, ids, num_max_dispatch_tokens_per_rank, num_experts, stats)
    if weights is not None and (options["use_fp8"] or options.get("payload") not in (None, "bf16")):
        raise argument_error(InvalidArgument, "topk_weights", "None unless the payload is bf16 (the receiver scales "
                             "bf16 rows by their weight)", f"weights with use_fp8={options['use_fp8']}, "
                             f"payload={options.get('payload')!r}")
    if not _wants_grad(x, weights):
        recv_x, recv_count, hook = _dispatch_call(state, x, weights, **options)
        return recv_x, recv_count, state.handle, EventOverlap(), hook
    _refuse_not_differentiable(options, _DISPATCH_NOT_DIFFERENTIABLE)
    _low_latency._flag("async_finish", options.get("async_finish", False))
    recv_x, recv_count = _LowLatencyDispatch.apply(x, weights, state)
    return recv_x, recv_count, state.handle, EventOverlap(), None


# ---- combine -----------------------------------------------------------------------------------

@dataclasses.dataclass
class _CombineState:
    buffer: Any
    topk_idx: torch.Tensor
    handle: Any
    replay_idx: Optional[torch.Tensor]  # the dispatch's ids, for the backward's replay into its slots
    stats: Optional[torch.Tensor]


class _LowLatencyCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weights, state: _CombineState):
        buffer, handle = state.buffer, state.handle
        ll = buffer._low_latency_state("low_latency_combine")
        slot_values = None
        if ctx.needs_input_grad[1]:
            slot_values = torch.zeros(handle.num_tokens, handle.num_topk, handle[3], dtype=torch.bfloat16,
                                      device=x.device)
        combined, _, _ = _low_latency.combine(ll, buffer._operation, x, state.topk_idx, weights, handle,
                                           combine_wait_recv_cost_stats=state.stats, slot_values=slot_values)
        ctx.state = state
        ctx.save_for_backward(weights, slot_values)
        return combined

    @staticmethod
    @_once_differentiable("moelink.autograd.low_latency_combine", "low-latency cached dispatch")
    def backward(ctx, grad_out):
        state: _CombineState = ctx.state
        weights, slot_values = ctx.saved_tensors
        buffer, handle, topk = state.buffer, state.handle, state.topk_idx
        grad_x = grad_w = None
        used = topk >= 0
        if ctx.needs_input_grad[0]:
            ll = buffer._low_latency_state("low_latency_dispatch")
            # Replayed with the dispatch's ids (the receivers count each source's rows), a slot the
            # combine skipped carrying weight 0.
            scaled = (weights * used).contiguous()
            grad = grad_out.to(torch.bfloat16).contiguous()
            recv, _, _, _, _ = _low_latency.dispatch(ll, buffer._operation, grad, state.replay_idx, handle[2], handle[4],
                                                  use_fp8=False, topk_weights=scaled, cached=handle,
                                                  scale_by_weight=True)
            grad_x = torch.where(_valid_rows(handle), recv, torch.zeros((), dtype=recv.dtype))
        if ctx.needs_input_grad[1]:
            grad_w = torch.einsum("tkh,th->tk", slot_values.float(), grad_out.float()) * used
        return grad_x, grad_w, None


def _replay_ids(handle, topk: torch.Tensor) -> torch.Tensor:
    """The ids the backward's replay routes by: the dispatch's (kept on handles of
    moelink.autograd.low_latency_dispatch), else the combine's, which must then send every slot
    the dispatch sent."""
    ids = getattr(handle, "dispatch_topk_idx", None)
    if ids is not None:
        return ids
    sent = getattr(handle, "send_slots", None)
    if sent is not None and tuple(sent.shape) == tuple(topk.shape) and not torch.equal(topk >= 0, sent >= 0):
        raise argument_error(InvalidArgument, "topk_idx", "the dispatch's ids with no slot set to -1 when x needs a "
                             "gradient and the handle comes from Buffer.low_latency_dispatch (give the slot weight 0, "
                             "or dispatch with moelink.autograd.low_latency_dispatch)", "a slot set to -1")
    return topk


@accepts_arrays(returns_torch=True, bits={"x": torch.bfloat16, "out": torch.bfloat16})
def low_latency_combine(buffer, x, topk_idx, topk_weights, handle, **options):
    """Differentiable :meth:`moelink.Buffer.low_latency_combine` of the expert outputs ``x`` ``[EL,
    R * T, H]`` (any floating dtype; sent as bf16) with the dispatch's ``handle``. Returns
    ``(combined_x, event, hook)`` as the Buffer method; gradients flow to ``x`` and
    ``topk_weights``. ``options``: the Buffer method's keywords."""
    _check_options("low_latency_combine", options, _COMBINE_OPTIONS)
    if not isinstance(handle, _low_latency.LowLatencyHandle):
        raise argument_error(InvalidType, "handle", "the handle of a low-latency dispatch", type(handle).__name__)
    topk = _ids(topk_idx)
    if topk_weights is None:
        raise argument_error(InvalidType, "topk_weights", "a tensor [num_tokens, num_topk]", "None")
    x, weights = _as_bf16("x", x), _as_weights(topk_weights)
    if not _wants_grad(x, weights):
        return buffer.low_latency_combine(x, topk_idx, weights, handle, **options)
    _refuse_not_differentiable(options, _COMBINE_NOT_DIFFERENTIABLE)
    _low_latency._flag("async_finish", options.get("async_finish", False))
    replay = _replay_ids(handle, topk) if x.requires_grad else None
    state = _CombineState(buffer, topk, handle, replay, options.get("combine_wait_recv_cost_stats"))
    return _LowLatencyCombine.apply(x, weights, state), EventOverlap(), None
