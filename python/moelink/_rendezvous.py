"""Deadlined exchanges over a ``torch.distributed`` process group, for moelink's bootstraps.

``exchange(group, step, item, deadline_s)`` gives every rank every rank's ``item`` (JSON values:
no pickle, so a peer's message can never run code here), or raises
:class:`moelink.errors.CommTimeout` naming the step and the ranks that did not send in time. It is
an all-to-all of point-to-point messages, not a gloo collective: a collective offers neither a
deadline shorter than the group's timeout (30 min by default) nor a way to tell who is missing,
whereas ``Work.wait(timeout)`` on each receive does both, per peer:

- a peer that never arrives (not started, stalled, stuck in an earlier step) is *missing* once the
  deadline passes (gloo then closes the connection to it: the group is unusable afterwards, as it
  is anyway with a rank missing);
- a peer whose process died is *lost* as soon as gloo sees the connection drop, and the step fails
  without waiting for the deadline for it.

Messages of one call carry tags of their own (a per-group counter every rank advances in step),
so a late rank's messages from an abandoned step are never taken for those of a later one. Works
that never complete (sends to a missing peer) are kept referenced until they finish, so gloo never
writes from a freed buffer.
"""

from __future__ import annotations

import datetime
import json
import re
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import CommTimeout

__all__ = ["exchange", "next_tag_base", "DEFAULT_DEADLINE_S"]

DEFAULT_DEADLINE_S = 100.0  # MOELINK_TIMEOUT_S's default, used when the variable itself is malformed
_MAGIC = 0x4D4F454C494E4B31  # "MOELINK1": the header's second word
_TAG_BASE = 0x4D4C0000  # far above the small tags applications use
_TAG_STRIDE = 8  # tags per exchange: header and body
_TAG_SLOTS = 0x7FFF
_counters: dict[int, int] = {}  # id(group) -> exchanges started on it
_abandoned: list = []  # works that were still pending when their step ended


def next_tag_base(group) -> int:
    """Tags for the next exchange on ``group``: every rank calls this the same number of times."""
    count = _counters.get(id(group), 0)
    _counters[id(group)] = count + 1
    return _TAG_BASE + (count % _TAG_SLOTS) * _TAG_STRIDE


def _prune_abandoned() -> None:
    _abandoned[:] = [w for w in _abandoned if not w.is_completed()]


def _gloo_text(exc: BaseException) -> str:
    """The gist of a gloo error: no source path, no generic advice."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0][:200]


def _wait(work, deadline: float) -> Optional[str]:
    """None once ``work`` completed before ``deadline``, "missing" on timeout, "lost: <why>" if the
    connection failed."""
    left = max(0.001, deadline - time.monotonic())
    try:
        work.wait(timeout=datetime.timedelta(seconds=left))
        return None
    except RuntimeError as exc:  # gloo reports both as RuntimeError (DistBackendError)
        text = str(exc)
        if "imed out" in text or "timeout" in text.lower():
            return "missing"
        return "lost: " + _gloo_text(exc)


def exchange(group, step: str, item: Any, deadline_s: float, *, what: str = "bootstrap") -> list:
    """Every rank's ``item`` (JSON-serialisable), in group-rank order. Collective over ``group``.

    Raises CommTimeout when a peer's item did not arrive within ``deadline_s`` seconds of this
    call, or its connection dropped; the message names ``what``, the step and those ranks."""
    rank, size = group.rank(), group.size()
    tag = next_tag_base(group)
    _prune_abandoned()
    out: list = [None] * size
    out[rank] = item
    if size == 1:
        return out
    body = bytearray(json.dumps(item, separators=(",", ":")).encode())
    header = torch.tensor([len(body), _MAGIC], dtype=torch.int64)
    body_tensor = torch.frombuffer(body, dtype=torch.uint8)
    start = time.monotonic()
    deadline = start + deadline_s
    peers = [p for p in range(size) if p != rank]
    global_rank = {p: dist.get_global_rank(group, p) for p in peers}
    failed: dict[int, str] = {}
    sends, header_works = [], {}
    headers = {p: torch.zeros(2, dtype=torch.int64) for p in peers}
    for p in peers:
        try:  # gloo refuses at once to post on a connection it already closed
            sends.append((p, dist.isend(header, global_rank[p], group=group, tag=tag)))
            sends.append((p, dist.isend(body_tensor, global_rank[p], group=group, tag=tag + 1)))
            header_works[p] = dist.irecv(headers[p], global_rank[p], group=group, tag=tag)
        except RuntimeError as exc:
            failed[p] = "lost: " + _gloo_text(exc)
    bodies: dict[int, tuple] = {}
    for p, work in header_works.items():  # post each body's receive as soon as its header is in
        status = _wait(work, deadline)
        if status is not None:
            failed[p] = status
            _abandoned.append(work)
            continue
        length, magic = (int(v) for v in headers[p])
        if magic != _MAGIC or not 0 < length <= 1 << 24:
            failed[p] = f"lost: malformed message header ({length}, {magic:#x})"
            continue
        buffer = torch.empty(length, dtype=torch.uint8)
        try:
            bodies[p] = (buffer, dist.irecv(buffer, global_rank[p], group=group, tag=tag + 1))
        except RuntimeError as exc:
            failed[p] = "lost: " + _gloo_text(exc)
    for p, (buffer, work) in bodies.items():
        status = _wait(work, deadline)
        if status is not None:
            failed[p] = status
            _abandoned.append(work)
            continue
        try:
            out[p] = json.loads(bytes(buffer.numpy()).decode())
        except (UnicodeDecodeError, ValueError) as exc:
            failed[p] = f"lost: malformed message ({exc})"
    # Peers that answered are receiving: our sends to them complete. Sends to the others cannot.
    for p, work in sends:
        if p in failed or _wait(work, deadline + 1.0) is not None:
            _abandoned.append(work)
    if failed:
        raise CommTimeout(_describe(what, step, rank, size, failed, time.monotonic() - start, deadline_s))
    return out


def _describe(what: str, step: str, rank: int, size: int, failed: dict, elapsed: float, deadline_s: float) -> str:
    missing = sorted(p for p, s in failed.items() if s == "missing")
    lost = {p: s[len("lost: "):] for p, s in failed.items() if s != "missing"}
    parts = []
    if missing:
        parts.append(f"no message within {deadline_s:g} s from ranks {missing} (not started, stalled, or still "
                     f"in an earlier step)")
    if lost:
        listing = "; ".join(f"rank {p}: {why}" for p, why in sorted(lost.items()))
        parts.append(f"connection lost to ranks {sorted(lost)} (process gone?): {listing}")
    return (f"{what} step '{step}' on rank {rank} of {size}: " + "; ".join(parts) +
            f" (after {elapsed:.2f} s) [MOELINK_TIMEOUT_S={deadline_s:g}]; missing ranks: "
            f"{sorted(failed)}")

