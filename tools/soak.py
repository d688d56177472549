"""Soak: every mode of the intranode path, many times over, with each rank's resources sampled.

    python tools/soak.py                         # 10 000 iterations, 2 ranks
    python tools/soak.py --iterations 500 --ranks 3 --sample-every 50

One iteration, on every rank: a new Buffer (the bootstrap: memfd segments shared by descriptor),
get_dispatch_layout, dispatch (bf16, top-k weights), dispatch of an FP8 pair, cached dispatch,
combine (weights and bias), a check that combine(dispatch(x)) equals x * copies, and the Buffer's
destroy (with --rebuild-every N, a new Buffer every N iterations instead). Every --sample-every
iterations each rank records its RSS, open fds, threads, the segments it maps and the names of its
tag in /dev/shm. The verdict is "flat" when, from the first sample after the warm-up (10% of the
run) to the last, RSS grew by at most 4 MiB and fds, threads, segments and /dev/shm did not grow.
Exit status 0 if flat on every rank, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # multiproc (rank groups) and shm_audit

import shm_audit  # noqa: E402
from multiproc import RankGroup  # noqa: E402

RSS_SLACK_BYTES = 4 << 20


def _sample(iteration: int, tag: str) -> dict:
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return dict(iteration=iteration, rss=rss, fds=shm_audit.open_fds(), threads=len(os.listdir("/proc/self/task")),
                segments=len(shm_audit.mappings(tag=tag)), dev_shm=len(shm_audit.dev_shm_names(tag)))


def _soak(ctx, iterations: int, sample_every: int, rebuild_every: int, tokens: int, hidden: int):
    import torch

    import moelink

    world, rank = ctx.world_size, ctx.rank
    config = moelink.Config(4, 4, 32)
    nvl_bytes = config.get_nvl_buffer_size_hint(hidden * 2, world)
    gen = torch.Generator().manual_seed(1234 + rank)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    x_fp8 = (x.to(torch.float8_e4m3fn), torch.rand(tokens, (hidden + 127) // 128, generator=gen) + 0.5)
    topk = torch.randint(-1, 2 * world, (tokens, 4), generator=gen)
    weights = torch.rand(tokens, 4, generator=gen)
    bias = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16)
    samples, buffer, start = [], None, time.monotonic()
    for i in range(iterations):
        if buffer is None:
            buffer = moelink.Buffer(ctx.group, nvl_bytes)
        _, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk, 2 * world)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, topk_idx=topk, topk_weights=weights,
                                                          is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                                                          config=config)
        buffer.dispatch(x_fp8, topk_idx=topk, topk_weights=weights, is_token_in_rank=in_rank,
                        num_tokens_per_expert=per_expert, config=config)
        cached = buffer.dispatch(x, handle=handle, config=config)[0]
        combined, _, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, bias=bias, config=config)
        copies = in_rank.sum(1, keepdim=True).float()
        want = (x.float() * copies + bias.float()).to(torch.bfloat16).float()
        if not (torch.equal(cached, recv_x) and torch.allclose(combined.float(), want, rtol=2e-2, atol=2e-2)):
            raise AssertionError(f"rank {rank} iteration {i}: wrong result")
        if (i + 1) % rebuild_every == 0:
            buffer.destroy()
            buffer = None
        if i % sample_every == 0 or i == iterations - 1:
            samples.append(_sample(i, ctx.shm_tag))
    if buffer is not None:
        buffer.destroy()
    return dict(samples=samples, seconds=time.monotonic() - start)


def _verdict(samples: list) -> tuple[bool, str]:
    base = samples[max(1, len(samples) // 10)] if len(samples) > 2 else samples[0]
    last = samples[-1]
    growth = last["rss"] - base["rss"]
    ok = (growth <= RSS_SLACK_BYTES and last["fds"] <= base["fds"] and last["threads"] <= base["threads"]
          and last["segments"] <= base["segments"] and max(s["dev_shm"] for s in samples) == 0)
    return ok, (f"RSS {base['rss'] / 2**20:.1f} -> {last['rss'] / 2**20:.1f} MiB ({growth / 2**20:+.2f}), fds "
                f"{base['fds']} -> {last['fds']}, threads {base['threads']} -> {last['threads']}, segments mapped "
                f"{base['segments']} -> {last['segments']}, /dev/shm names max {max(s['dev_shm'] for s in samples)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sample-every", type=int, default=500)
    parser.add_argument("--rebuild-every", type=int, default=1, help="iterations per Buffer (1: a bootstrap each)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.timezone.utc)
    group = RankGroup(args.ranks, case_timeout=24 * 3600)
    try:
        results = group.run(_soak, args.iterations, args.sample_every, args.rebuild_every, args.tokens, args.hidden)
        leftovers = shm_audit.holders(group.shm_tag)
    finally:
        group.close()
    print(f"python tools/soak.py --iterations {args.iterations} --ranks {args.ranks} --sample-every "
          f"{args.sample_every} --rebuild-every {args.rebuild_every} --tokens {args.tokens} --hidden {args.hidden}")
    print(f"started {started:%Y-%m-%d %H:%M} UTC, 1-min load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs")
    print(f"{'iteration':>9} " + " ".join(f"{'rank ' + str(r) + ' RSS MiB/fds/threads/segs/shm':>36}"
                                         for r in range(args.ranks)))
    for row in zip(*(r["samples"] for r in results)):
        cells = [f"{s['rss'] / 2**20:12.1f} {s['fds']:5d} {s['threads']:5d} {s['segments']:5d} {s['dev_shm']:5d}"
                 for s in row]
        print(f"{row[0]['iteration']:9d} " + " ".join(f"{c:>36}" for c in cells))
    flat = True
    for r, res in enumerate(results):
        ok, text = _verdict(res["samples"])
        flat &= ok
        print(f"rank {r}: {'flat' if ok else 'NOT FLAT'}: {text}; {args.iterations} iterations in "
              f"{res['seconds']:.0f} s ({1000 * res['seconds'] / args.iterations:.1f} ms each)")
    print(f"after the ranks exited: processes holding a segment of the run: {len(leftovers)}")
    return 0 if flat and not leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
