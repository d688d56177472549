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
so a late rank's messages from an abandoned step are never taken for those of a later one. Sends
are released once the peer's next message proves they were received (see _unfinished_sends).
"""

from __future__ import annotations

import concurrent.futures
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
# Sends are never waited for with a timeout (an expired gloo wait closes every connection of the
# group, and a peer may stall between our message and its next receive). A peer's message of a
# later exchange proves it finished the earlier ones, hence received our sends of those: they are
# then complete, and waited for (at once) to release them. Until then they stay referenced here,
# so gloo never reads a freed buffer: at most one exchange's sends per peer, plus the notices.
_unfinished_sends: dict = {}  # (id(group), peer) -> [works]
# Receives from peers that never answered, kept referenced for the same reason (bounded).
_abandoned: list = []
_ABANDONED_KEPT = 256
_NOTICE_WINDOW_S = 0.25  # waits run this much past the deadline, so that notices can go out


def next_tag_base(group, ahead: int = 0, advance: bool = True) -> int:
    """Tags of the exchange ``ahead`` places after the next one on ``group`` (every rank runs the
    same exchanges in the same order, so the counters agree); ``advance`` consumes the next one."""
    count = _counters.get(id(group), 0)
    if advance:
        _counters[id(group)] = count + 1
    return _TAG_BASE + ((count + ahead) % _TAG_SLOTS) * _TAG_STRIDE


def _skip(group, steps: int) -> None:
    _counters[id(group)] = _counters.get(id(group), 0) + steps


_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None


def _workers() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that wait for the peers, one per peer of the largest group so far, kept for
    the life of the process: gloo's point-to-point calls leave a little memory behind in every
    thread that makes them (about 200 bytes, measured), so fresh threads per exchange would grow
    RSS with every bootstrap."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(max_workers=4096, thread_name_prefix="moelink-exchange")
    return _pool


def _abandon(works) -> None:
    _abandoned.extend(works)
    del _abandoned[:-_ABANDONED_KEPT]


def _release_sends(group, peer: int) -> None:
    """``peer`` sent us a message of a newer exchange: our earlier sends to it are complete."""
    for work in _unfinished_sends.pop((id(group), peer), []):
        try:
            work.wait()
        except RuntimeError:  # its connection failed after delivery, or before (then it gave up)
            pass


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
    out: list = [None] * size
    out[rank] = item
    if size == 1:
        return out
    body = bytearray(json.dumps(item, separators=(",", ":")).encode())
    header = torch.tensor([len(body), _MAGIC], dtype=torch.int64)
    body_tensor = torch.frombuffer(body, dtype=torch.uint8)
    start = time.monotonic()
    deadline = start + deadline_s

    # Every wait runs a little past the deadline: this rank decides at the deadline who is missing
    # and tells its peers (below) while the connections are still open; only then can a gloo wait
    # expire, which closes every connection of the group.
    wait_until = deadline + _NOTICE_WINDOW_S

    def talk(p: int) -> None:
        """Everything with peer ``p``: our message out, its message in."""
        dst = dist.get_global_rank(group, p)
        works = []
        try:  # gloo refuses at once to post on a connection it already closed
            sends = [dist.isend(header, dst, group=group, tag=tag), dist.isend(body_tensor, dst, group=group, tag=tag + 1)]
            incoming = torch.zeros(2, dtype=torch.int64)
            works.append(dist.irecv(incoming, dst, group=group, tag=tag))
            status = _wait(works[-1], wait_until)
            if status is None:
                _release_sends(group, p)
            _unfinished_sends.setdefault((id(group), p), []).extend(sends)
            if status is None:
                length, magic = (int(v) for v in incoming)
                if magic != _MAGIC or not 0 < length <= 1 << 24:
                    status = f"lost: malformed message header ({length}, {magic:#x})"
            if status is None:
                buffer = torch.empty(length, dtype=torch.uint8)
                works.append(dist.irecv(buffer, dst, group=group, tag=tag + 1))
                status = _wait(works[-1], wait_until)
            if status is None:
                try:
                    received[p] = json.loads(bytes(buffer.numpy()).decode())
                except (UnicodeDecodeError, ValueError) as exc:
                    status = f"lost: malformed message ({exc})"
        except RuntimeError as exc:
            status = "lost: " + _gloo_text(exc)
        if status is not None:
            failures[p] = status
            _abandon(works)

    received: dict = {}
    failures: dict = {}
    pending = {p: _workers().submit(talk, p) for p in range(size) if p != rank}
    concurrent.futures.wait(list(pending.values()), timeout=max(0.0, deadline - time.monotonic()))
    # The verdict at the deadline: what arrived, what failed, who has not answered.
    failed = {p: failures[p] for p in pending if p in failures and p not in received}
    failed.update({p: "missing" for p, f in pending.items() if p not in received and p not in failed and not f.done()})
    for p, value in received.items():
        out[p] = value
    gave_up = {p: out[p]["aborted"] for p in range(size)
               if p != rank and isinstance(out[p], dict) and isinstance(out[p].get("aborted"), dict)}
    if failed or gave_up:
        missing = _root_missing(rank, failed, gave_up)
        message = _describe(what, step, rank, size, failed, gave_up, missing, time.monotonic() - start, deadline_s)
        _give_up(group, rank, size, step, later_steps, missing, message)
    concurrent.futures.wait(list(pending.values()))  # all end by wait_until: none outlives the exchange
    if failed or gave_up:
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
                _unfinished_sends.setdefault((id(group), p), []).extend(
                    [dist.isend(header, dst, group=group, tag=tag), dist.isend(body, dst, group=group, tag=tag + 1)])
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
