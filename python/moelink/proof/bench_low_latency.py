"""The proof's low-latency benchmark: microseconds per low-latency dispatch and per combine call of
N ranks on one GPU, every rank's call at once, over the loopback (every message a put, as between
nodes: ``ranks_per_node`` 1, no NVLink).

Each point sets up one routing (a bf16 dispatch, checked against the reference), then times the
dispatch (FP8, DeepEP's default, and bf16) and the combine (bf16, LogFMT-10; the experts return
the bf16 dispatch's rows unchanged, so its receive buffer is the combine's input) with
``bench._time_graph``: every rank's call captured into one CUDA graph across the ranks' streams
and replayed, each replay a new call of the protocol (the half alternates in device memory). After
the replays the last call's outputs of the first and the last rank are checked against the
reference again (every rank's are in the proof's own cases). Figures: ``us`` per
call (all ranks at once), the grid (``blocks`` x ``block_warps``), and ``recv_gbps`` = message
bytes this rank received / time. One GPU's HBM is every "link": not a network figure.
"""

from __future__ import annotations

from typing import List

import torch

from ..reference import low_latency as ref
from .core import RankGroup
from .low_latency_rig import Rig, check_dispatch, dispatch_outputs, encode_all, global_scale, make_inputs, messages

# (tokens per rank, hidden, top-k, experts in total): DeepSeek-V3 decoding (DeepEP's LL benchmark).
LL_SHAPES = [(128, 7168, 8, 256)]
DISPATCH_PAYLOADS = ("fp8", "bf16")
COMBINE_BITS = (None, 10)


def _point(group: RankGroup, tokens: int, hidden: int, topk: int, experts: int) -> List[dict]:
    from . import bench
    from .low_latency import blocks_for
    R, ll = group.num_ranks, group.module.low_latency
    EL = experts // R
    W = group.module.intranode.GPU_BLOCK_WARPS
    p = dict(t_max=tokens, hidden=hidden, topk=topk, experts_per_rank=EL, tokens=[tokens] * R, drop=0.0)
    blocks = blocks_for(group, p, W)
    xs, idx, weights = make_inputs(4321 + R, R, p)
    msgs = messages(idx, R, EL)
    SEND_RECV = ll.SEND_PHASE | ll.RECV_PHASE
    rows: List[dict] = []
    base = dict(ranks=R, tokens=tokens, hidden=hidden, topk=topk, experts=experts, blocks=blocks, block_warps=W,
                replays=bench.REPLAYS)
    with group.scratch() as mem:
        rig = Rig(group, mem, t_max=tokens, hidden=hidden, experts=experts, topk=topk, rpn=1, nvlink=False,
                  block_warps=W, blocks=blocks, payloads=DISPATCH_PAYLOADS, combines=COMBINE_BITS)
        x = [mem.upload(t) for t in xs]
        ids = [mem.upload(i) for i in idx]
        w = [mem.upload(t) for t in weights]

        def outputs(payload):
            """Every rank's receive buffers and its send_slots / send_counts (the handle's)."""
            return [dict(dispatch_outputs(mem, payload, EL, R, tokens, hidden, fill=0), slots=mem.empty((tokens, topk), torch.int32),
                         counts=mem.empty((R,), torch.int32)) for _ in range(R)]

        def dispatcher(payload, outs, g):
            def launch(r, s):
                o = outs[r]
                ll.dispatch(rig.context(r, payload), SEND_RECV, blocks, tokens, x[r], ids[r], 0, g[r], 0, False,
                            o["slots"].ptr, o["counts"].ptr, o["x"].ptr, o["scales"].ptr if o["scales"] is not None else 0,
                            o["g"].ptr if o["g"] is not None else 0, o["count"].ptr, o["src_info"].ptr,
                            o["layout_range"].ptr, 0, 0, stream=s, rank=r)
            return launch

        # The first and the last rank are checked (the proof's cases check every rank; here the
        # reference of 8 ranks x 128 tokens x 7168 would cost more host time than the timing).
        checked = sorted({0, R - 1})

        def check(payload, outs, gs):
            want, encoded = ref.low_latency_dispatch(xs, idx, experts, payload, global_scales=gs), encode_all(xs, payload, gs)
            for r in checked:
                o = outs[r]
                check_dispatch(r, rig, xs, idx, payload, encoded, o, o["slots"].get(), o["counts"].get(), msgs, want)

        handle = outputs("bf16")
        group.run_all("bench low-latency dispatch", dispatcher("bf16", handle, [0] * R))
        check("bf16", handle, [None] * R)
        received = sum(int(msgs[:, r].sum()) for r in range(R)) / R  # rows per rank
        for payload in DISPATCH_PAYLOADS:
            outs = outputs(payload)
            gs = [global_scale(t) if payload == "nvfp4" else None for t in xs]
            g = [mem.upload(t) for t in gs] if payload == "nvfp4" else [0] * R
            msg = rig.layout(payload)["msg_bytes"]
            rows.append(_timed(group, dict(base, op="ll-dispatch", payload=payload), dispatcher(payload, outs, g),
                               lambda: check(payload, outs, gs), received * msg))
        # The bf16 dispatch's handle from here on (every rank's handle of the same dispatch).
        for bits in COMBINE_BITS:
            out = [mem.empty((tokens, hidden), torch.bfloat16) for _ in range(R)]
            cpay = rig.combine_payload(bits)

            def combine(r, s, cpay=cpay, out=out):
                o = handle[r]
                ll.combine(rig.context(r, cpay), SEND_RECV, blocks, o["x"].ptr, o["src_info"].ptr,
                           o["layout_range"].ptr, tokens, ids[r], w[r], o["slots"].ptr, o["counts"].ptr, out[r].ptr, 0, 0,
                           stream=s, rank=r)

            def check_combine(bits=bits, out=out):
                for r in checked:
                    want = ref.low_latency_combine(xs[r].unsqueeze(1).expand(-1, topk, -1), idx[r], weights[r], bits)
                    assert torch.equal(out[r].get().view(torch.int16), want.view(torch.int16)), f"rank {r}: combine"
            sent = sum(int(msgs[r].sum()) for r in range(R)) / R  # rows each rank gets back
            rows.append(_timed(group, dict(base, op="ll-combine", payload=cpay), combine, check_combine,
                               sent * rig.layout(cpay)["comb_msg_bytes"]))
    return rows


def _timed(group, row, launch, check, bytes_per_rank) -> dict:
    from . import bench
    try:
        ms, method = bench._time_graph(group, {r: (lambda s, r=r: launch(r, s)) for r in range(group.num_ranks)},
                                       row["op"])
        try:
            check()
            ok = "ok"
        except AssertionError as exc:
            ok = f"MISMATCH: {exc}"[:200]
        row.update(us=ms * 1e3, method=method, recv_gbps=bytes_per_rank / (ms * 1e-3) / 1e9, check=ok)
    except Exception as exc:  # noqa: BLE001 - a point that fails is reported, the rest run
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row


def low_latency_bench(backend, log) -> List[dict]:
    from . import bench
    rows: List[dict] = []
    for R in bench.RANKS:
        group = RankGroup(backend, R, wait_s=120.0)
        try:
            for tokens, hidden, topk, experts in LL_SHAPES:
                if experts % R:
                    continue
                try:
                    points = _point(group, tokens, hidden, topk, experts)
                except Exception as exc:  # noqa: BLE001 - the set-up failed: reported, the rest run
                    points = [dict(op="ll-setup", ranks=R, tokens=tokens, hidden=hidden, blocks=0,
                                   error=f"{type(exc).__name__}: {exc}")]
                    group.reset()
                for row in points:
                    rows.append(row)
                    log(format_row(row))
        finally:
            group.reset()
    return rows


def format_row(row: dict) -> str:
    head = f"bench {row['op']:11} ranks={row['ranks']} tokens={row['tokens']:5} hidden={row['hidden']:5}"
    if "error" in row:
        return f"{head} blocks={row.get('blocks')}: {row['error']}"
    return (f"{head} {row['payload']:8} blocks/rank={row['blocks']:3} x {row['block_warps']} warps {row['us']:9.1f} us"
            f"  recv {row['recv_gbps']:7.1f} GB/s/rank  [{row['method'][:5]}] {row['check']}")
