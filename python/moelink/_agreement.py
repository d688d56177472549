"""Ranks agree or fail together (docs/semantics.md, "Trust").

Every operation's first synchronisation carries ``WORDS`` 64-bit parameter words from each rank to
every peer: intranode the node barrier (runtime/ops_intranode.h, IntranodeContext::agreement; the
window's ``agreement`` region, docs/buffer-layout.md), internode the global barrier, whose NVL
store carries them to the ranks of the node and whose scale-out put (the one that carries the
barrier signal) to the ranks of other nodes (runtime/ops_internode.h, "Agreement"). Each rank
compares every peer's words
with its own right after the barrier, before any count or row moves, and a difference fails the
kernel with ``DeviceAssert("moelink agreement: rank a and rank b disagree on word w ...")`` on
every rank (each compares with all). :func:`translate` turns that into :class:`RankMismatch`
naming the ranks, the field and both values. No extra round trip: the words ride on the barrier.

The words are the call's parameters as this module lists them in ``FIELDS``; values are small
ints or codes (dtypes by table), so they print as what the caller passed.
"""

from __future__ import annotations

import contextlib
import re
import zlib
from typing import Iterator, List, Optional

import torch

from .errors import DeviceAssert, RankMismatch

__all__ = ["FIELDS", "words", "translate", "guard", "OPS"]

FIELDS = (
    "operation",                                   # OPS below
    "hidden",                                      # x.shape[1]
    "x dtype",
    "num_scales (FP8 scales per token)",
    "scales dtype",
    "num_topk",
    "num_experts",
    "config.num_sms",
    "config.num_max_nvl_chunked_recv_tokens",
    "block warps and sub-channels",                # block_warps * 256 + sub_channels
    "row bytes",                                   # hidden * x.element_size()
    "handle (the dispatch it came from)",          # the handle's serial, 0 without one
    "zero_copy",
    "config.num_max_rdma_chunked_recv_tokens",     # internode only (0 on one node)
)
# Not compared, since they never reach another rank: expert_alignment (local counts), the send
# chunk (how often a sender publishes), num_worst_tokens (exchanged by design: M is the largest),
# topk_weights and bias (local inputs; combine's num_topk is compared).
OPS = {"dispatch": 1, "cached dispatch": 2, "combine": 3}
_OP_NAMES = {v: k for k, v in OPS.items()}
_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.uint8, torch.int8, torch.int32, torch.int64]
_DTYPES += [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d]


def _dtype_code(dtype: Optional[torch.dtype]) -> int:
    if dtype is None:
        return 0
    if dtype in _DTYPES:
        return 1 + _DTYPES.index(dtype)
    return 1000 + zlib.crc32(str(dtype).encode())  # any other dtype still compares


def _dtype_name(code: int) -> str:
    return "none" if code == 0 else str(_DTYPES[code - 1]) if code <= len(_DTYPES) else f"dtype code {code}"


def words(op: str, *, hidden: int, x_dtype: Optional[torch.dtype], num_scales: int = 0,
          scales_dtype: Optional[torch.dtype] = None, num_topk: int = 0, num_experts: int = 0, config=None,
          block_warps: int = 0, sub_channels: int = 0, row_bytes: int = 0, handle_serial: int = 0,
          zero_copy: bool = False, internode: bool = False) -> List[int]:
    """The agreement words of one call, in ``FIELDS`` order (every value in [0, 2^64)).
    ``internode``: the call spans nodes, so the scale-out queue size is compared too."""
    values = [OPS[op], hidden, _dtype_code(x_dtype), num_scales, _dtype_code(scales_dtype), num_topk, num_experts,
              config.num_sms, config.num_max_nvl_chunked_recv_tokens, block_warps * 256 + sub_channels, row_bytes,
              handle_serial, int(zero_copy), config.num_max_rdma_chunked_recv_tokens if internode else 0]
    assert len(values) == len(FIELDS)
    return [int(v) & (2**64 - 1) for v in values]


def _show(word: int, value: int) -> str:
    name = FIELDS[word]
    if name == "operation":
        return _OP_NAMES.get(value, f"operation code {value}")
    if name.endswith("dtype"):
        return _dtype_name(value)
    if name.startswith("block warps"):
        return f"{value // 256} warps, {value % 256} sub-channels"
    if name.startswith("handle"):
        return "no handle" if value == 0 else f"the dispatch of operation {value}"
    return str(value)


_PATTERN = re.compile(r"moelink agreement: rank (\d+) and rank (\d+) disagree on word (\d+) \((\d+) here, (\d+) there\)")


def translate(op: str, exc: BaseException) -> BaseException:
    """RankMismatch for a DeviceAssert of the agreement check, else ``exc`` itself."""
    match = _PATTERN.search(str(exc)) if isinstance(exc, DeviceAssert) else None
    if match is None:
        return exc
    rank, peer, word, mine, theirs = (int(g) for g in match.groups())
    if word >= len(FIELDS):
        return exc
    field = FIELDS[word]
    return RankMismatch(f"{op}: ranks {rank} and {peer} disagree on {field}: rank {rank} has {_show(word, mine)}, "
                        f"rank {peer} has {_show(word, theirs)} (every rank raises; the Buffer is "
                        "unusable)", ranks=(rank, peer), field=field)


@contextlib.contextmanager
def guard(op: str) -> Iterator[None]:
    """Raises :func:`translate`'s RankMismatch for an agreement failure inside the block."""
    try:
        yield
    except DeviceAssert as exc:
        explained = translate(op, exc)
        if explained is exc:
            raise
        raise explained from exc
