"""The one-GPU proof on a real GPU (marker ``gpu``; skipped without one): N ranks as N streams of
one process, at 2, 4 and 8 ranks, every path against moelink.reference, forced timeouts through
the AbortRecord with the context intact; plus the AbortRecord binding and the launch probe on
their own. Each runs in a subprocess: the GPU's wait deadline (MOELINK_TIMEOUT_S) is read once per
process, and a broken CUDA context must not take pytest down with it.

    python -m pytest -m gpu tests/test_gpu_proof.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from moelink import _backend

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not _backend.cuda_available(), reason="needs a GPU and moelink's CUDA extension")]

# Where this process imports moelink from (the source tree in place, or site-packages).
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(_backend.__file__)))


def _env(timeout_s: str) -> dict:
    return dict(os.environ, MOELINK_TIMEOUT_S=timeout_s,
                PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _python(code: str, timeout_s: str = "2", limit: int = 300) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=_env(timeout_s), timeout=limit)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_the_proof_passes_at_2_4_and_8_ranks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moelink.proof", "--target", "cuda", "--ranks", "2,4,8",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=_env("5"), timeout=900)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]
    data = json.loads((tmp_path / "proof-cuda.json").read_text())
    assert data["counts"]["fail"] == 0 and data["counts"]["pass"] > 0
    assert {r["ranks"] for r in data["results"]} == {2, 4, 8}
    timeouts = [r for r in data["results"] if r["case"].startswith("absent-")]
    assert timeouts and all(r["status"] == "pass" and "GPU abort record" in r["details"]["message"] for r in timeouts)


def test_a_timed_out_wait_fills_the_abort_record_and_the_context_survives():
    out = _python("""
        import re, time, torch
        import moelink._cuda as c
        p = c.proof
        s = p.stream_create()
        flag = p.malloc(64)
        p.memset(flag, 0, 64)
        c.selftest.wait_forever(flag, 3, 7, stream=s, rank=5)   # nobody ever sets the flag
        deadline = time.monotonic() + 60
        while not p.stream_done(s):
            assert time.monotonic() < deadline, "the timed-out kernel did not return"
            time.sleep(0.01)
        rec = c.abort.record()
        assert rec is not None, "no abort record"
        assert (rec["rank"], rec["peer"], rec["channel"]) == (5, 3, 7), rec
        assert "a flag nobody sets" in rec["what"] and rec["waited_ns"] >= 2e9 and rec["cmp"] == ">=", rec
        message = c.abort.take("selftest_wait_forever")
        assert re.match(r"kernel 'selftest_wait_forever' rank 5 block 0 thread 0: waited \\d+ ms for selftest: a flag "
                        r"nobody sets from peer 3 on channel 7: value is 0, waited for >= 1 ", message), message
        assert c.abort.record() is None and not c.abort.pending()
        # The context is intact: a normal kernel runs and gives its exact counts.
        c64, c32 = p.malloc(9 * 8), p.malloc(2 * 4)
        host64 = torch.tensor([0, 0, 0, -1, 1 << 40, 0, 0, 0, 0], dtype=torch.int64)
        p.copy(c64, host64.data_ptr(), 72)
        p.memset(c32, 0, 8)
        c.selftest.atomics(c64, c32, stream=s)
        p.stream_synchronize(s)
        p.copy(host64.data_ptr(), c64, 72)
        assert host64[0] == 512 and host64[1] == sum(range(512)) and host64[3] == 511 and host64[5] == 512, host64
        p.device_synchronize()
        print("OK")
    """)
    assert "OK" in out


def test_the_launch_probe_reports_the_dispatch_grid():
    out = _python("""
        import moelink._cuda as c
        im, p = c.intranode, c.proof
        shape = dict(num_ranks=2, num_channels=4, block_warps=im.GPU_BLOCK_WARPS, sub_channels=1, queue_tokens=64,
                     row_bytes=256, num_scales=0, num_topk=4, experts_per_rank=2)
        win = p.malloc(1 << 24)
        node = im.Node(rank=0, windows=[win, win + (1 << 23)], **shape)
        s = p.stream_create()
        p.capture_begin(s)
        try:
            im.dispatch(node, False, 6, 0, 0, 0, 0, 0, 0, win, 0, 0, 0, 0, 0, 0, stream=s, rank=0)
        finally:
            graph = p.capture_end(s)
        kernels = p.graph_kernels(graph)
        p.graph_destroy(graph)
        assert len(kernels) == 1, kernels
        k = kernels[0]
        assert "dispatch_kernel" in k["name"] and k["grid_blocks"] == 8 and k["block_threads"] == 512, k
        assert k["blocks_per_sm"] >= 1 and k["cooperative"], k
        print("OK", k)
    """)
    assert "OK" in out
