"""Where the proof's virtual ranks run: one GPU (a stream per rank) or the host target (a thread
per rank). Both give the harness the same few verbs, so every path is written once:

- memory: ``zeros``/``upload`` return a :class:`Mem` (an address and a size), ``download`` copies
  one back into a CPU tensor. On the GPU that is ``cudaMalloc`` memory; on the host ordinary memory
  (a CPU tensor kept alive by the Mem).
- ``run_phase(name, launchers)``: every rank's kernels of one step at once. ``launchers`` maps a
  rank to a function taking that rank's stream handle (0 on the host) and calling the ordinary
  bindings (``module.intranode.dispatch(..., stream=s)``). GPU: each rank's launches are queued on
  its own stream from this thread, then the streams are awaited (with a host deadline) and a wait
  that timed out on the device comes back as :class:`moelink.errors.CommTimeout` from the
  AbortRecord, for every rank that ran (the record is process-wide). Host: one OS thread per rank
  runs its launches (each blocks until its kernel finished; the bindings release the GIL), and
  every rank's own exception comes back. Returns ``{rank: exception or None}``.
- ``probe(launchers)``: GPU only. Captures what each rank would launch without running it and
  returns its kernels with the blocks one SM holds (the occupancy API), for the co-residency check
  in :func:`check_coresident`. The host target runs every block of every grid at once: None.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Dict, List, Optional

import torch

from ..errors import CommTimeout, GPUUnavailable, InvalidArgument

__all__ = ["Mem", "Backend", "HostBackend", "CudaBackend", "make_backend", "check_coresident", "HarnessHang"]

Launcher = Callable[[int], None]


class HarnessHang(RuntimeError):
    """A phase did not finish within the host deadline although every wait has its own: a kernel
    hangs outside moelink's waits. The process cannot recover; the harness stops."""


@dataclasses.dataclass
class Mem:
    ptr: int
    nbytes: int
    keep: Optional[torch.Tensor] = None  # host target: the memory itself

    def at(self, offset: int) -> int:
        return self.ptr + offset


class Backend:
    target = "?"

    def __init__(self, module):
        self.module = module
        self.last_abort: Optional[dict] = None  # GPU: the AbortRecord of the last failed phase

    # memory
    def zeros(self, nbytes: int) -> Mem:
        raise NotImplementedError

    def upload(self, tensor: torch.Tensor) -> Mem:
        raise NotImplementedError

    def download(self, mem: Mem, dtype: torch.dtype, shape) -> torch.Tensor:
        raise NotImplementedError

    def free(self, mem: Mem) -> None:
        pass

    def clear(self, mem: Mem) -> None:
        """Sets every byte of `mem` to zero (in place: its address stays valid)."""
        raise NotImplementedError

    def write(self, mem: Mem, offset: int, tensor: torch.Tensor) -> None:
        """Copies `tensor`'s bytes into `mem` at `offset` (a window's region, as a caller fills the
        zero-copy combine buffer)."""
        raise NotImplementedError

    # execution
    def stream(self, rank: int) -> int:
        return 0

    def run_phase(self, name: str, launchers: Dict[int, Launcher], wait_s: float) -> Dict[int, Optional[BaseException]]:
        raise NotImplementedError

    def probe(self, launchers: Dict[int, Launcher]) -> Optional[Dict[int, List[dict]]]:
        return None

    def healthy(self) -> Optional[str]:
        """None when the execution context is intact, else why not."""
        return None

    def describe(self) -> dict:
        return {"target": self.target}

    def close(self) -> None:
        pass


def _host_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(torch.uint8).reshape(-1) if tensor.numel() else torch.empty(0, dtype=torch.uint8)


class HostBackend(Backend):
    """The SIMT host target: virtual ranks are OS threads of this process."""

    target = "host"

    def __init__(self):
        from .. import _host
        super().__init__(_host)

    def zeros(self, nbytes: int) -> Mem:
        # 256 spare bytes so the address can be rounded up like cudaMalloc's.
        raw = torch.zeros(nbytes + 256, dtype=torch.uint8)
        ptr = (raw.data_ptr() + 255) // 256 * 256
        return Mem(ptr, nbytes, raw)

    def upload(self, tensor: torch.Tensor) -> Mem:
        data = _host_bytes(tensor)
        mem = self.zeros(data.numel())
        if data.numel():
            view = mem.keep[mem.ptr - mem.keep.data_ptr():][:data.numel()]
            view.copy_(data)
        return mem

    def download(self, mem: Mem, dtype: torch.dtype, shape) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes:
            start = mem.ptr - mem.keep.data_ptr()
            out.view(torch.uint8).reshape(-1).copy_(mem.keep[start:start + nbytes])
        return out

    def clear(self, mem: Mem) -> None:
        start = mem.ptr - mem.keep.data_ptr()
        mem.keep[start:start + mem.nbytes].zero_()

    def write(self, mem: Mem, offset: int, tensor: torch.Tensor) -> None:
        data = _host_bytes(tensor)
        assert 0 <= offset and offset + data.numel() <= mem.nbytes, "write outside the memory"
        start = mem.ptr - mem.keep.data_ptr() + offset
        mem.keep[start:start + data.numel()].copy_(data)

    def run_phase(self, name, launchers, wait_s):
        errors: Dict[int, Optional[BaseException]] = {r: None for r in launchers}

        def body(rank: int) -> None:
            try:
                launchers[rank](0)
            except BaseException as exc:  # noqa: BLE001 - every failure is the rank's result
                errors[rank] = exc

        threads = [threading.Thread(target=body, args=(r,), name=f"proof-rank-{r}", daemon=True) for r in launchers]
        for t in threads:
            t.start()
        deadline = time.monotonic() + wait_s
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        late = [t.name for t in threads if t.is_alive()]
        if late:
            raise HarnessHang(f"{name}: {', '.join(late)} still running after {wait_s:.0f} s on the host target")
        return errors

    def describe(self) -> dict:
        import os
        return {"target": "host", "cpus": os.cpu_count()}


class CudaBackend(Backend):
    """One GPU: virtual ranks are non-blocking streams of this process, launched from one thread."""

    target = "cuda"

    def __init__(self):
        from .. import _backend
        module = _backend.cuda()  # GPUUnavailable with the reason when there is none
        super().__init__(module)
        self.proof = module.proof
        self.info = self.proof.device_info()
        self._streams: List[int] = []

    def zeros(self, nbytes: int) -> Mem:
        ptr = self.proof.malloc(nbytes)
        self.proof.memset(ptr, 0, max(nbytes, 1))
        return Mem(ptr, nbytes)

    def upload(self, tensor: torch.Tensor) -> Mem:
        data = _host_bytes(tensor)
        ptr = self.proof.malloc(data.numel())
        if data.numel():
            self.proof.copy(ptr, data.data_ptr(), data.numel())
        return Mem(ptr, data.numel())

    def download(self, mem: Mem, dtype: torch.dtype, shape) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes:
            self.proof.copy(out.data_ptr(), mem.ptr, nbytes)
        return out

    def free(self, mem: Mem) -> None:
        self.proof.free(mem.ptr)

    def clear(self, mem: Mem) -> None:
        self.proof.memset(mem.ptr, 0, mem.nbytes)

    def write(self, mem: Mem, offset: int, tensor: torch.Tensor) -> None:
        data = _host_bytes(tensor)
        assert 0 <= offset and offset + data.numel() <= mem.nbytes, "write outside the memory"
        if data.numel():
            self.proof.copy(mem.ptr + offset, data.data_ptr(), data.numel())

    def stream(self, rank: int) -> int:
        while len(self._streams) <= rank:
            self._streams.append(self.proof.stream_create())
        return self._streams[rank]

    def run_phase(self, name, launchers, wait_s):
        errors: Dict[int, Optional[BaseException]] = {r: None for r in launchers}
        launched = []
        for rank, launch in launchers.items():
            try:
                launch(self.stream(rank))
                launched.append(rank)
            except Exception as exc:  # noqa: BLE001 - a launch refused (shape, residency): that rank's result
                errors[rank] = exc
        deadline = time.monotonic() + wait_s
        pending = set(launched)
        pause = 1e-5
        while pending:
            pending = {r for r in pending if not self.proof.stream_done(self.stream(r))}
            if not pending:
                break
            if time.monotonic() > deadline:
                raise HarnessHang(f"{name}: the streams of ranks {sorted(pending)} are still busy after {wait_s:.0f} s, "
                                  "although every wait has a deadline (MOELINK_TIMEOUT_S)")
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)
        self.last_abort = self.module.abort.record()
        message = self.module.abort.take(name)
        if message is not None:
            for rank in launched:
                errors[rank] = CommTimeout(message)
        return errors

    def probe(self, launchers):
        kernels: Dict[int, List[dict]] = {}
        for rank, launch in launchers.items():
            stream = self.stream(rank)
            self.proof.capture_begin(stream)
            try:
                launch(stream)
            finally:
                try:
                    graph = self.proof.capture_end(stream)
                except Exception:  # noqa: BLE001 - a failed launch invalidated the capture; its error is raised
                    graph = 0
            try:
                kernels[rank] = self.proof.graph_kernels(graph)
            finally:
                self.proof.graph_destroy(graph)
        return kernels

    def healthy(self):
        try:
            self.proof.device_synchronize()
        except Exception as exc:  # noqa: BLE001
            return str(exc)
        return None

    def describe(self) -> dict:
        info = dict(self.info)
        info["target"] = "cuda"
        info["build"] = self.module.build_info()
        return info

    def close(self) -> None:
        for s in self._streams:
            try:
                self.proof.stream_destroy(s)
            except Exception:  # noqa: BLE001 - closing after a failure: nothing more to do
                pass
        self._streams = []


def make_backend(target: str) -> Backend:
    if target == "host":
        return HostBackend()
    if target == "cuda":
        return CudaBackend()
    raise InvalidArgument(f"target: expected 'host' or 'cuda', got {target!r}")


def check_coresident(what: str, kernels: Dict[int, List[dict]], sm_count: int) -> dict:
    """Raises InvalidArgument unless every rank's grids of one step can be resident at once.

    Kernel i of every rank's step runs at the same time as kernel i of the others (a step's
    kernels follow each other on each rank's stream) and they wait on each other. Each occupies
    grid_blocks / blocks_per_sm SMs, so for every i the ranks' grids together must fit the
    device's SMs (necessary, and sufficient when nothing else holds an SM). Returns the summary
    the report keeps."""
    depth = max((len(v) for v in kernels.values()), default=0)
    worst, lines = 0.0, []
    for i in range(depth):
        need = 0.0
        for rank, entries in sorted(kernels.items()):
            if i >= len(entries):
                continue
            k = entries[i]
            if k["blocks_per_sm"] < 1:
                raise InvalidArgument(f"{what}: kernel {k['name']} of rank {rank} cannot launch at all "
                                      f"({k['block_threads']} threads, {k['dynamic_smem_bytes']} B shared memory, "
                                      f"{k['registers']} registers per thread)")
            need += k["grid_blocks"] / k["blocks_per_sm"]
        first = kernels[min(kernels)][i] if i < len(kernels[min(kernels)]) else None
        if first is not None:
            lines.append(f"{first['name']}: {first['grid_blocks']} blocks x {first['block_threads']} threads, "
                         f"{first['dynamic_smem_bytes']} B smem, {first['registers']} regs, "
                         f"{first['blocks_per_sm']} block(s)/SM, all ranks {need:.1f} SMs")
        if need > sm_count + 1e-9:
            raise InvalidArgument(
                f"{what}: the {len(kernels)} ranks' grids need {need:.1f} SMs to be resident at once, this GPU has "
                f"{sm_count} ({lines[-1]}): lower num_sms or the rank count")
        worst = max(worst, need)
    return {"sms_needed": worst, "sm_count": sm_count, "kernels": lines}
