"""Encode/decode throughput of moelink's codec kernels on the host target, beside this machine's
memcpy floor, and the bytes each format puts on the wire (issue 4, docs/codecs.md).

A host-target launch runs every CUDA thread of the kernel as a fiber on the calling thread, so
the numbers are per core. Throughput counts the BF16 activation bytes (2 per element: read by an
encoder, written by a decoder); the memcpy floor copies the same BF16 tensor with one thread.
Each figure is the best of --repeats runs (the least disturbed by other processes).

    python bench/codec_throughput.py
    python bench/codec_throughput.py --tokens 128 --hidden 7168 --repeats 5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import moelink  # noqa: E402
from moelink import codecs  # noqa: E402
from moelink.reference import codecs as ref  # noqa: E402

FORMATS = [
    ("fp8 e4m3, fp32 scales", "fp8", ("e4m3", "float32")),
    ("fp8 e4m3, ue8m0 scales", "fp8", ("e4m3", "ue8m0")),
    ("fp8 e5m2, fp32 scales", "fp8", ("e5m2", "float32")),
    ("logfmt-8", "logfmt", 8),
    ("logfmt-9", "logfmt", 9),
    ("logfmt-10", "logfmt", 10),
]


def best_seconds(fn, repeats: int, sync=lambda: None) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def wire_bytes(kind: str, arg, hidden: int) -> float:
    if kind == "logfmt":
        return ref.logfmt_layout(hidden, arg).bytes_per_element
    groups = ref.fp8_num_groups(hidden)
    scale_bytes = 4 * groups if arg[1] == "float32" else 4 * -(-groups // 4)
    return 1.0 + scale_bytes / hidden


def run(device: str, tokens: int, hidden: int, repeats: int) -> None:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    x = torch.randn(tokens, hidden, device=device).bfloat16()
    payload = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    memcpy = payload / best_seconds(lambda: dst.copy_(x), repeats, sync) / 1e9
    print(f"## {device}: {tokens} tokens x {hidden} channels of bf16 ({payload / 1e6:.1f} MB), best of {repeats}")
    print()
    print("| format | wire bytes/element | encode GB/s | decode GB/s |")
    print("|---|---|---|---|")
    print(f"| bf16 (memcpy floor) | 2.0000 | {memcpy:.2f} | {memcpy:.2f} |")
    for label, kind, arg in FORMATS:
        if kind == "fp8":
            encode = lambda: codecs.fp8_quantize(x, *arg)  # noqa: E731
            q, s = encode()
            decode = lambda: codecs.fp8_dequantize(q, s)  # noqa: E731
        else:
            encode = lambda: codecs.logfmt_encode(x, arg)  # noqa: E731
            packed = encode()
            decode = lambda: codecs.logfmt_decode(packed, hidden, arg)  # noqa: E731
        enc = payload / best_seconds(encode, repeats, sync) / 1e9
        dec = payload / best_seconds(decode, repeats, sync) / 1e9
        print(f"| {label} | {wire_bytes(kind, arg, hidden):.4f} | {enc:.3f} | {dec:.3f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the floor is one core's memcpy, like the host target's launch
    print(f"# codec throughput, torch {torch.__version__}, moelink {moelink.__version__}, "
          f"schedule {moelink.runtime.schedule()}")
    print()
    run("cpu", args.tokens, args.hidden, args.repeats)
    if moelink.cuda_available():
        run("cuda", args.tokens * 16, args.hidden, args.repeats * 5)


if __name__ == "__main__":
    main()
