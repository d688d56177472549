"""Deadlined exchanges over a ``torch.distributed`` process group, for moelink's bootstraps.

``exchange(group, step, item, deadline_s)`` gives every rank every rank's ``item`` (JSON values:
no pickle, so a peer's message can never run code here), or raises
:class:`moelink.errors.CommTimeout` naming the step and the ranks that did not send in time. It is
an all-to-all of point-to-point messages, not a gloo collective: a collective offers neither a
deadline shorter than the group's timeout (30 min by default) nor a way to tell who is missing,
whereas a receive per peer with a deadline does both:

- a peer that never arrives (not started, stalled, stuck in an earlier step) is *missing* once the
  deadline passes. The receives from all peers are waited for at once (a thread per peer, all
  done by the deadline): gloo answers an expired wait by closing every connection of the group,
  so a wait must not expire while another peer's message is still on its way. After a timeout
  the group's connections are closed, as with any gloo timeout;
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
import threading
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


def next_tag_base(group, ahead: int = 0, advance: bool = True) -> int:
    """Tags of the exchange ``ahead`` places after the next one on ``group`` (every rank runs the
    same exchanges in the same order, so the counters agree); ``advance`` consumes the next one."""
    count = _counters.get(id(group), 0)
    if advance:
        _counters[id(group)] = count + 1
    return _TAG_BASE + ((count + ahead) % _TAG_SLOTS) * _TAG_STRIDE


def _skip(group, steps: int) -> None:
    _counters[id(group)] = _counters.get(id(group), 0) + steps


def _prune_abandoned() -> None:
    _abandoned[:] = [w for w in _abandoned if not w.is_completed()]


def _gloo_text(exc: BaseException) -> str:
    """The gist of a gloo error: no source path, no generic advice."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". This is typically")[0][:200]


def _wait(work, deadline: float) -> Optional[str]:
    """None once ``work`` completed before ``deadline``, "missing" if it did not, "lost: <why>" if
    its connection failed."""
    try:
        work.wait(timeout=datetime.timedelta(seconds=max(0.001, deadline - time.monotonic())))
        return None
    except RuntimeError as exc:  # gloo reports both as RuntimeError (DistBackendError)
        text = str(exc)
        # "Timed out waiting": this wait expired. "Application timeout caused pair closure": gloo
        # closed every connection because another wait of this exchange expired first.
        if "Timed out" in text or "Application timeout" in text:
            return "missing"
        return "lost: " + _gloo_text(exc)


def exchange(group, step: str, item: Any, deadline_s: float, *, what: str = "bootstrap", later_steps=()) -> list:
    """Every rank's ``item`` (JSON-serialisable), in group-rank order. Collective over ``group``.

    Raises CommTimeout when a peer's item did not arrive within ``deadline_s`` seconds of this
    call, or its connection dropped; the message names ``what``, the step and those ranks.
    ``later_steps``: the exchanges of the same protocol still to come. A rank that fails here
    sends its peers, in place of its messages for those steps, the ranks it found missing: a peer
    already waiting in a later step learns the root cause at once instead of naming this rank."""
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
    failed: dict[int, str] = {}

    def talk(p: int) -> None:
        """Everything with peer ``p``: our message out, its message in."""
        dst = dist.get_global_rank(group, p)
        works = []
        try:  # gloo refuses at once to post on a connection it already closed
            works.append(dist.isend(header, dst, group=group, tag=tag))
            works.append(dist.isend(body_tensor, dst, group=group, tag=tag + 1))
            incoming = torch.zeros(2, dtype=torch.int64)
            works.append(dist.irecv(incoming, dst, group=group, tag=tag))
            status = _wait(works[-1], deadline)
            if status is None:
                length, magic = (int(v) for v in incoming)
                if magic != _MAGIC or not 0 < length <= 1 << 24:
                    status = f"lost: malformed message header ({length}, {magic:#x})"
            if status is None:
                buffer = torch.empty(length, dtype=torch.uint8)
                works.append(dist.irecv(buffer, dst, group=group, tag=tag + 1))
                status = _wait(works[-1], deadline)
            if status is None:
                try:
                    out[p] = json.loads(bytes(buffer.numpy()).decode())
                except (UnicodeDecodeError, ValueError) as exc:
                    status = f"lost: malformed message ({exc})"
            if status is None:  # it received ours too, or its own failure will say why not
                for work in works[:2]:
                    _wait(work, deadline + 1.0)
        except RuntimeError as exc:
            status = "lost: " + _gloo_text(exc)
        if status is not None:
            failed[p] = status
        _abandoned.extend(w for w in works if not w.is_completed())

    # One thread per peer, all waiting at once: a message that arrives before the deadline is
    # taken before any wait can expire (an expired wait makes gloo close every connection).
    threads = [threading.Thread(target=talk, args=(p,), name=f"moelink-{what}-{step}-{p}", daemon=True)
               for p in range(size) if p != rank]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gave_up = {p: out[p]["aborted"] for p in range(size)
               if p != rank and isinstance(out[p], dict) and isinstance(out[p].get("aborted"), dict)}
    if failed or gave_up:
        missing = _root_missing(rank, failed, gave_up)
        message = _describe(what, step, rank, size, failed, gave_up, missing, time.monotonic() - start, deadline_s)
        _give_up(group, rank, size, step, later_steps, missing, message)
        raise CommTimeout(message)
    return out


def _root_missing(rank: int, failed: dict, gave_up: dict) -> list:
    """The ranks nobody heard from: those this rank missed or lost, and those the ranks that gave up
    missed, less every rank known to be alive (it sent, or it gave up)."""
    suspects = set(failed)
    for notice in gave_up.values():
        suspects.update(int(r) for r in notice.get("missing", []) if isinstance(r, int))
    return sorted(suspects - set(gave_up) - {rank})


def _give_up(group, rank: int, size: int, step: str, later_steps, missing: list, message: str) -> None:
    """Sends every peer, as this rank's message for each later step, why it stopped here."""
    notice = json.dumps({"aborted": {"rank": rank, "step": step, "missing": missing, "text": message[:500]}})
    payload = bytearray(notice.encode())
    for ahead, _ in enumerate(later_steps):
        tag = next_tag_base(group, ahead=ahead, advance=False)
        header = torch.tensor([len(payload), _MAGIC], dtype=torch.int64)
        body = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        for p in range(size):
            if p == rank:
                continue
            try:
                dst = dist.get_global_rank(group, p)
                _abandoned.append(dist.isend(header, dst, group=group, tag=tag))
                _abandoned.append(dist.isend(body, dst, group=group, tag=tag + 1))
            except RuntimeError:  # that connection is gone: nobody is waiting there
                pass
    _skip(group, len(later_steps))  # as far as the ranks that finish the protocol will be


def _describe(what: str, step: str, rank: int, size: int, failed: dict, gave_up: dict, missing: list,
              elapsed: float, deadline_s: float) -> str:
    timed_out = sorted(p for p, s in failed.items() if s == "missing")
    lost = {p: s[len("lost: "):] for p, s in failed.items() if s != "missing"}
    parts = []
    if timed_out:
        parts.append(f"no message within {deadline_s:g} s from ranks {timed_out} (not started, stalled, or still "
                     f"in an earlier step)")
    if lost:
        listing = "; ".join(f"rank {p}: {why}" for p, why in sorted(lost.items()))
        parts.append(f"connection lost to ranks {sorted(lost)} (process gone?): {listing}")
    for p, notice in sorted(gave_up.items()):
        parts.append(f"rank {p} gave up at step '{notice.get('step', '?')}', missing ranks {notice.get('missing', '?')}")
    return (f"{what} step '{step}' on rank {rank} of {size}: " + "; ".join(parts) +
            f" (after {elapsed:.2f} s) [MOELINK_TIMEOUT_S={deadline_s:g}]; missing ranks: {missing}")
