"""An expert-parallel MoE layer on moelink, and the same layer in one process.

    dense = moelink.nn.MoE(hidden=64, ffn_hidden=128, num_experts=8, num_topk=2, generator=gen)
    layer = moelink.nn.ExpertParallelMoE.from_dense(dense, buffer)   # this rank's experts only
    y = layer(x)                                                      # [tokens, hidden], like dense(x)

Both compute, for each token ``x``, ``sum_k w_k * expert_{e_k}(x)`` with a router ``scores =
score_func(x @ W_r)``, ``(e, w) = route(scores)`` and SwiGLU-free two-layer experts
``expert_e(x) = W2_e · silu(W1_e · x)``. :class:`ExpertParallelMoE` keeps the experts of its rank
(rank ``r`` owns experts ``[r·E/R, (r+1)·E/R)``) and moves tokens with
:func:`moelink.autograd.dispatch` / :func:`moelink.autograd.combine`: the top-k weights travel
with the tokens and are applied on the expert side, so their gradients come back through the
dispatch's backward. The router is replicated: call :meth:`ExpertParallelMoE.all_reduce_router_grads`
after backward (data parallelism over the expert-parallel group), as training frameworks do.

Routing. With ``num_groups``/``max_groups`` (experts split into ``num_groups`` contiguous groups,
e.g. one per node; each token may use at most ``max_groups`` of them, DeepSeek-V3's 4 of 8) the
layer calls ``moelink.routing.node_limited_topk(scores, num_topk, num_groups, max_groups, bias=...,
normalize=..., scaling_factor=...)``. If ``moelink.routing`` is not installed the layer falls back
to plain top-k, which ignores the group limit: :data:`NODE_LIMITED_ROUTING` is False, every layer's
``routing`` attribute says ``"plain top-k (fallback: moelink.routing is absent)"``, and asking for a
group limit warns (:class:`RoutingFallbackWarning`).
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import autograd
from .errors import InvalidArgument, argument_error

try:
    from .routing import node_limited_topk as _node_limited_topk
except ModuleNotFoundError as exc:  # only the module itself may be missing; its own imports must work
    if exc.name not in (f"{__package__}.routing",):
        raise
    _node_limited_topk = None

__all__ = ["MoE", "ExpertParallelMoE", "route", "NODE_LIMITED_ROUTING", "RoutingFallbackWarning"]

#: True when ``moelink.routing.node_limited_topk`` is importable and group limits are honoured.
NODE_LIMITED_ROUTING = _node_limited_topk is not None
_PLAIN = "plain top-k"
_FALLBACK = "plain top-k (fallback: moelink.routing is absent, group limits ignored)"
_NODE_LIMITED = "node-limited top-k (moelink.routing.node_limited_topk)"


class RoutingFallbackWarning(RuntimeWarning):
    """A group limit was asked for, but moelink.routing is absent: plain top-k is used instead."""


def _plain_topk(scores: torch.Tensor, num_topk: int, *, bias: Optional[torch.Tensor], normalize: bool,
                scaling_factor: float) -> Tuple[torch.Tensor, torch.Tensor]:
    # As DeepSeek-V3: the bias steers the choice only; the weights are the scores themselves.
    chosen = (scores if bias is None else scores + bias).topk(num_topk, dim=-1).indices
    weights = scores.gather(1, chosen)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-20)
    return chosen, weights * scaling_factor


def route(scores: torch.Tensor, num_topk: int, num_groups: Optional[int] = None, max_groups: Optional[int] = None,
          *, bias: Optional[torch.Tensor] = None, normalize: bool = True, scaling_factor: float = 1.0
          ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(topk_idx int64 [N, K], topk_weights float32 [N, K])`` from router ``scores`` ``[N, E]``:
    node-limited when ``num_groups`` is given and moelink.routing exists, plain top-k otherwise."""
    if num_groups is not None and _node_limited_topk is not None:
        idx, weights = _node_limited_topk(scores, num_topk, num_groups, max_groups, bias=bias, normalize=normalize,
                                          scaling_factor=scaling_factor)
    else:
        idx, weights = _plain_topk(scores, num_topk, bias=bias, normalize=normalize, scaling_factor=scaling_factor)
    return idx.to(torch.int64), weights.float()


class _Router(nn.Module):
    """Router shared by both layers: scores, routing options and the routing actually used."""

    def __init__(self, hidden: int, num_experts: int, num_topk: int, num_groups: Optional[int], max_groups: Optional[int],
                 score_func: str, normalize: bool, scaling_factor: float, generator: Optional[torch.Generator],
                 dtype: torch.dtype):
        super().__init__()
        for name, value in (("hidden", hidden), ("num_experts", num_experts), ("num_topk", num_topk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise argument_error(InvalidArgument, name, "an int >= 1", value)
        if num_topk > num_experts:
            raise argument_error(InvalidArgument, "num_topk", f"at most num_experts = {num_experts}", num_topk)
        if score_func not in ("softmax", "sigmoid"):
            raise argument_error(InvalidArgument, "score_func", "'softmax' or 'sigmoid'", repr(score_func))
        if (num_groups is None) != (max_groups is None):
            raise argument_error(InvalidArgument, "max_groups", "given together with num_groups",
                                 f"num_groups={num_groups}, max_groups={max_groups}")
        if num_groups is not None:
            if num_experts % num_groups or not 1 <= max_groups <= num_groups:
                raise argument_error(InvalidArgument, "num_groups", f"a divisor of num_experts = {num_experts}, with "
                                     "1 <= max_groups <= num_groups", f"num_groups={num_groups}, max_groups={max_groups}")
        self.num_experts, self.num_topk = num_experts, num_topk
        self.num_groups, self.max_groups = num_groups, max_groups
        self.score_func, self.normalize, self.scaling_factor = score_func, normalize, scaling_factor
        weight = torch.randn(num_experts, hidden, generator=generator, dtype=torch.float32) / hidden ** 0.5
        self.weight = nn.Parameter(weight.to(dtype))
        if num_groups is None:
            self.routing = _PLAIN
        elif NODE_LIMITED_ROUTING:
            self.routing = _NODE_LIMITED
        else:
            self.routing = _FALLBACK
            warnings.warn(f"moelink.nn: num_groups={num_groups}, max_groups={max_groups} asked for node-limited "
                          "routing, but moelink.routing is not installed: using plain top-k, which ignores the "
                          "group limit", RoutingFallbackWarning, stacklevel=3)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = x.float() @ self.weight.float().t()
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        return route(scores, self.num_topk, self.num_groups, self.max_groups, normalize=self.normalize,
                     scaling_factor=self.scaling_factor)


def _expert(w1: torch.Tensor, w2: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return F.silu(rows @ w1.t()) @ w2.t()


def _init_experts(count: int, hidden: int, ffn_hidden: int, generator, dtype) -> Tuple[nn.Parameter, nn.Parameter]:
    w1 = torch.randn(count, ffn_hidden, hidden, generator=generator) / hidden ** 0.5
    w2 = torch.randn(count, hidden, ffn_hidden, generator=generator) / ffn_hidden ** 0.5
    return nn.Parameter(w1.to(dtype)), nn.Parameter(w2.to(dtype))


class MoE(nn.Module):
    """The MoE layer in one process, every expert local: the reference for :class:`ExpertParallelMoE`.

    ``generator`` seeds the parameters (router, then ``w1`` ``[E, ffn_hidden, hidden]``, then ``w2``
    ``[E, hidden, ffn_hidden]``), so every rank can build the same one."""

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, num_topk: int, *,
                 num_groups: Optional[int] = None, max_groups: Optional[int] = None, score_func: str = "softmax",
                 normalize: bool = True, scaling_factor: float = 1.0, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.router = _Router(hidden, num_experts, num_topk, num_groups, max_groups, score_func, normalize,
                              scaling_factor, generator, dtype)
        self.hidden, self.ffn_hidden, self.num_experts, self.num_topk = hidden, ffn_hidden, num_experts, num_topk
        self.w1, self.w2 = _init_experts(num_experts, hidden, ffn_hidden, generator, dtype)

    @property
    def routing(self) -> str:
        return self.router.routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.router(x)
        out = torch.zeros(x.shape, dtype=torch.float32)
        for e in range(self.num_experts):
            hit = topk_idx == e
            tokens = hit.any(1).nonzero().flatten()
            if tokens.numel() == 0:
                continue
            gate = (hit[tokens] * topk_weights[tokens]).sum(1, keepdim=True)
            out = out.index_add(0, tokens, gate * _expert(self.w1[e].float(), self.w2[e].float(), x[tokens].float()))
        return out.to(x.dtype)


class ExpertParallelMoE(nn.Module):
    """The MoE layer with its experts spread over the ranks of ``buffer`` (a :class:`moelink.Buffer`).

    Same constructor as :class:`MoE` after ``buffer``; with the same ``generator`` state it holds
    this rank's slice of the same parameters. Every rank must call ``forward`` (and ``backward``)
    together: dispatch and combine are collectives. ``dispatch_options`` go to
    :func:`moelink.autograd.dispatch` (``expert_alignment``, ``num_worst_tokens``, ``config``)."""

    def __init__(self, buffer, hidden: int, ffn_hidden: int, num_experts: int, num_topk: int, *,
                 num_groups: Optional[int] = None, max_groups: Optional[int] = None, score_func: str = "softmax",
                 normalize: bool = True, scaling_factor: float = 1.0, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32, dispatch_options: Optional[dict] = None):
        super().__init__()
        dense = MoE(hidden, ffn_hidden, num_experts, num_topk, num_groups=num_groups, max_groups=max_groups,
                    score_func=score_func, normalize=normalize, scaling_factor=scaling_factor, generator=generator,
                    dtype=dtype)  # the same draws as MoE, then this rank's share is kept
        self._take(dense, buffer, dispatch_options or {})

    @classmethod
    def from_dense(cls, dense: MoE, buffer, **dispatch_options) -> "ExpertParallelMoE":
        """This rank's share of ``dense``: the router copied, the experts of this rank sliced out."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._take(dense, buffer, dispatch_options)
        return layer

    def _take(self, dense: MoE, buffer, dispatch_options: dict) -> None:
        self.buffer = buffer
        self.rank, self.world_size = buffer.rank, buffer.group_size
        if dense.num_experts % self.world_size:
            raise argument_error(InvalidArgument, "num_experts", f"a multiple of the {self.world_size} ranks",
                                 dense.num_experts)
        self.hidden, self.ffn_hidden = dense.hidden, dense.ffn_hidden
        self.num_experts, self.num_topk = dense.num_experts, dense.num_topk
        self.experts_per_rank = dense.num_experts // self.world_size
        self.router = copy.deepcopy(dense.router)
        first = self.rank * self.experts_per_rank
        self.w1 = nn.Parameter(dense.w1.detach()[first:first + self.experts_per_rank].clone())
        self.w2 = nn.Parameter(dense.w2.detach()[first:first + self.experts_per_rank].clone())
        self.dispatch_options = dict(dispatch_options)

    @property
    def routing(self) -> str:
        return self.router.routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.router(x)
        recv_x, recv_idx, recv_w, _, handle = autograd.dispatch(self.buffer, x, topk_idx, topk_weights,
                                                                self.num_experts, **self.dispatch_options)
        out = torch.zeros(recv_x.shape, dtype=torch.float32)
        for e in range(self.experts_per_rank):
            hit = recv_idx == e
            rows = hit.any(1).nonzero().flatten()
            if rows.numel() == 0:
                continue
            gate = (hit[rows] * recv_w[rows]).sum(1, keepdim=True)
            out = out.index_add(0, rows, gate * _expert(self.w1[e].float(), self.w2[e].float(), recv_x[rows].float()))
        return autograd.combine(self.buffer, out.to(torch.bfloat16), handle).to(x.dtype)

    def all_reduce_router_grads(self) -> None:
        """Sums the replicated router's gradients over the ranks (call after backward, before the
        optimizer step), so every rank applies the gradient of the whole batch."""
        grad = self.router.weight.grad
        if grad is not None:
            dist.all_reduce(grad, group=self.buffer.group)

    def expert_parameters(self):
        return [self.w1, self.w2]
