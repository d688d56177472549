"""Path "low_latency": the low-latency dispatch and combine kernels (csrc/runtime/ops_low_latency.h,
DeepEP's low-latency mode) of every rank at once, through the ordinary bindings
(``module.low_latency.dispatch/combine``), checked against ``moelink.reference.low_latency``
after every call.

Transport: every put goes through the loopback (``ScaleOutKind::kLoopback``,
csrc/transport/proof/loopback.cuh), as in the internode path: every rank's scale-out window is
carved from one allocation and a put is the calling thread's copy plus a release add on the peer's
signal. With ``rpn`` 1 and no NVLink every message (to itself too) is a loopback put; with ``rpn``
2 and ``nvlink`` the ranks of a node pair reach each other with stores into each other's windows
(``node_windows``, the Buffer's ``allow_nvlink_for_low_latency_mode``), the other pairs through the
loopback. Windows are fresh per case; a case runs several calls on them, so both halves (call c
uses half c % 2) are reused.

Checks after every dispatch: recv_count; per (local expert, source) the rows layout_range gives,
grouped by source in rank order, their (token, slot) set from src_info, every row bit for bit the
reference encoding (bf16, FP8 with float32 / power-of-two / UE8M0 scales, MXFP8, NVFP4, LogFMT);
send_counts and send_slots. After every combine (expert outputs placed by the device's own handle,
unspecified rows NaN; or, zero-copy, written into the window's comb_send region): the output bit
for bit the reference combine (bf16 or LogFMT-n). moelink.autograd's entry points: a bf16 dispatch
carrying its weights replayed into an earlier dispatch's slots (rows w * x), the combine's slot
values. After every send half and every call: every rank's signal words and call count are what
the protocol says.
Byte counters: the loopback's (one counts message per rank reached by a put and one message per
(token, top-k slot) in a dispatch; one row per received (token, slot) in a combine) and the NVLink
one (the same, for the node's other rank). ``timeout_cases``: the last rank never launches a
dispatch (then: a combine); the others must come back with CommTimeout naming that kernel and peer;
in shrink mode its absence masks it after one deadline and the calls complete over the ranks left.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .._low_latency import gpu_grid_blocks
from ..reference import low_latency as ref
from .core import Case, RankGroup, Skip
from .low_latency_rig import (Rig, check_dispatch, dispatch_outputs, encode_all, expected_combine, expert_fn,
                              expert_outputs, global_scale, make_inputs, messages)

name = "low_latency"


def blocks_for(group: RankGroup, p: dict, W: int) -> int:
    """The grid of every low-latency kernel of the case. Host target: one block, as the Buffer's
    (LowLatencyState.num_blocks: its fibers run on one thread anyway) unless the case asks for
    more. GPU (blocks of W = the GPU build's 16 warps, which ops_low_latency.cu requires): the
    Buffer's grid (moelink._low_latency.gpu_grid_blocks), at most the SMs one rank gets: the R ranks' cooperative grids wait on each other, so all must be
    resident on the one GPU at once (the harness's co-residency probe checks it)."""
    if group.target != "cuda":
        return int(p.get("blocks", 1))
    R = group.num_ranks
    per_rank = max(1, group.backend.info["sm_count"] // R)
    return min(per_rank, gpu_grid_blocks(p["experts_per_rank"] * R, p["t_max"], W))


def cases(group: RankGroup) -> List[Case]:
    R, big = group.num_ranks, group.big
    pairs = R % 2 == 0  # nodes of 2 ranks
    H = 1024 if big else 128
    c = [Case("nic-bf16", dict(t_max=64 if big else 16, hidden=7168 if big else 256, topk=8 if big else 4,
                               experts_per_rank=8 if big else 4, rpn=1, nvlink=False, payloads=["bf16"],
                               combines=[None], iterations=2))]
    if pairs:
        c.append(Case("nvlink-pairs-fp8", dict(t_max=64 if big else 16, hidden=2 * H, topk=6, experts_per_rank=4,
                                               rpn=2, nvlink=True, payloads=["fp8", "fp8_ue8m0"], combines=[10],
                                               iterations=2)))
    c += [
        # 12 calls alternating the halves, every format (payloads and combines change call to call),
        # every other combine zero-copy (bf16, LogFMT-9, LogFMT-10 from the window's comb_send).
        Case("alternate-halves", dict(t_max=32 if big else 12, hidden=H, topk=4, experts_per_rank=2,
                                      rpn=2 if R >= 4 else 1, nvlink=R >= 4,
                                      payloads=["nvfp4", "mxfp8", "fp8_pow2", "logfmt10", "fp8", "bf16"],
                                      combines=[None, 10, 9], iterations=6, zero_copy=True)),
        # Send half, then the receive half as a separate launch (the hook): every message has landed
        # in between (the signal words say so) while no kernel of the call runs.
        Case("hook-halves", dict(t_max=32 if big else 16, hidden=H, topk=4, experts_per_rank=3, rpn=1, nvlink=False,
                                 payloads=["fp8", "mxfp8"], combines=[None, 10], iterations=2, hook=True)),
        # A rank with no tokens, one with the maximum, many -1 slots; the combine drops some sent slots.
        Case("empty-and-dropped", dict(t_max=24, hidden=H, topk=8, experts_per_rank=4, rpn=2 if pairs else 1,
                                       nvlink=pairs, tokens=[0] + [24] * (R - 1), drop=0.4, combine_drop=0.3,
                                       payloads=["bf16", "nvfp4"], combines=[10, None], iterations=2)),
        # Autograd's entry points: a dispatch replayed into the first one's slots with carried
        # weights (the receiver stores w * row); the combine on the replay's handle, its slot values.
        Case("weights-replay", dict(t_max=16, hidden=H, topk=4, experts_per_rank=2, rpn=2 if pairs else 1,
                                    nvlink=pairs, payloads=["bf16", "fp8"], combines=[None], iterations=2,
                                    replay=True)),
        Case("all-empty", dict(t_max=8, hidden=128, topk=2, experts_per_rank=1, rpn=1, nvlink=False, tokens=[0] * R,
                               payloads=["fp8"], combines=[None], iterations=2)),
        # Host: several blocks of few warps (the GPU's multi-block receive split and last-block
        # bookkeeping) and the GPU's (warp) form of the in-kernel encoders.
        Case("blocks-warp-form", dict(t_max=16, hidden=256, topk=3, experts_per_rank=2, rpn=1, nvlink=False,
                                      blocks=3, block_warps=2, split=1, payloads=["mxfp8", "nvfp4", "fp8_ue8m0"],
                                      combines=[9], iterations=2)),
    ]
    return c


def timeout_cases(group: RankGroup) -> List[Case]:
    base = dict(t_max=8, hidden=128, topk=2, experts_per_rank=2, rpn=1, nvlink=False, payloads=["bf16"],
                combines=[None], iterations=1)
    return [Case("absent-in-dispatch", dict(base, absent="dispatch"), kind="timeout"),
            Case("absent-in-combine", dict(base, absent="combine"), kind="timeout"),
            # Shrink mode: the absent rank is masked after one deadline, the call completes, the next
            # calls skip it. One block on the host (several: tests/test_proof_low_latency.py); the
            # GPU runs its grid.
            Case("shrink-absent", dict(base, topk=3, rpn=2 if group.num_ranks % 2 == 0 else 1,
                                       nvlink=group.num_ranks % 2 == 0, payloads=["fp8", "bf16"], iterations=3,
                                       shrink=True, victim_from=1, blocks=1, block_warps=4), kind="timeout"),
            Case("after-timeout", dict(base, iterations=2), kind="recovery")]


def run(group: RankGroup, case: Case):
    return _run(group, case)


def _run(group: RankGroup, case: Case, absent: Optional[str] = None) -> Dict:
    p, R, m = case.params, group.num_ranks, group.module
    L = p["rpn"]
    if R % L:
        raise Skip(f"{R} ranks cannot form nodes of {L}")
    gpu = group.target == "cuda"
    W = m.intranode.GPU_BLOCK_WARPS if gpu else p.get("block_warps", m.intranode.GPU_BLOCK_WARPS)
    blocks = blocks_for(group, p, W)
    ll = m.low_latency
    SEND, RECV = ll.SEND_PHASE, ll.RECV_PHASE
    T, H, K, EL = p["t_max"], p["hidden"], p["topk"], p["experts_per_rank"]
    E = EL * R
    details = {"blocks": blocks, "block_warps": W, "nodes": R // L, "ranks_per_node": L, "nvlink": p["nvlink"],
               "calls": 0, "loopback_bytes": 0, "nvlink_bytes": 0}
    group.coresidency.clear()
    with group.scratch() as mem:
        rig = Rig(group, mem, t_max=T, hidden=H, experts=E, topk=K, rpn=L, nvlink=p["nvlink"], block_warps=W,
                  blocks=blocks, payloads=p["payloads"], combines=p["combines"], split=p.get("split", 0),
                  zero_copy=p.get("zero_copy", False), carry_weights=p.get("replay", False),
                  shrink=p.get("shrink", False))
        cum = [mem.empty((EL,), torch.int32) for _ in range(R)]
        wait = [mem.empty((R,), torch.int64) for _ in range(R)]
        total_recv = [torch.zeros(EL, dtype=torch.int32) for _ in range(R)]
        for it in range(p["iterations"]):
            payload = p["payloads"][it % len(p["payloads"])]
            bits = p["combines"][it % len(p["combines"])]
            xs, idx, weights = make_inputs(case.seed * 100 + it, R, p)
            # Shrink mode ("shrink-absent"): from call pair `victim_from` on the last rank never
            # launches; the others' wait for it expires in that dispatch (it is masked there, the call
            # completes) and later calls skip it from the start. The reference: the ranks left.
            gone = {R - 1} if p.get("shrink") and it >= p["victim_from"] else set()
            masked = gone if gone and it > p["victim_from"] else set()  # masked before the call starts
            live = [r for r in range(R) if r not in gone]
            seen_x = [x[:0] if s in gone else x for s, x in enumerate(xs)]
            seen_idx = [i[:0] if s in gone else i for s, i in enumerate(idx)]
            msgs = messages(seen_idx, R, EL)  # (token, slot) pairs each rank addresses to each rank
            sent = msgs.clone()
            sent[:, sorted(masked)] = 0  # token messages that went out
            count_msgs = torch.ones(R, R, dtype=torch.int64)
            count_msgs[sorted(gone), :] = 0
            count_msgs[:, sorted(masked)] = 0
            gs = [global_scale(x) if payload == "nvfp4" else None for x in xs]
            lay = rig.layout(payload)
            x_ptr = [mem.upload(x) for x in xs]
            idx_ptr = [mem.upload(i) for i in idx]
            g_ptr = [mem.upload(g) for g in gs] if payload == "nvfp4" else [0] * R
            outs = [dispatch_outputs(mem, payload, EL, R, T, H) for _ in range(R)]
            slots = [mem.empty((x.shape[0], K), torch.int32, fill=0x7f) for x in xs]
            counts = [mem.empty((R,), torch.int32, fill=0xff) for _ in range(R)]

            def dispatch(r, s, phases):
                o = outs[r]
                ll.dispatch(rig.context(r, payload), phases, blocks, xs[r].shape[0], x_ptr[r], idx_ptr[r], 0, g_ptr[r],
                            0, False, slots[r].ptr, counts[r].ptr, o["x"].ptr, o["scales"].ptr if o["scales"] is not None else 0,
                            o["g"].ptr if o["g"] is not None else 0, o["count"].ptr, o["src_info"].ptr, o["layout_range"].ptr,
                            cum[r].ptr, wait[r].ptr, stream=s, rank=r)
            present = [r for r in live if r != R - 1] if absent == "dispatch" else live
            _call(group, rig, "low-latency dispatch", dispatch, p.get("hook"), SEND, RECV, present,
                  lambda: rig.note_dispatch(sent, count_msgs))
            want = ref.low_latency_dispatch(seen_x, seen_idx, E, payload, global_scales=gs)
            encoded = encode_all(seen_x, payload, gs)
            for r in live:
                check_dispatch(r, rig, seen_x, seen_idx, payload, encoded, outs[r], slots[r].get(), counts[r].get(),
                               sent, want, masked)
                total_recv[r] += outs[r]["count"].get()
                assert torch.equal(cum[r].get(), total_recv[r]), f"rank {r}: cumulative_local_expert_recv_stats"
                assert bool((wait[r].get() >= 0).all()), f"rank {r}: dispatch_wait_recv_cost_stats"
            _check_bytes(rig, "dispatch", sent * lay["msg_bytes"] + count_msgs * lay["count_bytes"], details)
            slot_values = None
            if p.get("replay"):  # the combine then runs on the replay's handle, with its slot values
                outs, slots, counts = _replay(group, rig, mem, xs, idx, weights, x_ptr, idx_ptr, outs, slots, msgs,
                                              details)
                slot_values = [mem.empty((x.shape[0], K, H), torch.bfloat16, fill=0xcd) for x in xs]

            # Combine: each expert returns expert_fn(its rows), placed by the device's handle; every
            # other call of a zero-copy case writes them into the window's comb_send region instead.
            zero_copy = p.get("zero_copy", False) and it % 2 == 0
            cpay = rig.combine_payload(bits)
            expert_rows = [expert_outputs(r, rig, seen_x, outs[r]) if r in live else None for r in range(R)]
            if zero_copy:
                for r in live:
                    rig.write_combine_buffer(r, cpay, expert_rows[r])
            ys = [0 if zero_copy or rows is None else mem.upload(rows) for rows in expert_rows]
            cidx = [i.clone() for i in idx]
            if p.get("combine_drop"):
                gen = torch.Generator().manual_seed(case.seed * 100 + it + 50)
                for i in cidx:
                    i[torch.rand(i.shape, generator=gen) < p["combine_drop"]] = -1
            # The slots of a gone rank's experts add nothing (shrink: no renormalising).
            expect_idx = [torch.where((i // EL).unsqueeze(-1).eq(torch.tensor(sorted(gone))).any(-1), -1, i)
                          if gone else i for i in cidx]
            back = msgs.clone()  # rows that come back: at source r from expert rank s
            back[:, sorted(gone)] = 0
            done = torch.ones(R, R, dtype=torch.int64)
            done[:, sorted(gone)] = 0
            cidx_ptr = [mem.upload(i) for i in cidx]
            w_ptr = [mem.upload(w) for w in weights]
            combined = [mem.empty((x.shape[0], H), torch.bfloat16, fill=0xcd) for x in xs]

            def combine(r, s, phases):
                o = outs[r]
                ll.combine(rig.context(r, cpay, zero_copy), phases, blocks, ys[r], o["src_info"].ptr, o["layout_range"].ptr,
                           xs[r].shape[0], cidx_ptr[r], w_ptr[r], slots[r].ptr, counts[r].ptr, combined[r].ptr,
                           slot_values[r].ptr if slot_values else 0, 0, stream=s, rank=r)
            present = [r for r in live if r != R - 1] if absent == "combine" else live
            _call(group, rig, "low-latency combine", combine, p.get("hook"), SEND, RECV, present,
                  lambda: rig.note_combine(back, done))
            for r in live:
                want_c = expected_combine(xs[r], expect_idx[r], weights[r], bits)
                assert torch.equal(combined[r].get().view(torch.int16), want_c.view(torch.int16)), \
                    f"rank {r}: combined_x ({cpay}{', zero-copy' if zero_copy else ''}, call {rig.calls}) differs " \
                    "from the reference (bit for bit)"
                if slot_values:
                    valid = cidx[r] >= 0
                    rows = expert_fn(xs[r].unsqueeze(1), cidx[r].clamp_min(0).unsqueeze(-1))
                    assert torch.equal(slot_values[r].get()[valid].view(torch.int16), rows[valid].view(torch.int16)), \
                        f"rank {r}: slot_values (the rows returned per top-k slot)"
            _check_bytes(rig, "combine", back.t() * rig.layout(cpay)["comb_msg_bytes"], details)
        if p.get("shrink"):
            for r in live:
                assert rig.mask(r) == [int(d in gone) for d in range(R)], f"rank {r}: mask {rig.mask(r)}, gone {gone}"
    details["calls"] = rig.calls
    if group.coresidency:
        details["coresidency"] = dict(group.coresidency)
    details["summary"] = (f"nodes={R // L}x{L}{' nvl' if p['nvlink'] else ''} blocks={blocks} W={W} calls={rig.calls} "
                          f"net={details['loopback_bytes']}B nvl={details['nvlink_bytes']}B")
    return details


def _replay(group, rig, mem, xs, idx, weights, x_ptr, idx_ptr, outs, slots, msgs, details):
    """moelink.autograd's entry points: bf16 rows carrying their top-k weights, replayed into the
    receive slots of the dispatch just made (its send_slots as cached_slots), the receiver storing
    w * row. Same counts, layout and src_info as that dispatch, the same send_slots, every row
    (w * x) in bf16 bit for bit. Returns the replay's outputs, send_slots and send_counts."""
    R, EL, K, T, H, ll = rig.R, rig.EL, rig.K, rig.T, rig.H, rig.ll
    w_ptr = [mem.upload(w) for w in weights]
    outs2 = [dispatch_outputs(mem, "bf16", EL, R, T, H) for _ in range(R)]
    slots2 = [mem.empty((x.shape[0], K), torch.int32, fill=0x7f) for x in xs]
    counts2 = [mem.empty((R,), torch.int32, fill=0xff) for _ in range(R)]

    def dispatch(r, s):
        o = outs2[r]
        ll.dispatch(rig.context(r, "bf16", carry=True), ll.SEND_PHASE | ll.RECV_PHASE, rig.blocks, xs[r].shape[0],
                    x_ptr[r], idx_ptr[r], w_ptr[r], 0, slots[r].ptr, True, slots2[r].ptr, counts2[r].ptr, o["x"].ptr, 0,
                    0, o["count"].ptr, o["src_info"].ptr, o["layout_range"].ptr, 0, 0, stream=s, rank=r)
    group.run_all("low-latency dispatch (weights, replay)", dispatch)
    rig.note_dispatch(msgs)
    rig.check_words("after a replayed dispatch")
    for r in range(R):
        a, b = outs[r], outs2[r]
        count, ranges, info = a["count"].get(), a["layout_range"].get(), a["src_info"].get()
        assert torch.equal(b["count"].get(), count) and torch.equal(b["layout_range"].get(), ranges),             f"rank {r}: the replay's recv_count / layout_range differ from its dispatch's"
        assert torch.equal(slots2[r].get(), slots[r].get()), f"rank {r}: the replay's send_slots"
        info2, rows = b["src_info"].get(), b["x"].get()
        for e in range(EL):
            assert torch.equal(info2[e, :int(count[e])], info[e, :int(count[e])]), f"rank {r}: the replay's src_info"
            for s in range(R):
                n, begin = int(ranges[e, s]) & 0xFFFFFFFF, int(ranges[e, s]) >> 32
                t, k = info[e, begin:begin + n].long() // K, info[e, begin:begin + n].long() % K
                want = (weights[s][t, k].unsqueeze(1) * xs[s][t].float()).to(torch.bfloat16)
                assert torch.equal(rows[e, begin:begin + n].view(torch.int16), want.view(torch.int16)), \
                    f"rank {r}: replayed rows of expert {e} from source {s} are not w * x"
    lay = rig.layout("bf16", carry=True)
    _check_bytes(rig, "replayed dispatch", msgs * lay["msg_bytes"] + lay["count_bytes"], details)
    return outs2, slots2, counts2


def _call(group, rig, what, launch, hook, SEND, RECV, ranks, note):
    """One call on every rank of `ranks`: in one launch, or (hook) the send half, the protocol's
    words checked (every message landed), then the receive half as a launch of its own."""
    if hook:
        group.run_all(f"{what} (send half)", lambda r, s: launch(r, s, SEND), ranks=ranks)
        note()
        rig.check_words(f"after the send half of {what}", ranks)
        group.run_all(f"{what} (receive hook)", lambda r, s: launch(r, s, RECV), ranks=ranks)
    else:
        group.run_all(what, lambda r, s: launch(r, s, SEND | RECV), ranks=ranks)
        note()
    rig.check_words(f"after {what}", ranks)


def _check_bytes(rig: Rig, what: str, per_peer: torch.Tensor, details: dict) -> None:
    """per_peer[r][d]: bytes rank r sends to rank d in this call; the loopback counts the puts, the
    NVLink counter the stores into the node's other windows."""
    got_rdma, got_nvl = rig.read_bytes()
    want_rdma, want_nvl = rig.expected_bytes(per_peer)
    for r in range(rig.R):
        assert got_rdma[r] == want_rdma[r], f"rank {r}: {what} moved {got_rdma[r]} loopback bytes, expected {want_rdma[r]}"
        assert got_nvl[r] == want_nvl[r], f"rank {r}: {what} stored {got_nvl[r]} NVLink bytes, expected {want_nvl[r]}"
    details["loopback_bytes"] += sum(got_rdma)
    details["nvlink_bytes"] += sum(got_nvl)


def run_timeout(group: RankGroup, case: Case, host_deadline_s: float = 2.0):
    """The last rank never launches the dispatch (or the combine): every other rank comes back with
    CommTimeout naming that low-latency kernel and the absent peer, having waited out the deadline,
    and the execution context stays intact."""
    import time

    from .. import runtime
    from ..errors import CommTimeout
    previous = runtime.wait_timeout()
    if group.target == "host":
        runtime.set_wait_timeout(host_deadline_s)
    start = time.monotonic()
    if case.params.get("shrink"):  # no error: the wait expires, masks the peer, the calls complete
        try:
            details = _run(group, case)
        finally:
            runtime.set_wait_timeout(previous)
        details["waited_s"] = waited = time.monotonic() - start
        if group.target == "host":
            assert waited >= host_deadline_s, f"the absent rank was masked after {waited:.2f} s, before the deadline"
        return details
    missing, kernel = group.num_ranks - 1, f"low-latency {case.params['absent']}"
    try:
        _run(group, case, absent=case.params["absent"])
    except CommTimeout as exc:
        failed, errors = getattr(exc, "failed_ranks", []), getattr(exc, "rank_errors", {})
    else:
        raise AssertionError(f"{kernel} without rank {missing} returned normally")
    finally:
        runtime.set_wait_timeout(previous)
        group.reset()
    waited = time.monotonic() - start
    assert failed == [r for r in range(group.num_ranks) if r != missing], f"ranks {failed} failed: {errors}"
    if group.target == "host":
        assert waited >= host_deadline_s, f"the ranks gave up after {waited:.2f} s, before the {host_deadline_s} s deadline"
    for r, e in errors.items():
        text = str(e)
        assert isinstance(e, CommTimeout) and kernel in text, f"rank {r}: {type(e).__name__}: {e}"
        assert f"from peer {missing}" in text, f"rank {r}: the timeout does not name the absent peer {missing}: {e}"
    broken = group.backend.healthy()
    assert broken is None, f"context not intact after the timeout: {broken}"
    first = str(errors[min(errors)])
    return {"summary": first[:150], "message": first, "waited_s": waited}
