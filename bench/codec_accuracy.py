"""Accuracy of moelink's payload codecs on activation-like data (issue 4, docs/codecs.md).

For every format -- BF16 (a round-to-nearest cast), FP8 E4M3 and E5M2 with per-128-channel
float32 scales, E4M3 with UE8M0 scales, MXFP8 (E4M3 + UE8M0 per 32 channels; the OCP "floor" and
the "rceil" scale rule), NVFP4 (E2M1 + E4M3 per 16 channels + a float32 per-tensor scale computed
from the tensor), LogFMT-8/9/10 -- and every data set, it reports the relative (RMS) error
||x_hat - x|| / ||x|| and the largest element error relative to its row's largest magnitude,
measured against float32 ground truth in float64, and the bytes each format puts on the wire per
token (payload + scales). The combine case sums 8 encoded
expert outputs with top-k weights (accumulating in float32, as a combine kernel does) and compares
with the exact weighted sum.

The codecs run through moelink.reference.codecs, which the kernels reproduce bit for bit
(tests/test_codecs.py); ``--backend kernels`` runs the host-target kernels instead (slower).

    python bench/codec_accuracy.py                      # the table in docs/codecs.md
    python bench/codec_accuracy.py --tokens 256 --seed 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from moelink.reference import codecs as ref  # noqa: E402

FORMATS = ["bf16", "e4m3", "e4m3-ue8m0", "e5m2", "mxfp8", "mxfp8-rceil", "nvfp4", "logfmt8", "logfmt9", "logfmt10"]


def codec_round_trip(name: str, x: torch.Tensor, backend) -> torch.Tensor:
    """x (float32) -> encode -> decode -> float32."""
    if name == "bf16":
        return x.bfloat16().float()
    if name.startswith("logfmt"):
        bits = int(name[len("logfmt"):])
        return backend.logfmt_decode(backend.logfmt_encode(x, bits), x.shape[1], bits, torch.float32)
    if name.startswith("mxfp8"):
        mode = "rceil" if name.endswith("rceil") else "floor"
        return backend.mxfp8_dequantize(*backend.mxfp8_quantize(x, mode), torch.float32)
    if name == "nvfp4":
        return backend.nvfp4_dequantize(*backend.nvfp4_quantize(x), x.shape[1], torch.float32)
    fmt, scale_format = (name.split("-") + ["float32"])[:2]
    return backend.fp8_dequantize(*backend.fp8_quantize(x, fmt, scale_format), torch.float32)


def wire_bytes_per_element(name: str, hidden: int) -> float:
    if name == "bf16":
        return 2.0
    if name.startswith("logfmt"):
        return ref.logfmt_layout(hidden, int(name[len("logfmt"):])).bytes_per_element
    if name.startswith("mxfp8"):
        return (hidden + ref.mxfp8_num_blocks(hidden)) / hidden
    if name == "nvfp4":  # plus 4 bytes per tensor (the float32 global scale), not per token
        return (ref.nvfp4_row_bytes(hidden) + ref.nvfp4_num_blocks(hidden)) / hidden
    groups = ref.fp8_num_groups(hidden)
    scale_bytes = groups * 4 if not name.endswith("ue8m0") else -(-groups // 4) * 4
    return (hidden + scale_bytes) / hidden


# ---- data ---------------------------------------------------------------------------------------


def gaussian(gen, t, h):
    return torch.randn(t, h, generator=gen)


def laplace(gen, t, h):
    u = torch.rand(t, h, generator=gen, dtype=torch.float64).clamp(1e-300, 1 - 1e-16) - 0.5
    return (-torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def swiglu(gen, t, h):
    a, b = torch.randn(t, h, generator=gen), torch.randn(t, h, generator=gen)
    return torch.nn.functional.silu(a) * b


def outliers(gen, t, h):
    """Gaussian rows with 4 channels per row 100x larger (at random positions)."""
    x = torch.randn(t, h, generator=gen)
    idx = torch.randint(h, (t, 4), generator=gen)
    return x.scatter(1, idx, torch.randn(t, 4, generator=gen) * 100)


DATASETS = {"gaussian": gaussian, "laplace": laplace, "swiglu": swiglu, "outliers": outliers}


def errors(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    d = x_hat.double() - x.double()
    rel = (d.norm() / x.double().norm()).item()
    row_max = x.double().abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    return rel, (d.abs() / row_max).max().item()


def combine_case(gen, tokens, hidden, experts, backend, data):
    """sum_e w_e * decode(encode(y_e)) against sum_e w_e * y_e, w = softmax of random logits."""
    weights = torch.softmax(torch.randn(tokens, experts, generator=gen, dtype=torch.float64) * 1.5, dim=1)
    exact = torch.zeros(tokens, hidden, dtype=torch.float64)
    approx = {name: torch.zeros(tokens, hidden, dtype=torch.float32) for name in FORMATS}
    for e in range(experts):
        y = DATASETS[data](gen, tokens, hidden)
        w = weights[:, e : e + 1]
        exact += w * y.double()
        for name in FORMATS:
            approx[name] += w.float() * codec_round_trip(name, y, backend)
    return {name: errors(approx[name], exact) for name in FORMATS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=8, help="top-k of the combine case")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", choices=["reference", "kernels"], default="reference")
    args = parser.parse_args()
    if args.backend == "kernels":
        from moelink import codecs as backend
    else:
        backend = ref
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()

    rows = {}
    for data in DATASETS:
        x = DATASETS[data](gen, args.tokens, args.hidden)
        rows[data] = {name: errors(codec_round_trip(name, x, backend), x) for name in FORMATS}
    for data in ("gaussian", "swiglu", "outliers"):
        rows[f"combine-{args.experts} ({data})"] = combine_case(gen, args.tokens, args.hidden, args.experts, backend, data)

    print(f"# codec accuracy: {args.tokens} tokens x {args.hidden} channels, seed {args.seed}, "
          f"backend {args.backend}, torch {torch.__version__}, {time.time() - start:.0f} s")
    print()
    print("relative error ||x_hat - x|| / ||x|| (max element error / row max in parentheses)")
    print()
    print("| data | " + " | ".join(FORMATS) + " |")
    print("|---" * (len(FORMATS) + 1) + "|")
    for data, result in rows.items():
        cells = [f"{result[n][0]:.2e} ({result[n][1]:.1e})" for n in FORMATS]
        print(f"| {data} | " + " | ".join(cells) + " |")
    print(f"| bytes/element (hidden {args.hidden}) | "
          + " | ".join(f"{wire_bytes_per_element(n, args.hidden):.4f}" for n in FORMATS) + " |")
    print(f"| bytes/token on the wire | "
          + " | ".join(f"{round(wire_bytes_per_element(n, args.hidden) * args.hidden)}" for n in FORMATS) + " |")
    print()

    def ratio(a, b, data):
        return rows[data][a][0] / rows[data][b][0]

    print("LogFMT-8 vs E4M3 (relative error ratio; < 1 means LogFMT-8 is more accurate):")
    for data in rows:
        print(f"  {data:>24}: {ratio('logfmt8', 'e4m3', data):.2f}")
    print("LogFMT-10 vs BF16 (relative error ratio; ~1 means it matches BF16):")
    for data in rows:
        print(f"  {data:>24}: {ratio('logfmt10', 'bf16', data):.2f}")
    print("MXFP8 (floor) vs E4M3 with float32 scales per 128 channels (relative error ratio):")
    for data in rows:
        print(f"  {data:>24}: {ratio('mxfp8', 'e4m3', data):.2f}")
    print("NVFP4 vs LogFMT-8 (relative error ratio):")
    for data in rows:
        print(f"  {data:>24}: {ratio('nvfp4', 'logfmt8', data):.2f}")
    assert all(math.isfinite(v[0]) for r in rows.values() for v in r.values())


if __name__ == "__main__":
    main()
