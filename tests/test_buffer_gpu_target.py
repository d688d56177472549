"""Buffer on a non-gloo group (the GPU target) on a machine without a GPU: every rank raises
GPUUnavailable at once, naming what this machine lacks, and nothing is left behind (the rank group
stays usable for a host Buffer afterwards). CUDA tensors given to a host Buffer are refused with
InvalidDevice (tests/test_intranode.py). With a GPU the GPU target is exercised by
tests/test_gpu_*.py."""

from __future__ import annotations

import pytest

import moelink
from moelink import _backend, errors
from multiproc import rank_group_fixture

group = rank_group_fixture(2)


def _gpu_group_buffer(ctx, **kwargs):
    import torch.distributed as dist
    from moelink import buffer as buffer_module
    real = dist.get_backend
    buffer_module.dist.get_backend = lambda g=None: "nccl"
    try:
        moelink.Buffer(ctx.group, 1 << 20, **kwargs)
    except errors.MoelinkError as exc:
        return type(exc).__name__, str(exc)
    finally:
        buffer_module.dist.get_backend = real
    return None


def _host_buffer(ctx):
    with moelink.Buffer(ctx.group, 1 << 20) as buffer:
        return buffer.get_comm_stream(), buffer.num_nvl_bytes


# Every mode takes the GPU target on a non-gloo group: intranode, internode (2 nodes of 1 rank) and
# low-latency; each refuses alike here, at the first step (the GIN transport is never reached).
MODES = {"intranode": {}, "internode": dict(ranks_per_node=1, num_rdma_bytes=1 << 20),
         "low_latency": dict(num_rdma_bytes=1 << 20, low_latency_mode=True)}


@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_group_without_a_gpu_raises_a_typed_error_on_every_rank(group, mode):
    if _backend.cuda_available():
        pytest.skip("a GPU is present")
    for result in group.run(_gpu_group_buffer, **MODES[mode]):
        assert result is not None
        name, message = result
        assert name == "GPUUnavailable"
        assert "'nccl' group selects the GPU target" in message and "cannot run moelink's GPU target" in message
    # Nothing was created: the same ranks make a host Buffer right after.
    assert group.run(_host_buffer) == [(None, 1 << 20)] * 2


# ---- the GPU target's default node split: the ranks per host ------------------------------------

@pytest.mark.parametrize("hosts,expected", [(["a"] * 4, 4), (["a", "a", "b", "b"], 2), (["a", "b"], 1),
                                            (["n0"] * 8 + ["n1"] * 8, 8)])
def test_ranks_per_node_defaults_to_the_ranks_per_host(hosts, expected, monkeypatch):
    from moelink import _validate
    monkeypatch.delenv(_validate.RANKS_PER_NODE_ENV, raising=False)
    assert _validate.ranks_per_node(None, len(hosts), hosts) == expected
    assert _validate.ranks_per_node(None, len(hosts)) == len(hosts)  # the host target: one node
    assert _validate.ranks_per_node(1, len(hosts), hosts) == 1  # the argument wins
    monkeypatch.setenv(_validate.RANKS_PER_NODE_ENV, "1")
    assert _validate.ranks_per_node(None, len(hosts), hosts) == 1  # and the variable


@pytest.mark.parametrize("hosts", [["a", "b", "a", "b"], ["a", "a", "a", "b"], ["a", "a", "b", "b", "a", "a"]])
def test_a_host_layout_without_equal_consecutive_blocks_asks_for_ranks_per_node(hosts, monkeypatch):
    from moelink import _validate
    monkeypatch.delenv(_validate.RANKS_PER_NODE_ENV, raising=False)
    with pytest.raises(errors.InvalidArgument, match=r"ranks_per_node: expected given .*rank 0: a, rank 1: "):
        _validate.ranks_per_node(None, len(hosts), hosts)
