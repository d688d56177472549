"""Cost of the SIMT host runtime itself: a fiber switch, and an empty launch.

    python bench/simt_overhead.py [--json]

A "switch" is one fiber stopping and the next one starting (one user-space context switch plus
the scheduler's bookkeeping); it is measured with warps that do nothing but syncwarp, where 31 of
every 32 lanes block and resume per call.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

from moelink import _host, runtime


def _timed(fn, repeats: int) -> float:
    fn()  # warm: fiber stacks come from a pool that grows on first use
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure() -> dict:
    probe = _host.selftest.cost_probe
    results = {"machine": platform.processor() or platform.machine(), "schedule": runtime.schedule()}

    # One warp keeps every stack in cache; 1024 threads is a full block's worth of stacks.
    for threads in (32, 1024):
        before = runtime.stats()["switches"]
        seconds = _timed(lambda: probe(0, 1, threads, 200), 5)
        switches = (runtime.stats()["switches"] - before) / 6
        results[f"switch_ns_{threads}_threads"] = seconds / switches * 1e9

    results["empty_launch_1x1_us"] = _timed(lambda: probe(1, 1, 1, 0), 2000) * 1e6
    seconds = _timed(lambda: probe(1, 132, 256, 0), 20)
    results["empty_launch_132x256_ms"] = seconds * 1e3
    results["per_fiber_ns"] = seconds / (132 * 256) * 1e9
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    results = measure()
    if args.json:
        print(json.dumps(results))
        return
    print(f"SIMT host runtime overhead ({results['machine']}, schedule {results['schedule']})")
    print(f"  fiber switch, 1 warp                    {results['switch_ns_32_threads']:8.1f} ns")
    print(f"  fiber switch, 1024-thread block         {results['switch_ns_1024_threads']:8.1f} ns")
    print(f"  empty launch, 1 block x 1 thread        {results['empty_launch_1x1_us']:8.2f} us")
    print(f"  empty launch, 132 blocks x 256 threads  {results['empty_launch_132x256_ms']:8.2f} ms"
          f"  ({results['per_fiber_ns']:.0f} ns per fiber)")


if __name__ == "__main__":
    main()
