"""Runs pytest against the AddressSanitizer + UndefinedBehaviorSanitizer build of moelink._host.

    python tools/sanitize.py                      # build (cached) + the CI subset (SUBSET below)
    python tools/sanitize.py -- tests/test_simt.py -k warp    # build + any pytest arguments

1. builds ``MOELINK_SANITIZE=address,undefined python setup.py build_ext`` (objects and output in
   build/sanitize-address-undefined/, never over the normal in-place build);
2. assembles a package overlay, build/sanitize-address-undefined/pkg/moelink: the Python sources
   of python/moelink plus the sanitized extension;
3. runs pytest with that overlay first on PYTHONPATH and the ASan runtime preloaded (the Python
   interpreter is not instrumented, so the runtime must be loaded before anything else; the rank
   processes inherit it), under the options below. Any report fails the run: ASan aborts the
   process at the first error, UBSan too (the build passes -fno-sanitize-recover).

ASAN_OPTIONS (docs/env.md):
  detect_leaks=0                         CPython and torch keep allocations for the life of the
                                         process; leak reports would be noise, not moelink's
  halt_on_error=1, abort_on_error=1      the first error stops the process (rank processes die
                                         with SIGABRT, which the harness reports as a crash)
  detect_stack_use_after_return=0        no fake stacks: fibers switch stacks (annotated, but
                                         fake stacks across 10^4 fibers cost memory for nothing)
  alloc_dealloc_mismatch=0               torch's libraries pair new/free across their own boundaries
  handle_segv=1, print_summary=1
UBSAN_OPTIONS: halt_on_error=1, print_stacktrace=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VARIANT = "address,undefined"
BASE = ROOT / "build" / "sanitize-address-undefined"
ASAN_OPTIONS = ("detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=0:"
                "alloc_dealloc_mismatch=0:handle_segv=1:print_summary=1")
UBSAN_OPTIONS = "halt_on_error=1:print_stacktrace=1"
# The CI subset: the runtime and every kernel family on real inputs, the windows and bootstrap,
# the intranode path on 2 and 4 ranks (one case of each kind), the root-cause machinery and the
# faulty-peer harnesses (intranode and internode).
SUBSET = [
    "tests/test_sanitizers.py", "tests/test_simt.py", "tests/test_layout.py", "tests/test_host_windows.py",
    "tests/test_root_cause.py",
    "tests/test_codecs.py::test_fp8_edge_cases_match_reference",
    "tests/test_codecs.py::test_logfmt_edge_cases_match_reference",
    "tests/test_intranode.py::test_random_routings",
    "tests/test_intranode.py::test_tiny_queues_wrap_many_times",
    "tests/test_intranode.py::test_cached_dispatch_equals_fresh_dispatch",
    "tests/test_intranode.py::test_combine_with_and_without_weights_and_bias",
    "tests/test_intranode.py::test_invalid_arguments_raise_typed_errors_on_every_rank",
    # A faulty peer's garbage at every stage: the victim raises and writes nothing out of bounds.
    "tests/test_faulty_peer.py",
    # ... and at every stage of the internode protocol (both windows, 2 nodes of 2 ranks).
    "tests/test_faulty_peer_internode.py",
]


def build() -> Path:
    start = time.monotonic()
    env = dict(os.environ, MOELINK_SANITIZE=VARIANT, MOELINK_CUDA="0")
    subprocess.run([sys.executable, "setup.py", "-q", "build_ext"], cwd=ROOT, env=env, check=True)
    built = sorted((BASE / "lib" / "moelink").glob("_host*.so"))
    if not built:
        raise SystemExit(f"sanitize: no _host*.so under {BASE / 'lib' / 'moelink'}")
    overlay = BASE / "pkg" / "moelink"
    shutil.rmtree(overlay, ignore_errors=True)
    shutil.copytree(ROOT / "python" / "moelink", overlay,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_ptxas_report.txt"))
    shutil.copy2(built[-1], overlay / built[-1].name)
    print(f"sanitize: {VARIANT} build ready in {time.monotonic() - start:.0f} s: {overlay.relative_to(ROOT)}", flush=True)
    return overlay.parent


def runtime_libraries() -> str:
    """LD_PRELOAD: the ASan runtime, then libstdc++. ASan resolves its __cxa_throw interceptor when
    it starts; the interpreter does not link libstdc++, so without the preload the first C++
    exception (every moelink error) finds no real __cxa_throw and aborts."""
    cc = os.environ.get("CC", "gcc")
    paths = [subprocess.run([cc, f"-print-file-name={lib}"], capture_output=True, text=True, check=True).stdout.strip()
             for lib in ("libasan.so", "libstdc++.so")]
    return " ".join(os.path.realpath(p) for p in paths)


def main(argv: list[str]) -> int:
    pkg = build()
    args = argv[argv.index("--") + 1:] if "--" in argv else ["-q", *SUBSET]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(pkg), str(ROOT / "tests")])
    env["LD_PRELOAD"] = runtime_libraries()
    env.setdefault("ASAN_OPTIONS", ASAN_OPTIONS)
    env.setdefault("UBSAN_OPTIONS", UBSAN_OPTIONS)
    env["MOELINK_SANITIZED"] = VARIANT  # tests may widen timing margins under the sanitizer
    print(f"sanitize: LD_PRELOAD={env['LD_PRELOAD']} ASAN_OPTIONS={env['ASAN_OPTIONS']} "
          f"UBSAN_OPTIONS={env['UBSAN_OPTIONS']}", flush=True)
    start = time.monotonic()
    code = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=ROOT, env=env).returncode
    print(f"sanitize: pytest exit {code} in {time.monotonic() - start:.0f} s", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
