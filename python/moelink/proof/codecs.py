"""Path "codecs": every rank encodes and decodes its own tokens at the same time (FP8 E4M3/E5M2
with float32 or UE8M0 scales, LogFMT-8/9/10), each kernel on its rank's stream or thread, checked
bit for bit against ``moelink.reference.codecs``: codes, scales, packed rows and decoded values.
Inputs mix normal values with zeros, huge and tiny magnitudes, and a partial last group."""

from __future__ import annotations

import torch

from ..reference import codecs as ref
from .core import Case, RankGroup

name = "codecs"

_FMT = {"e4m3": 0, "e5m2": 1}
_SCALE = {"float32": 0, "ue8m0": 1}
_DTYPE = {torch.float32: 0, torch.bfloat16: 1}


def cases(group: RankGroup):
    tokens = 256 if group.big else 48  # the reference is plain torch: keep it quick
    return [
        Case("fp8-e4m3-float32", dict(codec="fp8", fmt="e4m3", scale="float32", tokens=tokens, hidden=7168)),
        Case("fp8-e5m2-ue8m0-partial", dict(codec="fp8", fmt="e5m2", scale="ue8m0", tokens=tokens, hidden=2880)),
        Case("logfmt-8", dict(codec="logfmt", bits=8, tokens=tokens, hidden=4096)),
        Case("logfmt-10-partial", dict(codec="logfmt", bits=10, tokens=tokens, hidden=2880)),
    ]


def _inputs(gen: torch.Generator, tokens: int, hidden: int) -> torch.Tensor:
    x = torch.randn(tokens, hidden, generator=gen) * torch.exp2(torch.randint(-8, 9, (tokens, 1), generator=gen).float())
    x[torch.rand(tokens, hidden, generator=gen) < 0.02] = 0.0
    if tokens > 2:
        x[1] *= 2.0 ** 60  # huge and tiny rows: the scale's floor and saturation
        x[2] *= 2.0 ** -60
    return x.to(torch.bfloat16)


def run(group: RankGroup, case: Case):
    p, ranks = case.params, group.num_ranks
    gen = torch.Generator().manual_seed(case.seed)
    xs = [_inputs(gen, p["tokens"] + 3 * r, p["hidden"]) for r in range(ranks)]
    hidden = p["hidden"]
    m = group.module
    with group.scratch() as mem:
        ins = [mem.upload(x) for x in xs]
        if p["codec"] == "fp8":
            want = [ref.fp8_quantize(x, p["fmt"], p["scale"]) for x in xs]
            q = [mem.empty(x.shape, torch.uint8, fill=0xcd) for x in xs]
            sc = [mem.empty(w[1].shape, w[1].dtype, fill=0xcd) for w in want]
            out = [mem.empty(x.shape, torch.bfloat16, fill=0xcd) for x in xs]

            def encode(r, s):
                m.fp8_quantize(ins[r], _DTYPE[torch.bfloat16], hidden, xs[r].shape[0], hidden, _FMT[p["fmt"]],
                               _SCALE[p["scale"]], q[r].ptr, hidden, sc[r].ptr, want[r][1].shape[1], stream=s, rank=r)

            def decode(r, s):
                m.fp8_dequantize(q[r].ptr, hidden, _FMT[p["fmt"]], _SCALE[p["scale"]], sc[r].ptr, want[r][1].shape[1],
                                 xs[r].shape[0], hidden, out[r].ptr, _DTYPE[torch.bfloat16], hidden, stream=s, rank=r)

            group.run_all("fp8_quantize", encode, check_fit=False)
            group.run_all("fp8_dequantize", decode, check_fit=False)
            for r in range(ranks):
                assert torch.equal(q[r].get(), want[r][0].view(torch.uint8)), f"rank {r}: fp8 codes"
                assert torch.equal(sc[r].get(), want[r][1]), f"rank {r}: fp8 scales"
                back = ref.fp8_dequantize(want[r][0], want[r][1], torch.bfloat16)
                assert torch.equal(out[r].get().view(torch.int16), back.view(torch.int16)), f"rank {r}: fp8 decode"
        else:
            bits = p["bits"]
            row = m.logfmt_row_bytes(hidden, bits)
            packed = [mem.empty((x.shape[0], row), torch.uint8, fill=0xcd) for x in xs]
            out = [mem.empty(x.shape, torch.float32, fill=0xcd) for x in xs]

            def encode(r, s):
                m.logfmt_encode(ins[r], _DTYPE[torch.bfloat16], hidden, xs[r].shape[0], hidden, bits, packed[r].ptr, row,
                                stream=s, rank=r)

            def decode(r, s):
                m.logfmt_decode(packed[r].ptr, row, xs[r].shape[0], hidden, bits, out[r].ptr, _DTYPE[torch.float32],
                                hidden, stream=s, rank=r)

            group.run_all("logfmt_encode", encode, check_fit=False)
            group.run_all("logfmt_decode", decode, check_fit=False)
            for r in range(ranks):
                want = ref.logfmt_encode(xs[r], bits)
                assert torch.equal(packed[r].get(), want), f"rank {r}: logfmt-{bits} rows"
                back = ref.logfmt_decode(want, hidden, bits, torch.float32)
                got = out[r].get()
                same = (got.view(torch.int32) == back.view(torch.int32)) | (got.isnan() & back.isnan())
                assert bool(same.all()), f"rank {r}: logfmt-{bits} decode"
    return {"summary": f"{sum(x.shape[0] for x in xs)} rows of {hidden}"}
