"""The one-GPU proof (moelink.proof) on the host target: N virtual ranks as N threads of this
process on the SIMT runtime, every path checked against moelink.reference, at 2 and 4 ranks; the
forced timeouts and the normal case after them; the CLI; the runtime's concurrent launches from
several OS threads; and the GPU backend's control flow driven by a simulated device
(tests/fake_device.py), since no GPU is here. tests/test_gpu_proof.py runs the real thing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import moelink
import moelink.proof as proof
from moelink import _backend, _host, errors, runtime
from moelink.proof import bench, bench_low_latency
from moelink.proof.backend import check_coresident
from seeding import proof_failures, proof_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where this process imports moelink from (the source tree in place, site-packages in CI): the CLI
# subprocesses must run the same build.
PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(moelink.__file__)))


@pytest.fixture(scope="module", params=[2, 4], ids=lambda r: f"{r}ranks")
def host_report(request):
    return proof.run_proof("host", [request.param], seed=proof_seed(), log=lambda line: None)


def test_every_path_passes_on_the_host_target(host_report):
    assert not host_report.failed, proof_failures(host_report)
    ran = {r.path for r in host_report.results if r.status == "pass"}
    assert ran == {p.name for p in proof.PATHS}
    assert host_report.counts()["skip"] == 0, [r.line() for r in host_report.results if r.status == "skip"]


def test_queues_wrapped_and_several_warp_maps_ran(host_report):
    cases = {r.case: r for r in host_report.results if r.path == "intranode"}
    assert cases["wrap-tiny-queues"].details["max_wraps"] >= 8
    maps = {(r.details["block_warps"], r.details["sub_channels"]) for r in cases.values() if "block_warps" in r.details}
    assert len(maps) >= 3, maps
    ranks = host_report.meta["ranks"][0]
    assert any(w < ranks for w, _ in maps) or ranks <= 2, "W < R (several peers per warp) did not run"


def test_forced_timeouts_name_the_absent_peer_and_a_normal_case_runs_after(host_report):
    results = {r.case: r for r in host_report.results if r.path == "intranode"}
    ranks = host_report.meta["ranks"][0]
    notify = results["absent-in-notify"]
    assert notify.status == "pass", notify.line()
    assert f"from peer {ranks - 1}" in notify.details["message"] and "CommTimeout" not in notify.error
    assert results["absent-in-dispatch"].status == "pass"
    assert results["after-timeout"].status == "pass" and results["after-timeout"].details["dispatch_bytes"] > 0
    assert runtime.wait_timeout() == host_report.meta["wait_timeout_s"], "the host deadline was not restored"


def test_launches_from_several_threads_at_once_are_independent(seed):
    """The SIMT runtime's launch state is per OS thread: concurrent launches of different kernels on
    different threads give the results each gives alone, and two threads can wait on each other."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [torch.randint(-1000, 1000, (4 * 96,), generator=gen, dtype=torch.int32) for _ in range(4)]

    def warp_ops(x):
        out = torch.empty(x.numel() * _host.selftest.WARP_OP_RESULTS, dtype=torch.int32)
        out_f = torch.empty(x.numel(), dtype=torch.float32)
        _host.selftest.warp_ops(x.data_ptr(), out.data_ptr(), out_f.data_ptr(), 4, 96)
        return out, out_f

    alone = [warp_ops(x) for x in inputs]
    flags = torch.zeros(16, dtype=torch.int64)  # two flags, 64 bytes apart
    payload = torch.zeros(2, 64, dtype=torch.int32)
    errs = torch.full((2,), -1, dtype=torch.int32)
    results, failures = {}, []

    def ops(i):
        try:
            results[i] = [warp_ops(inputs[i]) for _ in range(3)]
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    def pingpong(role):
        try:
            me, peer = flags[8 * role:].data_ptr(), flags[8 * (1 - role):].data_ptr()
            _host.selftest.pingpong(me, peer, payload[role].data_ptr(), payload[1 - role].data_ptr(), 64, role, 200,
                                    errs[role:].data_ptr(), rank=role)
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    before = runtime.stats()["launches"]
    threads = [threading.Thread(target=ops, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=pingpong, args=(role,)) for role in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a launch did not return"
    assert not failures, failures
    for i in range(4):
        for out, out_f in results[i]:
            assert torch.equal(out, alone[i][0]) and torch.equal(out_f, alone[i][1]), f"thread {i}"
    assert errs.tolist() == [0, 0], "pingpong payloads seen before their release"
    assert runtime.stats()["launches"] - before == 4 * 3 + 2


def test_cli_writes_text_and_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "moelink.proof", "--target", "host", "--ranks", "2", "--only",
                           "layout/", "--no-timeouts", "--out", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "proof-host.json").read_text())
    assert data["counts"]["pass"] == 3 and data["counts"]["fail"] == 0
    assert "3 passed, 0 failed, 0 skipped" in (tmp_path / "proof-host.txt").read_text()


@pytest.mark.skipif(_backend.cuda_available(), reason="a GPU is usable here")
def test_cli_says_plainly_when_there_is_no_gpu():
    env = dict(os.environ, PYTHONPATH=PYTHON_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "moelink.proof", "--target", "cuda"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no GPU to run on" in proc.stderr


def test_coresidency_check_refuses_grids_that_do_not_fit():
    k = lambda blocks, per_sm: dict(name="k", grid_blocks=blocks, block_threads=512, dynamic_smem_bytes=0,  # noqa: E731
                                    registers=128, blocks_per_sm=per_sm)
    ok = check_coresident("x", {r: [k(16, 1), k(8, 2)] for r in range(8)}, 132)
    assert ok["sms_needed"] == 128
    with pytest.raises(errors.InvalidArgument, match="need 136.0 SMs .* this GPU has 132"):
        check_coresident("dispatch", {r: [k(34, 1)] for r in range(4)}, 132)
    with pytest.raises(errors.InvalidArgument, match="cannot launch at all"):
        check_coresident("dispatch", {0: [k(2, 0)]}, 132)


# ---- the GPU backend's control flow on a simulated device --------------------------------------

def test_gpu_backend_control_flow_on_a_simulated_device(monkeypatch):
    from fake_device import FakeCuda, SimulatedBackend
    fake = FakeCuda(sm_count=12)  # 4 SMs per rank at 3 ranks: CI-sized grids
    previous = runtime.wait_timeout()
    runtime.set_wait_timeout(5.0)  # the simulated device's deadline (a GPU's: MOELINK_TIMEOUT_S)
    monkeypatch.setattr(bench, "SHAPES", [(64, 256, 4, 8)])
    monkeypatch.setattr(bench, "RANKS", (2,))
    monkeypatch.setattr(bench_low_latency, "LL_SHAPES", [(16, 256, 4, 8)])
    try:
        report = proof.run_proof("cuda", [3], seed=proof_seed(), backend=SimulatedBackend(fake), bench=True, big=False,
                                 log=lambda line: None)
    finally:
        runtime.set_wait_timeout(previous)
    assert not report.failed, proof_failures(report)
    cases = {r.case: r for r in report.results if r.path == "intranode"}
    assert "(fake GPU)" in cases["absent-in-notify"].details["message"]  # came back through the abort record
    # Every rank's kernels of a step are queued before the harness waits for any of them.
    notify = [rank for name, rank in fake.launches if name == "intranode.notify"]
    assert notify[:3] == [0, 1, 2]
    assert report.bench and all(row.get("check") == "ok" and row["method"] == "graph" for row in report.bench), report.bench
    assert {row["op"] for row in report.bench} == {"dispatch", "combine", "ll-dispatch", "ll-combine"}, report.bench
    assert not report.bench_failed


def test_abort_binding_without_a_gpu():
    cuda = pytest.importorskip("moelink._cuda", reason="built without the CUDA extension")
    if cuda.device_count() > 0:
        pytest.skip("a GPU is usable here: tests/test_gpu_proof.py covers it")
    assert cuda.abort.record() is None and cuda.abort.take("x") is None and not cuda.abort.pending()
    cuda.abort.raise_if_aborted("x")  # nothing recorded: no error
    with pytest.raises(errors.GPUUnavailable, match="no usable CUDA device"):
        cuda.proof.malloc(16)


@pytest.mark.skipif(_backend.cuda_available(), reason="a GPU is usable here")
def test_device_check_says_plainly_that_there_is_no_gpu(tmp_path):
    """tools/device_check.sh without a GPU: the inventory, a clear 'no GPU' and exit status 2, the
    summary written; nothing built or run."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "device_check.sh"), str(tmp_path)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no GPU on this machine" in proc.stdout and "GPU: none" in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == [] and "torch" in summary["inventory"]
