"""Host windows (csrc/transport/host/, moelink._host_windows): anonymous shared memory (memfd)
shared by file descriptor between the rank processes of a node, byte counters, node emulation,
failure records, the deadlined bootstrap, and the promise that nothing is ever left anywhere, even
when a rank is SIGKILLed in the middle of the bootstrap."""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import stat
import time

import pytest
import torch.distributed as dist

from moelink import _host, errors, runtime
from moelink._host_windows import bootstrap_host_windows
from multiproc import RankCrashed, RankGroup, rank_group_fixture
import shm_audit

transport = _host.transport
group = rank_group_fixture(2, 4)
DATA_BYTES = 1 << 16
SLOT = 64  # bytes each writer owns in every window of its node
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


def _clean(tag):
    """Nothing of ``tag`` anywhere: no name in /dev/shm, no process holding a segment."""
    return shm_audit.dev_shm_names(tag) == [] and shm_audit.holders(tag) == {}


def _clean_here(tag):
    """This process holds no segment of ``tag`` and /dev/shm has no moelink name."""
    return shm_audit.dev_shm_names(tag) == [] and shm_audit.descriptors(tag=tag) == shm_audit.mappings(tag=tag) == []


# --- one process: segments -------------------------------------------------------------------

def test_segment_is_a_sealed_private_memfd_shared_by_descriptor():
    tag = f"u{os.getpid()}"
    with transport.ShmSegment.create(1000, tag) as seg:
        assert seg.name.startswith(f"moelink-{tag}-") and len(seg.name.rsplit("-", 1)[1]) == 32
        path = f"/proc/self/fd/{seg.descriptor}"
        assert os.readlink(path) == f"/memfd:{seg.name} (deleted)"
        st = os.stat(path)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == 1000 and st.st_uid == os.geteuid()
        fd = os.open(path, os.O_RDWR)
        try:
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS == SEALS
            with pytest.raises(PermissionError):  # nobody can shrink it under a mapping (SIGBUS)
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)
        other = transport.ShmSegment.open(os.getpid(), seg.descriptor, seg.name, 1000)
        assert other.descriptor == -1 and not other.is_creator
        ctypes.memmove(seg.data_ptr, b"moelink", 7)
        assert ctypes.string_at(other.data_ptr, 7) == b"moelink"
        seg.close_descriptor()
        assert not seg.is_shareable and shm_audit.descriptors(tag=tag) == []
        assert ctypes.string_at(other.data_ptr, 7) == b"moelink"  # mappings outlive the descriptor
        other.close()
        assert shm_audit.dev_shm_names(tag) == []
    assert shm_audit.mappings(tag=tag) == [] and shm_audit.descriptors(tag=tag) == []


def test_segment_names_are_random_and_close_releases_everything():
    tag = f"r{os.getpid()}"
    names = set()
    for _ in range(8):
        seg = transport.ShmSegment.create(4096, tag)
        names.add(seg.name)
        seg.close()
    assert len(names) == 8 and _clean(tag)


@pytest.mark.parametrize("tag", ["has-dash", "x" * 33, "slash/", "dot."])
def test_segment_rejects_bad_tags(tag):
    with pytest.raises(errors.InvalidArgument, match="tag"):
        transport.ShmSegment.create(4096, tag)


def test_segment_open_checks():
    me = os.getpid()
    with pytest.raises(errors.InvalidArgument, match="> 0"):
        transport.ShmSegment.create(0)
    with transport.ShmSegment.create(4096, f"o{me}") as seg:
        fd, name = seg.descriptor, seg.name
        cases = [
            ((me, fd, name, 8192), "expected 8192 bytes, got 4096"),
            ((me, fd, "not-ours", 4096), "starting with 'moelink-'"),
            ((me, fd, "moelink-" + "0" * 32, 4096), "expected /memfd:moelink-0000"),  # another segment's id
            ((me, 0, name, 4096), "expected /memfd:"),  # stdin is no memfd
            ((me, 9999, name, 4096), "exited or closed the descriptor"),
            ((-1, fd, name, 4096), "process id > 0"),
        ]
        for args, text in cases:
            with pytest.raises(errors.InvalidArgument) as info:
                transport.ShmSegment.open(*args)
            assert text in str(info.value), (args, str(info.value))
    # A memfd with our name but without the seals, or readable by others, is refused.
    unsealed = os.memfd_create("moelink-" + "1" * 32, os.MFD_CLOEXEC)
    open_mode = os.memfd_create("moelink-" + "2" * 32, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(unsealed, 4096)
        os.fchmod(unsealed, 0o600)
        with pytest.raises(errors.InvalidArgument, match="sealed"):
            transport.ShmSegment.open(me, unsealed, "moelink-" + "1" * 32, 4096)
        os.ftruncate(open_mode, 4096)
        os.fchmod(open_mode, 0o644)
        fcntl.fcntl(open_mode, fcntl.F_ADD_SEALS, SEALS)
        with pytest.raises(errors.InvalidArgument, match="mode 0600, got uid .* mode 0644"):
            transport.ShmSegment.open(me, open_mode, "moelink-" + "2" * 32, 4096)
    finally:
        os.close(unsealed)
        os.close(open_mode)


def test_windows_argument_checks():
    for args, match in [((2, 2, 2, 4096), "rank"), ((0, 0, 1, 4096), "num_ranks"), ((0, 4, 3, 4096), "ranks_per_node"),
                        ((0, 2, 2, 0), "data_bytes")]:
        with pytest.raises(errors.InvalidArgument, match=match):
            transport.HostWindows(*args)


def test_lone_window_is_never_shareable():
    tag = f"l{os.getpid()}"
    w = transport.HostWindows(0, 2, 1, 4096, tag)  # alone on its node: nobody will open it
    assert not w.is_shareable and shm_audit.descriptors(tag=tag) == [] and w.header()["attach_expected"] == 1
    assert w.header()["owner_pid"] == os.getpid() and w.header()["layout_version"] == transport.WINDOW_LAYOUT_VERSION
    with pytest.raises(errors.InvalidArgument, match="only the NIC"):
        w.peer_ptr(1)
    with pytest.raises(errors.InvalidArgument, match="outside the 4096-byte window"):
        w.local_ptr(4000, 200)
    w.close()
    with pytest.raises(errors.InvalidArgument, match="closed"):
        w.local_ptr()
    assert _clean(tag)


def test_failure_record_is_written_once_and_read_defensively():
    w = transport.HostWindows(0, 4, 4, 4096, f"f{os.getpid()}")
    try:
        assert w.failure(0) is None
        with pytest.raises(errors.InvalidArgument, match="publish_failure peer"):
            w.publish_failure("x", 4, 1)
        assert w.publish_failure("waited for rank 2 " + "y" * 2000, 2, 7) is True
        assert w.publish_failure("a later failure", 3, 8) is False  # the first one explains the rest
        record = w.failure(0)
        assert record["peer"] == 2 and record["sequence"] == 7 and record["rank"] == 0
        assert record["text"].startswith("waited for rank 2") and len(record["text"]) == transport.FAILURE_TEXT_BYTES - 1
        assert abs(record["time_ns"] / 1e9 - time.time()) < 60
        # A faulty owner: an out-of-range peer, a length beyond the field, no NUL. Bounded on read.
        base = w.local_ptr() - transport.WINDOW_HEADER_BYTES + 256
        ctypes.c_int32.from_address(base + 4).value = 1 << 30
        ctypes.c_uint32.from_address(base + 24).value = 0xFFFFFFFF
        ctypes.memset(base + 64, ord("z"), transport.FAILURE_TEXT_BYTES)
        record = w.failure(0)
        assert record["peer"] == -1 and record["text"] == "z" * (transport.FAILURE_TEXT_BYTES - 1)
    finally:
        w.close()


# --- rank cases (run in every rank of the group) ---------------------------------------------

def _map_write_read(ctx, ranks_per_node, nic_maps_remote=False):
    modes = []

    def at_step(step):
        if step == "created":  # the only stretch where a descriptor is open: check it
            for fd in os.listdir("/proc/self/fd"):
                try:
                    if os.readlink(f"/proc/self/fd/{fd}").startswith(f"/memfd:moelink-{ctx.shm_tag}-"):
                        modes.append(stat.S_IMODE(os.stat(f"/proc/self/fd/{fd}").st_mode))
                except OSError:
                    pass

    w = bootstrap_host_windows(ctx.group, DATA_BYTES, ranks_per_node=ranks_per_node, nic_maps_remote=nic_maps_remote,
                               _fault=at_step)
    try:
        # Once any rank returns, no descriptor is open anywhere: the segments can no longer be opened.
        descriptors = shm_audit.descriptors(tag=ctx.shm_tag)
        mapped_segments = len(shm_audit.mappings(tag=ctx.shm_tag))
        for peer in w.node_ranks:
            w.view(peer, SLOT * w.local_rank, SLOT).fill_(ctx.rank + 1)
        if nic_maps_remote:
            for r in range(ctx.world_size):
                if r not in w.node_ranks:
                    ctypes.memset(w.nic_ptr(r, DATA_BYTES - 8 * (ctx.rank + 1), 8), 100 + ctx.rank, 8)
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
        attach_count = w.native.header()["attach_count"]
        dist.barrier(ctx.group)
        return dict(node_ranks=w.node_ranks, seen=seen, descriptors=descriptors, mapped_segments=mapped_segments, modes=modes,
                    mapped=mapped, refused=refused, tail=tail, attach_count=attach_count)
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


def _mismatched_arguments(ctx):
    with pytest.raises(errors.InvalidArgument, match="expected the same on every rank"):
        bootstrap_host_windows(ctx.group, DATA_BYTES + 4096 * ctx.rank)
    with pytest.raises(errors.InvalidArgument, match="expected the same on every rank"):
        bootstrap_host_windows(ctx.group, DATA_BYTES, agree={"num_rdma_bytes": ctx.rank})
    with pytest.raises(errors.InvalidArgument, match="a divisor of the group size"):
        bootstrap_host_windows(ctx.group, DATA_BYTES, ranks_per_node=ctx.world_size + 1)
    # Only rank 0 is wrong: it raises its own error, every other rank names rank 0's.
    bad = {"ranks_per_node": 0} if ctx.rank == 0 else {}
    with pytest.raises(errors.InvalidArgument, match="rank 0: InvalidArgument: ranks_per_node" if ctx.rank else
                       "ranks_per_node: expected an int >= 1"):
        bootstrap_host_windows(ctx.group, DATA_BYTES, **bad)
    # The caller's own checks travel too (Buffer's arguments).
    mine = errors.InvalidArgument("num_nvl_bytes: expected an int >= 1, got 0") if ctx.rank == 1 else None
    with pytest.raises(errors.InvalidArgument, match="num_nvl_bytes" if ctx.rank == 1 else "rank 1: InvalidArgument"):
        bootstrap_host_windows(ctx.group, DATA_BYTES, local_error=mine)
    with pytest.raises(errors.InvalidType, match="data_bytes"):
        bootstrap_host_windows(ctx.group, float(DATA_BYTES))
    # A tag the segment name cannot hold fails the creation on every rank.
    with pytest.raises(errors.InvalidArgument, match="creating the segments failed on rank 0.*tag"):
        bootstrap_host_windows(ctx.group, DATA_BYTES, tag="no-dashes")
    w = bootstrap_host_windows(ctx.group, DATA_BYTES)  # the group still works after all of that
    w.close()
    return _clean_here(ctx.shm_tag)


def _absent_from_step(ctx, victim, step, deadline_s):
    """``victim`` skips the bootstrap (step None) or sleeps past the deadline at ``step``."""
    runtime.set_wait_timeout(deadline_s)
    try:
        if ctx.rank == victim and step is None:
            return "absent"

        def at_step(s):
            if s == step and ctx.rank == victim:
                time.sleep(3 * deadline_s)

        start = time.monotonic()
        try:
            bootstrap_host_windows(ctx.group, DATA_BYTES, _fault=at_step).close()
            return "no error"
        except errors.CommTimeout as exc:
            return dict(message=str(exc), elapsed=time.monotonic() - start, clean=_clean_here(ctx.shm_tag))
    finally:
        runtime.set_wait_timeout(100.0)


def _killed_at(ctx, victim, step):
    def at_step(s):
        if s == step and ctx.rank == victim:
            os.kill(os.getpid(), signal.SIGKILL)

    runtime.set_wait_timeout(5.0)
    try:
        w = bootstrap_host_windows(ctx.group, DATA_BYTES, _fault=at_step)
        if step == "in use" and ctx.rank == victim:
            w.view(ctx.rank).fill_(1)
            os.kill(os.getpid(), signal.SIGKILL)
        w.close()
        return "no error"
    except errors.CommTimeout as exc:
        return dict(message=str(exc), held=shm_audit.descriptors(tag=ctx.shm_tag) + shm_audit.mappings(tag=ctx.shm_tag))
    finally:
        runtime.set_wait_timeout(100.0)


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
        assert res["descriptors"] == [] and res["mapped_segments"] == rpn and res["modes"] == ([0o600] if rpn > 1 else [])
        assert res["attach_count"] == rpn
        assert res["mapped"] == [r // rpn == node for r in range(world)]  # other nodes: not mapped
        assert res["refused"] == [r for r in range(world) if r // rpn != node]
    assert _clean(group.shm_tag)


def test_nic_maps_remote_nodes(group):
    world = group.world_size
    results = group.run(_map_write_read, 1, nic_maps_remote=True)  # every rank its own node
    for rank, res in enumerate(results):
        assert res["mapped"] == [True] * world and res["refused"] == [r for r in range(world) if r != rank]
        assert res["mapped_segments"] == world and res["attach_count"] == world
        # every other rank wrote its 8 bytes at the end of this rank's window, through the NIC view
        tail = res["tail"]
        for writer in range(world):
            chunk = tail[len(tail) - 8 * (writer + 1): len(tail) - 8 * writer]
            assert chunk == ([0] * 8 if writer == rank else [100 + writer] * 8)
    assert _clean(group.shm_tag)


def test_counters(group):
    world = group.world_size
    for seen, after in group.run(_counters):
        assert seen == [{"nvl": 1000 * (r + 1) + 1, "rdma": 7 * (r + 1)} for r in range(world)]
        assert after == [{"nvl": 0, "rdma": 0}] * world


def test_mismatched_arguments_raise_everywhere(group):
    assert group.run(_mismatched_arguments) == [True] * group.world_size


@pytest.mark.parametrize("step", [None, "created", "published", "attached"])
def test_every_step_has_the_deadline_and_names_the_missing_rank(group, step):
    deadline, victim = 1.0, group.world_size - 1
    outcomes = group.run(_absent_from_step, victim, step, deadline, timeout=60, return_exceptions=True)
    names = {None: "arguments", "created": "publish", "published": "map", "attached": "map"}
    for rank, res in enumerate(outcomes):
        if rank == victim:
            continue
        assert isinstance(res, dict), (rank, res)
        assert f"step '{names[step]}'" in res["message"] and f"missing ranks: [{victim}]" in res["message"], res
        assert res["elapsed"] < deadline + 1.5, res  # the deadline plus scheduling slack on 2 loaded cores
        assert res["clean"], res
    group.close()  # gloo closed its connections to the late rank: the next test starts afresh
    assert _clean(group.shm_tag)


@pytest.mark.parametrize("step", ["created", "published", "attached", "done", "in use"])
def test_sigkill_leaves_nothing(group, step):
    victim = group.world_size - 1
    with pytest.raises(RankCrashed) as info:
        group.run(_killed_at, victim, step, timeout=60, grace_s=10)
    assert info.value.rank == victim
    survivors = [o for r, o in enumerate(info.value.outcomes) if r != victim]
    for o in survivors:
        if step in ("done", "in use") and o == "no error":
            continue  # the victim's last message reached this rank before the signal
        # Every other survivor sees the lost connection: a CommTimeout naming the victim.
        assert isinstance(o, dict) and f"missing ranks: [{victim}]" in o["message"] and o["held"] == [], o
    group.close()
    assert _clean(group.shm_tag)


@pytest.mark.slow
def test_eight_ranks_as_one_two_and_eight_nodes():
    eight = RankGroup(8)
    try:
        for rpn in (8, 4, 1):
            for rank, res in enumerate(eight.run(_map_write_read, rpn)):
                assert res["seen"] == [[r + 1] for r in res["node_ranks"]] and res["descriptors"] == []
                assert res["mapped"] == [r // rpn == rank // rpn for r in range(8)]
        assert _clean(eight.shm_tag)
    finally:
        eight.close()
