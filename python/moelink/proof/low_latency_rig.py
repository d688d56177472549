"""The low-latency path's machinery (moelink.proof.low_latency, and its benchmark): every rank's
low-latency context on the loopback, its device outputs, and the checks against
``moelink.reference.low_latency``.

A :class:`Rig` is one case's windows: every rank's scale-out window carved from one allocation
(the loopback's table of them uploaded as its queue), the loopback's byte counter and the NVLink
byte counter per rank, and each rank's zeroed slot claims. Contexts are built through the ordinary
binding (``module.low_latency.Context``) exactly as ``moelink._low_latency.LowLatencyState`` builds
a Buffer's, with the loopback instead of the NIC: ``node_windows`` are the node's scale-out windows
(the NVLink path), so the kernels cannot tell.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..reference import codecs as ref_codecs
from ..reference import low_latency as ref
from .backend import Mem
from .core import RankGroup

SCALE_OUT_KIND_LOOPBACK = 2  # transport::ScaleOutKind::kLoopback
# Row of the signal words [7][R] (ops_low_latency.h "Signals"): 2 * kind + half; 6 is the barrier.
COUNT, TOKENS, COMB = 0, 2, 4


def expert_fn(values: torch.Tensor, expert) -> torch.Tensor:
    """What an expert returns for bf16 rows: a distinct, exactly reproducible function of the row
    and the global expert id (a tensor broadcast against the rows, or an int)."""
    scale = 0.5 + 0.03125 * (expert.float() if isinstance(expert, torch.Tensor) else float(expert))
    return (values.float() * scale + 0.25).to(torch.bfloat16)


def make_inputs(seed: int, R: int, p: dict):
    """Every rank's (x, topk_idx, topk_weights): distinct experts per row, a share of slots -1."""
    gen = torch.Generator().manual_seed(seed)
    T, H, K, E = p["t_max"], p["hidden"], p["topk"], p["experts_per_rank"] * R
    xs, idx, weights = [], [], []
    for r in range(R):
        n = p["tokens"][r] if "tokens" in p else int(torch.randint(1, T + 1, (1,), generator=gen))
        x = torch.randn(n, H, generator=gen)
        topk = torch.rand(n, E, generator=gen).topk(K, dim=1).indices
        topk[torch.rand(n, K, generator=gen) < p.get("drop", 0.1)] = -1
        xs.append(x.to(torch.bfloat16))
        idx.append(topk)
        weights.append(torch.rand(n, K, generator=gen))
    return xs, idx, weights


def messages(idx: Sequence[torch.Tensor], R: int, EL: int) -> torch.Tensor:
    """[R, R]: (token, top-k slot) pairs rank s sends to rank d (each one dispatch message)."""
    out = torch.zeros(R, R, dtype=torch.int64)
    for s, i in enumerate(idx):
        valid = i[i >= 0]
        out[s] = torch.bincount(valid // EL, minlength=R)[:R]
    return out


def global_scale(x: torch.Tensor) -> torch.Tensor:
    """NVFP4's tensor scale of one rank, as the Buffer computes it (``_low_latency_args``)."""
    return ref_codecs.nvfp4_global_scale(x) if x.shape[0] else torch.ones(1, dtype=torch.float32)


class Rig:
    def __init__(self, group: RankGroup, mem, *, t_max: int, hidden: int, experts: int, topk: int, rpn: int,
                 nvlink: bool, block_warps: int, blocks: int, payloads: Sequence[str], combines: Sequence,
                 split: int = 0, zero_copy: bool = False, carry_weights: bool = False, shrink: bool = False):
        self.group, self.mem, self.ll = group, mem, group.module.low_latency
        R = group.num_ranks
        self.R, self.L, self.N = R, rpn, R // rpn
        self.T, self.H, self.E, self.K, self.EL = t_max, hidden, experts, topk, experts // R
        self.W, self.blocks, self.nvlink, self.split, self.shrink = block_warps, blocks, nvlink, split, shrink
        self.nbytes = 0  # sizes first (they do not depend on the window), then the window
        half = max([self.layout(pl, carry=carry_weights)["dispatch_bytes"] for pl in payloads] +
                   [self.layout(self.combine_payload(b), zero_copy)["combine_bytes"] for b in combines])
        head = self.ll.window(num_nodes=self.N, ranks_per_node=rpn, window_bytes=0)["data_base"]
        self.nbytes = -(-(head + 2 * half) // 4096) * 4096
        # Fresh windows for every case: signals, seen words and the call count start together (a
        # Buffer creates them at once), and other paths carve the same arenas differently.
        group.reset()
        self.windows = group.windows("rdma", self.nbytes)
        self.window = self.ll.window(num_nodes=self.N, ranks_per_node=rpn, window_bytes=self.nbytes)
        self.table = mem.upload(torch.tensor(self.windows, dtype=torch.int64))  # the loopback's window table
        self.rdma_counter = mem.empty((R, 8), torch.int64)
        self.nvl_counters = group.counters()
        group.read_counters(clear=True)
        self.claims = [mem.empty((2 * experts,), torch.int32) for _ in range(R)]
        self._contexts: Dict[tuple, object] = {}
        self.calls = 0
        self.tally = torch.zeros(R, 7, R, dtype=torch.int64)  # expected signal words per rank

    @staticmethod
    def combine_payload(bits: Optional[int]) -> str:
        return "bf16" if bits is None else f"logfmt{bits}"

    def layout(self, payload: str, zero_copy: bool = False, carry: bool = False) -> dict:
        return dict(self.ll.layout(num_ranks=self.R, ranks_per_node=self.L, num_max_tokens=self.T, hidden=self.H,
                                   num_experts=self.E, num_topk=self.K, format=dict(self.ll.FORMATS)[payload],
                                   carry_weights=carry, zero_copy=zero_copy, block_warps=self.W, num_nodes=self.N,
                                   window_bytes=self.nbytes))

    def context(self, r: int, payload: str, zero_copy: bool = False, carry: bool = False):
        """Rank r's context for a call in `payload` (zero_copy: a combine from comb_send; carry:
        dispatch messages that carry the token's top-k weights)."""
        key = (r, payload, zero_copy, carry)
        if key not in self._contexts:
            node = r // self.L
            self._contexts[key] = self.ll.Context(
                rank=r, num_ranks=self.R, ranks_per_node=self.L, num_max_tokens=self.T, hidden=self.H,
                num_experts=self.E, num_topk=self.K, format=dict(self.ll.FORMATS)[payload], zero_copy=zero_copy,
                carry_weights=carry,
                block_warps=self.W, num_nodes=self.N, window_bytes=self.nbytes, net_kind=SCALE_OUT_KIND_LOOPBACK,
                net_window=self.windows[r], net_window_bytes=self.nbytes, num_signals=self.window["num_signals"],
                net_queue=self.table, net_rdma_bytes=self.rdma_counter.ptr + 64 * r, use_nvlink=self.nvlink,
                node_windows=self.windows[node * self.L:(node + 1) * self.L] if self.nvlink else [],
                nvl_bytes=self.nvl_counters[r], claims=self.claims[r].ptr, claim_capacity=self.E,
                codec_split=self.split, shrink=self.shrink)
        return self._contexts[key]

    def write_combine_buffer(self, r: int, payload: str, rows: torch.Tensor) -> None:
        """Rank r's expert outputs into the comb_send region of its next call's half (what
        get_next_low_latency_combine_buffer returns a view of): the zero-copy combine's input."""
        arena = self.group.window_mem("rdma")
        offset = self.window["data_base"] + (self.calls % 2) * self.window["half_bytes"] + \
            self.layout(payload, True)["comb_send"]
        self.group.backend.write(arena, self.windows[r] - arena.ptr + offset, rows)

    def direct(self, r: int, d: int) -> bool:
        """Rank r reaches rank d with NVLink stores (else a loopback put), as LowLatencyContext::direct."""
        return self.nvlink and r // self.L == d // self.L

    def read_bytes(self) -> tuple:
        """(loopback bytes, NVLink bytes) every rank moved since the last read; both cleared."""
        rdma = self.rdma_counter.get()[:, 0].tolist()
        self.group.backend.clear(self.rdma_counter.mem)
        return rdma, self.group.read_counters(clear=True)

    def expected_bytes(self, per_peer: torch.Tensor) -> tuple:
        """per_peer[r][d]: bytes rank r moves to rank d. Split into (loopback, NVLink) per rank;
        NVLink stores to itself are not counted (ops: nvl_bytes counts other ranks only)."""
        rdma = [sum(int(per_peer[r, d]) for d in range(self.R) if not self.direct(r, d)) for r in range(self.R)]
        nvl = [sum(int(per_peer[r, d]) for d in range(self.R) if self.direct(r, d) and d != r) for r in range(self.R)]
        return rdma, nvl

    # ---- the protocol's words ----
    def note_dispatch(self, msgs: torch.Tensor, counts: Optional[torch.Tensor] = None) -> None:
        """A dispatch call: msgs[s][d] token messages and counts[s][d] (default 1) counts messages."""
        h = self.calls % 2
        self.tally[:, COUNT + h, :] += 1 if counts is None else counts.t()
        self.tally[:, TOKENS + h, :] += msgs.t()  # at receiver r from s: msgs[s][r]
        self.calls += 1

    def note_combine(self, msgs: torch.Tensor, done: Optional[torch.Tensor] = None) -> None:
        """A combine call: at source r, from expert rank s, the msgs[r][s] rows r sent s and (done[r][s],
        default 1) its "done"."""
        h = self.calls % 2
        self.tally[:, COMB + h, :] += msgs + (1 if done is None else done)
        self.calls += 1

    def mask(self, r: int) -> list:
        """Rank r's mask words (shrink mode: 1 = that rank is masked), own words at 128 + 56 R."""
        arena = self.group.window_mem("rdma")
        at = self.windows[r] + self.window["own_offset"] + 128 + 56 * self.R
        return self.group.backend.download(Mem(at, 4 * self.R, arena.keep), torch.int32, (self.R,)).tolist()

    def check_words(self, when: str, ranks=None) -> None:
        """Every rank's signal words and its call count are what the protocol says (ops_low_latency.h:
        monotonic adds, +1 per counts message, per token message, per combine row and per "done")."""
        base, own = self.window["signal_base"], self.window["own_offset"]
        backend = self.group.backend
        arena = self.group.window_mem("rdma")
        for r in range(self.R) if ranks is None else ranks:
            words = backend.download(Mem(self.windows[r], own + 8, arena.keep), torch.int64, ((own + 8) // 8,))
            got = words[base:base + 7 * self.R].view(7, self.R)
            assert torch.equal(got, self.tally[r]), \
                f"rank {r} {when}: signal words [count h0, h1, tokens h0, h1, comb h0, h1, barrier] x source\n" \
                f"{got.tolist()}, expected\n{self.tally[r].tolist()}"
            assert int(words[own // 8]) == self.calls, f"rank {r} {when}: call count {int(words[own // 8])}, expected {self.calls}"


# ---- dispatch outputs ---------------------------------------------------------------------------

def dispatch_outputs(mem, payload: str, EL: int, R: int, T: int, H: int, fill: int = 0xcd) -> Dict[str, object]:
    """Device outputs in the shapes the Buffer returns (``_low_latency._dispatch_outputs``), filled
    with junk: rows past each expert's count are unspecified, the specified ones must be written.
    (``fill`` 0: zeroed on the device, no host copy; the benchmark's large buffers.)"""
    G, rows = H // 128, R * T
    out = dict(scales=None, g=None)
    if payload in ("bf16", "logfmt8", "logfmt9", "logfmt10"):
        out["x"] = mem.empty((EL, rows, H), torch.bfloat16, fill=fill)
    elif payload.startswith("fp8"):
        out["x"] = mem.empty((EL, rows, H), torch.float8_e4m3fn, fill=fill)
        out["scales"] = (mem.empty((EL, -(-G // 4), rows), torch.int32, fill=fill) if payload == "fp8_ue8m0"
                         else mem.empty((EL, G, rows), torch.float32, fill=fill))
    elif payload == "mxfp8":
        out["x"] = mem.empty((EL, rows, H), torch.float8_e4m3fn, fill=fill)
        out["scales"] = mem.empty((EL, rows, H // 32), torch.uint8, fill=fill)
    else:  # nvfp4
        out["x"] = mem.empty((EL, rows, H // 2), torch.uint8, fill=fill)
        out["scales"] = mem.empty((EL, rows, H // 16), torch.float8_e4m3fn, fill=fill)
        out["g"] = mem.empty((EL, rows), torch.float32, fill=fill)
    out["count"] = mem.empty((EL,), torch.int32, fill=0xff)
    out["src_info"] = mem.empty((EL, rows), torch.int32, fill=0xff)
    out["layout_range"] = mem.empty((EL, R), torch.int64, fill=0xff)
    return out


def received(out: dict, payload: str) -> tuple:
    """The device's rows as CPU tensors in encode_rows' form, each [EL, rows, ...]."""
    parts = [out["x"].get()]
    if payload.startswith("fp8"):
        parts.append(out["scales"].get().transpose(1, 2))  # token-major on the device, as DeepEP
    elif payload in ("mxfp8", "nvfp4"):
        parts.append(out["scales"].get())
    if payload == "nvfp4":
        parts.append(out["g"].get())
    return tuple(parts)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of t (a dense copy: a view with size-1 dims may keep strides view() rejects)."""
    return torch.empty(t.numel(), dtype=t.dtype).copy_(t.reshape(-1)).view(torch.uint8)


def encode_all(xs, payload: str, gs) -> list:
    """Every rank's rows as the reference encodes them (None for a rank without tokens)."""
    return [ref.encode_rows(x, payload, gs[s]) if x.shape[0] else None for s, x in enumerate(xs)]


def check_dispatch(r: int, rig: Rig, xs, idx, payload: str, encoded, got: dict, send_slots: torch.Tensor,
                   send_counts: torch.Tensor, msgs: torch.Tensor, want, masked=()) -> None:
    """One rank's dispatch against the reference: recv_count; per (local expert, source) the rows
    [begin, begin + count) of layout_range, begin the counts of earlier sources (grouped by source
    in rank order), their (token, slot) set from src_info, each row bit for bit encode_rows;
    send_counts, and send_slots a permutation of [0, n) per expert (-1 where topk_idx is -1)."""
    R, EL, K = rig.R, rig.EL, rig.K
    w = want[r]
    count = got["count"].get()
    assert count.tolist() == w.recv_count, f"rank {r}: recv_count {count.tolist()}, reference {w.recv_count}"
    info, ranges = got["src_info"].get().long(), got["layout_range"].get()
    parts = received(got, payload)
    for e in range(EL):
        start = 0
        for s in range(R):
            mine = [(t, k) for s2, t, k in w.entries[e] if s2 == s]
            v = int(ranges[e, s])
            n, begin = v & 0xFFFFFFFF, v >> 32
            assert (n, begin) == (len(mine), start), \
                f"rank {r}: expert {e} source {s}: layout_range gives rows [{begin}, +{n}), reference [{start}, +{len(mine)})"
            start += n
            if not n:
                continue
            tk = info[e, begin:begin + n]
            t, k = tk // K, tk % K
            assert sorted(zip(t.tolist(), k.tolist())) == mine, f"rank {r}: expert {e} source {s}: src_info (token, slot) set"
            for j, (a, b) in enumerate(zip(parts, encoded[s])):
                assert torch.equal(_bits(a[e, begin:begin + n]), _bits(b[t])), \
                    f"rank {r}: recv_x part {j} ({payload}) of expert {e}, rows from source {s}, differ from the reference"
    assert send_counts.tolist() == msgs[r].tolist(), f"rank {r}: send_counts {send_counts.tolist()}, expected {msgs[r].tolist()}"
    ids = idx[r]
    assert bool((send_slots[ids < 0] == -1).all()), f"rank {r}: send_slots not -1 where topk_idx is -1"
    for ex in ids[ids >= 0].unique().tolist():
        slots = sorted(send_slots[ids == ex].tolist())
        if ex // EL in masked:  # shrink: its rank was masked when the call began, nothing sent
            assert set(slots) == {rig.ll.MASKED_SLOT}, f"rank {r}: send_slots of expert {ex} of a masked rank: {slots}"
        else:
            assert slots == list(range(len(slots))), f"rank {r}: send_slots of expert {ex}: {slots}"


def expert_outputs(r: int, rig: Rig, xs, got: dict) -> torch.Tensor:
    """[EL, R*T, H]: what rank r's experts return, placed by the device's own handle (src_info,
    layout_range, checked before); unspecified rows hold NaN junk the combine must not read."""
    R, EL, K = rig.R, rig.EL, rig.K
    out = torch.full((EL, R * rig.T, rig.H), float("nan"), dtype=torch.bfloat16)
    info, ranges = got["src_info"].get().long(), got["layout_range"].get()
    for e in range(EL):
        for s in range(R):
            v = int(ranges[e, s])
            n, begin = v & 0xFFFFFFFF, v >> 32
            if n:
                out[e, begin:begin + n] = expert_fn(xs[s][info[e, begin:begin + n] // K], r * EL + e)
    return out


def expected_combine(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, bits: Optional[int]) -> torch.Tensor:
    """The reference combine of one rank when expert i returns expert_fn(x[t], i) for (t, k)."""
    y = expert_fn(x.unsqueeze(1), idx.clamp_min(0).unsqueeze(-1)) if x.shape[0] else \
        torch.zeros(0, idx.shape[1], x.shape[1], dtype=torch.bfloat16)
    return ref.low_latency_combine(y, idx, weights, bits)
