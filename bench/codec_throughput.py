"""Encode/decode throughput of moelink's codec kernels beside the memcpy of the same tensor, and
the SIMT runtime's fiber switches per token (issue 11, item 6; docs/codecs.md, docs/results.md).

Throughput counts the BF16 activation bytes (2 per element: read by an encoder, written by a
decoder). The floor is a single-threaded copy of the same BF16 tensor into a preallocated
buffer, timed *interleaved* with the codec: every iteration times the copy, the encoder and the
decoder back to back, so a neighbour's load hits all three alike; the table shows medians and
each codec's ratio to the median copy. A host-target launch runs every CUDA thread as a fiber on
the calling thread, so the figures are per core.

    python bench/codec_throughput.py                          # 256 tokens x 7168
    python bench/codec_throughput.py --split warp             # the GPU's lane split, run on the host
    python bench/codec_throughput.py --tokens 128 --iters 15 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

import moelink  # noqa: E402
from moelink import codecs, runtime  # noqa: E402
from moelink.reference import codecs as ref  # noqa: E402

FORMATS = [  # label, kind, argument
    ("fp8 e4m3, fp32 scales", "fp8", ("e4m3", "float32")),
    ("fp8 e4m3, ue8m0 scales", "fp8", ("e4m3", "ue8m0")),
    ("fp8 e5m2, fp32 scales", "fp8", ("e5m2", "float32")),
    ("mxfp8 (floor)", "mxfp8", "floor"),
    ("mxfp8 (rceil)", "mxfp8", "rceil"),
    ("nvfp4", "nvfp4", None),
    ("logfmt-8", "logfmt", 8),
    ("logfmt-9", "logfmt", 9),
    ("logfmt-10", "logfmt", 10),
]


def wire_bytes_per_element(kind: str, arg, hidden: int) -> float:
    if kind == "logfmt":
        return ref.logfmt_layout(hidden, arg).bytes_per_element
    if kind == "mxfp8":
        return (hidden + ref.mxfp8_num_blocks(hidden)) / hidden
    if kind == "nvfp4":
        return (ref.nvfp4_row_bytes(hidden) + ref.nvfp4_num_blocks(hidden)) / hidden  # + 4 B per tensor
    groups = ref.fp8_num_groups(hidden)
    return (hidden + (4 * groups if arg[1] == "float32" else 4 * -(-groups // 4))) / hidden


def codec_pair(kind: str, arg, x: torch.Tensor, split: str):
    """(encode, decode) closures; the decoder decodes what the encoder produced once."""
    hidden = x.shape[1]
    if kind == "fp8":
        encode = lambda: codecs.fp8_quantize(x, *arg, split=split)  # noqa: E731
        q, s = encode()
        return encode, lambda: codecs.fp8_dequantize(q, s, split=split)
    if kind == "mxfp8":
        encode = lambda: codecs.mxfp8_quantize(x, arg, split=split)  # noqa: E731
        q, s = encode()
        return encode, lambda: codecs.mxfp8_dequantize(q, s, split=split)
    if kind == "nvfp4":
        # A calibrated per-tensor scale, as serving stacks pass in (computing it is one more
        # reduction over the tensor, not the codec).
        g = codecs.nvfp4_global_scale(x)
        encode = lambda: codecs.nvfp4_quantize(x, g, split=split)  # noqa: E731
        p, b, gg = encode()
        return encode, lambda: codecs.nvfp4_dequantize(p, b, gg, hidden, split=split)
    encode = lambda: codecs.logfmt_encode(x, arg, split=split)  # noqa: E731
    packed = encode()
    return encode, lambda: codecs.logfmt_decode(packed, hidden, arg, split=split)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def switches_per_token(fn, tokens: int) -> float:
    before = runtime.stats()["switches"]
    fn()
    return (runtime.stats()["switches"] - before) / tokens


def run(tokens: int, hidden: int, iters: int, split: str, only: list[str] | None) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    payload = x.numel() * x.element_size()
    dst = torch.empty_like(x)
    rows = []
    for label, kind, arg in FORMATS:
        if only and not any(o in label for o in only):
            continue
        encode, decode = codec_pair(kind, arg, x, split)
        copy = lambda: dst.copy_(x)  # noqa: E731
        for fn in (copy, encode, decode):  # warm up: pools, caches
            fn()
        t_copy, t_enc, t_dec = [], [], []
        for _ in range(iters):
            t_copy.append(timed(copy))
            t_enc.append(timed(encode))
            t_dec.append(timed(decode))
        copy_gbs = payload / statistics.median(t_copy) / 1e9
        enc_gbs = payload / statistics.median(t_enc) / 1e9
        dec_gbs = payload / statistics.median(t_dec) / 1e9
        rows.append({
            "format": label, "wire_bytes_per_element": wire_bytes_per_element(kind, arg, hidden),
            "memcpy_gbs": copy_gbs, "encode_gbs": enc_gbs, "decode_gbs": dec_gbs,
            "encode_vs_memcpy": enc_gbs / copy_gbs, "decode_vs_memcpy": dec_gbs / copy_gbs,
            "encode_switches_per_token": switches_per_token(encode, tokens),
            "decode_switches_per_token": switches_per_token(decode, tokens),
        })
        print(f"  {label}: encode {enc_gbs:.2f} GB/s, decode {dec_gbs:.2f} GB/s, memcpy {copy_gbs:.2f} GB/s",
              file=sys.stderr, flush=True)
    return {"tokens": tokens, "hidden": hidden, "iters": iters, "split": split, "bf16_bytes": payload, "rows": rows}


def print_table(result: dict) -> None:
    print(f"## host target: {result['tokens']} tokens x {result['hidden']} channels of bf16 "
          f"({result['bf16_bytes'] / 1e6:.1f} MB), lane split '{result['split']}', "
          f"median of {result['iters']} interleaved iterations")
    print()
    print("| format | wire B/elem | memcpy GB/s | encode GB/s | decode GB/s | encode / memcpy | decode / memcpy "
          "| switches/token enc, dec |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['format']} | {r['wire_bytes_per_element']:.4f} | {r['memcpy_gbs']:.2f} | {r['encode_gbs']:.3f} "
              f"| {r['decode_gbs']:.3f} | {r['encode_vs_memcpy']:.2f} | {r['decode_vs_memcpy']:.2f} "
              f"| {r['encode_switches_per_token']:.1f}, {r['decode_switches_per_token']:.1f} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--iters", type=int, default=11, help="interleaved timed iterations per format")
    parser.add_argument("--split", choices=["auto", "warp"], default="auto")
    parser.add_argument("--only", nargs="*", help="formats whose label contains one of these")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the floor is one core's memcpy, like the host target's launch
    load = os.getloadavg()
    print(f"# codec throughput, {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
          f"moelink {moelink.__version__}, schedule {runtime.schedule()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"# command: python bench/codec_throughput.py {' '.join(sys.argv[1:])}")
    print()
    result = run(args.tokens, args.hidden, args.iters, args.split, args.only)
    result["load_average"] = load
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
