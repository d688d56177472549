"""The Python layer for CUDA tensors (moelink.event, moelink._gpu, _backend.is_sm90_compiled).

Without a GPU: the host-target paths are no-ops that never touch ``torch.cuda`` (checked by making
every torch.cuda entry point raise), argument checks, receive counts with their deadline. With a
CUDA build of torch and a GPU (marker ``gpu``): the stream and event discipline of DeepEP
(previous_event, async_finish, allocate_on_comm_stream) on real streams."""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from moelink import _backend, errors
from moelink._gpu import CommOp, CommStream, ReceiveCounts
from moelink.event import EventOverlap

def needs_cuda_torch(test):
    """Marker `gpu`, skipped without a GPU and a CUDA build of torch."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU and a CUDA build of torch")
    return pytest.mark.gpu(skip(test))


@pytest.fixture
def cuda_forbidden(monkeypatch):
    """Every torch.cuda entry point the GPU paths use raises: a CPU path that reaches one fails."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a host-target path touched torch.cuda")
    for name in ("current_stream", "current_device", "stream", "synchronize", "set_stream"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(torch.cuda.Stream, "__new__", forbidden)
    monkeypatch.setattr(torch.cuda.Event, "__new__", forbidden)


# --- host target: nothing changes ------------------------------------------------------------

def test_the_guard_catches_cuda_use(cuda_forbidden):
    with pytest.raises(AssertionError, match="touched torch.cuda"):
        with CommOp("cuda:0", CommStream("cuda:0")):
            pass
    with pytest.raises(AssertionError, match="touched torch.cuda"):
        EventOverlap.capture("cuda:0")


def test_empty_event_is_a_no_op(cuda_forbidden):
    event = EventOverlap()
    assert event.is_empty and event.event is None and event.extra_tensors is None
    event.current_stream_wait()
    with event as entered:
        assert entered is event
    assert "empty" in repr(event)
    assert EventOverlap.capture("cpu").is_empty


@pytest.mark.parametrize("async_finish", [False, True])
@pytest.mark.parametrize("allocate_on_comm_stream", [False, True])
@pytest.mark.parametrize("previous", [False, True])
def test_host_target_comm_op_is_a_no_op(cuda_forbidden, async_finish, allocate_on_comm_stream, previous):
    stream = CommStream("cpu")
    assert stream.stream is None and stream.handle == 0
    x = torch.ones(4)
    with CommOp("cpu", stream, EventOverlap() if previous else None, async_finish, allocate_on_comm_stream) as op:
        assert op.stream_handle == 0
        y = x * 2
        op.keep(x, y, None)
    assert op.event.is_empty and torch.equal(y, torch.full((4,), 2.0))


def test_host_target_receive_counts_are_plain_memory(cuda_forbidden):
    counts = ReceiveCounts(3, "cpu")
    assert not counts.host.is_pinned() and counts.host.tolist() == [-1, -1, -1]
    counts.host.copy_(torch.tensor([5, 0, 7]))
    assert counts.wait(1.0, "dispatch: receive counts") == [5, 0, 7]
    counts.reset()
    assert counts.host.tolist() == [-1, -1, -1]


def test_exception_inside_a_host_op_propagates(cuda_forbidden):
    with pytest.raises(ValueError, match="boom"):
        with CommOp("cpu", CommStream("cpu")):
            raise ValueError("boom")


# --- arguments -------------------------------------------------------------------------------

def test_event_arguments_are_checked():
    with pytest.raises(errors.InvalidType, match="event: expected a torch.cuda.Event, an object with current_stream_wait\(\), or None, got object"):
        EventOverlap(object())
    with pytest.raises(errors.InvalidType, match="extra_tensors: expected a tuple"):
        EventOverlap(None, [torch.ones(1)])
    with pytest.raises(errors.InvalidArgument, match="device: expected a CUDA device, got 'cpu'"):
        EventOverlap(None, device="cpu")


def test_comm_op_arguments_are_checked():
    with pytest.raises(errors.InvalidType, match="previous_event: expected an EventOverlap or None, got str"):
        CommOp("cpu", CommStream("cpu"), "event")
    with pytest.raises(errors.InvalidType, match="comm_stream"):
        CommOp("cpu", object())
    with pytest.raises(errors.InvalidArgument, match="comm_stream: expected the comm stream of cpu, got one of cuda:0"):
        CommOp("cpu", CommStream("cuda:0"))  # creating a CommStream touches no device
    with pytest.raises(errors.InvalidArgument, match="device"):
        CommStream("meta")


@pytest.mark.parametrize("previous, async_finish", [(None, True), (EventOverlap(), False), (None, False)])
def test_allocate_on_comm_stream_needs_an_event_and_async_on_the_gpu(previous, async_finish):
    with pytest.raises(errors.InvalidArgument, match="allocate_on_comm_stream: expected previous_event and async_finish"):
        CommOp("cuda:0", CommStream("cuda:0"), previous, async_finish, allocate_on_comm_stream=True)


@pytest.mark.parametrize("num_slots", [0, -3])
def test_receive_count_sizes_are_checked(num_slots):
    with pytest.raises(errors.InvalidArgument, match="num_slots: expected an int >= 1"):
        ReceiveCounts(num_slots, "cpu")
    with pytest.raises(errors.InvalidType, match="num_slots"):
        ReceiveCounts(2.0, "cpu")


# --- receive counts --------------------------------------------------------------------------

def test_receive_counts_arrive_from_another_writer():
    counts = ReceiveCounts(4, "cpu")

    def writer():
        for slot, value in enumerate([3, 1, 4, 1]):
            time.sleep(0.01)
            counts.host[slot] = value
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert counts.wait(5.0, "dispatch: receive counts", rank=2) == [3, 1, 4, 1]
    finally:
        thread.join()


def test_receive_counts_time_out_naming_what_and_which():
    counts = ReceiveCounts(20, "cpu")
    counts.host[:3] = 1
    start = time.monotonic()
    with pytest.raises(errors.CommTimeout) as info:
        counts.wait(0.05, "dispatch: receive counts", rank=1)
    assert time.monotonic() - start < 2.0
    message = str(info.value)
    assert message.startswith("dispatch: receive counts (rank 1): 17 of 20 counts were not written within 0.05 s")
    assert message.endswith("(slots [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, ...])")


def test_receive_counts_refuse_garbage():
    counts = ReceiveCounts(2, "cpu")
    counts.host[:] = torch.tensor([4, -7])
    with pytest.raises(errors.InvalidArgument, match=r"slots \[1\] hold negative counts \[-7\]"):
        counts.wait(1.0, "dispatch: receive counts")


# --- build info ------------------------------------------------------------------------------

@pytest.mark.parametrize("archs, expected", [(["90"], True), (["90a"], True), (["80", "100a"], True),
                                             (["80"], False), (["sm_86", "75"], False), ([], False)])
def test_is_sm90_compiled_reads_the_build(monkeypatch, archs, expected):
    fake = types.SimpleNamespace(build_info=lambda: {"archs": archs})
    monkeypatch.setattr(_backend, "_load_cuda", lambda: fake)
    assert _backend.is_sm90_compiled() is expected


def test_is_sm90_compiled_without_the_cuda_extension(monkeypatch):
    monkeypatch.setattr(_backend, "_load_cuda", lambda: None)
    assert _backend.is_sm90_compiled() is False


def test_is_sm90_compiled_for_this_build():
    module = _backend._load_cuda()
    expected = module is not None and any(int(a.rstrip("af")) >= 90 for a in module.build_info()["archs"])
    assert _backend.is_sm90_compiled() is expected


# --- GPU: DeepEP's stream discipline on real streams -----------------------------------------

def _slow_fill(tensor: torch.Tensor, value: float) -> None:
    """Fills `tensor` on the current stream after ~50 ms of device time, so an unordered reader
    would see the old contents."""
    torch.cuda._sleep(100_000_000)
    tensor.fill_(value)


@needs_cuda_torch
@pytest.mark.parametrize("async_finish", [False, True])
def test_compute_sees_the_comm_streams_results(async_finish):
    comm = CommStream("cuda")
    out = torch.zeros(1 << 20, device="cuda")
    with CommOp("cuda", comm, async_finish=async_finish) as op:
        with torch.cuda.stream(comm.stream):
            _slow_fill(out, 1.0)
        op.keep(out)
    assert op.event.is_empty is (not async_finish)
    op.event.current_stream_wait()
    assert bool((out.clone() == 1.0).all())


@needs_cuda_torch
def test_comm_stream_waits_for_previous_event_and_allocates_there():
    comm = CommStream("cuda")
    compute = torch.cuda.current_stream()
    source = torch.zeros(1 << 20, device="cuda")
    _slow_fill(source, 3.0)  # queued on the compute stream
    previous = EventOverlap.capture("cuda")
    with CommOp("cuda", comm, previous, async_finish=True, allocate_on_comm_stream=True) as op:
        assert torch.cuda.current_stream() == comm.stream  # outputs are allocated on the comm stream
        copy = source.clone()  # runs on the comm stream, after the event
        op.keep(source, copy)
    assert torch.cuda.current_stream() == compute
    assert op.event.extra_tensors == (source, copy)
    with op.event:
        pass
    assert bool((copy == 3.0).all())


@needs_cuda_torch
def test_stream_is_restored_after_an_error():
    comm = CommStream("cuda")
    compute = torch.cuda.current_stream()
    with pytest.raises(RuntimeError, match="launch failed"):
        with CommOp("cuda", comm, EventOverlap.capture("cuda"), True, True):
            raise RuntimeError("launch failed")
    assert torch.cuda.current_stream() == compute


@needs_cuda_torch
def test_gpu_receive_counts_are_pinned():
    counts = ReceiveCounts(8, "cuda")
    assert counts.host.is_pinned() and counts.device_ptr == counts.host.data_ptr()
