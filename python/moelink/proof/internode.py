"""Path "internode": layout -> notify -> dispatch (-> cached dispatch) -> combine of the internode
kernels (csrc/runtime/ops_internode.h: IB once, then NVLink) with the group's ranks posing as
nodes of ``ranks_per_node`` ranks, through the ordinary bindings, checked against
``moelink.reference`` after every step.

The network binding is the loopback (``ScaleOutKind::kLoopback``, csrc/transport/proof/
loopback.cuh): every rank's scale-out window is carved from one allocation and a put is the
calling thread's copy into the peer's window plus a release add on its signal, so the kernels,
their queues, credits, barriers and wire format run unchanged, with real weak memory between the
SMs of one GPU (or the threads of the host target). The loopback counts the bytes it moves, and
the proof checks them: one wire message per (token, distinct remote node) and one notify message
per rank of another node in a dispatch, one bf16 partial per (token, remote node) in a combine.

Checks: notify's received rows and aligned per-expert counts; dispatch rows (bf16 or FP8 codes +
scales), top-k ids and weights, source indices, bit for bit; ``rdma_send_head`` is -1 exactly
where no rank of that node gets the token; a cached dispatch reproduces the rows; combine bit for
bit when the case's values make every sum exact (node partials included: quarters and 1/64
weights), else within the reference's bound for ``nodes`` bf16 partials. ``timeout_cases``: one
rank never launches notify, the others must come back with CommTimeout.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .. import reference
from ..reference.dispatch import assert_combine_close
from .core import Case, RankGroup, Skip
from .intranode import _biases, _combine_rows, _inputs

name = "internode"

SCALE_OUT_KIND_LOOPBACK = 2  # transport::ScaleOutKind::kLoopback


def _sms(group: RankGroup, requested) -> int:
    if requested != "fit":
        return int(requested)
    if group.target != "cuda":
        return 4
    per_rank = group.backend.info["sm_count"] // group.num_ranks
    return max(2, min(48, per_rank - per_rank % 2))


def cases(group: RankGroup) -> List[Case]:
    r, big = group.num_ranks, group.big
    n = 512 if big else 64  # the reference combine dominates a GPU case: keep device_check under 8 min
    c = [Case("ranks-as-nodes", dict(tokens=n, hidden=1024 if big else 64, topk=8, experts_per_rank=2, rpn=1,
                                     num_sms="fit", exact=True))]
    if r >= 4:
        c.append(Case("two-per-node", dict(tokens=n, hidden=1024 if big else 128, topk=6, experts_per_rank=3, rpn=2,
                                           num_sms="fit", exact=True)))
    c += [
        Case("wrap-tiny-queues", dict(tokens=2 * n if big else 192, hidden=256 if big else 64, topk=4, experts_per_rank=2,
                                      rpn=1 if r < 4 else 2, num_sms=2, block_warps=4, nvl_queue=1, rdma_queue=1, nvl_chunk=1,
                                      rdma_chunk=1, exact=True, min_wraps=4)),
        Case("fp8-cached", dict(tokens=n, hidden=1024 if big else 128, topk=4, experts_per_rank=2, rpn=1,
                                num_sms="fit", fp8=True, cached=True, exact=True)),
        Case("skew-empty-bias", dict(tokens=n, hidden=256 if big else 64, topk=8, experts_per_rank=4, rpn=1,
                                     num_sms="fit", skew=True, empty_rank=True, bias="pair", exact=False)),
    ]
    return c


def timeout_cases(group: RankGroup) -> List[Case]:
    base = dict(tokens=48, hidden=64, topk=4, experts_per_rank=2, rpn=1, num_sms=2, exact=True)
    return [Case("absent-in-notify", dict(base, absent="notify"), kind="timeout"),
            Case("after-timeout", dict(base, tokens=80), kind="recovery")]


def run(group: RankGroup, case: Case):
    return _run(group, case)


class _Rank:
    """One rank's device buffers for the case."""


def _run(group: RankGroup, case: Case, absent: Optional[str] = None) -> Dict:
    p, R, m = case.params, group.num_ranks, group.module
    L = p["rpn"]
    if R % L or R // L < 2:
        raise Skip(f"{R} ranks cannot pose as two or more nodes of {L}")
    N = R // L
    gpu = group.target == "cuda"
    W = m.intranode.GPU_BLOCK_WARPS if gpu else max(2, p.get("block_warps", m.intranode.GPU_BLOCK_WARPS))
    num_sms = _sms(group, p.get("num_sms", "fit"))
    C = num_sms // 2
    fp8, hidden, topk, epr = p.get("fp8", False), p["hidden"], p["topk"], p["experts_per_rank"]
    xs, idx, weights, experts = _inputs(case, R)
    counts = [(x[0] if isinstance(x, tuple) else x).shape[0] for x in xs]
    row_bytes = hidden if fp8 else 2 * hidden
    num_scales = xs[0][1].shape[1] if fp8 else 0
    # Queues in units of W (the minimum the roles need: docs/internode.md), wrapped by small cases.
    nvl_q, rdma_q = W * p.get("nvl_queue", 4), (2 * W) * p.get("rdma_queue", 4)
    d_shape = dict(num_nodes=N, ranks_per_node=L, num_channels=C, block_warps=W, nvl_queue_tokens=nvl_q,
                   rdma_queue_tokens=rdma_q, row_bytes=row_bytes, num_scales=num_scales, num_topk=topk,
                   experts_per_rank=epr)
    c_shape = dict(d_shape, row_bytes=2 * hidden, num_scales=0, experts_per_rank=0)
    d_sizes, c_sizes = dict(m.internode.layout(**d_shape)), dict(m.internode.layout(**c_shape))
    if not (d_sizes["roles_valid"] and c_sizes["roles_valid"]):
        raise Skip(f"queues {nvl_q}/{rdma_q} too small for blocks of {W} warps")
    nvl_bytes = max(d_sizes["nvl_bytes"], c_sizes["nvl_bytes"])
    rdma_bytes = max(d_sizes["rdma_bytes"], c_sizes["rdma_bytes"])
    # Fresh windows for every case: the scale-out signals and the NVL epochs must start together
    # (a Buffer creates both at once), and other paths carve the same "nvl" arena differently.
    group.reset()
    nvl = group.windows("nvl", nvl_bytes)
    rdma = group.windows("rdma", rdma_bytes)
    nvl_counters = group.counters()
    group.read_counters(clear=True)
    num_signals = d_sizes["num_signals"]
    alignment = p.get("expert_alignment", 1)
    nvl_chunk, rdma_chunk = p.get("nvl_chunk", 4), p.get("rdma_chunk", 4)
    want = reference.intranode_dispatch(xs, idx, experts, weights, expert_alignment=alignment)
    group.coresidency.clear()
    details = {"num_sms": num_sms, "block_warps": W, "nodes": N, "ranks_per_node": L, "nvl_queue": nvl_q,
               "rdma_queue": rdma_q}

    with group.scratch() as mem:
        table = mem.upload(torch.tensor(rdma, dtype=torch.int64))  # the loopback's window table
        rdma_counter = mem.empty((R, 8), torch.int64)

        def context(r: int, shape: dict):
            node = r // L
            return m.internode.Context(rank=r, **shape, nvl_windows=nvl[node * L:(node + 1) * L],
                                       nvl_bytes=nvl_counters[r], net_kind=SCALE_OUT_KIND_LOOPBACK, net_window=rdma[r],
                                       net_window_bytes=rdma_bytes, num_signals=num_signals, net_queue=table,
                                       net_rdma_bytes=rdma_counter.ptr + 64 * r)
        dctx = [context(r, d_shape) for r in range(R)]
        cctx = [context(r, c_shape) for r in range(R)]

        def read_rdma() -> List[int]:
            values = rdma_counter.get()[:, 0].tolist()
            group.backend.clear(rdma_counter.mem)
            return values

        rk = [_Rank() for _ in range(R)]
        for r, k in enumerate(rk):
            k.n = counts[r]
            k.x = mem.upload(xs[r][0] if fp8 else xs[r])
            k.scales = mem.upload(xs[r][1]) if fp8 else 0
            k.idx = mem.upload(idx[r])
            k.w = mem.upload(weights[r])
            k.per_rank = mem.empty((R,), torch.int32)
            k.per_node = mem.empty((N,), torch.int32)
            k.per_expert = mem.empty((experts,), torch.int32)
            k.in_rank = mem.empty((k.n, R), torch.bool)
            k.starts = mem.empty((R * C + 1,), torch.int32, fill=0xff)
            k.fwd_start = mem.empty((C * N + 1,), torch.int32, fill=0xff)
            k.counts = mem.empty((2 + epr,), torch.int32, fill=0xff)
            k.rdma_head = mem.empty((k.n, N), torch.int32, fill=0x7f)

        def layout(r, s):
            k = rk[r]
            m.dispatch_layout(k.idx, 8, k.n, topk, topk, experts, R, L, k.per_rank.ptr, k.per_node.ptr,
                              k.per_expert.ptr, k.in_rank.ptr, stream=s, rank=r)
        group.run_all("dispatch_layout", layout, check_fit=False)

        def notify(r, s):
            k = rk[r]
            m.internode.notify(dctx[r], k.n, k.in_rank.ptr, k.per_expert.ptr, alignment, k.starts.ptr,
                               k.fwd_start.ptr, k.counts.ptr, stream=s, rank=r)
        present = [r for r in range(R) if r != R - 1] if absent == "notify" else range(R)
        group.run_all("internode notify", notify, ranks=present)
        for r, k in enumerate(rk):
            got, w = k.counts.get(), want[r]
            assert int(got[0]) == w.num_recv_tokens, f"rank {r}: notify counted {int(got[0])} rows, reference {w.num_recv_tokens}"
            assert got[2:].tolist() == w.num_recv_tokens_per_expert_list, f"rank {r}: per-expert counts"
            k.rows, k.forwarded = w.num_recv_tokens, int(k.fwd_start.get()[-1])
            k.fwd_head = mem.empty((k.forwarded, L), torch.int32, fill=0x7f)

        def alloc_outputs(k):
            k.recv_x = mem.empty((k.rows, row_bytes), torch.uint8, fill=0xcd)
            k.recv_scales = mem.empty((k.rows, num_scales), torch.float32, fill=0xcd) if fp8 else None
            k.recv_idx = mem.empty((k.rows, topk), torch.int64, fill=0xff)
            k.recv_w = mem.empty((k.rows, topk), torch.float32)
            k.recv_src = mem.empty((k.rows,), torch.int32, fill=0xff)

        def dispatch(r, s, cached=False):
            k = rk[r]
            m.internode.dispatch(dctx[r], cached, nvl_chunk, rdma_chunk, k.n, k.x, k.scales, k.idx, k.w, k.in_rank.ptr,
                                 k.starts.ptr, k.fwd_start.ptr, k.rdma_head.ptr, k.fwd_head.ptr, k.recv_x.ptr,
                                 k.recv_scales.ptr if fp8 else 0, k.recv_idx.ptr, k.recv_w.ptr, k.recv_src.ptr,
                                 stream=s, rank=r)
        for k in rk:
            alloc_outputs(k)
        group.run_all("internode dispatch", dispatch)
        _check_dispatch(rk, want, fp8, N, L)
        per_node = [_remote_nodes(k.in_rank.get(), N, L, r) for r, k in enumerate(rk)]
        moved = read_rdma()
        for r in range(R):
            # Metadata per rank of another node: the notify message, the barrier's agreement words.
            expected = (int(per_node[r].sum()) * d_sizes["dispatch_slot_bytes"] +
                        (R - L) * (d_sizes["notify_bytes"] + d_sizes["agreement_bytes"]))
            assert moved[r] == expected, f"rank {r}: dispatch moved {moved[r]} network bytes, expected {expected}"
        details["dispatch_rdma_bytes"] = sum(moved)
        details["max_wraps"] = max(float(pn.sum()) for pn in per_node) / max(1, C) / rdma_q
        if p.get("min_wraps"):
            assert details["max_wraps"] >= p["min_wraps"], f"case design: queues wrapped {details['max_wraps']:.1f} times"
        group.read_counters(clear=True)

        if p.get("cached"):
            first = [k.recv_x.get() for k in rk]
            for k in rk:
                alloc_outputs(k)
            group.run_all("internode cached dispatch", lambda r, s: dispatch(r, s, cached=True))
            for r, k in enumerate(rk):
                assert torch.equal(k.recv_x.get(), first[r]), f"rank {r}: cached dispatch rows differ"
            read_rdma()
            group.read_counters(clear=True)

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
            m.internode.combine(cctx[r], nvl_chunk, rdma_chunk, hidden, k.y, k.recv_w.ptr, k.starts.ptr,
                                k.fwd_start.ptr, k.fwd_head.ptr, k.n, k.rdma_head.ptr, k.bias[0], k.bias[1], k.out.ptr,
                                k.out_w.ptr, stream=s, rank=r)
        group.run_all("internode combine", combine)
        returned_w = [d.recv_topk_weights.float() for d in plain]
        expected = reference.intranode_combine(rows, plain, counts, returned_w, biases)
        for r, k in enumerate(rk):
            got, got_w = k.out.get(), k.out_w.get()
            if p.get("exact", True):
                assert torch.equal(got.view(torch.int16), expected[r].combined_x.to(torch.bfloat16).view(torch.int16)), \
                    f"rank {r}: combined_x differs from the reference (bit for bit)"
                assert torch.equal(got_w, expected[r].combined_topk_weights.float()), f"rank {r}: combined_topk_weights"
            else:
                assert_combine_close(got, got_w, expected[r], context=f"rank {r}", partials=N)
        moved = read_rdma()
        for r in range(R):
            partials = sum(int(per_node[src][:, r // L].sum()) for src in range(R)
                           if src % L == r % L and src // L != r // L)
            assert moved[r] == partials * c_sizes["partial_slot_bytes"] + (R - L) * c_sizes["agreement_bytes"], \
                f"rank {r}: combine moved {moved[r]} network bytes, expected {partials} partials"
        details["combine_rdma_bytes"] = sum(moved)
        group.read_counters(clear=True)
    if group.coresidency:
        details["coresidency"] = dict(group.coresidency)
    details["summary"] = (f"nodes={N}x{L} sms={num_sms} W={W} q={nvl_q}/{rdma_q} wraps={details['max_wraps']:.1f} "
                          f"net={details['dispatch_rdma_bytes']}+{details['combine_rdma_bytes']}B")
    return details


def _remote_nodes(in_rank: torch.Tensor, N: int, L: int, rank: int) -> torch.Tensor:
    """[tokens, N]: the token goes to some rank of node n, n not this rank's node."""
    per_node = in_rank.view(in_rank.shape[0], N, L).any(dim=2)
    per_node[:, rank // L] = False
    return per_node


def _check_dispatch(rk, want, fp8, N, L):
    for r, k in enumerate(rk):
        w, rows = want[r], k.rows
        ref_x = w.recv_x[0] if fp8 else w.recv_x
        assert torch.equal(k.recv_x.get(), ref_x[:rows].contiguous().view(torch.uint8).reshape(rows, -1)), f"rank {r}: recv_x"
        if fp8:
            assert torch.equal(k.recv_scales.get(), w.recv_x[1][:rows]), f"rank {r}: recv_x scales"
        assert torch.equal(k.recv_idx.get(), w.recv_topk_idx[:rows]), f"rank {r}: recv_topk_idx"
        assert torch.equal(k.recv_w.get(), w.recv_topk_weights[:rows].float()), f"rank {r}: recv_topk_weights"
        assert torch.equal(k.recv_src.get().long(), w.recv_src_idx[:rows]), f"rank {r}: recv_src_idx"
        to_node = k.in_rank.get().view(k.n, N, L).any(dim=2)
        head = k.rdma_head.get()
        assert bool(((head == -1) == ~to_node).all()), f"rank {r}: rdma_send_head is -1 exactly where no rank of a node gets the token"


def run_timeout(group: RankGroup, case: Case, host_deadline_s: float = 2.0):
    """The last rank never launches notify: every other rank comes back with CommTimeout naming
    the internode notify, and the execution context stays intact."""
    from .. import runtime
    from ..errors import CommTimeout
    missing = group.num_ranks - 1
    previous = runtime.wait_timeout()
    if group.target == "host":
        runtime.set_wait_timeout(host_deadline_s)
    try:
        _run(group, case, absent=case.params["absent"])
    except CommTimeout as exc:
        failed, errors = getattr(exc, "failed_ranks", []), getattr(exc, "rank_errors", {})
    else:
        raise AssertionError(f"internode notify without rank {missing} returned normally")
    finally:
        runtime.set_wait_timeout(previous)
        group.reset()
    assert failed == [r for r in range(group.num_ranks) if r != missing], f"ranks {failed} failed: {errors}"
    for r, e in errors.items():
        assert isinstance(e, CommTimeout) and "internode" in str(e), f"rank {r}: {type(e).__name__}: {e}"
    broken = group.backend.healthy()
    assert broken is None, f"context not intact after the timeout: {broken}"
    first = str(errors[min(errors)])
    return {"summary": first[:150], "message": first}
