"""Never trust the window (docs/semantics.md, "Trust"): a faulty peer writes chosen garbage into a
victim's window at each stage of the intranode protocol, and the victim raises DeviceAssert
naming the peer and the value, writing nothing out of bounds (tools/sanitize.py runs this file
under ASan + UBSan, which is what proves the last part; here the victim also checks canaries).

Two real rank processes share the windows: rank 0, the victim, calls Buffer.dispatch / combine as
usual; rank 1, the faulty peer, never launches a kernel but plays the protocol by hand from
Python through views of both windows (the layout the bindings export, runtime/ops_intranode.h):
it enters the node barrier (copying the victim's agreement words, so that it passes as agreeing),
writes the counts of notify, fills queue slots and publishes tails, with chosen values."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import moelink
from moelink import errors, runtime
from multiproc import rank_group_fixture

group = rank_group_fixture(2, case_timeout=120, env={"MOELINK_TIMEOUT_S": "20"})

VICTIM, PEER, RANKS = 0, 1, 2
_WINDOW = 4 << 20
_HIDDEN, _TOPK, _EXPERTS = 16, 2, 4  # bf16 rows of 32 bytes; experts 0, 1 on rank 0, 2, 3 on rank 1
_WORDS = moelink._host.intranode.AGREEMENT_WORDS
_STRIDE = moelink._host.intranode.COUNTER_STRIDE
_CONFIG = moelink.Config(2, 4, 32)


class FaultyPeer:
    """Rank 1's hands on both windows: the protocol of a notify, dispatch and combine, by hand."""

    def __init__(self, buffer, row_bytes=_HIDDEN * 2, num_topk=_TOPK, experts_per_rank=_EXPERTS // RANKS):
        self.buffer = buffer
        node = buffer._node("dispatch")
        self.native, _ = node.shape("dispatch", _CONFIG, row_bytes, 0, num_topk, experts_per_rank)
        self.layout, self.V = self.native.layout, self.native.virtual_channels
        self.num_topk, self.experts_per_rank, self.row_bytes = num_topk, experts_per_rank, row_bytes

    def view(self, owner, offset, count, dtype):
        return self.buffer._windows.view(owner, offset, count * torch.empty(0, dtype=dtype).element_size(), dtype)

    def wait(self, tensor, index, value, what):
        deadline = time.monotonic() + 20
        while int(tensor[index]) < value:
            if time.monotonic() > deadline:
                raise AssertionError(f"faulty peer: the victim never reached {what}")
            time.sleep(0.0005)

    def enter_barrier(self, epoch=1):
        """Waits for the victim's barrier store of operation `epoch` (its first: 1), copies its
        agreement words, stores its own."""
        L = self.layout
        self.wait(self.view(PEER, L["barrier"], RANKS, torch.int64), VICTIM, epoch, "the node barrier")
        parity = (epoch & 1) * RANKS
        words = self.view(PEER, L["agreement"] + 8 * _WORDS * (parity + VICTIM), _WORDS, torch.int64).clone()
        self.view(VICTIM, L["agreement"] + 8 * _WORDS * (parity + PEER), _WORDS, torch.int64).copy_(words)
        self.view(VICTIM, L["barrier"], RANKS, torch.int64)[PEER] = epoch
        return epoch

    def notify(self, epoch, channel_counts, expert_counts, totals):
        """The counts rank 1 'sends' the victim (any values), then its notify_epoch."""
        L = self.layout
        self.view(VICTIM, L["channel_count"] + 4 * PEER * self.V, self.V, torch.int32).copy_(
            torch.tensor(channel_counts, dtype=torch.int32))
        self.view(VICTIM, L["expert_count"] + 4 * PEER * self.experts_per_rank, self.experts_per_rank,
                  torch.int32).copy_(torch.tensor(expert_counts, dtype=torch.int32))
        self.view(VICTIM, L["rank_count"] + 4 * PEER * (RANKS + 1), RANKS + 1, torch.int32).copy_(
            torch.tensor(totals, dtype=torch.int32))
        self.view(VICTIM, L["notify_epoch"], RANKS, torch.int64)[PEER] = epoch

    def honest_notify(self, tokens_for_victim=0):
        """Announces `tokens_for_victim` tokens in virtual channel 0, all for local expert 0."""
        epoch = self.enter_barrier()
        counts = [tokens_for_victim] + [0] * (self.V - 1)
        experts = [tokens_for_victim] + [0] * (self.experts_per_rank - 1)
        self.notify(epoch, counts, experts, [tokens_for_victim, 0, 0])
        return epoch

    def queue_counter(self, owner, which, v, sender):
        return self.view(owner, self.layout[which] + _STRIDE * (v * RANKS + sender), 1, torch.int64)

    def fill_slots(self, v, tokens, topk, src):
        """Writes `tokens` slots of queue (v, me) in the victim's window (from its current tail)."""
        L = self.layout
        base = L["slots"] + (v * RANKS + PEER) * L["queue_bytes"]
        start = int(self.queue_counter(VICTIM, "tail", v, PEER)[0])
        capacity = self.native.queue_capacity
        for i in range(tokens):
            slot = (start + i) % capacity
            self.view(VICTIM, base + L["row"] + slot * self.row_bytes, self.row_bytes, torch.uint8).fill_(0x3F)
            self.view(VICTIM, base + L["topk"] + 4 * slot * self.num_topk, self.num_topk, torch.int32).fill_(topk)
            self.view(VICTIM, base + L["weights"] + 4 * slot * self.num_topk, self.num_topk, torch.float32).fill_(1)
            self.view(VICTIM, base + L["src"] + 4 * slot, 1, torch.int32).fill_(src)
        return start


def _victim_inputs(n, to_peer=False):
    topk = torch.tensor([[2, 3] if to_peer else [0, 1]] * n)
    in_rank = torch.zeros(n, RANKS, dtype=torch.bool)
    in_rank[:, 1 if to_peer else 0] = True
    per_expert = torch.bincount(topk.flatten(), minlength=_EXPERTS).to(torch.int32)
    x = torch.randn(n, _HIDDEN).to(torch.bfloat16)
    return x, dict(topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=_CONFIG)


def _canaries():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 2**31 - 1, (1 << k,), generator=g, dtype=torch.int64) for k in range(4, 17, 3)]


# Each stage: what rank 1 does, and what the victim must raise (None: finish, garbage values allowed).
def _peer_plays(peer: FaultyPeer, stage: str):
    V, big = peer.V, 2**31 - 1
    if stage == "negative channel count":
        peer.notify(peer.enter_barrier(), [-5] + [0] * (V - 1), [0] * peer.experts_per_rank, [-5, 0, 0])
    elif stage == "channel counts whose int32 sum wraps":
        peer.notify(peer.enter_barrier(), [big] + [1] * (V - 1), [0] * peer.experts_per_rank, [0, 0, 0])
    elif stage == "negative expert count":
        peer.notify(peer.enter_barrier(), [0] * V, [-1] + [0] * (peer.experts_per_rank - 1), [0, 0, 0])
    elif stage == "announced total differs from its counts":
        peer.notify(peer.enter_barrier(), [3] + [0] * (V - 1), [3] + [0] * (peer.experts_per_rank - 1), [7, 0, 0])
    elif stage == "negative total for another rank":
        peer.notify(peer.enter_barrier(), [0] * V, [0] * peer.experts_per_rank, [0, -3, 0])
    elif stage == "huge tail":
        peer.honest_notify(3)
        peer.queue_counter(VICTIM, "tail", 0, PEER)[0] = 2**62
    elif stage == "local expert id out of range":
        peer.honest_notify(3)
        start = peer.fill_slots(0, 3, topk=peer.experts_per_rank + 5, src=0)
        peer.queue_counter(VICTIM, "tail", 0, PEER)[0] = start + 3
    elif stage == "negative source index":
        peer.honest_notify(3)
        start = peer.fill_slots(0, 3, topk=-1, src=-9)
        peer.queue_counter(VICTIM, "tail", 0, PEER)[0] = start + 3
    elif stage == "head past the tail":
        for v in range(V):  # the victim's queues into rank 1's window: read once they are full
            peer.queue_counter(PEER, "head", v, VICTIM)[0] = 2**40
        peer.honest_notify(0)
    elif stage == "one-copy tail past the announced rows":
        peer.honest_notify(3)
        peer.queue_counter(VICTIM, "tail", 0, PEER)[0] = int(peer.queue_counter(VICTIM, "tail", 0, PEER)[0]) + 5
    elif stage == "combine: huge tail":
        peer.honest_notify(0)  # the victim's dispatch sends its 3 tokens to rank 1's queue (room: 32 slots)
        peer.enter_barrier(2)  # the combine
        peer.queue_counter(VICTIM, "tail", 0, PEER)[0] = 2**62
    else:
        raise AssertionError(stage)


STAGES = {
    "negative channel count": r"rank 1 sent a (token count|total) of -5",
    "channel counts whose int32 sum wraps": r"rank 1 sent a token count of (2147483647|1) \(total so far",
    "negative expert count": r"rank 1 sent -1 rows for local expert 0",
    "announced total differs from its counts": r"rank 1 announced 7 tokens for this rank but sent counts of 3",
    "negative total for another rank": r"rank 1 sent a total of -3",
    "huge tail": r"sender 1 queued \d+ tokens, 3 expected",
    "local expert id out of range": r"sender 1 sent local expert id 7 \(this rank has 2\)",
    "negative source index": r"sender 1 sent source token index -9",
    "head past the tail": r"rank 1 released head 1099511627776 past this rank's tail",
    "one-copy tail past the announced rows": r"sender 1 wrote 5 rows, 3 expected",
    "combine: huge tail": None,
}


def _stage(ctx, stage):
    expected = STAGES[stage]
    buffer = moelink.Buffer(ctx.group, _WINDOW)
    try:
        if ctx.rank == PEER:
            _peer_plays(FaultyPeer(buffer), stage)
            outcome = "played"
        else:
            canaries = _canaries()
            # 200 tokens to rank 1 fill its queues (at most 32 slots), so the victim reads the heads.
            x, layout = _victim_inputs(200 if stage == "head past the tail" else 3,
                                       to_peer=stage in ("head past the tail", "combine: huge tail"))
            if stage == "combine: huge tail":
                recv, _, _, _, handle, _ = buffer.dispatch(x, **layout)
                combined = buffer.combine(recv, handle, config=_CONFIG)[0]
                assert combined.shape == x.shape  # garbage values: a peer's data is its own to get wrong
                outcome = "finished"
            else:
                with pytest.raises(errors.DeviceAssert, match=expected) as info:
                    buffer.dispatch(x, zero_copy=stage.startswith("one-copy"), **layout)
                assert not isinstance(info.value, errors.RankMismatch)
                with pytest.raises(errors.BufferUnusable):
                    buffer.dispatch(x, **layout)
                outcome = "raised"
            assert all(torch.equal(a, b) for a, b in zip(canaries, _canaries())), "memory corrupted"
    finally:
        dist.barrier(group=ctx.group)  # the victim is done with rank 1's window before it goes
        buffer.destroy()
    # Afterwards both ranks still work together on a fresh Buffer: no corruption, nothing hangs.
    with moelink.Buffer(ctx.group, _WINDOW) as fresh:
        x, layout = _victim_inputs(4)
        recv, _, _, _, handle, _ = fresh.dispatch(x, **layout)
        assert recv.shape[0] == (4 * RANKS if ctx.rank == VICTIM else 0)
        assert torch.equal(fresh.combine(recv, handle, config=_CONFIG)[0], x * 1)
    return outcome


@pytest.mark.parametrize("stage", list(STAGES))
def test_victim_raises_naming_the_peer(group, stage):
    outcomes = group.run(_stage, stage)
    assert outcomes[PEER] == "played"
    assert outcomes[VICTIM] == ("finished" if STAGES[stage] is None else "raised")
