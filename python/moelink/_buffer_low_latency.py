"""``moelink.Buffer``'s low-latency methods (DeepEP V1's names, arguments and return tuples), kept
apart from buffer.py so that each file stays small. The mechanics are in ``_low_latency``; the
protocol and the buffer layout in docs/low-latency.md, the differences from DeepEP in
docs/semantics.md."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _interop, _low_latency, _low_latency_shrink
from ._interop import accepts_arrays
from .errors import BufferUnusable, InvalidArgument

__all__ = ["LowLatencyMethods"]


def _remembers_array_library(method):
    """DLPack for get_next_low_latency_combine_buffer, which takes only a handle: a dispatch
    called with another library's arrays records that library on its handle."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        result = method(self, *args, **kwargs)
        foreign = next((v for v in (*args, *kwargs.values()) if _interop.is_foreign_array(v)), None)
        if foreign is not None:
            result[2].array_library = _interop.library_of(foreign)
        return result

    return wrapper


class LowLatencyMethods:
    """Mixed into :class:`moelink.Buffer` (which provides ``_ll``, ``_unusable``, ``_operation``)."""

    def _low_latency_state(self, op: str) -> "_low_latency.LowLatencyState":
        if self._unusable is not None:
            raise BufferUnusable(f"{op}: this Buffer cannot be used: {self._unusable}")
        if self._ll is None:
            raise InvalidArgument(f"{op}: this Buffer was created with low_latency_mode=False; the low-latency calls "
                                  "need Buffer(..., num_rdma_bytes=..., low_latency_mode=True)")
        return self._ll

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """``num_rdma_bytes`` that holds every low-latency call of this shape (any payload format,
        any top-k up to 32, any node split of ``num_ranks``). By formula (docs/low-latency.md)."""
        return _low_latency.rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @_remembers_array_library
    @accepts_arrays(bits={"x": torch.bfloat16})
    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False, *, payload: Optional[str] = None,
                             nvfp4_global_scale=None):
        """Sends each token of ``x`` (bf16 ``[num_tokens, hidden]``, ``num_tokens <=
        num_max_dispatch_tokens_per_rank``) to the experts of ``topk_idx`` (``[num_tokens, k]``,
        -1 = none). Returns ``(recv_x, recv_count, handle, event, hook)``:

        - ``recv_x`` ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]``:
          bf16 (``use_fp8=False``), or ``(e4m3 codes, scales)`` with float32 scales
          ``[..., hidden / 128]`` (token dimension contiguous; powers of two with ``round_scale``) or
          int32 UE8M0-packed ``[..., hidden / 512]`` (``use_ue8m0``). Rows ``[0, recv_count[e])`` of
          expert ``e`` are valid, grouped by source rank; the rest are unspecified.
        - moelink extensions, ``payload=``: ``"mxfp8"`` (codes, uint8 UE8M0 per 32 channels),
          ``"nvfp4"`` (packed uint8 ``[..., hidden/2]``, e4m3 scales per 16, float32 tensor scale
          per row; ``nvfp4_global_scale`` overrides the rank's scale), ``"logfmt8|9|10"`` (bf16
          after decoding), ``"bf16"``, ``"fp8"``.
        - ``hook``: None, or with ``return_recv_hook`` the callable that runs the receive half;
          ``recv_x`` and ``recv_count`` hold data only after it ran.
        ``cumulative_local_expert_recv_stats`` (int32 ``[num_local_experts]``) accumulates
        ``recv_count``; ``dispatch_wait_recv_cost_stats`` (int64 ``[num_ranks]``) the ns spent
        waiting for each source."""
        state = self._low_latency_state("low_latency_dispatch")
        _low_latency._flag("async_finish", async_finish)
        recv_x, recv_count, handle, hook, event = _low_latency.dispatch(
            state, self._guard(async_finish), x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
            cumulative_local_expert_recv_stats, dispatch_wait_recv_cost_stats, use_fp8, round_scale, use_ue8m0,
            return_recv_hook, payload, nvfp4_global_scale)
        return recv_x, recv_count, handle, event, hook

    @accepts_arrays(bits={"x": torch.bfloat16, "out": torch.bfloat16})
    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None, *, logfmt_bits: int = 10):
        """Returns each expert row to its token's rank and sums it there:
        ``combined[t] = sum_k topk_weights[t, k] * row(t, k)`` (float32, k in order, -1 slots
        skipped, one rounding to bf16). ``x``: bf16 ``[num_local_experts, num_ranks *
        num_max_dispatch_tokens_per_rank, hidden]`` in the dispatch's receive rows; with
        ``zero_copy`` the rows were written into :meth:`get_next_low_latency_combine_buffer`
        instead (``x`` is then only checked for its shape). ``use_logfmt``: the rows travel as
        LogFMT-``logfmt_bits`` (10 as DeepEP; 8 and 9 too). ``topk_idx`` / ``topk_weights``: the
        dispatch's ids (a slot may be set to -1 to skip it). Returns ``(combined_x, event, hook)``."""
        state = self._low_latency_state("low_latency_combine")
        _low_latency._flag("async_finish", async_finish)
        combined, hook, event = _low_latency.combine(state, self._guard(async_finish), x, topk_idx, topk_weights, handle, use_logfmt,
                                              zero_copy, return_recv_hook, out, combine_wait_recv_cost_stats,
                                              logfmt_bits)
        return combined, event, hook

    def _guard(self, async_finish: bool):
        """The operation scope of a low-latency launch (its hook's too). ``async_finish``: on the GPU
        target the current stream does not wait for the kernels; the returned event does."""
        return functools.partial(self._operation, async_finish=async_finish)

    def get_next_low_latency_combine_buffer(self, handle) -> torch.Tensor:
        """The bf16 ``[num_local_experts, num_ranks * num_max_dispatch_tokens_per_rank, hidden]``
        region of the scale-out window the next low-latency call (the combine of ``handle``) sends
        from: write the expert outputs there and combine with ``zero_copy=True``. Valid until the
        next low-latency call starts. A NumPy (DLPack) dispatch's handle gives that library's array
        (bf16 as raw uint16 bits), zero-copy."""
        state = self._low_latency_state("get_next_low_latency_combine_buffer")
        view = _low_latency.combine_buffer_view(state, handle)
        library = getattr(handle, "array_library", None)
        return view if library is None else _interop.from_torch(view, library)

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """A barrier of every rank over the scale-out window: call it on every rank after
        normal-mode (internode) calls used the window, before the next low-latency call. The
        low-latency state itself never needs cleaning (signals are running totals; every call
        cleans the other half's slot claims for its successor)."""
        state = self._low_latency_state("clean_low_latency_buffer")
        _low_latency.clean(state, self._operation, num_max_dispatch_tokens_per_rank, hidden, num_experts)

    # ---- shrink mode (Buffer(enable_shrink=True); docs/low-latency.md "Shrink mode") --------------

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Masks (``mask=True``) or unmasks rank ``rank_to_mask`` for this rank's low-latency calls:
        a masked rank gets nothing and nothing is awaited from it (its experts receive nothing and
        return nothing); a rank masked in its own mask talks to no one. Unmask on every rank at one
        point between calls."""
        _low_latency_shrink.update_mask(self._low_latency_state("low_latency_update_mask_buffer"), rank_to_mask, mask)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Fills ``mask_status`` (int32 ``[num_ranks]``): 1 where the rank is masked (by hand, or
        because a low-latency wait for it reached its deadline), else 0."""
        _low_latency_shrink.query_mask(self._low_latency_state("low_latency_query_mask_buffer"), mask_status)

    def low_latency_clean_mask_buffer(self) -> None:
        """Unmasks every rank (call it on every rank at one point between calls)."""
        _low_latency_shrink.clean_mask(self._low_latency_state("low_latency_clean_mask_buffer"))
