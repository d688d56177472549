"""The GPU target's launch contract, held on the host: every mode of ``moelink.Buffer`` (intranode,
internode, low-latency) run on :class:`ContractTarget`, the host target with what the GPU target
demands of the Python layer checked at every kernel call. What it checks, and why a GPU needs it:

- every native context is built with the GPU build's fixed block (``GPU_BLOCK_WARPS``: the CUDA
  kernels refuse any other, so a mode that asks the host's one-warp-per-rank default fails on
  every GPU call);
- every kernel is launched inside a Buffer operation, on that operation's stream handle (else
  on a GPU it runs on the wrong stream, unordered with the caller's work);
- every tensor a kernel call points into (the slot claims of a low-latency context too) was handed
  to ``op.keep`` (on a GPU the caching allocator may reuse the memory of an unkept tensor while the
  comm stream still reads it), and starts at a 16-byte boundary (the kernels' vector and bulk
  copies fault on a GPU otherwise);
- counts read back through the GPU target's own staging buffers (``_target.HostStaging``), so two
  read-backs of one call cannot alias;
- low-latency grids of several blocks (a GPU's) give the same results as the host's one block,
  and a one-node low-latency Buffer runs on the GPU's one-node transport (``NodeScaleOut``: puts
  as NVLink stores through the window table, the loopback binding) over shared memory.

Results are checked against moelink.reference by the modes' own test cases (test_intranode,
test_internode, test_low_latency), run unchanged under the contract. What it cannot show: stream
order itself, pinned read-backs, the NCCL/GIN transports (tests/test_gpu_*.py, on a GPU).
CI: 2 ranks (2x1) and 4 ranks (4x1, 2x2)."""

from __future__ import annotations

import contextlib


from moelink import _host, _target
from moelink.event import EventOverlap
from multiproc import rank_group_fixture
import test_internode
import test_intranode
import test_low_latency

group = rank_group_fixture(2, 4, case_timeout=300)

STREAM = 0x5EED  # the stream handle every contract operation hands out
GPU_BLOCK_WARPS = int(_host.intranode.GPU_BLOCK_WARPS)
KERNELS = {"intranode": ("notify", "dispatch", "combine"), "internode": ("notify", "dispatch", "combine"),
           "low_latency": ("dispatch", "combine", "clean")}
CONTEXTS = {"intranode": "Node", "internode": "Context", "low_latency": "Context"}


class ContractViolation(AssertionError):
    pass


def _extent(t):
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


class _Operation:
    """``ContractTarget.operation``'s scope: the surface of ``_gpu.CommOp``, recording launches."""

    stream_handle = STREAM

    def __init__(self):
        self.event = EventOverlap()
        self.kept = []
        self.launches = []  # (kernel, pointer-sized int arguments)

    def keep(self, *tensors) -> None:
        self.kept.extend(t for t in tensors if t is not None)

    def on_stream(self):
        return contextlib.nullcontext()

    def check(self) -> None:
        extents = [_extent(t) for t in self.kept if t.numel()]
        for kernel, pointers in self.launches:
            for name, p in pointers:
                if not any(lo <= p < hi for lo, hi in extents):
                    raise ContractViolation(f"{kernel}: argument {name} points at 0x{p:x}, in no tensor the "
                                            "operation kept (op.keep)")
                if p % 16:
                    raise ContractViolation(f"{kernel}: argument {name} = 0x{p:x} is not 16-byte aligned")


class _Family:
    """A kernel family of moelink._host (``intranode`` ...) whose kernels and contexts check the
    contract before running."""

    def __init__(self, target: "ContractTarget", name: str):
        self._target, self._name, self._real = target, name, getattr(_host, name)

    def __getattr__(self, attr):
        real = getattr(self._real, attr)
        if attr == CONTEXTS[self._name]:
            return self._context(real)
        if attr in KERNELS[self._name]:
            return self._kernel(attr, real)
        return real

    def _context(self, real):
        def make(*args, **kwargs):
            warps = kwargs.get("block_warps")
            if warps != GPU_BLOCK_WARPS:
                raise ContractViolation(f"{self._name}.{CONTEXTS[self._name]}: block_warps={warps}, the GPU build "
                                        f"runs {GPU_BLOCK_WARPS} only")
            native = real(*args, **kwargs)
            # Tensors the context points into (the low-latency slot claims): kept like an argument.
            # Every context registers, so an id reused by a later context never inherits an entry.
            held = [("claims", kwargs["claims"])] if kwargs.get("claims") else []
            self._target.context_pointers[id(native)] = held
            return native
        return make

    def _kernel(self, attr, real):
        what = f"{self._name}.{attr}"

        def launch(*args, **kwargs):
            op = self._target.current
            if op is None:
                raise ContractViolation(f"{what}: launched outside a Buffer operation")
            if kwargs.get("stream") != STREAM:
                raise ContractViolation(f"{what}: stream={kwargs.get('stream')}, not the operation's ({STREAM:#x})")
            # Pointers: ints past the first 4 GiB (sizes, counts and flags are far below).
            named = [(f"#{i}", v) for i, v in enumerate(args)] + list(kwargs.items())
            pointers = [(n, v) for n, v in named if isinstance(v, int) and not isinstance(v, bool) and v >= 1 << 32]
            pointers += self._target.context_pointers.get(id(args[0]), [])
            op.launches.append((what, pointers))
            self._target.launches += 1
            return real(*args, **kwargs)
        return launch


class _Module:
    def __init__(self, target: "ContractTarget"):
        self.intranode = _Family(target, "intranode")
        self.internode = _Family(target, "internode")
        self.low_latency = _Family(target, "low_latency")

    def __getattr__(self, attr):
        return getattr(_host, attr)


class ContractTarget(_target.HostTarget):
    """The host target, with the GPU target's launch contract (see the module docstring)."""

    def __init__(self):
        self.module = _Module(self)
        self.current = None
        self.launches = 0
        self.read_backs = 0
        self.context_pointers = {}  # id(native context) -> [(name, pointer)] of tensors it holds
        self._staging = _target.HostStaging(pin_memory=False)

    @staticmethod
    def block_warps(num_ranks=None) -> int:
        return GPU_BLOCK_WARPS

    @staticmethod
    def grid_blocks(wanted: int) -> int:
        return max(1, min(int(wanted), 3))  # several blocks, as on a GPU (kept small: fibers cost)

    @staticmethod
    def scale_out(num_nodes: int) -> str:
        return "node" if num_nodes == 1 else "nic"  # the GPU's one-node transport; no GIN on the host

    @contextlib.contextmanager
    def operation(self, previous_event=None, async_finish=False, allocate_on_comm_stream=False):
        if self.current is not None:
            raise ContractViolation("an operation inside an operation")
        op = self.current = _Operation()
        try:
            yield op
        finally:
            self.current = None
        op.check()

    def to_host(self, op, what, rank, *tensors):
        if op is not self.current:
            raise ContractViolation(f"{what}: read back outside its operation")
        self.read_backs += 1
        copies = self._staging.buffers(tensors)  # as the GPU target's: reused buffers, one per position
        for host, t in zip(copies, tensors):
            host.copy_(t)
        return tuple(c.clone() for c in copies)


def _under_contract(ctx, case_fn, *args):
    """Runs a mode's test case with every Buffer of this rank on the contract target."""
    target = ctx.state.get("contract")
    if target is None:
        target = ctx.state["contract"] = ContractTarget()
        _target.HOST = target  # Buffer takes its host target from here at construction
    before = target.launches
    case_fn(ctx, *args)
    return target.launches - before, target.read_backs


def _run(group, case_fn, *args):
    results = group.run(_under_contract, case_fn, *args)
    assert all(launches > 0 for launches, _ in results), results  # the contract saw every kernel
    return results


def test_intranode_under_the_gpu_contract(group, seed):
    results = _run(group, test_intranode._dispatch_and_combine, seed,
                   dict(hidden=256, num_topk=4, experts_per_rank=2, cached=True, bias="pair"))
    assert all(read_backs > 0 for _, read_backs in results)  # the counts came through to_host
    _run(group, test_intranode._dispatch_and_combine, seed,
         dict(hidden=128, num_topk=4, experts_per_rank=2, fp8=True, tokens=[40] * group.world_size,
              num_worst_tokens=40 * group.world_size))


def test_internode_under_the_gpu_contract(group, seed):
    for rpn in test_internode._layouts(group):
        _run(group, test_internode._dispatch_and_combine, seed,
             dict(ranks_per_node=rpn, hidden=128, num_topk=4, experts_per_rank=2, cached=True, bias=True))


def _scale_outs(ctx):
    """The scale-out transports of this rank's low-latency Buffers, by (ranks per node, NVLink)."""
    return {key[1:]: type(b._scaleout).__name__ for key, b in ctx.state.items()
            if isinstance(key, tuple) and key[0] == "ll"}


def test_low_latency_under_the_gpu_contract(group, seed):
    layouts = test_low_latency._layouts(group)[:2]
    for rpn, allow in layouts:
        _run(group, test_low_latency._case, seed,
             dict(rpn=rpn, allow_nvlink=allow, t_max=12, hidden=256, num_topk=3, experts=4 * group.world_size,
                  payloads=["fp8", "bf16", "nvfp4"], iterations=3, hook=True, zero_copy=True))
    # One node ran on the GPU's one-node transport, several on the host's NIC (no GIN here).
    want = {(rpn, allow): "NodeScaleOut" if rpn == group.world_size else "ScaleOutWindows" for rpn, allow in layouts}
    assert group.run(_scale_outs) == [want] * group.world_size
