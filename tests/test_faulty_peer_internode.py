"""Never trust the window, across nodes (docs/semantics.md, "Trust"): faulty ranks write chosen
garbage into a victim's windows at each stage of the internode protocol, and the victim raises
DeviceAssert naming the faulty rank and the value, writing nothing out of bounds (tools/sanitize.py
runs this file under ASan + UBSan, which is what proves the last part; here the victim also checks
canaries). The intranode counterpart is tests/test_faulty_peer.py.

Four real rank processes as 2 nodes of 2 (runtime/ops_internode.h): rank 0, the victim, calls
Buffer.dispatch / combine as usual; ranks 1 (its node, the forwarder of local index 1), 2 (the
other node, local index 0: the victim's forwarder there and a source the victim forwards for) and
3 never launch a kernel but play the protocol by hand from Python, standing in for their kernels
and their NICs: they write the victim's NVL window through the node's mappings and its scale-out
window through the mappings the emulated NIC uses (the layout the bindings export). Each enters
the global barrier (copying the victim's agreement words, so that it passes as agreeing), writes
its notify message, and, as the stage asks, fills queue slots and moves tails or heads."""

from __future__ import annotations

import ctypes
import time

import pytest
import torch
import torch.distributed as dist

import moelink
from moelink import errors
from multiproc import rank_group_fixture

group = rank_group_fixture(4, case_timeout=120, env={"MOELINK_TIMEOUT_S": "20"})

VICTIM, LOCAL, SOURCE, IDLE = 0, 1, 2, 3
RANKS, RPN, NODES = 4, 2, 2
_HIDDEN, _TOPK, _EXPERTS = 16, 2, 8  # bf16 rows of 32 bytes; experts 2r, 2r + 1 on rank r
_EPR = _EXPERTS // RANKS
_ROW = _HIDDEN * 2
_CONFIG = moelink.Config(2, 4, 32, 4, 32)  # one channel; NVL and scale-out queues of 32 slots
_C = _CONFIG.num_sms // 2
_WORDS = moelink._host.intranode.AGREEMENT_WORDS
_STRIDE = moelink._host.intranode.COUNTER_STRIDE
_BIG = 2**31 - 1


def _tensor(address: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(address), dtype=torch.uint8).view(dtype)


class Hands:
    """A faulty rank's hands on the victim's windows (and its own): the internode protocol by hand."""

    def __init__(self, buffer, op: str = "dispatch", row_bytes=_ROW, experts_per_rank=_EPR):
        self.buffer, self.rank = buffer, buffer.rank
        native = buffer._node(op).context(op, _CONFIG, row_bytes, 0, _TOPK, experts_per_rank)
        self.sizes = native.layout
        self.off = self.sizes["offsets"]
        self.local = self.rank % RPN
        self.on_victim_node = self.rank // RPN == VICTIM // RPN

    # ---- memory -------------------------------------------------------------------------------
    def net(self, owner, offset, count, dtype=torch.int64):
        nbytes = count * torch.empty(0, dtype=dtype).element_size()
        return _tensor(self.buffer._scaleout.windows.nic_ptr(owner, offset, nbytes), count, dtype)

    def nvl(self, owner, offset, count, dtype=torch.int64):
        return self.buffer._windows.view(owner, offset, count * torch.empty(0, dtype=dtype).element_size(), dtype)

    def signal(self, owner, sig):
        return self.net(owner, 8 * sig, 1)

    def wait(self, tensor, value, what):
        deadline = time.monotonic() + 20
        while int(tensor[0]) < value:
            if time.monotonic() > deadline:
                raise AssertionError(f"faulty rank {self.rank}: the victim never reached {what}")
            time.sleep(0.0005)

    def stream(self, c, node):
        return c * NODES + node

    # ---- protocol -----------------------------------------------------------------------------
    def enter_barrier(self, epoch: int) -> None:
        """Waits for the victim's barrier store or signal of operation `epoch`, copies its agreement
        words into the victim's window as this rank's, then stores or signals its own barrier."""
        o, parity, word_bytes = self.off, epoch & 1, 8 * _WORDS
        if self.on_victim_node:
            self.wait(self.nvl(self.rank, o["nvl_barrier"] + 8 * (VICTIM % RPN), 1), epoch, "the global barrier")
            words = self.nvl(self.rank, o["nvl_agreement"] + (parity * RPN + VICTIM % RPN) * word_bytes, _WORDS).clone()
            self.nvl(VICTIM, o["nvl_agreement"] + (parity * RPN + self.local) * word_bytes, _WORDS).copy_(words)
            self.nvl(VICTIM, o["nvl_barrier"] + 8 * self.local, 1)[0] = epoch
        else:
            self.wait(self.signal(self.rank, o["sig_barrier"] + VICTIM), epoch, "the global barrier")
            words = self.net(self.rank, o["agreement_in"] + (parity * RANKS + VICTIM) * word_bytes, _WORDS).clone()
            self.net(VICTIM, o["agreement_in"] + (parity * RANKS + self.rank) * word_bytes, _WORDS).copy_(words)
            self.signal(VICTIM, o["sig_barrier"] + self.rank)[0] += 1

    def notify(self, to_rank, to_node, experts) -> None:
        """This rank's counts message to the victim (any values): per channel its tokens for the
        victim and for the victim's node, then its (token, slot) pairs per victim expert."""
        o = self.off
        message = torch.tensor(list(to_rank) + list(to_node) + list(experts), dtype=torch.int32)
        if self.on_victim_node:
            self.nvl(VICTIM, o["nvl_notify_in"] + self.local * self.sizes["notify_bytes"], len(message),
                     torch.int32).copy_(message)
            self.nvl(VICTIM, o["nvl_notify_flag"] + 8 * self.local, 1)[0] = 1  # the victim's first notify
        else:
            self.net(VICTIM, o["notify_in"] + self.rank * self.sizes["notify_bytes"], len(message),
                     torch.int32).copy_(message)
            self.signal(VICTIM, o["sig_notify"] + self.rank)[0] += 1

    def idle(self, epoch: int = 1) -> None:
        """An honest rank that sends the victim nothing."""
        self.enter_barrier(epoch)
        self.notify([0] * _C, [0] * _C, [0] * _EPR)

    def honest_notify(self, tokens: int) -> None:
        """Announces `tokens` tokens in channel 0 for the victim (and its node), all for expert 0."""
        self.enter_barrier(1)
        self.notify([tokens] + [0] * (_C - 1), [tokens] + [0] * (_C - 1), [tokens] + [0] * (_EPR - 1))

    def nvl_queue(self, c: int = 0):
        """(slots base, tail word) of NVL queue (c, my local index) in the victim's window."""
        index = c * RPN + self.local
        return (self.off["nvl_queues"] + index * self.off["nvl_queue_bytes"],
                self.nvl(VICTIM, self.off["nvl_tail"] + _STRIDE * index, 1))

    def fill_nvl(self, tokens, topk, src, token_index, c=0) -> None:
        """As the victim's local forwarder: `tokens` slots of NVL queue (c, me), then the tail."""
        o, (base, tail) = self.off, self.nvl_queue(c)
        start = int(tail[0])
        for i in range(tokens):
            slot = (start + i) % _CONFIG.num_max_nvl_chunked_recv_tokens
            self.nvl(VICTIM, base + o["q_row"] + slot * _ROW, _ROW, torch.uint8).fill_(0x3F)
            self.nvl(VICTIM, base + o["q_topk"] + 4 * slot * _TOPK, _TOPK, torch.int32).fill_(topk)
            self.nvl(VICTIM, base + o["q_weights"] + 4 * slot * _TOPK, _TOPK, torch.float32).fill_(1)
            self.nvl(VICTIM, base + o["q_src"] + 8 * slot, 2, torch.int32).copy_(torch.tensor([src, token_index]))
        tail[0] = start + tokens

    def send_messages(self, first: int, count: int, token_index=None, c=0) -> None:
        """As a source of the other node: wire messages first..first+count-1 of queue (c, my node)
        at the victim (its forwarder), bound for the victim only, then the tail signal."""
        o, sizes = self.off, self.sizes
        slot_bytes, capacity = sizes["dispatch_slot_bytes"], _CONFIG.num_max_rdma_chunked_recv_tokens
        ring = o["rdma_recv"] + self.stream(c, self.rank // RPN) * capacity * slot_bytes
        for k in range(first, first + count):
            slot = ring + (k % capacity) * slot_bytes
            self.net(VICTIM, slot, _ROW, torch.uint8).fill_(0x3F)
            self.net(VICTIM, slot + o["slot_topk"], _TOPK, torch.int32).copy_(torch.tensor([0, -1]))
            self.net(VICTIM, slot + o["slot_weights"], _TOPK, torch.float32).copy_(torch.tensor([1.0, 0.0]))
            index = k if token_index is None else token_index
            self.net(VICTIM, slot + o["slot_meta"], 4, torch.int32).copy_(torch.tensor([index, 0, 0, 0]))
            self.net(VICTIM, slot + o["slot_mask"], 1, torch.int32)[0] = 1 << (VICTIM % RPN)
        self.signal(VICTIM, o["sig_rdma_tail"] + self.stream(c, self.rank // RPN))[0] += count


def _victim_inputs(n, to=VICTIM):
    topk = torch.tensor([[2 * to, 2 * to + 1]] * n)
    in_rank = torch.zeros(n, RANKS, dtype=torch.bool)
    in_rank[:, to] = True
    per_expert = torch.bincount(topk.flatten(), minlength=_EXPERTS).to(torch.int32)
    x = torch.randn(n, _HIDDEN).to(torch.bfloat16)
    return x, dict(topk_idx=topk, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, config=_CONFIG)


def _canaries():
    g = torch.Generator().manual_seed(7)
    return [torch.randint(0, 2**31 - 1, (1 << k,), generator=g, dtype=torch.int64) for k in range(4, 17, 3)]


# What each faulty rank does in a stage (ranks without an entry stay idle: barrier, empty notify).
def _plays(hands: Hands, stage: str) -> None:
    me, zero = hands.rank, [0] * _EPR
    if stage == "negative channel count" and me == SOURCE:
        hands.enter_barrier(1)
        hands.notify([-5], [0], zero)
    elif stage == "channel counts whose int32 sum wraps" and me == LOCAL:
        hands.enter_barrier(1)
        hands.notify([_BIG], [0], zero)
    elif stage == "negative expert count" and me == IDLE:
        hands.enter_barrier(1)
        hands.notify([0], [0], [-1, 0])
    elif stage == "node count below the rank count" and me == SOURCE:
        hands.enter_barrier(1)
        hands.notify([3], [1], [3, 0])
    elif stage == "node counts whose int32 sum wraps" and me == SOURCE:
        hands.enter_barrier(1)
        hands.notify([0], [_BIG], zero)
    elif stage == "negative node count" and me == SOURCE:
        hands.enter_barrier(1)
        hands.notify([0], [-4], zero)
    elif stage == "source tail past its announced tokens" and me == SOURCE:
        hands.honest_notify(3)
        hands.signal(VICTIM, hands.off["sig_rdma_tail"] + hands.stream(0, SOURCE // RPN))[0] = 2**40
    elif stage == "source message with a negative token index" and me == SOURCE:
        hands.honest_notify(3)
        hands.send_messages(0, 3, token_index=-9)
    elif stage == "forwarder head past the tail" and me == SOURCE:
        # The victim's queue (c, node 1) here fills up (200 tokens, 32 slots): it reads the head.
        hands.signal(VICTIM, hands.off["sig_rdma_head"] + hands.stream(0, SOURCE // RPN))[0] = 2**40
        hands.idle()
    elif stage == "NVL tail past the announced tokens" and me == LOCAL:
        hands.honest_notify(3)
        hands.nvl_queue()[1][0] = 2**62
    elif stage == "forwarder passes another source's token" and me == LOCAL:
        hands.honest_notify(3)
        hands.fill_nvl(3, topk=0, src=IDLE, token_index=0)
    elif stage == "local expert id out of range" and me == LOCAL:
        hands.honest_notify(3)
        hands.fill_nvl(3, topk=_EPR + 5, src=LOCAL, token_index=0)
    elif stage == "negative source index" and me == LOCAL:
        hands.honest_notify(3)
        hands.fill_nvl(3, topk=-1, src=LOCAL, token_index=-9)
    elif stage == "combine: huge partial tail" and me == SOURCE:
        hands.idle()  # the victim's dispatch puts its 3 tokens into this rank's queue (32 slots)
        hands.enter_barrier(2)
        combine = Hands(hands.buffer, "combine", experts_per_rank=0)
        combine.signal(VICTIM, combine.off["sig_comb_tail"] + combine.stream(0, SOURCE // RPN))[0] = 2**62
    elif stage == "combine: source head past the tail" and me == SOURCE:
        # 40 messages for the victim (its queue holds 32: the rest once it returns credits), so its
        # combine sends 40 partials back and must wait for room in this rank's partial queue.
        capacity = _CONFIG.num_max_rdma_chunked_recv_tokens
        hands.honest_notify(40)
        hands.send_messages(0, capacity)
        credits = hands.signal(SOURCE, hands.off["sig_rdma_head"] + hands.stream(0, VICTIM // RPN))
        hands.wait(credits, 40 - capacity, "returning credits")
        hands.send_messages(capacity, 40 - capacity)
        combine = Hands(hands.buffer, "combine", experts_per_rank=0)
        combine.signal(VICTIM, combine.off["sig_comb_head"] + combine.stream(0, SOURCE // RPN))[0] = 2**40
        hands.enter_barrier(2)
    else:
        hands.idle()
        if stage.startswith("combine"):
            hands.enter_barrier(2)


STAGES = {  # stage: (what the victim raises, or None: it finishes with garbage values; its tokens go to)
    "negative channel count": (r"internode notify: rank 2 announced -5 tokens \(total so far 3\)", VICTIM),
    "channel counts whose int32 sum wraps": (r"rank 1 announced 2147483647 tokens \(total so far 3\)", VICTIM),
    "negative expert count": (r"internode notify: rank 3 sent -1 rows for local expert 0", VICTIM),
    "node count below the rank count": (r"rank 2 announced 1 tokens for this node but 3 for this rank", VICTIM),
    "node counts whose int32 sum wraps": (r"rank 2 announced 2147483647 tokens for this node \(total so far 3\)",
                                          VICTIM),
    "negative node count": (r"rank 2 announced -4 tokens for this node", VICTIM),
    "source tail past its announced tokens": (r"source 2 published 1099511627776 tokens, 3 expected", VICTIM),
    "source message with a negative token index": (r"source 2 sent token index -9", VICTIM),
    "forwarder head past the tail": (r"rank 2 released head 1099511627776 past this rank's tail 32", SOURCE),
    "NVL tail past the announced tokens": (r"forwarder rank 1 queued 4611686018427387904 tokens, 3 expected", VICTIM),
    "forwarder passes another source's token": (r"forwarder rank 1 passed a token of rank 3 where rank 1's were due",
                                                VICTIM),
    "local expert id out of range": (r"forwarder rank 1 passed local expert id 7 \(this rank has 2\)", VICTIM),
    "negative source index": (r"forwarder rank 1 passed source token index -9 of rank 1", VICTIM),
    "combine: huge partial tail": (None, SOURCE),
    "combine: source head past the tail": (r"internode combine: rank 2 released head 1099511627776 past this "
                                           r"rank's tail \d+", VICTIM),
}


def _buffer(ctx):
    nvl = _CONFIG.get_nvl_buffer_size_hint(_ROW, RANKS, ranks_per_node=RPN, num_topk=_TOPK)
    rdma = _CONFIG.get_rdma_buffer_size_hint(_ROW, RANKS, ranks_per_node=RPN, num_topk=_TOPK)
    return moelink.Buffer(ctx.group, nvl, rdma, ranks_per_node=RPN)


def _stage(ctx, stage):
    expected, to = STAGES[stage]
    buffer = _buffer(ctx)
    try:
        if ctx.rank != VICTIM:
            _plays(Hands(buffer), stage)
            outcome = "played"
        else:
            canaries = _canaries()
            x, layout = _victim_inputs(200 if stage == "forwarder head past the tail" else 3, to=to)
            if stage.startswith("combine"):
                recv, _, _, _, handle, _ = buffer.dispatch(x, **layout)
                if expected is None:
                    combined = buffer.combine(recv, handle, config=_CONFIG)[0]
                    assert combined.shape == x.shape  # garbage values: a peer's data is its own to get wrong
                    outcome = "finished"
                else:
                    with pytest.raises(errors.DeviceAssert, match=expected) as info:
                        buffer.combine(recv, handle, config=_CONFIG)
                    outcome = "raised"
            else:
                with pytest.raises(errors.DeviceAssert, match=expected) as info:
                    buffer.dispatch(x, **layout)
                outcome = "raised"
            if outcome == "raised":
                assert not isinstance(info.value, errors.RankMismatch)
                with pytest.raises(errors.BufferUnusable):
                    buffer.dispatch(x, **layout)
            assert all(torch.equal(a, b) for a, b in zip(canaries, _canaries())), "memory corrupted"
    finally:
        dist.barrier(group=ctx.group)  # the victim is done with the faulty ranks' windows before they go
        buffer.destroy()
    # Afterwards all ranks still work together on a fresh Buffer: no corruption, nothing hangs.
    with _buffer(ctx) as fresh:
        x, layout = _victim_inputs(4)
        recv, _, _, _, handle, _ = fresh.dispatch(x, **layout)
        assert recv.shape[0] == (4 * RANKS if ctx.rank == VICTIM else 0)
        assert torch.equal(fresh.combine(recv, handle, config=_CONFIG)[0], x * 1)
    return outcome


@pytest.mark.parametrize("stage", list(STAGES))
def test_victim_raises_naming_the_faulty_rank(group, stage):
    outcomes = group.run(_stage, stage)
    assert outcomes[1:] == ["played"] * (RANKS - 1)
    assert outcomes[VICTIM] == ("finished" if STAGES[stage][0] is None else "raised")
