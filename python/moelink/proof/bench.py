"""The proof's short GPU benchmark: intranode dispatch and combine of N ranks on one GPU.

Each point sets up one routing (layout + notify + dispatch once, checked), then times the cached
dispatch (the handle's counts, no notify) and the combine of every rank at once. All ranks' kernels
of one step are captured into ONE CUDA graph across the ranks' streams (fork/join on events) and
replayed, so the ranks start together and Python's launch overhead stays out of the figure; every
replay is a new operation on the same windows (the epoch lives in device memory), and after the
replays the outputs are compared with the reference again. If capture or replay fails, the
point is timed with direct launches (the figure then includes the launch skew) and says so.

Figures are per rank: ``recv_gbps`` = rows received x hidden x 2 bytes / time (DeepEP's
convention for dispatch; for combine the rows sent back), ``link_gbps`` = the NVL byte counter (the
bytes of the slots that crossed to another rank) / time. On one GPU every "link" is the same HBM:
these figures measure the kernels' copy efficiency with N ranks sharing one GPU's memory and SMs,
not NVLink. ``BENCHES`` lists the benchmarks: this one and the low-latency one
(bench_low_latency.py: microseconds per LL dispatch and combine call).
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List

import torch

from .. import reference
from .core import Case, RankGroup

__all__ = ["run_bench", "format_table", "BENCHES"]

# (tokens per rank, hidden, top-k, experts in total): DeepSeek-V3's dispatch, a smaller hidden,
# fewer tokens.
SHAPES = [(4096, 7168, 8, 256), (4096, 4096, 8, 256), (1024, 7168, 8, 256)]
RANKS = (2, 4, 8)
WARMUP, REPLAYS = 2, 10


def _time_graph(group: RankGroup, launchers: Dict[int, Callable[[int], None]], name: str) -> tuple:
    """Mean milliseconds of one replay of every rank's step, and the method used."""
    b = group.backend
    p = b.proof
    s0 = b.stream(0)
    fork, start, stop = p.event_create(), p.event_create(), p.event_create()
    joins = {r: p.event_create() for r in launchers}
    graph = exec_ = 0
    try:
        try:
            p.capture_begin(s0)
            try:
                p.event_record(fork, s0)
                for r in launchers:
                    if r != 0:
                        p.stream_wait_event(b.stream(r), fork)
                for r, launch in launchers.items():
                    launch(b.stream(r))
                for r in launchers:
                    if r != 0:
                        p.event_record(joins[r], b.stream(r))
                        p.stream_wait_event(s0, joins[r])
            finally:
                graph = p.capture_end(s0)
            exec_ = p.graph_instantiate(graph)
            method = "graph"
        except Exception as exc:  # noqa: BLE001 - fall back to direct launches, and say why
            method = f"launch (graph capture failed: {type(exc).__name__}: {str(exc)[:120]})"
            exec_ = 0

        def once():
            if exec_:
                p.graph_launch(exec_, s0)
            else:
                p.event_record(fork, s0)
                for r in launchers:
                    if r != 0:
                        p.stream_wait_event(b.stream(r), fork)
                for r, launch in launchers.items():
                    launch(b.stream(r))
                for r in launchers:
                    if r != 0:
                        p.event_record(joins[r], b.stream(r))
                        p.stream_wait_event(s0, joins[r])

        for _ in range(WARMUP):
            once()
        _sync(group, s0, name)
        p.event_record(start, s0)
        for _ in range(REPLAYS):
            once()
        p.event_record(stop, s0)
        _sync(group, s0, name)
        return p.event_elapsed_ms(start, stop) / REPLAYS, method
    finally:
        if exec_:
            p.graph_exec_destroy(exec_)
        if graph:
            p.graph_destroy(graph)
        for e in (fork, start, stop, *joins.values()):
            p.event_destroy(e)


def _sync(group: RankGroup, stream: int, name: str) -> None:
    deadline = time.monotonic() + group.wait_s
    while not group.backend.proof.stream_done(stream):
        if time.monotonic() > deadline:
            from .backend import HarnessHang
            raise HarnessHang(f"bench {name}: stream still busy after {group.wait_s:.0f} s")
        time.sleep(1e-4)
    group.backend.module.abort.raise_if_aborted(f"bench {name}")


def _point(group: RankGroup, tokens: int, hidden: int, topk: int, experts: int, sm_budgets: List[int]) -> List[dict]:
    """One routing, timed at each SM budget (the inputs and the reference are built once)."""
    from .intranode import _inputs
    R, im = group.num_ranks, group.module.intranode
    case = Case("bench", dict(tokens=tokens, hidden=hidden, topk=topk, experts_per_rank=experts // R,
                              max_tokens=True, exact=True), seed=1234 + R)
    xs, idx, weights, _ = _inputs(case, R)
    want = reference.intranode_dispatch(xs, idx, experts, weights)
    # The experts return the rows they received, so token t comes back as x[t] times the number of
    # ranks it went to: at most 8 copies of one bf16 value, whose float32 sum is exact, so this is
    # the reference's combine bit for bit (and cheap enough for 8 ranks of 4096 x 7168).
    expected = [(x.float() * reference.dispatch_layout(i, experts, R).is_token_in_rank.sum(1, keepdim=True)).to(torch.bfloat16)
                for x, i in zip(xs, idx)]
    queue, chunk, W = 256, 6, im.GPU_BLOCK_WARPS
    rows_out: List[dict] = []
    with group.scratch() as mem:
        k = []
        for r in range(R):
            n, M = xs[r].shape[0], want[r].num_recv_tokens
            layout = reference.dispatch_layout(idx[r], experts, R)
            k.append(dict(n=n, m=M, x=mem.upload(xs[r]), idx=mem.upload(idx[r]), w=mem.upload(weights[r]),
                          in_rank=mem.upload(layout.is_token_in_rank), per_expert=mem.upload(layout.num_tokens_per_expert),
                          counts=mem.empty((1 + experts // R,), torch.int32), head=mem.empty((n, R), torch.int32),
                          rx=mem.empty((M, hidden), torch.bfloat16), ridx=mem.empty((M, topk), torch.int64),
                          rw=mem.empty((M, topk), torch.float32), rsrc=mem.empty((M,), torch.int32),
                          y=mem.upload(want[r].recv_x), out=mem.empty((n, hidden), torch.bfloat16),
                          outw=mem.empty((n, topk), torch.float32)))
        for num_sms in sm_budgets:
            try:
                rows_out += _timed(group, mem, k, want, expected, R, hidden, topk, experts, tokens, num_sms, queue,
                                   chunk, W)
            except Exception as exc:  # noqa: BLE001 - a point that fails is reported, the rest run
                rows_out.append(dict(op="intranode", ranks=R, tokens=tokens, hidden=hidden, num_sms=num_sms,
                                     error=f"{type(exc).__name__}: {exc}"))
                group.reset()
    return rows_out


def _timed(group, mem, k, want, expected, R, hidden, topk, experts, tokens, num_sms, queue, chunk, W) -> List[dict]:
    im = group.module.intranode
    channels = num_sms // 2
    S = im.default_sub_channels(R, W, channels, queue)
    d_shape = dict(num_ranks=R, num_channels=channels, block_warps=W, sub_channels=S, queue_tokens=queue,
                   row_bytes=2 * hidden, num_scales=0, num_topk=topk, experts_per_rank=experts // R)
    c_shape = dict(d_shape, experts_per_rank=0)
    sizing = im.Node(rank=0, windows=[0] * R, **d_shape)
    windows = group.windows("nvl", sizing.window_bytes_needed)
    counters = group.counters()
    dn = [im.Node(rank=r, windows=windows, nvl_bytes=counters[r], **d_shape) for r in range(R)]
    cn = [im.Node(rank=r, windows=windows, nvl_bytes=counters[r], **c_shape) for r in range(R)]
    starts = [mem.empty((R * sizing.virtual_channels + 1,), torch.int32) for _ in range(R)]

    def notify(r, s):
        q = k[r]
        im.notify(dn[r], q["n"], q["in_rank"], q["per_expert"], 1, starts[r].ptr, q["counts"].ptr, stream=s, rank=r)

    def dispatch(r, s, cached=True):
        q = k[r]
        im.dispatch(dn[r], cached, chunk, q["n"], q["x"], 0, q["idx"], q["w"], q["in_rank"], starts[r].ptr,
                    q["head"].ptr, q["rx"].ptr, 0, q["ridx"].ptr, q["rw"].ptr, q["rsrc"].ptr, stream=s, rank=r)

    def combine(r, s):
        q = k[r]
        im.combine(cn[r], chunk, hidden, q["m"], q["y"], q["rw"].ptr, starts[r].ptr, q["n"], q["in_rank"],
                   q["head"].ptr, 0, 0, q["out"].ptr, q["outw"].ptr, stream=s, rank=r)

    group.run_all("bench notify", notify)
    group.run_all("bench dispatch", lambda r, s: dispatch(r, s, cached=False))
    rows = []
    for op, fn in (("dispatch", dispatch), ("combine", combine)):
        group.read_counters(clear=True)
        ms, method = _time_graph(group, {r: (lambda s, r=r, fn=fn: fn(r, s)) for r in range(R)}, op)
        link = group.read_counters(clear=True)
        if op == "dispatch":
            ok = all(torch.equal(k[r]["rx"].get(), want[r].recv_x) for r in range(R))
        else:
            ok = all(torch.equal(k[r]["out"].get().view(torch.int16), expected[r].view(torch.int16)) for r in range(R))
        moved = sum(w.num_recv_tokens for w in want) * hidden * 2
        rows.append(dict(op=op, ranks=R, tokens=tokens, hidden=hidden, topk=topk, experts=experts, num_sms=num_sms,
                         sub_channels=S, us=ms * 1e3, method=method, replays=REPLAYS,
                         recv_gbps=moved / R / (ms * 1e-3) / 1e9,
                         link_gbps=sum(link) / (WARMUP + REPLAYS) / R / (ms * 1e-3) / 1e9,
                         check="ok" if ok else "MISMATCH"))
    return rows


def intranode_bench(backend, log) -> List[dict]:
    sm = backend.info["sm_count"]
    rows = []
    for R in RANKS:
        group = RankGroup(backend, R, wait_s=120.0)
        try:
            fit = max(2, min(128, (sm // R) - (sm // R) % 2))
            budgets = sorted({fit, max(2, fit // 2 - (fit // 2) % 2)}, reverse=True)
            for tokens, hidden, topk, experts in SHAPES:
                for row in _point(group, tokens, hidden, topk, experts, budgets):
                    rows.append(row)
                    log(format_row(row))
        finally:
            group.reset()
    return rows


from .bench_low_latency import low_latency_bench  # noqa: E402 - it uses this module's timing

BENCHES = [intranode_bench, low_latency_bench]


def run_bench(backend, log=print) -> List[dict]:
    rows: List[dict] = []
    for bench in BENCHES:
        rows += bench(backend, log)
    return rows


def format_row(row: dict) -> str:
    if row["op"].startswith("ll-"):
        from .bench_low_latency import format_row as low_latency_row
        return low_latency_row(row)
    if "error" in row:
        return f"bench {row['op']:9} ranks={row['ranks']} tokens={row['tokens']} hidden={row['hidden']} sms={row['num_sms']}: {row['error']}"
    return (f"bench {row['op']:9} ranks={row['ranks']} tokens={row['tokens']:5} hidden={row['hidden']:5} "
            f"sms/rank={row['num_sms']:3} S={row['sub_channels']} {row['us']:9.1f} us  recv {row['recv_gbps']:7.1f} GB/s/rank  "
            f"link {row['link_gbps']:7.1f} GB/s/rank  [{row['method'][:5]}] {row['check']}")


def format_table(rows: List[dict]) -> str:
    return "\n".join(["benchmark (one GPU: every link is local HBM; figures per rank):"] + [format_row(r) for r in rows])
