"""The SIMT host runtime, primitive by primitive, through the self-test kernels of
csrc/kernels/selftest.cuh. Each test runs under the deterministic schedule and several random ones."""

from __future__ import annotations

import time

import numpy as np
import pytest

from moelink import _host, errors, runtime

selftest = _host.selftest
SCHEDULES = ["deterministic", "random:1", "random:2:0.5", "random:3:1.0"]


@pytest.fixture(params=SCHEDULES)
def schedule(request):
    with runtime.scheduled(request.param):
        yield request.param


@pytest.fixture
def short_deadline():
    previous = runtime.wait_timeout()
    runtime.set_wait_timeout(0.3)
    yield 0.3
    runtime.set_wait_timeout(previous)


# ---- warp collectives ------------------------------------------------------------------------


def _butterfly_sum(values: np.ndarray) -> np.float32:
    values = values.astype(np.float32)
    for offset in (16, 8, 4, 2, 1):
        values = (values + values[np.arange(32) ^ offset]).astype(np.float32)
    return values[0]


def _expected_warp_ops(values: np.ndarray, threads_per_block: int):
    """Per thread: expected int results (None where CUDA leaves the result undefined) and the
    expected float sum."""
    expected, expected_float = [], []
    for block_start in range(0, len(values), threads_per_block):
        block = values[block_start : block_start + threads_per_block]
        for warp_start in range(0, len(block), 32):
            v = block[warp_start : warp_start + 32]
            n = len(v)
            mask = (1 << n) - 1

            def src(lane: int, source: int):
                return int(v[source]) if source < n else None  # outside the mask: undefined

            ballot = sum(1 << lane for lane in range(n) if v[lane] & 1)
            total = int(np.sum(v.astype(np.int64))) & 0xFFFFFFFF
            total = total - (1 << 32) if total >= 1 << 31 else total
            fsum = _butterfly_sum(v * np.float32(0.375)) if n == 32 else np.float32(np.sum(v.astype(np.float32) * np.float32(0.375), dtype=np.float32))
            for lane in range(n):
                up = lane - 3
                down = lane + 5
                down16 = lane + 2
                row = [
                    src(lane, (lane * 7 + 3) % 32),
                    int(v[lane]) if up < 0 else int(v[up]),
                    int(v[lane]) if down >= 32 else src(lane, down),
                    src(lane, lane ^ 6),
                    src(lane, (lane & ~7) + ((lane + 1) & 7)),
                    int(v[lane]) if down16 >= (lane & ~15) + 16 else src(lane, down16),
                    ballot - (1 << 32) if ballot >= 1 << 31 else ballot,
                    int(bool((v > 900).any())),
                    int(bool((v >= 0).all())),
                    total,
                    int(v.min()),
                    int(v.max()),
                    mask - (1 << 32) if mask >= 1 << 31 else mask,
                ]
                expected.append(row)
                expected_float.append(fsum)
    return expected, np.array(expected_float, dtype=np.float32)


@pytest.mark.parametrize("blocks,threads", [(1, 32), (2, 128), (3, 80), (1, 1)])
def test_warp_ops(schedule, seed, blocks, threads):
    rng = np.random.default_rng(seed)
    values = rng.integers(-1000, 1000, size=blocks * threads, dtype=np.int32)
    out = np.zeros((blocks * threads, selftest.WARP_OP_RESULTS), dtype=np.int32)
    out_float = np.zeros(blocks * threads, dtype=np.float32)
    selftest.warp_ops(values.ctypes.data, out.ctypes.data, out_float.ctypes.data, blocks, threads)
    expected, expected_float = _expected_warp_ops(values, threads)
    for thread, row in enumerate(expected):
        for slot, want in enumerate(row):
            if want is not None:
                assert out[thread, slot] == want, f"thread {thread} result slot {slot}"
    np.testing.assert_array_equal(out_float, expected_float)  # bit-exact: same order as the GPU


# ---- block synchronisation -------------------------------------------------------------------


def test_named_barriers_with_partial_thread_counts(schedule):
    out = np.zeros(34, dtype=np.int32)
    selftest.named_barriers(out.ctypes.data, 25)
    assert out[0] == 0 and out[1] == 0, f"threads read before their partners wrote: {out[:2]}"
    np.testing.assert_array_equal(out[2:], 1000 + np.arange(32))


def test_cross_lane_spin_wait_inside_one_warp(schedule):
    out = np.full(32, -1, dtype=np.int32)
    selftest.intrawarp_spin(out.ctypes.data)
    np.testing.assert_array_equal(out, 31 - np.arange(32))


def test_atomics_at_every_scope(schedule):
    n = 4 * 128
    counters64 = np.array([0, 0, 0, -1, 1 << 40, 0, 777, 0, 0], dtype=np.int64)
    counters32 = np.array([0, -1000], dtype=np.int32)
    selftest.atomics(counters64.ctypes.data, counters32.ctypes.data)
    ids = np.arange(n, dtype=np.int64)
    assert counters64[0] == n
    assert counters64[1] == ids.sum()
    assert counters64[2] == ids.sum()
    assert counters64[3] == n - 1
    assert counters64[4] == 5
    assert counters64[5] == n
    assert 0 <= counters64[6] < n
    assert counters64[7] + counters64[6] == 777 + ids.sum(), "exchange lost or duplicated a value"
    assert counters64[8] == 2 * n
    assert counters32[0] == n and counters32[1] == n - 1 - 100


# ---- failures --------------------------------------------------------------------------------


def test_deadline_fires_and_names_its_wait(short_deadline):
    flag = np.zeros(1, dtype=np.uint64)
    start = time.monotonic()
    with pytest.raises(errors.CommTimeout) as info:
        selftest.wait_forever(flag.ctypes.data, 3, 7, rank=5)
    elapsed = time.monotonic() - start
    message = str(info.value)
    for part in ("selftest_wait_forever", "rank 5", "block 0 thread 0", "a flag nobody sets", "peer 3",
                 "channel 7", "is 0", ">= 1"):
        assert part in message, f"{part!r} missing from: {message}"
    assert short_deadline <= elapsed < short_deadline + 5


def test_device_check_becomes_a_python_exception(seed):
    rng = np.random.default_rng(seed)
    values = rng.integers(14, 100, size=300, dtype=np.int32)
    selftest.device_check(values.ctypes.data, len(values))  # no 13: passes
    index = int(rng.integers(0, len(values)))
    values[index] = 13
    with pytest.raises(errors.DeviceAssert) as info:
        selftest.device_check(values.ctypes.data, len(values))
    message = str(info.value)
    assert f"value 13 at index {index} is forbidden" in message
    assert f"block {index // 128} thread {index % 128}" in message and "selftest_device_check" in message


@pytest.mark.parametrize(
    "kind,error,text",
    [
        (0, errors.Deadlock, "barrier 1 has 32 of 64 threads"),
        (1, errors.Deadlock, "can never arrive"),
        (2, errors.DeviceAssert, "divergent warp collectives"),
    ],
)
def test_broken_synchronisation_is_reported_not_hung(schedule, kind, error, text):
    with pytest.raises(error) as info:
        selftest.broken_sync(kind)
    assert text in str(info.value) and "selftest_broken_sync" in str(info.value)
    # The runtime is usable after a failed launch.
    out = np.full(32, -1, dtype=np.int32)
    selftest.intrawarp_spin(out.ctypes.data)
    np.testing.assert_array_equal(out, 31 - np.arange(32))


def test_launch_shape_is_validated():
    with pytest.raises(errors.InvalidArgument, match=r"block size must be in \[1, 1024\] threads, got 2048"):
        selftest.cost_probe(1, 1, 2048, 0)
    with pytest.raises(errors.InvalidArgument, match="at least one block"):
        selftest.cost_probe(1, 0, 32, 0)


def test_schedule_spec_is_validated():
    for bad in ("random", "random:x", "random:1:2", "fifo", "random:1:0.5:3"):
        with pytest.raises(errors.InvalidArgument, match="schedule: expected"):
            runtime.set_schedule(bad)
    assert runtime.schedule() == "deterministic"
    with pytest.raises(errors.InvalidArgument, match="timeout: expected a positive number"):
        runtime.set_wait_timeout(0)


def test_random_schedule_replays_exactly():
    def run() -> list[int]:
        before = runtime.stats()["switches"]
        out = np.zeros(34, dtype=np.int32)
        selftest.named_barriers(out.ctypes.data, 5)
        return runtime.stats()["switches"] - before

    with runtime.scheduled("random:99:0.3"):
        first = [run() for _ in range(3)]
    with runtime.scheduled("random:99:0.3"):
        second = [run() for _ in range(3)]
    assert first == second, "same seed, same launches: the schedule must be the same"
    assert len(set(first)) > 1, "successive launches should use different seeds"


def test_stats_count_launches_and_switches():
    before = runtime.stats()
    selftest.cost_probe(0, 1, 64, 10)
    after = runtime.stats()
    assert after["launches"] == before["launches"] + 1
    assert after["fibers"] == before["fibers"] + 64
    # Each fiber starts once; at each syncwarp 31 lanes of each of the 2 warps block and resume.
    assert after["switches"] - before["switches"] >= 64 + 2 * 10 * 31
