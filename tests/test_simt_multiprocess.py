"""Acquire/release between two processes over shared memory: the pattern every intranode kernel
relies on (a writer publishes data with a release store, a reader in another process acquires the
flag, then reads the data), run by real kernels on the SIMT runtime in two processes."""

from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import secrets

import numpy as np
import pytest

from moelink import _host, errors, runtime

PAYLOAD_WORDS = 256
FLAG_STRIDE = 64  # each flag on its own cache line
SEGMENT_BYTES = 2 * FLAG_STRIDE + 2 * PAYLOAD_WORDS * 4


def _views(buffer):
    flags = [np.ndarray(1, dtype=np.uint64, buffer=buffer, offset=i * FLAG_STRIDE) for i in range(2)]
    payloads = [
        np.ndarray(PAYLOAD_WORDS, dtype=np.int32, buffer=buffer, offset=2 * FLAG_STRIDE + i * PAYLOAD_WORDS * 4)
        for i in range(2)
    ]
    return flags, payloads


def _play(buffer, role: int, iterations: int) -> int:
    flags, payloads = _views(buffer)
    errors_seen = np.zeros(1, dtype=np.int32)
    peer = 1 - role
    _host.selftest.pingpong(
        flags[role].ctypes.data, flags[peer].ctypes.data, payloads[role].ctypes.data, payloads[peer].ctypes.data,
        PAYLOAD_WORDS, role, iterations, errors_seen.ctypes.data, rank=role,
    )
    return int(errors_seen[0])


def _responder(connection) -> None:
    """Child process: maps the segment it is told about, then plays the responder on request."""
    mapping = None
    while True:
        request = connection.recv()
        if request[0] == "map":
            fd = os.open(request[1], os.O_RDWR)
            mapping = mmap.mmap(fd, SEGMENT_BYTES)
            os.close(fd)
            connection.send("mapped")
        elif request[0] == "play":
            _, iterations, schedule = request
            runtime.set_schedule(schedule)
            try:
                connection.send(("ok", _play(mapping, 1, iterations)))
            except Exception as exc:  # reported to the test, never swallowed
                connection.send((type(exc).__name__, str(exc)))
        else:
            return


@pytest.fixture(scope="module")
def segment():
    """A shared segment mapped by this process and a responder process. Created 0600 under an
    unguessable name and unlinked as soon as both sides have mapped it, so nothing is left in
    /dev/shm whatever happens next."""
    context = mp.get_context("spawn")
    parent_end, child_end = context.Pipe()
    child = context.Process(target=_responder, args=(child_end,), daemon=True)
    child.start()
    path = f"/dev/shm/moelink-test-{secrets.token_hex(16)}"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, SEGMENT_BYTES)
        mapping = mmap.mmap(fd, SEGMENT_BYTES)
        parent_end.send(("map", path))
        assert parent_end.poll(60), "responder process did not map the segment"
        assert parent_end.recv() == "mapped"
    finally:
        os.close(fd)
        os.unlink(path)
    yield mapping, parent_end
    parent_end.send(("stop",))
    child.join(10)
    if child.is_alive():
        child.kill()


def _reset(mapping) -> None:
    mapping[:] = bytes(SEGMENT_BYTES)


@pytest.mark.parametrize("schedule,iterations", [("deterministic", 2000), ("random:5", 300), ("random:6:1.0", 100)])
def test_release_acquire_handshake_between_processes(segment, schedule, iterations):
    mapping, responder = segment
    _reset(mapping)
    responder.send(("play", iterations, schedule))
    with runtime.scheduled(schedule):
        mismatches = _play(mapping, 0, iterations)
    assert responder.poll(120), "responder did not finish"
    status, value = responder.recv()
    assert status == "ok", f"responder failed: {status}: {value}"
    assert mismatches == 0 and value == 0, f"payload words read before they were published: {mismatches}, {value}"
    flags, _ = _views(mapping)
    assert int(flags[0][0]) == iterations and int(flags[1][0]) == iterations


def test_missing_peer_times_out_naming_the_wait(segment):
    mapping, _ = segment
    _reset(mapping)
    previous = runtime.wait_timeout()
    runtime.set_wait_timeout(0.5)
    try:
        with pytest.raises(errors.CommTimeout) as info:
            _play(mapping, 0, 1)  # the responder is never asked to play
    finally:
        runtime.set_wait_timeout(previous)
    message = str(info.value)
    for part in ("selftest_pingpong", "rank 0", "pingpong peer flag", "from peer 1", "is 0", ">= 1"):
        assert part in message, f"{part!r} missing from: {message}"
