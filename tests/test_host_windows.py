"""Host windows (csrc/transport/host/, moelink._host_windows): POSIX shared-memory segments mapped
between the rank processes of a node, byte counters, node emulation, and the promise that nothing
is ever left in /dev/shm, even when a rank is SIGKILLed in the middle of the bootstrap."""

from __future__ import annotations

import ctypes
import os
import signal
import stat

import pytest
import torch.distributed as dist

from moelink import _host, errors
from moelink._host_windows import bootstrap_host_windows
from multiproc import RankCrashed, RankGroup, leftover_segments, rank_group_fixture

transport = _host.transport
group = rank_group_fixture(2, 4)
DATA_BYTES = 1 << 16
SLOT = 64  # bytes each writer owns in every window of its node


# --- one process: segments -------------------------------------------------------------------

def test_segment_create_open_unlink():
    tag = f"u{os.getpid()}"
    with transport.ShmSegment.create(1000, tag) as seg:
        path = "/dev/shm" + seg.name
        assert seg.name.startswith(f"/moelink-{tag}-") and len(seg.name.rsplit("-", 1)[1]) == 32
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and os.stat(path).st_size == 1000
        other = transport.ShmSegment.open(seg.name, 1000)
        ctypes.memmove(seg.data_ptr, b"moelink", 7)
        assert ctypes.string_at(other.data_ptr, 7) == b"moelink"
        assert seg.unlink() is True and not os.path.exists(path)
        assert seg.unlink() is False and transport.ShmSegment.unlink_name(seg.name) is False
        assert ctypes.string_at(other.data_ptr, 7) == b"moelink"  # mappings outlive the name
        other.close()
    assert leftover_segments(tag) == []


def test_segment_names_are_random_and_creator_cleans_up():
    tag = f"r{os.getpid()}"
    names = set()
    for _ in range(8):
        seg = transport.ShmSegment.create(4096, tag)
        names.add(seg.name)
        seg.close()  # a creator's close unlinks a still-linked name
    assert len(names) == 8 and leftover_segments(tag) == []


@pytest.mark.parametrize("tag", ["has-dash", "x" * 33, "slash/", "dot."])
def test_segment_rejects_bad_tags(tag):
    with pytest.raises(errors.InvalidArgument, match="tag"):
        transport.ShmSegment.create(4096, tag)


def test_segment_open_checks():
    with pytest.raises(errors.InvalidArgument, match="expected 0 bytes|> 0"):
        transport.ShmSegment.create(0)
    with pytest.raises(errors.InvalidArgument, match="starting with '/moelink-'"):
        transport.ShmSegment.open("/not-ours", 4096)
    with pytest.raises(errors.InvalidArgument, match="No such file"):
        transport.ShmSegment.open("/moelink-" + "0" * 32, 4096)
    with transport.ShmSegment.create(4096, f"o{os.getpid()}") as seg:
        with pytest.raises(errors.InvalidArgument, match="expected 8192 bytes, got 4096"):
            transport.ShmSegment.open(seg.name, 8192)
        os.chmod("/dev/shm" + seg.name, 0o644)
        with pytest.raises(errors.InvalidArgument, match="mode 0600, got uid .* mode 0644"):
            transport.ShmSegment.open(seg.name, 4096)


def test_windows_argument_checks():
    for args, match in [((2, 2, 2, 4096), "rank"), ((0, 0, 1, 4096), "num_ranks"), ((0, 4, 3, 4096), "ranks_per_node"),
                        ((0, 2, 2, 0), "data_bytes")]:
        with pytest.raises(errors.InvalidArgument, match=match):
            transport.HostWindows(*args)


def test_lone_window_is_never_linked():
    tag = f"l{os.getpid()}"
    w = transport.HostWindows(0, 2, 1, 4096, tag)  # alone on its node: nobody will open the name
    assert leftover_segments(tag) == [] and w.header()["attach_expected"] == 1
    with pytest.raises(errors.InvalidArgument, match="only the NIC"):
        w.peer_ptr(1)
    with pytest.raises(errors.InvalidArgument, match="outside the 4096-byte window"):
        w.local_ptr(4000, 200)
    w.close()
    with pytest.raises(errors.InvalidArgument, match="closed"):
        w.local_ptr()


# --- rank cases (run in every rank of the group) ---------------------------------------------

def _map_write_read(ctx, ranks_per_node, nic_maps_remote=False):
    modes = {}

    def at_step(step):
        if step == "created":  # the only moment names exist: check them
            for name in leftover_segments(ctx.shm_tag):
                try:
                    modes[name] = stat.S_IMODE(os.stat("/dev/shm/" + name).st_mode)
                except FileNotFoundError:  # a peer's name, already unlinked
                    pass

    w = bootstrap_host_windows(ctx.group, DATA_BYTES, ranks_per_node=ranks_per_node, nic_maps_remote=nic_maps_remote,
                               _fault=at_step)
    try:
        # Every name is gone once any rank returns: each segment's last mapper unlinked it.
        leftovers = leftover_segments(ctx.shm_tag)
        for peer in w.node_ranks:
            w.view(peer, SLOT * w.local_rank, SLOT).fill_(ctx.rank + 1)
        if nic_maps_remote:
            for r in range(ctx.world_size):
                if r not in w.node_ranks:
                    addr = w.native.nic_ptr(r, DATA_BYTES - 8 * (ctx.rank + 1), 8)
                    ctypes.memset(addr, 100 + ctx.rank, 8)
        dist.barrier(ctx.group)
        own = w.view(ctx.rank, 0, SLOT * w.ranks_per_node)
        seen = [sorted(set(own[SLOT * i: SLOT * (i + 1)].tolist())) for i in range(w.ranks_per_node)]
        tail = w.view(ctx.rank, DATA_BYTES - 8 * ctx.world_size, 8 * ctx.world_size).tolist()
        refused = []
        for r in range(ctx.world_size):
            if r not in w.node_ranks:
                with pytest.raises(errors.InvalidArgument, match="only the NIC"):
                    w.peer_ptr(r)
                refused.append(r)
        mapped = [w.native.is_mapped(r) for r in range(ctx.world_size)]
        dist.barrier(ctx.group)
        return dict(node_ranks=w.node_ranks, seen=seen, leftovers=leftovers, modes=modes, mapped=mapped,
                    refused=refused, tail=tail)
    finally:
        w.close()


def _counters(ctx):
    w = bootstrap_host_windows(ctx.group, DATA_BYTES)
    try:
        w.add_bytes("nvl", 1000 * (ctx.rank + 1))
        w.add_bytes("rdma", 7 * (ctx.rank + 1))
        w.add_bytes("nvl", 1)
        # Kernels add through the raw counter address (IntranodeContext.nvl_bytes).
        assert ctypes.c_uint64.from_address(w.counter_ptr("nvl")).value == 1000 * (ctx.rank + 1) + 1
        dist.barrier(ctx.group)
        seen = [w.counters(r) for r in range(ctx.world_size)]
        dist.barrier(ctx.group)
        w.reset_counters()
        dist.barrier(ctx.group)
        after = [w.counters(r) for r in range(ctx.world_size)]
        with pytest.raises(errors.InvalidArgument, match="'nvl' or 'rdma'"):
            w.add_bytes("pcie", 1)
        dist.barrier(ctx.group)
        return seen, after
    finally:
        w.close()


def _mismatched_sizes(ctx):
    with pytest.raises(errors.InvalidArgument, match="expected the same on every rank"):
        bootstrap_host_windows(ctx.group, DATA_BYTES + 4096 * ctx.rank)
    with pytest.raises(errors.InvalidArgument, match="a divisor of the group size"):
        bootstrap_host_windows(ctx.group, DATA_BYTES, ranks_per_node=ctx.world_size + 1)
    # Only rank 0 is wrong: it raises its own error, every other rank names rank 0's.
    bad = {"ranks_per_node": 0} if ctx.rank == 0 else {}
    with pytest.raises(errors.InvalidArgument, match="ranks_per_node"):
        bootstrap_host_windows(ctx.group, DATA_BYTES, **bad)
    with pytest.raises(errors.InvalidType, match="data_bytes"):
        bootstrap_host_windows(ctx.group, float(DATA_BYTES))
    # A tag the segment name cannot hold fails the creation on every rank.
    with pytest.raises(errors.InvalidArgument, match="creating the segments failed on rank 0.*tag"):
        bootstrap_host_windows(ctx.group, DATA_BYTES, tag="no-dashes")
    return leftover_segments(ctx.shm_tag)


def _killed_at(ctx, victim, step):
    def at_step(s):
        if s == step and ctx.rank == victim:
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        w = bootstrap_host_windows(ctx.group, DATA_BYTES, _fault=at_step)
        if step == "in use" and ctx.rank == victim:
            w.view(ctx.rank).fill_(1)
            os.kill(os.getpid(), signal.SIGKILL)
        dist.barrier(ctx.group)  # fails on the survivors: the victim is gone
        w.close()
        return "no error"
    except Exception as exc:  # noqa: BLE001 - the survivors report what they saw
        return type(exc).__name__


# --- tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize("num_nodes", [1, 2, 4])
def test_map_write_read(group, num_nodes):
    world = group.world_size
    if world % num_nodes or num_nodes > world:
        pytest.skip(f"{num_nodes} nodes do not divide {world} ranks")
    rpn = world // num_nodes
    results = group.run(_map_write_read, rpn)
    for rank, res in enumerate(results):
        node = rank // rpn
        assert res["node_ranks"] == list(range(node * rpn, (node + 1) * rpn))
        assert res["seen"] == [[r + 1] for r in res["node_ranks"]]  # each peer wrote its own slot
        assert res["leftovers"] == []
        assert set(res["modes"].values()) <= {0o600}
        assert res["mapped"] == [r // rpn == node for r in range(world)]  # other nodes: not mapped
        assert res["refused"] == [r for r in range(world) if r // rpn != node]
    assert group.leftover_segments() == []


def test_nic_maps_remote_nodes(group):
    world = group.world_size
    results = group.run(_map_write_read, 1, nic_maps_remote=True)  # every rank its own node
    for rank, res in enumerate(results):
        assert res["mapped"] == [True] * world and res["refused"] == [r for r in range(world) if r != rank]
        # every other rank wrote its 8 bytes at the end of this rank's window, through the NIC view
        tail = res["tail"]
        for writer in range(world):
            chunk = tail[len(tail) - 8 * (writer + 1): len(tail) - 8 * writer]
            assert chunk == ([0] * 8 if writer == rank else [100 + writer] * 8)
    assert group.leftover_segments() == []


def test_counters(group):
    world = group.world_size
    for seen, after in group.run(_counters):
        assert seen == [{"nvl": 1000 * (r + 1) + 1, "rdma": 7 * (r + 1)} for r in range(world)]
        assert after == [{"nvl": 0, "rdma": 0}] * world


def test_mismatched_arguments_raise_everywhere(group):
    assert group.run(_mismatched_sizes) == [[]] * group.world_size


@pytest.mark.parametrize("step", ["published", "attached", "done", "in use"])
def test_sigkill_leaves_nothing(group, step):
    victim = group.world_size - 1
    with pytest.raises(RankCrashed) as info:
        group.run(_killed_at, victim, step, timeout=60, grace_s=3)
    assert info.value.rank == victim
    # Survivors next to the victim in gloo's exchange see the broken connection and raise; others
    # may stay blocked until the process-group timeout and get killed by the harness. Either way,
    # those that raised unlinked every name they had learnt.
    survivors = [o for r, o in enumerate(info.value.outcomes) if r != victim]
    assert "no error" not in survivors and any(o is not None for o in survivors), info.value.outcomes
    assert group.leftover_segments() == []


def test_no_leftovers_at_all(group):
    assert group.run(_noop) == [None] * group.world_size
    assert group.leftover_segments() == []


def _noop(ctx):
    return None


@pytest.mark.slow
def test_eight_ranks_as_one_two_and_eight_nodes():
    eight = RankGroup(8)
    try:
        for rpn in (8, 4, 1):
            for rank, res in enumerate(eight.run(_map_write_read, rpn)):
                assert res["seen"] == [[r + 1] for r in res["node_ranks"]] and res["leftovers"] == []
                assert res["mapped"] == [r // rpn == rank // rpn for r in range(8)]
        assert eight.leftover_segments() == []
    finally:
        eight.close()
