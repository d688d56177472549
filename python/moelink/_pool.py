"""Reused output memory for a Buffer's calls, so a steady-state call takes no page faults.

Why: glibc serves allocations above its mmap threshold (at most 32 MiB) with ``mmap`` and unmaps
them on ``free``, so a fresh 100 MB ``recv_x`` per dispatch faults in and zeroes about 26 000 pages
on every call (about 60% of a dispatch's CPU time on the host target, docs/results.md).

:class:`OutputPool` keeps the storages of the outputs it handed out (one 1-D ``uint8`` *base*
tensor each) and hands a storage out again only once nobody but the pool holds it: the outputs
are ordinary tensors the caller owns for as long as it likes, and nothing it still holds (a view,
a slice, a NumPy array or DLPack capsule made from it, a tensor autograd saved) is ever reused.
"Nobody else holds it" is read from the storage's reference count
(``torch._C._storage_Use_Count``; the pool's base accounts for 2: its own reference and the
temporary Python object ``untyped_storage()`` returns). That is a private torch API: at import
the pool probes it (a lone base must count 2, one view more must count 3), and where it is
missing or counts differently the pool never reuses anything (every output is freshly allocated,
as without a pool: correct, only slower). One case the count cannot see: a caller that keeps
only ``tensor.untyped_storage()`` (torch's Python storage object does not hold a counted
reference); keep a tensor or a view instead.

Bounded: the pool retains at most ``max(min_retained_bytes, 4 x its largest request)`` bytes of
storage that the caller does not hold (default floor 256 MiB), and tracks at most
``max_bases`` storages; past either bound it forgets the storages idle longest (memory the
caller still holds stays the caller's and is freed when dropped). Small requests (under
``min_pooled_bytes``, 256 KiB) come from ``torch.empty``: glibc reuses small blocks from its heap
without faults.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch

__all__ = ["OutputPool", "use_count_supported", "storage_in_use"]


def _probe_use_count():
    """``torch._C._storage_Use_Count`` if it behaves as the pool assumes, else None."""
    fn = getattr(torch._C, "_storage_Use_Count", None)
    if fn is None:
        return None
    try:
        base = torch.empty(16, dtype=torch.uint8)
        alone = fn(base.untyped_storage()._cdata)
        view = base[:8]
        held = fn(base.untyped_storage()._cdata)
        del view
        again = fn(base.untyped_storage()._cdata)
    except Exception:  # noqa: BLE001 - any failure of a private API means: do not rely on it
        return None
    return fn if (alone, held, again) == (2, 3, 2) else None


_USE_COUNT = _probe_use_count()


def use_count_supported() -> bool:
    """Whether this torch lets the pool see that a storage is free (else it never reuses)."""
    return _USE_COUNT is not None


def storage_in_use(base: torch.Tensor) -> bool:
    """True unless ``base`` (a tensor the pool owns) is the only holder of its storage. Without a
    usable use count, always True (never reuse)."""
    if _USE_COUNT is None:
        return True
    return _USE_COUNT(base.untyped_storage()._cdata) > 2


_PAGE = 4096


class OutputPool:
    """Storages for a Buffer's outputs, reused once the caller has dropped them (module doc)."""

    def __init__(self, *, min_retained_bytes: int = 256 << 20, min_pooled_bytes: int = 256 << 10,
                 max_bases: int = 64) -> None:
        self.min_retained_bytes = min_retained_bytes
        self.min_pooled_bytes = min_pooled_bytes
        self.max_bases = max_bases
        self._bases: List[torch.Tensor] = []  # most recently handed out last
        self._largest_request = 0
        self.allocations = 0  # fresh pooled storages allocated
        self.reuses = 0  # requests served from a free storage

    @property
    def retain_limit(self) -> int:
        """Bytes of free (caller-dropped) storage the pool may keep."""
        return max(self.min_retained_bytes, 4 * self._largest_request)

    @property
    def nbytes(self) -> int:
        """Bytes of every storage the pool tracks (free or held by the caller)."""
        return sum(b.numel() for b in self._bases)

    def free_bytes(self) -> int:
        return sum(b.numel() for b in self._bases if not storage_in_use(b))

    def empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor of ``shape`` and ``dtype``, whose memory nobody else
        holds: a free pooled storage when one fits, else a fresh one (then pooled)."""
        shape = tuple(int(s) for s in shape)
        need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if need < self.min_pooled_bytes or _USE_COUNT is None:
            return torch.empty(shape, dtype=dtype)
        self._largest_request = max(self._largest_request, need)
        best = None
        for i, base in enumerate(self._bases):
            # A storage at most twice the request (plus a page) fits; the smallest that fits wins,
            # so a small request never pins a large storage.
            if need <= base.numel() <= 2 * need + _PAGE and not storage_in_use(base):
                if best is None or base.numel() < self._bases[best].numel():
                    best = i
        if best is not None:
            base = self._bases.pop(best)
            self.reuses += 1
        else:
            # 1/8 headroom, page-rounded: routings that differ by a few rows per call still fit.
            size = (need + need // 8 + _PAGE - 1) // _PAGE * _PAGE
            base = torch.empty(size, dtype=torch.uint8)
            self.allocations += 1
        self._bases.append(base)
        # A tensor of its own over the base's storage, not a view of the base: it has no `_base`,
        # and autograd treats it like any fresh tensor.
        out = torch.empty(0, dtype=dtype).set_(base.untyped_storage(), 0, shape)
        self._trim()
        return out

    def _trim(self) -> None:
        # Forget the storages idle longest until the free ones fit the limit and the count fits
        # max_bases (a forgotten storage the caller holds is freed when the caller drops it).
        limit = self.retain_limit
        free = [(i, b.numel()) for i, b in enumerate(self._bases) if not storage_in_use(b)]
        free_total = sum(n for _, n in free)
        drop = set()
        for i, n in free:  # oldest first
            if free_total <= limit:
                break
            drop.add(i)
            free_total -= n
        excess = len(self._bases) - len(drop) - self.max_bases
        for i in range(len(self._bases)):
            if excess <= 0:
                break
            if i not in drop and i != len(self._bases) - 1:
                drop.add(i)
                excess -= 1
        if drop:
            self._bases = [b for i, b in enumerate(self._bases) if i not in drop]

    def clear(self) -> None:
        """Forgets every storage (outputs the caller holds stay valid)."""
        self._bases.clear()

    def stats(self) -> dict:
        return {"allocations": self.allocations, "reuses": self.reuses, "bases": len(self._bases),
                "nbytes": self.nbytes, "free_bytes": self.free_bytes(), "retain_limit": self.retain_limit,
                "use_count_supported": use_count_supported()}
