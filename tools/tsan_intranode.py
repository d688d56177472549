"""Builds and runs the ThreadSanitizer driver of the intranode kernels (tools/tsan_intranode.cpp):
every rank of a node as a thread of one process, windows in ordinary memory, the fiber switches
annotated for TSan. Exits non-zero if TSan reports a data race or any output is wrong.

    python tools/tsan_intranode.py                 # build (cached) + the CI configurations
    python tools/tsan_intranode.py -- --ranks 3 --schedule random:7   # one custom run

Objects go to build/sanitize-thread/driver/ and are rebuilt when a csrc/ file or the driver is
newer. docs/simt.md says what this run can and cannot see.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "sanitize-thread" / "driver"
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "simt").glob("*.cpp")) + [
    "csrc/runtime/ops_intranode.cu", "tools/tsan_intranode.cpp"]
FLAGS = ["-std=c++20", "-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=thread", "-pthread", "-Wall", "-Icsrc"]
# halt_on_error: the first race fails the run. report_signal_unsafe=0: the runtime's back-off is
# not a signal handler. history_size=4: long runs keep enough history to name both accesses.
TSAN_OPTIONS = "halt_on_error=1:exitcode=66:report_signal_unsafe=0:history_size=4:second_deadlock_stack=1"
# Shapes that cover a full run of every kernel, queues that wrap many times, and random schedules.
CONFIGS = [
    ["--ranks", "4", "--tokens", "40", "--iterations", "2"],
    ["--ranks", "3", "--tokens", "64", "--queue", "3", "--chunk", "1", "--num-sms", "2", "--schedule", "random:5"],
    ["--ranks", "2", "--tokens", "96", "--hidden", "32", "--topk", "2", "--num-sms", "6", "--schedule", "random:9:0.5"],
]


def build() -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    newest_header = max(p.stat().st_mtime for p in (ROOT / "csrc").rglob("*") if p.suffix in (".h", ".cuh"))

    def compile_one(src: str) -> str:
        obj = OUT / (src.replace("/", "_") + ".o")
        if obj.is_file() and obj.stat().st_mtime >= max(newest_header, (ROOT / src).stat().st_mtime):
            return str(obj)
        language = ["-x", "c++"] if src.endswith(".cu") else []
        cmd = [cxx, *FLAGS, *language, "-c", src, "-o", str(obj)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"tsan_intranode: compiling {src} failed:\n{' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        return str(obj)

    start = time.monotonic()
    jobs = int(os.environ.get("MOELINK_BUILD_JOBS") or os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        objects = list(pool.map(compile_one, SOURCES))
    binary = OUT / "tsan_intranode"
    subprocess.run([cxx, "-fsanitize=thread", "-pthread", *objects, "-o", str(binary)], check=True, cwd=ROOT)
    print(f"tsan_intranode: built {binary.relative_to(ROOT)} in {time.monotonic() - start:.0f} s", flush=True)
    return binary


def main(argv: list[str]) -> int:
    binary = build()
    configs = [argv[argv.index("--") + 1:]] if "--" in argv else CONFIGS
    env = dict(os.environ, TSAN_OPTIONS=os.environ.get("TSAN_OPTIONS", TSAN_OPTIONS))
    if "--" not in argv:
        # Negative control: a planted unordered store into a peer's window must be reported, or
        # TSan does not see what the kernels' fibers do and a clean run would prove nothing.
        proc = subprocess.run([str(binary), "--ranks", "2", "--tokens", "8", "--iterations", "1", "--plant-race", "1"],
                              env=env, capture_output=True, text=True)
        reported = proc.returncode == 66 and "WARNING: ThreadSanitizer: data race" in proc.stderr
        print(f"tsan_intranode: planted race {'reported' if reported else 'NOT reported'} (exit {proc.returncode})",
              flush=True)
        if not reported:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            return 1
    for config in configs:
        start = time.monotonic()
        proc = subprocess.run([str(binary), *config], env=env)
        print(f"tsan_intranode: {' '.join(config) or '(defaults)'}: exit {proc.returncode} in "
              f"{time.monotonic() - start:.1f} s", flush=True)
        if proc.returncode != 0:
            print("tsan_intranode: FAILED (exit 66: ThreadSanitizer reported a race; 1: a wrong output)",
                  file=sys.stderr)
            return proc.returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
