"""Performance configuration of the normal kernels, and the NVL buffer sizes they need.

:class:`Config` has DeepEP V1's fields, positional order and defaults, validated on construction.
Its C++ mirror is ``csrc/runtime/config.h``; both compute buffer sizes from the window layout the
intranode kernels use (``IntranodeLayout`` in ``csrc/runtime/ops_intranode.h``, drawn in
``docs/buffer-layout.md``), mirrored here by :func:`intranode_window_bytes`.

``get_dispatch_config`` / ``get_combine_config`` give a working config for any rank count: the
chunk sizes come from a formula that meets DeepEP's tuned H800 values at 2 and 8 ranks, instead of
a table that rejects other sizes. They are starting points, not tuned results for this machine.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from .errors import InvalidArgument, InvalidType, argument_error

__all__ = [
    "Config",
    "intranode_window_bytes",
    "direct_recv_bytes",
    "combine_input_bytes",
    "get_dispatch_config",
    "get_combine_config",
    "DEFAULT_NUM_SMS",
    "INTRANODE_MAX_CHANNELS",
    "NVL_HINT_MAX_TOPK",
    "NVL_HINT_MAX_EXPERTS_PER_RANK",
]

DEFAULT_NUM_SMS = 20
INTRANODE_MAX_CHANNELS = 64  # kIntranodeMaxChannels: the queue counters are sized for it
INTRANODE_COUNTER_STRIDE = 64  # kIntranodeCounterStride: one queue counter per cache line
MAX_VIRTUAL_CHANNELS = 256  # kMaxVirtualChannels: channels * sub-channels the counters are sized for
MAX_SUB_CHANNELS = 8  # kMaxSubChannels
MAX_BLOCK_WARPS = 32  # kMaxBlockWarps: doorbells per channel
CONTROL_BYTES = 192  # IntranodeLayout::kControlBytes: epoch, blocks_done, notify_rows
AGREEMENT_WORDS = 16  # kAgreementWords: parameter words each rank sends beside its node barrier store
NVL_HINT_MAX_TOPK = 32  # the size hint covers calls with up to this many top-k slots
NVL_HINT_MAX_EXPERTS_PER_RANK = 1024  # ... and up to this many local experts per rank
_INT32_MAX = 2**31 - 1


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def _check_int(name: str, value: object, minimum: int, expected: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise argument_error(InvalidType, name, "an int", type(value).__name__)
    if value < minimum or value > _INT32_MAX:
        raise argument_error(InvalidArgument, name, expected or f"an int in [{minimum}, {_INT32_MAX}]", value)
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Tuning of one normal dispatch or combine.

    num_sms: SMs (host target: blocks) the kernel may use; even, >= 2. The intranode kernels run
        ``num_sms // 2`` channels, each a sender and a receiver block.
    num_max_nvl_chunked_send_tokens: tokens a sender publishes per queue-tail update; >= 1 and at
        most ``num_max_nvl_chunked_recv_tokens`` (a chunk must fit an empty queue).
    num_max_nvl_chunked_recv_tokens: slots of each (channel, peer) ring queue; >= 1.
    num_max_rdma_chunked_send_tokens / num_max_rdma_chunked_recv_tokens: the same for the
        scale-out queues of the internode path.
    """

    num_sms: int = DEFAULT_NUM_SMS
    num_max_nvl_chunked_send_tokens: int = 6
    num_max_nvl_chunked_recv_tokens: int = 256
    num_max_rdma_chunked_send_tokens: int = 6
    num_max_rdma_chunked_recv_tokens: int = 256

    def __post_init__(self) -> None:
        _check_int("Config.num_sms", self.num_sms, 2, "an even int >= 2")
        if self.num_sms % 2:
            raise argument_error(InvalidArgument, "Config.num_sms", "an even int >= 2", self.num_sms)
        for link in ("nvl", "rdma"):
            send_name = f"num_max_{link}_chunked_send_tokens"
            recv_name = f"num_max_{link}_chunked_recv_tokens"
            recv = _check_int(f"Config.{recv_name}", getattr(self, recv_name), 1)
            send = _check_int(f"Config.{send_name}", getattr(self, send_name), 1)
            if send > recv:
                raise argument_error(InvalidArgument, f"Config.{send_name}", f"an int <= {recv_name} = {recv}", send)

    @property
    def num_channels(self) -> int:
        return self.num_sms // 2

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, *, ranks_per_node: Optional[int] = None,
                                 num_topk: int = NVL_HINT_MAX_TOPK, num_max_zero_copy_recv_tokens: int = 0) -> int:
        """Bytes of NVL buffer (window) any intranode dispatch or combine with this config fits in.

        ``hidden_bytes``: bytes of a token row by DeepEP's convention, ``hidden * max(element_size,
        2)``. The hint is :func:`intranode_window_bytes` for a node of ``ranks_per_node`` ranks
        (default: all ``num_ranks``), ``num_sms // 2`` channels, queues of
        ``num_max_nvl_chunked_recv_tokens`` slots, rows of ``hidden_bytes``, ``ceil(hidden_bytes /
        128)`` FP8 scales, ``num_topk`` top-k slots and ``NVL_HINT_MAX_EXPERTS_PER_RANK`` local
        experts, for the sub-channel split that needs the most. The layout grows with every one of
        them, so every call with smaller rows (bf16 rows are ``hidden_bytes``, FP8 rows half that
        plus scales, combine rows ``hidden_bytes``), fewer top-k slots or experts fits.

        ``num_max_zero_copy_recv_tokens`` (M > 0): also room for the one-copy paths
        (``zero_copy=True``) when no rank receives more than M rows (or asks for more with
        ``num_worst_tokens``): the queue layout or the combine input region (:func:`combine_input_bytes`),
        whichever ends later, then a receive region (:func:`direct_recv_bytes`) at the end, so a
        one-copy dispatch's outputs survive a combine of either kind.
        """
        _check_int("hidden_bytes", hidden_bytes, 1)
        _check_int("num_ranks", num_ranks, 1)
        ranks = num_ranks if ranks_per_node is None else _check_int("ranks_per_node", ranks_per_node, 1)
        _check_int("num_topk", num_topk, 0)
        rows = _check_int("num_max_zero_copy_recv_tokens", num_max_zero_copy_recv_tokens, 0)
        row_bytes, num_scales = _align(hidden_bytes, 16), (hidden_bytes + 127) // 128
        queues = max(intranode_window_bytes(
            num_ranks=ranks, num_channels=self.num_channels, queue_tokens=self.num_max_nvl_chunked_recv_tokens,
            row_bytes=row_bytes, num_scales=num_scales, num_topk=num_topk,
            experts_per_rank=NVL_HINT_MAX_EXPERTS_PER_RANK, sub_channels=s)
            for s in range(1, min(MAX_SUB_CHANNELS, self.num_max_nvl_chunked_recv_tokens) + 1))
        if rows == 0:
            total = queues
        else:
            start = max(queues, combine_input_bytes(num_ranks=ranks, rows=rows, hidden=row_bytes // 2,
                                                    num_topk=num_topk))
            total = _align(start, 128) + direct_recv_bytes(rows=rows, row_bytes=row_bytes, num_scales=num_scales,
                                                           num_topk=num_topk)
        if ranks >= num_ranks:
            return total
        return max(total, self._internode_sizes(hidden_bytes, num_ranks, ranks, num_topk)["nvl_bytes"])

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int, *,
                                  ranks_per_node: Optional[int] = None, num_topk: int = NVL_HINT_MAX_TOPK) -> int:
        """Bytes of RDMA buffer (scale-out window) any internode dispatch or combine with this config
        fits in, for ``num_ranks`` ranks in nodes of ``ranks_per_node`` (default: one node, which
        needs none: 0). ``InternodeLayout`` (csrc/runtime/ops_internode.h, docs/internode.md)
        evaluated, like the NVL hint, for rows of ``hidden_bytes``, ``ceil(hidden_bytes / 128)`` FP8
        scales, ``num_topk`` top-k slots and ``NVL_HINT_MAX_EXPERTS_PER_RANK`` local experts."""
        _check_int("hidden_bytes", hidden_bytes, 1)
        _check_int("num_ranks", num_ranks, 1)
        ranks = num_ranks if ranks_per_node is None else _check_int("ranks_per_node", ranks_per_node, 1)
        _check_int("num_topk", num_topk, 0)
        if ranks >= num_ranks:
            return 0
        return self._internode_sizes(hidden_bytes, num_ranks, ranks, num_topk)["rdma_bytes"]

    def _internode_sizes(self, hidden_bytes: int, num_ranks: int, ranks_per_node: int, num_topk: int) -> dict:
        if num_ranks % ranks_per_node:
            raise argument_error(InvalidArgument, "ranks_per_node", f"a divisor of num_ranks = {num_ranks}",
                                 ranks_per_node)
        from . import _host  # the layout is the extension's own (InternodeLayout): no mirror to drift
        return dict(_host.internode.layout(
            num_nodes=num_ranks // ranks_per_node, ranks_per_node=ranks_per_node, num_channels=self.num_channels,
            block_warps=MAX_BLOCK_WARPS, nvl_queue_tokens=self.num_max_nvl_chunked_recv_tokens,
            rdma_queue_tokens=self.num_max_rdma_chunked_recv_tokens, row_bytes=_align(hidden_bytes, 16),
            num_scales=(hidden_bytes + 127) // 128, num_topk=num_topk, experts_per_rank=NVL_HINT_MAX_EXPERTS_PER_RANK))


def _per_call_offset(r: int) -> int:
    """``IntranodeLayout::channel_count``: where the per-call area starts (after the fixed counters)."""
    barrier = CONTROL_BYTES
    notify_epoch = _align(barrier + 8 * r, 128)
    exit_barrier = _align(notify_epoch + 8 * r, 128)
    tail = _align(exit_barrier + 8 * r, 128)
    head = _align(tail + INTRANODE_COUNTER_STRIDE * MAX_VIRTUAL_CHANNELS * r, 128)
    data_bell = _align(head + INTRANODE_COUNTER_STRIDE * MAX_VIRTUAL_CHANNELS * r, 128)
    bells = INTRANODE_COUNTER_STRIDE * INTRANODE_MAX_CHANNELS * MAX_BLOCK_WARPS
    agreement = _align(data_bell + 2 * bells, 128)
    return _align(agreement + 8 * 2 * r * AGREEMENT_WORDS, 128)


def intranode_window_bytes(*, num_ranks: int, num_channels: int, queue_tokens: int, row_bytes: int, num_scales: int,
                           num_topk: int, experts_per_rank: int, sub_channels: int = 1) -> int:
    """Window bytes one queue-based intranode call needs: ``IntranodeLayout::of(shape).total_bytes``
    of csrc/runtime/ops_intranode.h, term by term (docs/buffer-layout.md)::

        fixed    = 192 + a(8R) + a(8R) + a(8R) + a(64 * 256 * R) + a(64 * 256 * R) + 2 * 64 * 64 * 32
                   + a(8 * 2 * R * 16)
                   control, barrier, notify_epoch, exit_barrier, tail, head, data and room doorbells,
                   agreement words
        counts   = a(4 * R * V) + a(4 * R * E) + a(4 * R * (R + 1))  channel_count, expert_count, rank_count
        queue    = a(a16(a16(a16(a16(Q*B) + 4*Q*P) + 4*Q*K) + 4*Q*K) + 4*Q)
        total    = fixed + counts + V * R * queue

    with a = align to 128, a16 = align to 16, R ranks, V = C * S virtual channels (C channels,
    S sub-channels), Q = queue_tokens // S slots per queue, B row bytes, P scales, K top-k
    slots, E experts per rank.
    """
    r, v, q = num_ranks, num_channels * sub_channels, queue_tokens // sub_channels
    channel_count = _per_call_offset(r)
    expert_count = _align(channel_count + 4 * r * v, 128)
    rank_count = _align(expert_count + 4 * r * experts_per_rank, 128)
    slots = _align(rank_count + 4 * r * (r + 1), 128)
    scales = _align(q * row_bytes, 16)
    topk = _align(scales + q * 4 * num_scales, 16)
    weights = _align(topk + q * 4 * num_topk, 16)
    src = _align(weights + q * 4 * num_topk, 16)
    queue_bytes = _align(src + q * 4, 128)
    return slots + queue_bytes * v * r


def direct_recv_bytes(*, rows: int, row_bytes: int, num_scales: int, num_topk: int) -> int:
    """Bytes of a one-copy dispatch's receive region of ``rows`` rows (``DirectRecvLayout``)::

        a(a16(a16(a16(M*B) + 4*M*P) + 8*M*K) + 4*M*K) + 4*M)    rows, scales, i64 top-k, weights, src
    """
    scales = _align(rows * row_bytes, 16)
    topk = _align(scales + rows * 4 * num_scales, 16)
    weights = _align(topk + rows * 8 * num_topk, 16)
    src = _align(weights + rows * 4 * num_topk, 16)
    return _align(src + rows * 4, 128)


def combine_input_bytes(*, num_ranks: int, rows: int, hidden: int, num_topk: int) -> int:
    """End offset of a one-copy combine's input region (``CombineInputLayout``): it starts where the
    per-call area does and holds ``rows`` bf16 rows of ``hidden`` and their ``num_topk`` weights::

        per_call_start + a(a16(M * 2 * hidden) + 4 * M * K)
    """
    return _per_call_offset(num_ranks) + _align(_align(rows * 2 * hidden, 16) + rows * 4 * num_topk, 128)


def _default_config(num_ranks: int, num_sms: int, nvl_send_budget: int, rdma_send: int) -> Config:
    _check_int("num_ranks", num_ranks, 1)
    # A sender's chunk shrinks as peers multiply: every peer's queue is filled by its own warps.
    nvl_send = max(4, min(32, nvl_send_budget // num_ranks))
    return Config(num_sms, nvl_send, 256, rdma_send, 128)


def get_dispatch_config(num_ranks: int, num_sms: int = DEFAULT_NUM_SMS) -> Config:
    """A working dispatch config for any ``num_ranks``: NVL send chunk 48 // ranks in [4, 32]
    (DeepEP: 24 at 2 ranks, 6 at 8), 256-slot queues; RDMA chunks 16 of 128."""
    return _default_config(num_ranks, num_sms, 48, 16)


def get_combine_config(num_ranks: int, num_sms: int = DEFAULT_NUM_SMS) -> Config:
    """A working combine config for any ``num_ranks``: NVL send chunk 20 // ranks in [4, 32]
    (DeepEP: 10 at 2 ranks, 4 at 8), 256-slot queues; RDMA chunks 8 of 128."""
    return _default_config(num_ranks, num_sms, 20, 8)
