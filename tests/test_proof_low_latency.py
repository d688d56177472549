"""The one-GPU proof's low-latency path (moelink.proof.low_latency) on the host target: every rank's
LL dispatch and combine at once over the loopback (ranks as nodes) and node pairs over NVLink
stores, virtual ranks as threads of this process on the SIMT runtime, checked against
moelink.reference.low_latency; the forced timeout; that its checks fail when they should (a wrong
byte, signal or row expectation, a corrupted reference combine); and its GPU control flow on the
simulated device (tests/fake_device.py). tests/test_gpu_proof.py runs every path on a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moelink.proof as proof
from moelink import runtime
from moelink.proof import low_latency, low_latency_rig
from seeding import proof_failures, proof_seed


@pytest.fixture(scope="module", params=[2, 4], ids=lambda r: f"{r}ranks")
def report(request):
    return proof.run_proof("host", [request.param], seed=proof_seed(), paths=[low_latency], log=lambda line: None)


def test_low_latency_passes_on_the_host_target(report):
    assert not report.failed, proof_failures(report)
    cases = {r.case: r for r in report.results}
    assert all(r.status == "pass" for r in cases.values()), [r.line() for r in cases.values()]
    assert set(cases) >= {"nic-bf16", "nvlink-pairs-fp8", "alternate-halves", "hook-halves", "empty-and-dropped",
                          "all-empty", "blocks-warp-form", "weights-replay", "absent-in-dispatch", "absent-in-combine", "shrink-absent", "after-timeout"}
    checks = [r for r in cases.values() if r.params.get("absent") is None]
    assert all(r.details["calls"] >= 4 for r in checks), "a case did not reuse both halves"
    assert cases["alternate-halves"].details["calls"] == 12
    # rpn 1 without NVLink: every byte through the loopback; node pairs: NVLink stores too.
    assert cases["nic-bf16"].details["loopback_bytes"] > 0 and cases["nic-bf16"].details["nvlink_bytes"] == 0
    assert cases["nvlink-pairs-fp8"].details["nvlink_bytes"] > 0
    if report.meta["ranks"][0] >= 4:  # two pairs: both paths in one call
        assert cases["nvlink-pairs-fp8"].details["loopback_bytes"] > 0
        assert cases["alternate-halves"].details["nvlink"]
    assert cases["blocks-warp-form"].details["blocks"] == 3


def test_low_latency_timeout_names_the_kernel_and_peer_and_a_normal_case_runs_after(report):
    cases = {r.case: r for r in report.results}
    ranks = report.meta["ranks"][0]
    for kernel in ("dispatch", "combine"):
        message = cases[f"absent-in-{kernel}"].details["message"]
        assert f"low_latency_{kernel}" in message and f"from peer {ranks - 1}" in message, message
    assert cases["after-timeout"].status == "pass"
    assert cases["shrink-absent"].details["waited_s"] >= 2.0  # masked after the deadline, no error
    assert runtime.wait_timeout() == report.meta["wait_timeout_s"]


def _one_case(monkeypatch, name):
    monkeypatch.setattr(low_latency, "timeout_cases", lambda group: [])
    rep = proof.run_proof("host", [2], seed=proof_seed(), paths=[low_latency], only=f"low_latency/{name}",
                          log=lambda line: None)
    assert len(rep.results) == 1
    return rep.results[0]


def test_a_wrong_byte_expectation_fails_the_case(monkeypatch):
    real = low_latency_rig.Rig.expected_bytes

    def more(self, per_peer):
        rdma, nvl = real(self, per_peer)
        return [b + 16 for b in rdma], nvl
    monkeypatch.setattr(low_latency_rig.Rig, "expected_bytes", more)
    result = _one_case(monkeypatch, "nic-bf16")
    assert result.status == "fail" and "loopback bytes" in result.error, result.line()


def test_a_wrong_signal_expectation_fails_the_case(monkeypatch):
    real = low_latency_rig.Rig.note_dispatch
    monkeypatch.setattr(low_latency_rig.Rig, "note_dispatch", lambda self, msgs, counts=None: real(self, msgs * 0, counts))
    result = _one_case(monkeypatch, "hook-halves")
    assert result.status == "fail" and "after the send half" in result.error and "signal words" in result.error, \
        result.line()


def test_a_corrupted_reference_row_fails_the_case(monkeypatch):
    real = low_latency_rig.ref.encode_rows

    def corrupted(x, payload, global_scale=None):
        parts = real(x, payload, global_scale)
        first = parts[0].clone()
        first.view(torch.uint8).view(-1)[0] ^= 1
        return (first,) + tuple(parts[1:])
    monkeypatch.setattr(low_latency_rig.ref, "encode_rows", corrupted)
    result = _one_case(monkeypatch, "nvlink-pairs-fp8")
    assert result.status == "fail" and "recv_x part 0 (fp8)" in result.error, result.line()


def test_a_corrupted_reference_combine_fails_the_case(monkeypatch):
    real = low_latency.expected_combine

    def corrupted(x, idx, weights, bits):
        out = real(x, idx, weights, bits)
        if out.numel():
            out.view(torch.int16).view(-1)[-1] ^= 1
        return out
    monkeypatch.setattr(low_latency, "expected_combine", corrupted)
    result = _one_case(monkeypatch, "nic-bf16")
    assert result.status == "fail" and "combined_x (bf16" in result.error, result.line()


def test_gpu_control_flow_on_a_simulated_device():
    """The GPU path's control flow: W = the GPU's block, the grid from the experts and the SMs per
    rank, every rank queued before the harness waits, the co-residency probe, the send/receive
    halves as launches of their own, the timeout through the abort record."""
    from fake_device import FakeCuda, SimulatedBackend
    fake = FakeCuda(sm_count=16)  # 4 SMs per rank at 4 ranks
    previous = runtime.wait_timeout()
    runtime.set_wait_timeout(2.0)  # the simulated device's deadline
    try:
        rep = proof.run_proof("cuda", [4], seed=proof_seed(), backend=SimulatedBackend(fake), paths=[low_latency],
                              big=False, log=lambda line: None)
    finally:
        runtime.set_wait_timeout(previous)
    assert not rep.failed, proof_failures(rep)
    cases = {r.case: r for r in rep.results}
    assert "(fake GPU)" in cases["absent-in-dispatch"].details["message"]
    assert all(r.details["block_warps"] == 16 for r in cases.values() if "block_warps" in r.details)
    assert cases["empty-and-dropped"].details["blocks"] == 2  # ceil(24 tokens / 16 warps), <= 4 SMs per rank
    assert any("coresidency" in r.details for r in cases.values())
    dispatches = [rank for name, rank in fake.launches if name == "low_latency.dispatch"]
    assert dispatches[:4] == [0, 1, 2, 3]


def test_the_zero_copy_combine_reads_the_window(monkeypatch):
    """Zero-copy calls pass no input pointer: the rows written into the window's comb_send region
    are what the combine returns, so writing other rows there fails the case."""
    real = low_latency_rig.Rig.write_combine_buffer
    monkeypatch.setattr(low_latency_rig.Rig, "write_combine_buffer",
                        lambda self, r, payload, rows: real(self, r, payload, rows * 2))
    result = _one_case(monkeypatch, "alternate-halves")
    assert result.status == "fail" and "zero-copy" in result.error, result.line()


def test_a_wrong_slot_value_expectation_fails_the_case(monkeypatch):
    real = low_latency.expert_fn  # the slot-value check's own expectation (the combine's is in low_latency_rig)
    monkeypatch.setattr(low_latency, "expert_fn", lambda values, expert: real(values, expert + 1))
    result = _one_case(monkeypatch, "weights-replay")
    assert result.status == "fail" and "slot_values" in result.error, result.line()


def test_shrink_mode_masks_an_absent_rank_with_several_blocks(monkeypatch):
    """The GPU runs several blocks: those that follow block 0's verdicts must outlast its waits for
    the absent rank (low_latency_common.cuh: follow_verdicts), or the call fails instead of masking."""
    real = low_latency.timeout_cases

    def several_blocks(group):
        return [dataclasses.replace(c, params=dict(c.params, blocks=3)) for c in real(group) if c.name == "shrink-absent"]
    monkeypatch.setattr(low_latency, "timeout_cases", several_blocks)
    monkeypatch.setattr(low_latency, "cases", lambda group: [])
    rep = proof.run_proof("host", [2], seed=proof_seed(), paths=[low_latency], log=lambda line: None)
    assert [r.case for r in rep.results] == ["shrink-absent"] and rep.results[0].params["blocks"] == 3
    assert not rep.failed, proof_failures(rep)
