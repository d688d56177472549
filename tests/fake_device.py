"""A stand-in for ``moelink._cuda`` built from the host target, for testing the one-GPU proof's
GPU-side control flow (moelink/proof/backend.py: CudaBackend; bench.py) on machines without a GPU.

It is NOT a GPU model: kernels run on the SIMT host runtime, each "stream" is a worker thread that
executes what is queued on it in order, so launches return at once and ranks run concurrently as
on a GPU. A wait that times out comes back through a fake AbortRecord exactly where a GPU's would.
Stream capture records calls instead of running them; graphs replay them on their streams. What it
proves is only that the harness queues every rank before waiting, converts the record into
CommTimeout, probes, captures and replays as intended.
"""

from __future__ import annotations

import ctypes
import queue
import threading
import time
import types

import torch

from moelink import _host
from moelink.errors import CommTimeout, CudaError
from moelink.proof.backend import Backend, CudaBackend


class _Stream:
    def __init__(self, device: "FakeCuda"):
        self.device = device
        self.tasks: "queue.Queue" = queue.Queue()
        self.busy = 0
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def put(self, fn) -> None:
        with self.lock:
            self.busy += 1
        self.tasks.put(fn)

    def _loop(self) -> None:
        while True:
            fn = self.tasks.get()
            if fn is None:
                return
            try:
                fn()
            except CommTimeout as exc:
                self.device.record_abort(str(exc))
            except BaseException as exc:  # noqa: BLE001 - a "sticky" error, as a faulted kernel
                self.device.sticky = f"{type(exc).__name__}: {exc}"
            finally:
                with self.lock:
                    self.busy -= 1

    def done(self) -> bool:
        with self.lock:
            return self.busy == 0


class _Event:
    def __init__(self):
        self.fired = threading.Event()
        self.time = 0.0
        self.graph = None  # the capture it was last recorded into


class FakeCuda(types.SimpleNamespace):
    def __init__(self, sm_count: int = 132):
        super().__init__()
        self.sm_count = sm_count
        self.streams = {}
        self.memory = {}
        self.capturing = {}  # stream -> graph (a list of (stream, fn)) while captured
        self.abort_message = None
        self.sticky = None
        self.launches = []  # (name, rank) in the order they were queued
        self.intranode = self._proxy(_host.intranode)
        self.internode = self._proxy(_host.internode, "internode")
        self.low_latency = self._proxy(_host.low_latency, "low_latency")
        for name in ("dispatch_layout", "fp8_quantize", "fp8_dequantize", "logfmt_encode", "logfmt_decode"):
            setattr(self, name, self._kernel(name, getattr(_host, name)))
        self.logfmt_row_bytes = _host.logfmt_row_bytes
        self.abort = types.SimpleNamespace(record=self._record, take=self._take, clear=self._clear,
                                           raise_if_aborted=self._raise_if_aborted)
        self.proof = types.SimpleNamespace(**{n: getattr(self, "_" + n) for n in (
            "device_info", "malloc", "free", "memset", "copy", "stream_create", "stream_destroy", "stream_done",
            "stream_synchronize", "device_synchronize", "event_create", "event_destroy", "event_record",
            "stream_wait_event", "event_elapsed_ms", "capture_begin", "capture_end", "graph_kernels",
            "graph_destroy", "graph_instantiate", "graph_launch", "graph_exec_destroy")})

    # ---- kernels: queued on the caller's stream, or recorded while it is captured ----
    def _kernel(self, name, fn):
        def call(*args, stream=0, rank=-1):
            task = (lambda: fn(*args, rank=rank))
            graph = self.capturing.get(stream)
            if graph is not None:
                graph.append((stream, task, name))
                return
            self.launches.append((name, rank))
            self.streams[stream].put(task)
        return call

    def _proxy(self, sub, family: str = "intranode"):
        ns = types.SimpleNamespace()
        for attr in dir(sub):
            if attr.startswith("_"):
                continue
            value = getattr(sub, attr)
            if attr in ("notify", "dispatch", "combine"):
                value = self._kernel(f"{family}.{attr}", value)
            setattr(ns, attr, value)
        return ns

    def build_info(self):
        from moelink import runtime
        return {"archs": ["90"], "wait_timeout_s": runtime.wait_timeout(), "fake": True}

    # ---- abort record ----
    def record_abort(self, message):
        if self.abort_message is None:
            self.abort_message = message

    def _record(self):
        return None if self.abort_message is None else {"peer": -1, "what": self.abort_message}

    def _take(self, kernel=""):
        message, self.abort_message = self.abort_message, None
        return None if message is None else f"kernel '{kernel}' (fake GPU): {message}"

    def _clear(self):
        self.abort_message = None

    def _raise_if_aborted(self, kernel=""):
        message = self._take(kernel)
        if message is not None:
            raise CommTimeout(message)

    # ---- device, memory ----
    def _device_info(self):
        return {"name": "fake (host kernels)", "sm_count": self.sm_count, "cc": "9.0"}

    def _malloc(self, nbytes):
        t = torch.zeros(max(nbytes, 1) + 256, dtype=torch.uint8)
        ptr = (t.data_ptr() + 255) // 256 * 256
        self.memory[ptr] = t
        return ptr

    def _free(self, ptr):
        self.memory.pop(ptr)

    def _memset(self, ptr, value, nbytes):
        ctypes.memset(ptr, value, nbytes)

    def _copy(self, dst, src, nbytes):
        if nbytes:
            ctypes.memmove(dst, src, nbytes)

    # ---- streams, events ----
    def _stream_create(self):
        s = _Stream(self)
        handle = id(s)
        self.streams[handle] = s
        return handle

    def _stream_destroy(self, handle):
        self.streams.pop(handle).tasks.put(None)

    def _stream_done(self, handle):
        if self.sticky:
            raise CudaError(f"fake: sticky error: {self.sticky}")
        return self.streams[handle].done()

    def _stream_synchronize(self, handle):
        while not self._stream_done(handle):
            time.sleep(1e-4)

    def _device_synchronize(self):
        for h in list(self.streams):
            self._stream_synchronize(h)

    def _event_create(self):
        e = _Event()
        self.memory[id(e)] = e
        return id(e)

    def _event_destroy(self, handle):
        self.memory.pop(handle)

    def _event_record(self, handle, stream):
        e = self.memory[handle]
        graph = self.capturing.get(stream)

        def fire():
            e.time = time.monotonic()
            e.fired.set()
        e.graph = graph
        if graph is not None:
            graph.append((stream, fire, "event"))
            return
        e.fired.clear()
        self.streams[stream].put(fire)

    def _stream_wait_event(self, stream, handle):
        e = self.memory[handle]
        if e.graph is not None and any(g is e.graph for g in self.capturing.values()):
            self.capturing[stream] = e.graph  # waiting on a captured event joins the capture
            return
        if stream in self.capturing:
            return  # inside a capture the join is implied by the replay
        self.streams[stream].put(lambda: e.fired.wait(60))

    def _event_elapsed_ms(self, start, end):
        return (self.memory[end].time - self.memory[start].time) * 1e3

    # ---- capture and graphs ----
    def _capture_begin(self, stream):
        self.capturing[stream] = []

    def _capture_end(self, stream):
        graph = self.capturing.pop(stream)
        for s in [s for s, g in self.capturing.items() if g is graph]:
            del self.capturing[s]
        self.memory[id(graph)] = graph
        return id(graph)

    def _graph_kernels(self, handle):
        graph = self.memory.get(handle, [])
        return [dict(name=name, grid_blocks=2, block_threads=512, dynamic_smem_bytes=0, registers=128,
                     local_bytes=0, blocks_per_sm=1, cooperative=True) for _, _, name in graph if name != "event"]

    def _graph_destroy(self, handle):
        self.memory.pop(handle, None)

    def _graph_instantiate(self, handle):
        return handle

    def _graph_exec_destroy(self, handle):
        pass

    def _graph_launch(self, handle, stream):
        graph = [(s, task) for s, task, name in self.memory[handle] if name != "event"]

        def replay():  # every captured stream's calls on its own thread, joined at the end
            by_stream = {}
            for s, task in graph:
                by_stream.setdefault(s, []).append(task)
            def run(tasks):
                for t in tasks:
                    try:
                        t()
                    except CommTimeout as exc:
                        self.record_abort(str(exc))
            threads = [threading.Thread(target=run, args=(ts,)) for ts in by_stream.values()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        self.streams[stream].put(replay)


class SimulatedBackend(CudaBackend):
    """The proof's GPU backend (moelink.proof.backend.CudaBackend) over a FakeCuda instead of moelink._cuda."""

    def __init__(self, fake: FakeCuda):
        Backend.__init__(self, fake)
        self.proof = fake.proof
        self.info = fake.proof.device_info()
        self._streams = []
