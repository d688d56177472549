"""Mechanics of the low-latency mode (csrc/runtime/ops_low_latency.h): sizing, validation, output
allocation, the kernel calls and the receive hooks. ``moelink.Buffer``'s ``low_latency_*`` methods
are the public face; docs/low-latency.md explains the protocol and docs/semantics.md the choices.

Every call is one *call* of the protocol: this rank's kernels count calls in device memory and
call c uses half c % 2 of the window. The Python side keeps a mirror of that count only to
return the zero-copy combine buffer of the next call (``next_combine_buffer``) and to enforce the
rules the protocol rests on: a call's receive half (its hook) runs before the next call, and a
Buffer whose scale-out window a normal-mode call re-carved is cleaned first.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from . import _host, _low_latency_args, _validate
from ._target import HOST
from .errors import BufferUnusable, InvalidArgument, InvalidShape, InvalidType, argument_error
from .reference.low_latency import PAYLOADS
from ._low_latency_args import _check_experts, _check_hidden, _flag, _global_scale, _payload, _stats, _tensor, _topk

__all__ = ["PAYLOADS", "LowLatencyHandle", "LowLatencyState", "window_regions", "rdma_size_hint", "set_codec_split",
           "layout"]

_ll = _host.low_latency  # layouts and constants (arithmetic, the same in both extensions); kernels: state.kernels
_FORMATS = dict(_ll.FORMATS)
_SEND, _RECV = _ll.SEND_PHASE, _ll.RECV_PHASE
MAX_TOPK = _ll.MAX_TOPK
MASKED_SLOT = _ll.MASKED_SLOT  # send_slots of a (token, k) whose expert's rank was masked (shrink mode)
assert MAX_TOPK == _low_latency_args.MAX_TOPK
_codec_split = 0  # CodecLaneSplit of the encoders: 0 as the target suggests, 1 the GPU's warp form


def set_codec_split(split: str) -> None:
    """``"auto"`` (default) or ``"warp"``: the warp (GPU) form of the in-kernel encoders on the host
    too, so tests check the GPU's form bit for bit (process-wide; every rank must agree)."""
    global _codec_split
    if split not in ("auto", "warp"):
        raise argument_error(InvalidArgument, "split", "'auto' or 'warp'", repr(split))
    _codec_split = 0 if split == "auto" else 1


def window_regions(num_nodes: int, ranks_per_node: int, window_bytes: int) -> dict:
    """Where the low-latency regions lie in a scale-out window (LowLatencyWindow)."""
    return dict(_ll.window(num_nodes=num_nodes, ranks_per_node=ranks_per_node, window_bytes=window_bytes))


def layout(*, num_ranks, ranks_per_node, num_max_tokens, hidden, num_experts, num_topk, payload, carry_weights=False,
           zero_copy=False, num_nodes=1, window_bytes=0) -> dict:
    """Message and half sizes of one call (LowLatencyLayout); ``payload`` a name of PAYLOADS."""
    return dict(_ll.layout(num_ranks=num_ranks, ranks_per_node=ranks_per_node, num_max_tokens=num_max_tokens,
                           hidden=hidden, num_experts=num_experts, num_topk=num_topk, format=_FORMATS[payload],
                           carry_weights=carry_weights, zero_copy=zero_copy, block_warps=1, num_nodes=num_nodes,
                           window_bytes=window_bytes))


def gpu_grid_blocks(num_experts: int, num_max_tokens: int, block_warps: int) -> int:
    """Blocks of ``block_warps`` warps a GPU low-latency kernel asks for: one warp per (local expert,
    source) pair (EL * R = num_experts of them), the receive half's unit of work, or per token of
    the send half if there are more: 16 blocks at DeepSeek-V3's 256 experts. The kernels stride
    their work over every warp of the grid, so any count is correct; this one is not tuned
    (nothing has run on a GPU)."""
    return max(1, -(-max(num_experts, num_max_tokens) // block_warps))


def rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int, num_experts: int,
                   num_topk: Optional[int] = None) -> int:
    """``num_rdma_bytes`` that holds every low-latency call of this shape in every format (and the
    internode layout's persistent words for any node count), rounded up to 4 KiB. ``num_topk``
    defaults to the largest a call may use (min(32, num_experts))."""
    for name, value in (("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank), ("hidden", hidden),
                        ("num_ranks", num_ranks), ("num_experts", num_experts)):
        _validate.integer(name, value, minimum=1)
    _check_hidden(hidden)
    _check_experts(num_experts, num_ranks)
    k = min(MAX_TOPK, num_experts) if num_topk is None else _validate.integer("num_topk", num_topk, minimum=1)
    shape = dict(num_ranks=num_ranks, ranks_per_node=1, num_max_tokens=num_max_dispatch_tokens_per_rank, hidden=hidden,
                 num_experts=num_experts, num_topk=k)
    half = max(layout(**shape, payload="bf16", carry_weights=True)["dispatch_bytes"],
               layout(**shape, payload="logfmt10", zero_copy=True)["combine_bytes"])
    base = window_regions(num_ranks, 1, 0)["data_base"]  # the most internode words: a node per rank
    return -(-(base + 2 * half) // 4096) * 4096


class LowLatencyHandle:
    """DeepEP's low-latency handle: reads as the 5-tuple ``(src_info, layout_range,
    num_max_dispatch_tokens_per_rank, hidden, num_experts)`` (indexing, ``len``, unpacking), and
    carries what moelink's combine needs as attributes. Pass it back unchanged.

    ``src_info`` int32 ``[EL, R*T]``: for each received row, ``token * K + k`` of its (token, top-k
    slot) on its source; ``layout_range`` int64 ``[EL, R]``: the rows of source s for local expert e
    are ``[begin, begin + count)`` with ``count = v & 0xFFFFFFFF`` and ``begin = v >> 32``.
    """

    def __init__(self, src_info, layout_range, num_max_tokens, hidden, num_experts, **extras):
        self._items = (src_info, layout_range, num_max_tokens, hidden, num_experts)
        self.__dict__.update(extras)

    def __len__(self) -> int:
        return 5

    def __getitem__(self, index):
        return self._items[index]

    def __iter__(self):
        return iter(self._items)

    def __repr__(self) -> str:
        return (f"LowLatencyHandle(rank {self.rank}/{self.num_ranks}, {self.num_tokens} tokens x top-{self.num_topk}, "
                f"hidden {self._items[3]}, {self._items[4]} experts, payload {self.payload})")


@dataclasses.dataclass
class _Call:
    """One call's kernel (``kernel``: "dispatch" or "combine" of the target's extension), native
    context and arguments, kept for its receive half (``keep``: the tensors its pointers point
    into; on the GPU target both halves' operations hold them for the comm stream)."""

    op: str
    kernel: str
    native: object
    args: tuple
    keep: tuple = ()
    finish: Callable[[], None] = lambda: None
    num_blocks: int = 1  # the grid, the same for both halves


class LowLatencyState:
    """A Buffer's low-latency side: its scale-out windows (``_scaleout.ScaleOutWindows`` on the
    host target, ``_gin.GinScaleOut`` on the GPU), the slot claims, the call mirror and the
    pending receive half. ``target`` (moelink._target): where the kernels and tensors are."""

    def __init__(self, scaleout, rank: int, num_ranks: int, num_nodes: int, ranks_per_node: int,
                 allow_nvlink: bool, shrink: bool = False, target=HOST):
        self.scaleout = scaleout
        self.target = target
        self.kernels = target.module.low_latency
        self.rank, self.num_ranks, self.num_nodes, self.ranks_per_node = rank, num_ranks, num_nodes, ranks_per_node
        self.allow_nvlink = allow_nvlink
        self.shrink = shrink  # Buffer(enable_shrink=True): the mask of ranks (see "shrink mode" below)
        self.window = window_regions(num_nodes, ranks_per_node, scaleout.data_bytes)
        self.claims = torch.zeros(0, dtype=torch.int32, device=target.device)
        self.calls = 0  # mirror of the kernels' own count (ops_low_latency.h: own word `calls`)
        self.pending: Optional[_Call] = None
        self.dirty: Optional[str] = None  # a normal-mode call re-carved the window since the last clean
        self.token = object()  # identity of handles made by this Buffer
        # The Buffer's output pool (moelink._pool): recv_x and the combined output come from it, so
        # a steady-state call takes no page faults. Buffer sets it; None: fresh tensors.
        self.pool = None

    # ---- rules ---------------------------------------------------------------------------------

    def check_devices(self, **tensors) -> None:
        """Every tensor of a call on the target's device (CPU on the host target, the Buffer's GPU)."""
        for name, value in tensors.items():
            if value is not None:
                self.target.check_device(name, value)

    def empty(self, shape, dtype) -> torch.Tensor:
        """An output on the target's device, from the Buffer's pool when it has one."""
        return _validate.allocate(self.pool, shape, dtype, self.target.device)

    def check_idle(self, op: str) -> None:
        if self.pending is not None:
            raise InvalidArgument(f"{op}: the receive hook of the previous low-latency {self.pending.op} has not run; "
                                  "call it first (a call's receive half must run before this rank's next call)")

    def check_ready(self, op: str) -> None:
        self.check_idle(op)
        if self.dirty is not None:
            raise InvalidArgument(f"{op}: a normal-mode {self.dirty} used this Buffer's scale-out window since the last "
                                  "low-latency clean; call Buffer.clean_low_latency_buffer(...) on every rank first")

    # ---- native context ------------------------------------------------------------------------

    def ensure_claims(self, num_experts: int) -> None:
        """Zeroed slot claims for two halves of at least num_experts (zero between calls, so a
        larger fresh allocation is as good as the old one)."""
        if self.claims.numel() < 2 * num_experts:
            self.claims = torch.zeros(2 * num_experts, dtype=torch.int32, device=self.target.device)

    def context(self, op: str, *, num_max_tokens: int, hidden: int, num_experts: int, num_topk: int, payload: str,
                carry_weights: bool = False, zero_copy: bool = False):
        shape = dict(num_ranks=self.num_ranks, ranks_per_node=self.ranks_per_node, num_max_tokens=num_max_tokens,
                     hidden=hidden, num_experts=num_experts, num_topk=num_topk, format=_FORMATS[payload],
                     carry_weights=carry_weights, zero_copy=zero_copy, block_warps=self.target.block_warps(),
                     num_nodes=self.num_nodes, window_bytes=self.scaleout.data_bytes)
        sizes = _ll.layout(**shape)
        need = sizes["dispatch_bytes"] if op == "dispatch" else sizes["combine_bytes"]
        if op != "clean" and need > self.window["half_bytes"]:
            total = -(-(self.window["data_base"] + 2 * need) // 4096) * 4096
            raise argument_error(InvalidArgument, "num_rdma_bytes", f"at least {total} bytes for this low-latency {op} "
                                 f"(two halves of {need} bytes after {self.window['data_base']}; "
                                 "Buffer.get_low_latency_rdma_size_hint gives a size for every call of a shape)",
                                 self.scaleout.data_bytes)
        self.ensure_claims(num_experts)
        node = self.scaleout.windows
        return self.kernels.Context(rank=self.rank, **shape, **self.scaleout.handle(), use_nvlink=self.allow_nvlink,
                                    node_windows=node.node_window_ptrs() if self.allow_nvlink else [],
                                    nvl_bytes=node.counter_ptr("nvl"), claims=self.claims.data_ptr(),
                                    claim_capacity=self.claims.numel() // 2, codec_split=_codec_split,
                                    shrink=self.shrink)

    def num_blocks(self, num_experts: int, num_max_tokens: int) -> int:
        """The grid: one block on the host target (its fibers run on one thread anyway); on the GPU
        :func:`gpu_grid_blocks`, below the SM count (target.grid_blocks)."""
        return self.target.grid_blocks(gpu_grid_blocks(num_experts, num_max_tokens, self.target.block_warps()))

    # ---- running -------------------------------------------------------------------------------

    def launch(self, call: _Call, phases: int, guard, what: str):
        """One kernel launch of ``call`` inside a Buffer operation; returns the operation's event."""
        with guard(what) as op:
            getattr(self.kernels, call.kernel)(call.native, phases, call.num_blocks, *call.args,
                                               stream=op.stream_handle, rank=self.rank)
            op.keep(*call.keep)
        return op.event

    def run(self, call: _Call, send_only: bool, guard):
        """Runs the call's send half (and, unless send_only, its receive half in the same kernel).
        Returns ``(hook, event)``: with send_only the hook that runs the receive half, else None."""
        event = self.launch(call, _SEND if send_only else _SEND | _RECV, guard, call.op)
        self.calls += 1
        if not send_only:
            call.finish()
            return None, event
        self.pending = call
        return _RecvHook(self, call, guard), event


class _RecvHook:
    """``hook()``: the receive half of a low-latency call (DeepEP's ``return_recv_hook``). Until it
    runs nothing works on behalf of the call but the transport (on the host target, the NIC
    thread): the data arrives while the caller does other work."""

    def __init__(self, state: LowLatencyState, call: _Call, guard):
        self._state, self._call, self._guard = state, call, guard
        self._done = False

    def __call__(self) -> None:
        state, call = self._state, self._call
        if self._done:
            raise InvalidArgument(f"hook: the receive half of this low-latency {call.op} already ran")
        if state.pending is not call:
            raise BufferUnusable(f"hook: the Buffer of this low-latency {call.op} was destroyed or reset")
        state.launch(call, _RECV, self._guard, call.op + " (receive hook)")
        self._done = True
        state.pending = None
        call.finish()

    def __repr__(self) -> str:
        return f"<low-latency {self._call.op} receive hook, {'done' if self._done else 'pending'}>"


def ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or t.numel() == 0 else t.data_ptr()


# ---- dispatch --------------------------------------------------------------------------------------

def _dispatch_outputs(state: LowLatencyState, payload: str, experts: int, rows: int, hidden: int) -> tuple:
    """(recv_x, recv_scales for the kernel, recv_global_scale, what the caller gets), from the
    Buffer's pool when it has one. Uninitialised: rows past each expert's received count are
    unspecified (as DeepEP)."""
    empty = state.empty
    groups = hidden // 128
    if payload in ("bf16", "logfmt8", "logfmt9", "logfmt10"):
        x = empty((experts, rows, hidden), torch.bfloat16)
        return x, None, None, x
    if payload.startswith("fp8"):
        codes = empty((experts, rows, hidden), torch.float8_e4m3fn)
        if payload == "fp8_ue8m0":
            scales = empty((experts, -(-groups // 4), rows), torch.int32)
        else:
            scales = empty((experts, groups, rows), torch.float32)
        return codes, scales, None, (codes, scales.transpose(1, 2))  # token dimension contiguous, as DeepEP
    if payload == "mxfp8":
        codes = empty((experts, rows, hidden), torch.float8_e4m3fn)
        scales = empty((experts, rows, hidden // 32), torch.uint8)
        return codes, scales, None, (codes, scales)
    packed = empty((experts, rows, hidden // 2), torch.uint8)
    scales = empty((experts, rows, hidden // 16), torch.float8_e4m3fn)
    g = empty((experts, rows), torch.float32)
    return packed, scales, g, (packed, scales, g)


def dispatch(state: LowLatencyState, guard, x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
             cumulative_local_expert_recv_stats=None, dispatch_wait_recv_cost_stats=None, use_fp8=True,
             round_scale=False, use_ue8m0=False, return_recv_hook=False, payload=None, nvfp4_global_scale=None, *,
             topk_weights=None, cached: Optional[LowLatencyHandle] = None, scale_by_weight=False):
    """Buffer.low_latency_dispatch (its docstring has the contract). ``topk_weights``,
    ``cached`` and ``scale_by_weight`` are moelink.autograd's: bf16 rows that carry their weights,
    replayed into the receive slots of ``cached``'s dispatch, the receiver storing w * row."""
    op = "low_latency_dispatch"
    state.check_ready(op)
    ranks = state.num_ranks
    t_max = _validate.integer("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
    _validate.integer("num_experts", num_experts, minimum=1)
    _check_experts(num_experts, ranks)
    _flag("return_recv_hook", return_recv_hook)
    _validate.tensor("x", x)
    _validate.ndim("x", x, 2, "[num_tokens, hidden]")
    num_tokens, hidden = x.shape
    _tensor("x", x, (torch.bfloat16,), (num_tokens, hidden), "[num_tokens, hidden] bf16", rows=True)
    _check_hidden(hidden)
    if num_tokens > t_max:
        raise argument_error(InvalidShape, "x", f"at most num_max_dispatch_tokens_per_rank = {t_max} tokens", num_tokens)
    topk = _topk("topk_idx", topk_idx, num_tokens, num_experts)
    k = topk.shape[1]
    if t_max * max(k, ranks) >= 2**31:
        raise argument_error(InvalidArgument, "num_max_dispatch_tokens_per_rank", f"< 2**31 / {max(k, ranks)}", t_max)
    payload = _payload(payload, use_fp8, round_scale, use_ue8m0)
    experts = num_experts // ranks
    cum = _stats("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats, torch.int32, experts)
    wait = _stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats, torch.int64, ranks)
    if nvfp4_global_scale is not None and payload != "nvfp4":
        raise argument_error(InvalidArgument, "nvfp4_global_scale", "None unless payload='nvfp4'", "a value")
    g = _global_scale(nvfp4_global_scale, x) if payload == "nvfp4" else None
    carry = topk_weights is not None
    if carry:
        topk_weights = _tensor("topk_weights", topk_weights, (torch.float32,), tuple(topk.shape), "like topk_idx")
    state.check_devices(x=x, topk_idx=topk_idx, topk_weights=topk_weights, cumulative_local_expert_recv_stats=cum,
                        dispatch_wait_recv_cost_stats=wait, nvfp4_global_scale=g)
    native = state.context("dispatch", num_max_tokens=t_max, hidden=hidden, num_experts=num_experts, num_topk=k,
                           payload=payload, carry_weights=carry)
    rows = ranks * t_max
    recv_x, recv_scales, recv_g, result = _dispatch_outputs(state, payload, experts, rows, hidden)
    device = state.target.device
    recv_count = torch.empty(experts, dtype=torch.int32, device=device)
    src_info = torch.empty((experts, rows), dtype=torch.int32, device=device)
    layout_range = torch.empty((experts, ranks), dtype=torch.int64, device=device)
    send_slots = torch.empty((num_tokens, k), dtype=torch.int32, device=device)
    send_counts = torch.empty(ranks, dtype=torch.int32, device=device)
    cached_slots = None
    if cached is not None:  # its slots index the receive regions: only a handle of this shape
        cached = _check_handle(state, cached)
        if tuple(cached.send_slots.shape) != (num_tokens, k) or tuple(cached)[2:] != (t_max, hidden, num_experts):
            raise argument_error(InvalidArgument, "cached", f"a handle of a dispatch of {num_tokens} tokens x top-{k}, "
                                 f"T={t_max}, hidden {hidden}, {num_experts} experts", repr(cached))
        cached_slots = cached.send_slots
    args = (num_tokens, ptr(x), ptr(topk), ptr(topk_weights), ptr(g), ptr(cached_slots), bool(scale_by_weight),
            ptr(send_slots), ptr(send_counts), ptr(recv_x), ptr(recv_scales), ptr(recv_g), ptr(recv_count),
            ptr(src_info), ptr(layout_range), ptr(cum), ptr(wait))
    keep = (x, topk, topk_weights, g, cached_slots, send_slots, send_counts, recv_x, recv_scales, recv_g, recv_count,
            src_info, layout_range, cum, wait, state.claims)
    handle = LowLatencyHandle(src_info, layout_range, t_max, hidden, num_experts, send_slots=send_slots,
                              send_counts=send_counts, num_tokens=num_tokens, num_topk=k, payload=payload,
                              owner=state.token, rank=state.rank, num_ranks=ranks, recv_count=recv_count)
    call = _Call("dispatch", "dispatch", native, args, keep, num_blocks=state.num_blocks(num_experts, t_max))
    hook, event = state.run(call, return_recv_hook, guard)
    return result, recv_count, handle, hook, event


# ---- combine ---------------------------------------------------------------------------------------

def _check_handle(state: LowLatencyState, handle) -> LowLatencyHandle:
    if not isinstance(handle, LowLatencyHandle):
        raise argument_error(InvalidType, "handle", "the handle Buffer.low_latency_dispatch returned (unchanged)",
                             type(handle).__name__)
    if getattr(handle, "owner", None) is not state.token:
        raise argument_error(InvalidArgument, "handle", "a handle of this Buffer's low-latency dispatch",
                             "a handle of another Buffer")
    return handle


def combine_buffer_view(state: LowLatencyState, handle, half: Optional[int] = None) -> torch.Tensor:
    """The comb_send region of the next call's half as [EL, R*T, H] bf16 (zero-copy combine)."""
    handle = _check_handle(state, handle)
    t_max, hidden, num_experts = handle[2], handle[3], handle[4]
    sizes = layout(num_ranks=state.num_ranks, ranks_per_node=state.ranks_per_node, num_max_tokens=t_max, hidden=hidden,
                   num_experts=num_experts, num_topk=handle.num_topk, payload="bf16")
    if sizes["combine_bytes"] > state.window["half_bytes"]:
        state.context("combine", num_max_tokens=t_max, hidden=hidden, num_experts=num_experts,
                      num_topk=handle.num_topk, payload="bf16")  # raises, naming the size needed
    half = state.calls % 2 if half is None else half
    experts, rows = num_experts // state.num_ranks, state.num_ranks * t_max
    offset = state.window["data_base"] + half * state.window["half_bytes"] + sizes["comb_send"]
    view = state.scaleout.windows.view(state.rank, offset, experts * rows * hidden * 2, torch.bfloat16)
    return view.view(experts, rows, hidden)


def combine(state: LowLatencyState, guard, x, topk_idx, topk_weights, handle, use_logfmt=False, zero_copy=False,
            return_recv_hook=False, out=None, combine_wait_recv_cost_stats=None, logfmt_bits=10, *, slot_values=None):
    """Buffer.low_latency_combine (its docstring has the contract). ``slot_values`` (autograd):
    [N, K, H] bf16 receiving each returned row."""
    op = "low_latency_combine"
    state.check_ready(op)
    handle = _check_handle(state, handle)
    ranks, t_max, hidden, num_experts = state.num_ranks, handle[2], handle[3], handle[4]
    experts, num_tokens, k = num_experts // ranks, handle.num_tokens, handle.num_topk
    for name, value in (("use_logfmt", use_logfmt), ("zero_copy", zero_copy), ("return_recv_hook", return_recv_hook)):
        _flag(name, value)
    if use_logfmt and (isinstance(logfmt_bits, bool) or logfmt_bits not in (8, 9, 10)):
        raise argument_error(InvalidArgument, "logfmt_bits", "8, 9 or 10", logfmt_bits)
    _tensor("x", x, (torch.bfloat16,), (experts, ranks * t_max, hidden),
            "[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden] bf16", rows=True)
    topk = _topk("topk_idx", topk_idx, num_tokens, num_experts)
    if topk.shape[1] != k:
        raise argument_error(InvalidShape, "topk_idx", f"{k} columns (the dispatch's top-k)", tuple(topk.shape))
    if not topk.is_cuda:  # a slot the dispatch did not send; on a GPU the combine kernel checks it (no host sync)
        unsent = (topk >= 0) & (handle.send_slots < 0) & (handle.send_slots != MASKED_SLOT)  # masked: combined as 0
        if bool(unsent.any()):
            t, slot = unsent.nonzero()[0].tolist()
            raise argument_error(InvalidArgument, "topk_idx", "the dispatch's ids, or -1 (a slot the dispatch did not "
                                 "send cannot be combined)", f"token {t} slot {slot} = {int(topk[t, slot])}, -1 in the "
                                 "dispatch")
    weights = _tensor("topk_weights", topk_weights, (torch.float32,), tuple(topk.shape), "[num_tokens, num_topk]")
    wait = _stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats, torch.int64, ranks)
    if out is None:
        out = state.empty((num_tokens, hidden), torch.bfloat16)
    else:
        _tensor("out", out, (torch.bfloat16,), (num_tokens, hidden), "[num_tokens, hidden] bf16", rows=True)
    state.check_devices(x=x, topk_idx=topk_idx, topk_weights=weights, out=out, combine_wait_recv_cost_stats=wait)
    payload = f"logfmt{logfmt_bits}" if use_logfmt else "bf16"
    native = state.context("combine", num_max_tokens=t_max, hidden=hidden, num_experts=num_experts, num_topk=k,
                           payload=payload, zero_copy=zero_copy)
    args = (0 if zero_copy else ptr(x), ptr(handle[0]), ptr(handle[1]), num_tokens, ptr(topk), ptr(weights),
            ptr(handle.send_slots), ptr(handle.send_counts), ptr(out), ptr(slot_values), ptr(wait))
    keep = (x, handle[0], handle[1], handle.send_slots, handle.send_counts, topk, weights, out, slot_values, wait,
            state.claims)
    call = _Call("combine", "combine", native, args, keep, num_blocks=state.num_blocks(num_experts, t_max))
    hook, event = state.run(call, return_recv_hook, guard)
    return out, hook, event


def clean(state: LowLatencyState, guard, num_max_dispatch_tokens_per_rank, hidden, num_experts) -> None:
    """Buffer.clean_low_latency_buffer: a barrier of every rank over the scale-out window."""
    op = "clean_low_latency_buffer"
    state.check_idle(op)
    _validate.integer("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
    _validate.integer("hidden", hidden, minimum=1)
    _validate.integer("num_experts", num_experts, minimum=1)
    _check_hidden(hidden)
    _check_experts(num_experts, state.num_ranks)
    native = state.context("clean", num_max_tokens=1, hidden=128, num_experts=state.num_ranks, num_topk=1,
                           payload="bf16")
    with guard(op) as scope:
        state.kernels.clean(native, stream=scope.stream_handle, rank=state.rank)
        scope.keep(state.claims)  # the context holds them (the clean kernel leaves them alone)
    state.dirty = None

