"""Path "intranode": layout -> notify -> dispatch (-> cached dispatch) -> combine on every rank at
once, through the ordinary bindings, chained on the device (each step reads the previous step's
device outputs), checked against ``moelink.reference`` after every step:

- notify: received rows and per-expert counts (aligned) exactly; per-sender row ranges;
- dispatch: rows (bf16 or FP8 codes + scales), top-k ids and weights, source indices, bit for bit;
  ``send_head`` is -1 exactly where a token is not sent; the NVL byte counter equals the slots that
  crossed to another rank times the slot size;
- combine: bit for bit when the case's values make every float32 sum exact (``exact``: expert rows
  and biases on a grid of quarters, weights on a grid of 1/64, so any summation order gives the
  reference's value), else within the reference's rounding bound (``assert_combine_close``).

Cases vary rank count (the group's), SM budget, block maps (sub-channels S; on the host also the
block's warp count W, down to W < R where one warp serves several peers), queue size (queues
that wrap many times), FP8 payloads, ``num_worst_tokens`` (notify and dispatch queued back to back
with no host wait) and skewed or empty routings. ``timeout_cases`` force a timeout: one rank never
launches a step, the others must come back with CommTimeout naming the absent peer.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .. import reference
from ..reference.dispatch import assert_combine_close
from .core import Case, RankGroup, Skip

name = "intranode"

def _sms(group: RankGroup, requested) -> int:
    """The per-rank SM budget: "fit" = the most that lets every rank's grid be resident at once."""
    if requested != "fit":
        return int(requested)
    if group.target != "cuda":
        return 4
    per_rank = group.backend.info["sm_count"] // group.num_ranks
    return max(2, min(128, per_rank - per_rank % 2))


def cases(group: RankGroup) -> List[Case]:
    r, gpu, big = group.num_ranks, group.target == "cuda", group.big
    n = 2048 if big else 96
    w_small = 4 if r > 4 else 2  # host: W < R at 4 ranks (several peers per warp)
    c = [
        Case("random-bf16", dict(tokens=n, hidden=1024 if big else 128, topk=8, experts_per_rank=4, num_sms="fit",
                                 exact=True)),
        Case("deepseek-shape", dict(tokens=n, hidden=7168, topk=8, experts_per_rank=8, num_sms="fit", exact=True,
                                    max_tokens=True)),
        Case("wrap-tiny-queues", dict(tokens=4 * n if big else 200, hidden=256 if big else 64, topk=4,
                                      experts_per_rank=2, num_sms=4 if big else 2, queue=r, send_chunk=1,
                                      sub_channels=1, exact=True, min_wraps=8)),
        Case("maps-one-sub-channel", dict(tokens=n, hidden=512 if big else 64, topk=6, experts_per_rank=3, num_sms="fit",
                                          sub_channels=1, exact=True)),
        Case("fp8-payload", dict(tokens=n, hidden=2048 if big else 256, topk=8, experts_per_rank=2, num_sms="fit",
                                 fp8=True, exact=True)),
        Case("worst-cached-align", dict(tokens=n, hidden=256 if big else 64, topk=4, experts_per_rank=2, num_sms="fit",
                                        worst=True, cached=True, expert_alignment=128, exact=True)),
        Case("skew-empty-bias", dict(tokens=n, hidden=256 if big else 64, topk=8, experts_per_rank=4, num_sms="fit",
                                     skew=True, empty_rank=True, bias="pair", exact=False)),
    ]
    if not gpu:
        c.append(Case("maps-few-warps", dict(tokens=n, hidden=64, topk=4, experts_per_rank=2, num_sms=2,
                                             block_warps=w_small, queue=16, exact=True)))
    else:
        c.append(Case("sms-2", dict(tokens=n // 2, hidden=1024 if big else 128, topk=8, experts_per_rank=4, num_sms=2, exact=True)))
    return c


def timeout_cases(group: RankGroup) -> List[Case]:
    base = dict(tokens=64, hidden=64, topk=4, experts_per_rank=2, num_sms=2, exact=True)
    return [Case("absent-in-notify", dict(base, absent="notify"), kind="timeout"),
            Case("absent-in-dispatch", dict(base, absent="dispatch", tokens=400, queue=group.num_ranks), kind="timeout"),
            Case("after-timeout", dict(base, tokens=300), kind="recovery")]


# ---- inputs -------------------------------------------------------------------------------------

def _inputs(case: Case, ranks: int):
    p = case.params
    gen = torch.Generator().manual_seed(case.seed)
    experts = p["experts_per_rank"] * ranks
    xs, idx, weights = [], [], []
    for r in range(ranks):
        n = p["tokens"] if p.get("max_tokens") else int(torch.randint(p["tokens"] // 2, p["tokens"] + 1, (1,), generator=gen))
        if p.get("empty_rank") and r == ranks - 1:
            n = 0
        x = torch.randn(n, p["hidden"], generator=gen).to(torch.bfloat16)
        topk = torch.randint(-1, experts, (n, p["topk"]), generator=gen)
        if p.get("skew"):
            topk = torch.where(torch.rand(n, p["topk"], generator=gen) < 0.9, topk % p["experts_per_rank"], topk)
        if p.get("exact"):
            w = torch.randint(0, 65, (n, p["topk"]), generator=gen).float() / 64
        else:
            w = torch.rand(n, p["topk"], generator=gen)
        if p.get("fp8"):
            codes = torch.randint(0, 256, (n, p["hidden"]), generator=gen, dtype=torch.uint8)
            x = (codes, torch.rand(n, (p["hidden"] + 127) // 128, generator=gen) + 0.5)
        xs.append(x)
        idx.append(topk)
        weights.append(w)
    return xs, idx, weights, experts


def _expert(rows: torch.Tensor, exact: bool) -> torch.Tensor:
    """What each rank's experts return for its received rows (a function of the row)."""
    rows = rows.float()
    if exact:  # quarters in [-4, 4]: every sum of a few of them is exact in float32 and in bf16
        return (torch.round(rows * 4).clamp(-16, 16) / 4).to(torch.bfloat16)
    return (rows * 0.5 + 1.0).to(torch.bfloat16)


def _combine_rows(case: Case, dispatched, gen: torch.Generator, hidden: int) -> List[torch.Tensor]:
    if case.params.get("fp8"):  # the payload is not bf16: the experts return fresh rows
        return [_expert(torch.randn(d.num_recv_tokens, hidden, generator=gen), True) for d in dispatched]
    return [_expert(d.recv_x, case.params.get("exact", True)) for d in dispatched]


def _biases(case: Case, xs, gen: torch.Generator, hidden: int):
    kind = case.params.get("bias")
    if kind is None:
        return None
    exact = case.params.get("exact", True)
    make = lambda n: _expert(torch.randn(n, hidden, generator=gen), exact)  # noqa: E731
    rows = [(x[0] if isinstance(x, tuple) else x).shape[0] for x in xs]
    return [(make(n), make(n)) if kind == "pair" else make(n) for n in rows]


# ---- the case -----------------------------------------------------------------------------------

class _Rank:
    """One rank's device buffers for the case (all carved by the case's Scratch)."""


def run(group: RankGroup, case: Case):
    return _run(group, case)


def _native(group: RankGroup, rank: int, shape: dict, windows: List[int], counter: int):
    return group.module.intranode.Node(rank=rank, windows=windows, nvl_bytes=counter, **shape)


def _run(group: RankGroup, case: Case, absent: Optional[str] = None) -> Dict:
    p, R = case.params, group.num_ranks
    m = group.module
    im = m.intranode
    gpu = group.target == "cuda"
    warps = im.GPU_BLOCK_WARPS if gpu else p.get("block_warps", im.GPU_BLOCK_WARPS)
    num_sms = _sms(group, p.get("num_sms", "fit"))
    channels = num_sms // 2
    queue = p.get("queue", 64)
    send_chunk = p.get("send_chunk", 6)
    default_s = im.default_sub_channels(R, warps, channels, queue)
    sub = min(p.get("sub_channels", default_s), default_s)
    fp8 = p.get("fp8", False)
    hidden, topk = p["hidden"], p["topk"]
    xs, idx, weights, experts = _inputs(case, R)
    epr = p["experts_per_rank"]
    alignment = p.get("expert_alignment", 1)
    counts = [(x[0] if isinstance(x, tuple) else x).shape[0] for x in xs]
    worst = sum(counts) if p.get("worst") else 0
    row_bytes = hidden if fp8 else 2 * hidden
    num_scales = xs[0][1].shape[1] if fp8 else 0
    d_shape = dict(num_ranks=R, num_channels=channels, block_warps=warps, sub_channels=sub, queue_tokens=queue,
                   row_bytes=row_bytes, num_scales=num_scales, num_topk=topk, experts_per_rank=epr)
    c_shape = dict(d_shape, row_bytes=2 * hidden, num_scales=0, experts_per_rank=0)
    probe = im.Node(rank=0, windows=[0] * R, **d_shape)
    if not probe.map_valid:
        raise Skip(f"no warp map for {R} ranks, W={warps}, S={sub}, queue {queue}")
    needed = max(probe.window_bytes_needed, im.Node(rank=0, windows=[0] * R, **c_shape).window_bytes_needed)
    windows = group.windows("nvl", needed)
    counters = group.counters()
    group.read_counters(clear=True)
    dnodes = [_native(group, r, d_shape, windows, counters[r]) for r in range(R)]
    cnodes = [_native(group, r, c_shape, windows, counters[r]) for r in range(R)]
    V = probe.virtual_channels
    want = reference.intranode_dispatch(xs, idx, experts, weights, expert_alignment=alignment, num_worst_tokens=worst)
    group.coresidency.clear()
    details = {"num_sms": num_sms, "block_warps": warps, "sub_channels": sub, "queue": queue,
               "capacity": probe.queue_capacity, "virtual_channels": V}

    with group.scratch() as mem:
        rk = [_Rank() for _ in range(R)]
        for r in range(R):
            k = rk[r]
            k.n = counts[r]
            payload = xs[r][0] if fp8 else xs[r]
            k.x = mem.upload(payload)
            k.scales = mem.upload(xs[r][1]) if fp8 else 0
            k.idx = mem.upload(idx[r])
            k.w = mem.upload(weights[r])
            k.per_rank = mem.empty((R,), torch.int32)
            k.per_expert = mem.empty((experts,), torch.int32)
            k.in_rank = mem.empty((k.n, R), torch.bool)
            k.starts = mem.empty((R * V + 1,), torch.int32, fill=0xff)
            k.counts = mem.empty((1 + epr,), torch.int32, fill=0xff)
            k.send_head = mem.empty((k.n, R), torch.int32, fill=0x7f)

        # layout: the routing's counts and is_token_in_rank, read by notify and dispatch below.
        def layout(r, s):
            k = rk[r]
            m.dispatch_layout(k.idx, 8, k.n, topk, topk, experts, R, R, k.per_rank.ptr, 0, k.per_expert.ptr,
                              k.in_rank.ptr, stream=s, rank=r)
        group.run_all("dispatch_layout", layout, check_fit=False)

        def alloc_outputs(k, rows):
            k.rows = rows
            k.recv_x = mem.empty((rows, row_bytes), torch.uint8, fill=0xcd)
            k.recv_scales = mem.empty((rows, num_scales), torch.float32, fill=0xcd) if fp8 else None
            k.recv_idx = mem.empty((rows, topk), torch.int64, fill=0xff)
            k.recv_w = mem.empty((rows, topk), torch.float32)
            k.recv_src = mem.empty((rows,), torch.int32, fill=0xff)

        def notify(r, s):
            k = rk[r]
            im.notify(dnodes[r], k.n, k.in_rank.ptr, k.per_expert.ptr, alignment, k.starts.ptr, k.counts.ptr,
                      stream=s, rank=r)

        def dispatch(r, s, cached=False):
            k = rk[r]
            im.dispatch(dnodes[r], cached, send_chunk, k.n, k.x, k.scales, k.idx, k.w, k.in_rank.ptr, k.starts.ptr,
                        k.send_head.ptr, k.recv_x.ptr, k.recv_scales.ptr if fp8 else 0, k.recv_idx.ptr, k.recv_w.ptr,
                        k.recv_src.ptr, stream=s, rank=r)

        everyone = range(R)
        present = [r for r in everyone if r != R - 1] if absent else list(everyone)
        if worst:
            for k in rk:
                alloc_outputs(k, worst)
            group.run_all("intranode notify+dispatch", lambda r, s: (notify(r, s), dispatch(r, s)))
        else:
            group.run_all("intranode notify", notify, ranks=present if absent == "notify" else everyone)
            for r in range(R):
                got = rk[r].counts.get()
                w = want[r]
                assert int(got[0]) == w.num_recv_tokens, f"rank {r}: notify counted {int(got[0])} rows, reference {w.num_recv_tokens}"
                assert got[1:].tolist() == w.num_recv_tokens_per_expert_list, f"rank {r}: per-expert counts"
                alloc_outputs(rk[r], w.num_recv_tokens)
            group.run_all("intranode dispatch", dispatch, ranks=present if absent == "dispatch" else everyone)
        _check_dispatch(group, rk, want, xs, fp8, worst, R, V)
        details["dispatch_bytes"] = _check_bytes(group, want, counts, R, row_bytes + 4 * num_scales + 8 * topk + 4, "dispatch")
        details["max_wraps"] = _wraps(want, counts, R, V, probe.queue_capacity)
        if p.get("min_wraps"):
            assert details["max_wraps"] >= p["min_wraps"], f"case design: queues wrapped only {details['max_wraps']:.1f} times"

        if p.get("cached"):
            first = [k.recv_x.get() for k in rk]
            for k in rk:
                alloc_outputs(k, k.rows)
            group.run_all("intranode cached dispatch", lambda r, s: dispatch(r, s, cached=True))
            for r, k in enumerate(rk):
                assert torch.equal(k.recv_x.get()[:want[r].num_recv_tokens], first[r][:want[r].num_recv_tokens]), \
                    f"rank {r}: cached dispatch rows differ"
            group.read_counters(clear=True)

        # combine: the experts' rows go back to their tokens' ranks and are summed there.
        gen = torch.Generator().manual_seed(case.seed + 1)
        plain = reference.intranode_dispatch(xs, idx, experts, weights)
        rows = _combine_rows(case, plain, gen, hidden)
        biases = _biases(case, xs, gen, hidden)
        for r, k in enumerate(rk):
            k.y = mem.upload(rows[r])
            pair = biases[r] if biases is not None else (None, None)
            pair = pair if isinstance(pair, tuple) else (pair, None)
            k.bias = [mem.upload(b) for b in pair]
            k.out = mem.empty((k.n, hidden), torch.bfloat16, fill=0xcd)
            k.out_w = mem.empty((k.n, topk), torch.float32, fill=0xcd)

        def combine(r, s):
            k = rk[r]
            im.combine(cnodes[r], send_chunk, hidden, want[r].num_recv_tokens, k.y, k.recv_w.ptr, k.starts.ptr, k.n,
                       k.in_rank.ptr, k.send_head.ptr, k.bias[0], k.bias[1], k.out.ptr, k.out_w.ptr, stream=s, rank=r)
        group.run_all("intranode combine", combine)
        returned_w = [d.recv_topk_weights.float() for d in plain]
        expected = reference.intranode_combine(rows, plain, counts, returned_w, biases)
        for r, k in enumerate(rk):
            got, got_w = k.out.get(), k.out_w.get()
            if p.get("exact", True):
                assert torch.equal(got.view(torch.int16), expected[r].combined_x.to(torch.bfloat16).view(torch.int16)), \
                    f"rank {r}: combined_x differs from the reference (bit for bit)"
                assert torch.equal(got_w, expected[r].combined_topk_weights.float()), f"rank {r}: combined_topk_weights"
            else:
                assert_combine_close(got, got_w, expected[r], context=f"rank {r}")
        details["combine_bytes"] = _check_bytes(group, plain, counts, R, 2 * hidden + 4 * topk, "combine", back=True)
    if group.coresidency:  # GPU: each step's grids, registers, shared memory and SMs needed
        details["coresidency"] = dict(group.coresidency)
    details["summary"] = (f"sms={num_sms} W={warps} S={sub} cap={probe.queue_capacity} wraps={details['max_wraps']:.1f} "
                          f"rows={sum(w.num_recv_tokens for w in want)}")
    return details


def _check_dispatch(group, rk, want, xs, fp8, worst, R, V):
    for r, k in enumerate(rk):
        w = want[r]
        mrows = w.num_recv_tokens
        got = k.recv_x.get()[:mrows]
        ref_x = w.recv_x[0] if fp8 else w.recv_x
        assert torch.equal(got, ref_x[:mrows].contiguous().view(torch.uint8).reshape(mrows, -1)), f"rank {r}: recv_x"
        if fp8:
            assert torch.equal(k.recv_scales.get()[:mrows], w.recv_x[1][:mrows]), f"rank {r}: recv_x scales"
        assert torch.equal(k.recv_idx.get()[:mrows], w.recv_topk_idx[:mrows]), f"rank {r}: recv_topk_idx"
        assert torch.equal(k.recv_w.get()[:mrows], w.recv_topk_weights[:mrows].float()), f"rank {r}: recv_topk_weights"
        assert torch.equal(k.recv_src.get()[:mrows].long(), w.recv_src_idx[:mrows]), f"rank {r}: recv_src_idx"
        if worst:
            assert bool((k.recv_idx.get()[mrows:] == -1).all()), f"rank {r}: padding rows' top-k ids were written"
        starts = k.starts.get().long()
        assert int(starts[-1]) == mrows, f"rank {r}: recv_channel_start ends at {int(starts[-1])}, {mrows} received"
        for s in range(R):
            n_from_s = int((w.recv_src_rank[:mrows] == s).sum())
            assert int(starts[(s + 1) * V] - starts[s * V]) == n_from_s, f"rank {r}: rows from sender {s}"
        sent = k.in_rank.get()
        head = k.send_head.get()
        assert bool(((head == -1) == ~sent).all()), f"rank {r}: send_head is -1 exactly where a token is not sent"


def _sent_matrix(want, counts, R):
    """sent[s][d]: tokens rank s sends to rank d (from the reference's receive lists)."""
    sent = [[0] * R for _ in range(R)]
    for d, w in enumerate(want):
        src = w.recv_src_rank[:w.num_recv_tokens]
        for s in range(R):
            sent[s][d] = int((src == s).sum())
    return sent


def _check_bytes(group, want, counts, R, slot_bytes, what, back=False):
    """The NVL byte counter of every rank: slots that crossed to another rank x slot bytes
    (slot sizes as in csrc/kernels/intranode_{dispatch,combine}.cuh)."""
    got = group.read_counters(clear=True)
    sent = _sent_matrix(want, counts, R)
    for r in range(R):
        n = sum(sent[d][r] for d in range(R) if d != r) if back else sum(sent[r][d] for d in range(R) if d != r)
        assert got[r] == n * slot_bytes, f"rank {r}: {what} counted {got[r]} NVL bytes, expected {n} x {slot_bytes}"
    return sum(got)


def _wraps(want, counts, R, V, capacity):
    sent = _sent_matrix(want, counts, R)
    most = max((sent[s][d] for s in range(R) for d in range(R)), default=0)
    return most / V / max(1, capacity)


def run_timeout(group: RankGroup, case: Case, host_deadline_s: float = 2.0):
    """The last rank never launches `absent`: every other rank must come back with CommTimeout
    naming the kernel (and, for notify's barrier, the absent peer); then the windows are dropped
    (a poisoned Buffer's) and the execution context must be intact."""
    from .. import runtime
    from ..errors import CommTimeout
    absent, missing = case.params["absent"], group.num_ranks - 1
    previous = runtime.wait_timeout()
    if group.target == "host":  # the GPU's deadline is the process's MOELINK_TIMEOUT_S
        runtime.set_wait_timeout(host_deadline_s)
    try:
        _run(group, case, absent=absent)
    except CommTimeout as exc:
        failed = getattr(exc, "failed_ranks", [])
        errors = getattr(exc, "rank_errors", {})
    else:
        raise AssertionError(f"{absent} without rank {missing} returned normally")
    finally:
        runtime.set_wait_timeout(previous)
        group.reset()
    expected = [r for r in range(group.num_ranks) if r != missing]
    assert failed == expected, f"ranks {failed} failed, expected every rank but {missing}: {errors}"
    messages = {r: str(e) for r, e in errors.items()}
    for r, text in messages.items():
        assert isinstance(errors[r], CommTimeout), f"rank {r}: {type(errors[r]).__name__}: {text}"
        assert f"intranode {absent}" in text, f"rank {r}: the message does not name the {absent} kernel: {text}"
        if absent == "notify":
            assert f"from peer {missing}" in text, f"rank {r}: the message does not name peer {missing}: {text}"
    if group.target == "cuda":
        record = group.backend.last_abort or {}
        assert record.get("peer") in (missing, -1), f"abort record names peer {record.get('peer')}: {record}"
        assert group.module.abort.record() is None, "the abort record was not cleared"
    broken = group.backend.healthy()
    assert broken is None, f"context not intact after the timeout: {broken}"
    first = messages[min(messages)]
    return {"summary": first[:150], "message": first}
