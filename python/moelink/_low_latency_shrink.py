"""Low-latency shrink mode (``Buffer(enable_shrink=True)``, DeepEP's mask buffer): the host side
of the mask of ranks in this rank's own words (csrc/runtime/ops_low_latency.h "Shrink mode";
docs/low-latency.md). The kernels skip masked ranks and mask a peer whose wait expired; this
module masks, unmasks (catching the seen words up) and reports."""

from __future__ import annotations

import torch

from . import _host, _validate
from ._low_latency import LowLatencyState
from ._low_latency_args import _flag, _tensor
from .errors import InvalidArgument, argument_error

__all__ = ["update_mask", "query_mask", "clean_mask"]

_ll = _host.low_latency

def _own_words(state: LowLatencyState, offset: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """``count`` own words of this rank's window at ``offset`` bytes after the fixed ones."""
    base = state.window["own_offset"] + _ll.OWN_FIXED_BYTES + offset
    return state.scaleout.windows.view(state.rank, base, count * torch.empty(0, dtype=dtype).element_size(), dtype)


def _mask_words(state: LowLatencyState) -> torch.Tensor:
    return _own_words(state, 56 * state.num_ranks, state.num_ranks, torch.int32)


def _check_shrink(state: LowLatencyState, op: str) -> None:
    if not state.shrink:
        raise argument_error(InvalidArgument, "enable_shrink", f"True at Buffer(...) for {op} (the mask buffer exists "
                             "in shrink mode only)", False)
    state.check_idle(op)


def _rejoin(state: LowLatencyState, peer: int) -> None:
    """``peer`` is unmasked: whatever it sent while masked is consumed (its seen words catch up
    with its signals), so the next call waits for exactly that call's messages. Exact when the peer
    sent nothing meanwhile or all of it landed (ranks unmask at one point between calls)."""
    ranks = state.num_ranks
    seen = _own_words(state, 0, 6 * ranks, torch.int64)
    signals = state.scaleout.windows.view(state.rank, 0, 8 * state.window["num_signals"], torch.int64)
    base = state.window["signal_base"]
    for i in range(6):  # count[2], tokens[2], comb[2]: seen index i * R + s is signal base + i * R + s
        seen[i * ranks + peer] = signals[base + i * ranks + peer]


def update_mask(state: LowLatencyState, rank_to_mask, mask) -> None:
    """Buffer.low_latency_update_mask_buffer."""
    op = "low_latency_update_mask_buffer"
    _check_shrink(state, op)
    _validate.integer("rank_to_mask", rank_to_mask, minimum=0, maximum=state.num_ranks - 1)
    _flag("mask", mask)
    with state.target.comm_scope():  # ordered with the kernels (an async_finish call may still run)
        words = _mask_words(state)
        if not mask and int(words[rank_to_mask]) != 0:
            _rejoin(state, rank_to_mask)
        words[rank_to_mask] = 1 if mask else 0


def query_mask(state: LowLatencyState, mask_status) -> None:
    """Buffer.low_latency_query_mask_buffer: mask_status[r] = 1 if rank r is masked, else 0."""
    op = "low_latency_query_mask_buffer"
    _check_shrink(state, op)
    _tensor("mask_status", mask_status, (torch.int32,), (state.num_ranks,), "[num_ranks] int32")
    state.check_devices(mask_status=mask_status)
    with state.target.comm_scope():
        mask_status.copy_((_mask_words(state) != 0).to(torch.int32))


def clean_mask(state: LowLatencyState) -> None:
    """Buffer.low_latency_clean_mask_buffer: every rank unmasked."""
    _check_shrink(state, "low_latency_clean_mask_buffer")
    with state.target.comm_scope():
        words = _mask_words(state)
        for peer in (words != 0).nonzero().flatten().tolist():
            _rejoin(state, peer)
        words.zero_()
