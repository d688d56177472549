"""The one-GPU proof's internode path (moelink.proof.internode) on the host target: ranks posing as
nodes of 1 and 2 ranks, the scale-out binding replaced by the loopback, virtual ranks as threads of
this process on the SIMT runtime, checked against moelink.reference; and that its checks can fail
(a wrong byte expectation, a corrupted reference row). tests/test_gpu_proof.py runs every path,
this one included, on a GPU."""

from __future__ import annotations


import pytest
import torch

import moelink.proof as proof
from moelink import reference, runtime
from moelink.proof import internode
from seeding import proof_seed


@pytest.fixture(scope="module", params=[2, 4], ids=lambda r: f"{r}ranks")
def report(request):
    return proof.run_proof("host", [request.param], seed=proof_seed(), paths=[internode], log=lambda line: None)


def test_internode_passes_on_the_host_target(report):
    failed = [r.line() for r in report.failed]
    assert not failed, f"seed {report.meta['seed']}: " + "\n".join(failed)
    ranks = report.meta["ranks"][0]
    cases = {r.case: r for r in report.results}
    assert all(r.status == "pass" for r in cases.values()), [r.line() for r in cases.values()]
    assert cases["wrap-tiny-queues"].details["max_wraps"] >= 4
    assert ("two-per-node" in cases) == (ranks >= 4)
    for r in cases.values():
        if "dispatch_rdma_bytes" in r.details:
            assert r.details["dispatch_rdma_bytes"] > 0 and r.details["combine_rdma_bytes"] > 0, r.line()


def test_internode_timeout_names_the_kernel_and_a_normal_case_runs_after(report):
    cases = {r.case: r for r in report.results}
    assert "internode_notify" in cases["absent-in-notify"].details["message"]
    assert cases["after-timeout"].status == "pass"
    assert runtime.wait_timeout() == report.meta["wait_timeout_s"]


def _one_case(monkeypatch, name="ranks-as-nodes"):
    monkeypatch.setattr(internode, "timeout_cases", lambda group: [])
    rep = proof.run_proof("host", [2], seed=proof_seed(), paths=[internode], only=f"internode/{name}", log=lambda line: None)
    assert len(rep.results) == 1
    return rep.results[0]


def test_a_wrong_byte_expectation_fails_the_case(monkeypatch):
    real = internode._remote_nodes

    def fewer(in_rank, N, L, rank):
        per_node = real(in_rank, N, L, rank)
        per_node[0] = False  # pretend token 0 went nowhere remote
        return per_node
    monkeypatch.setattr(internode, "_remote_nodes", fewer)
    result = _one_case(monkeypatch)
    assert result.status == "fail" and "network bytes" in result.error


def test_a_corrupted_reference_row_fails_the_case(monkeypatch):
    real = reference.intranode_dispatch

    def corrupted(*args, **kwargs):
        out = real(*args, **kwargs)
        if out[0].num_recv_tokens:
            out[0].recv_x.view(torch.int16)[0, 0] ^= 1
        return out
    monkeypatch.setattr(internode.reference, "intranode_dispatch", corrupted)
    result = _one_case(monkeypatch)
    assert result.status == "fail" and "recv_x" in result.error
