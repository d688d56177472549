"""The one-GPU proof: N ranks as N streams of one process on one GPU (or, in CI, as N threads of
one process on the host target), running moelink's unchanged kernels through the ordinary
bindings on windows carved out of one allocation, checked against ``moelink.reference``.

    python -m moelink.proof --target cuda --ranks 2,4,8 --out results/      # on a GPU machine
    python -m moelink.proof --target host --ranks 2,4                       # anywhere (CI)

``PATHS`` lists what is proved, one module per path (``cases``, ``run``, optionally
``timeout_cases``/``run_timeout``): layout, codecs, intranode, internode (ranks posing as nodes over
the device-side loopback), low_latency (the low-latency dispatch and combine over the loopback and
node pairs' NVLink stores). docs/gpu-proof.md says what the proof shows and what it cannot.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Callable, List, Optional, Sequence

from . import codecs, internode, intranode, layout, low_latency
from .backend import HarnessHang, make_backend
from .core import Case, CaseResult, RankGroup, run_case

__all__ = ["PATHS", "Report", "run_proof", "DEFAULT_GPU_TIMEOUT_S"]

PATHS = [layout, codecs, intranode, internode, low_latency]

# The deadline of every wait in the proof's GPU process when MOELINK_TIMEOUT_S is unset: each
# forced timeout costs this long; normal cases finish in milliseconds.
DEFAULT_GPU_TIMEOUT_S = 5.0


@dataclasses.dataclass
class Report:
    meta: dict
    results: List[CaseResult]
    bench: List[dict] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> List[CaseResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def bench_failed(self) -> List[dict]:
        """Benchmark points that failed or whose outputs after the timed replays were wrong."""
        return [b for b in self.bench if "error" in b or b.get("check") != "ok"]

    def counts(self) -> dict:
        return {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "skip")}

    def as_json(self) -> dict:
        return {"meta": self.meta, "counts": self.counts(), "results": [dataclasses.asdict(r) for r in self.results],
                "bench": self.bench, "bench_failed": len(self.bench_failed)}

    def text(self) -> str:
        lines = [f"moelink one-GPU proof: target {self.meta['target']}, seed {self.meta['seed']}"]
        for key in ("device", "wait_timeout_s", "load_average"):
            if key in self.meta:
                lines.append(f"  {key}: {self.meta[key]}")
        lines += [r.line() for r in self.results]
        if self.bench:
            from .bench import format_table
            lines.append(format_table(self.bench))
        c = self.counts()
        lines.append(f"{c['pass']} passed, {c['fail']} failed, {c['skip']} skipped")
        return "\n".join(lines)


def _wait_timeout(target: str, module) -> float:
    if target == "cuda":
        return float(module.build_info()["wait_timeout_s"])
    from .. import runtime
    return runtime.wait_timeout()


def run_proof(target: str, ranks: Sequence[int], *, seed: Optional[int] = None, paths=None,
              only: Optional[str] = None, timeouts: bool = True, bench: bool = False,
              log: Callable[[str], None] = print, backend=None, big: Optional[bool] = None) -> Report:
    """Runs every path's cases at each rank count, then (``timeouts``) the forced timeouts and a
    normal case after them, then (``bench``) the benchmark. ``only`` keeps cases whose
    "path/case" name contains it. Never raises for a failing case: the report holds it.
    ``backend`` overrides the target's (tests drive the GPU control flow on a simulated device);
    ``big`` chooses GPU-sized cases (default: on the cuda target) or CI-sized ones."""
    seed = int(time.time()) % 100000 if seed is None else seed
    backend = backend or make_backend(target)
    timeout_s = _wait_timeout(target, backend.module)
    meta = {"target": target, "seed": seed, "ranks": list(ranks), "wait_timeout_s": timeout_s,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "load_average": list(os.getloadavg())}
    meta["device"] = backend.describe()
    results: List[CaseResult] = []
    report = Report(meta, results)
    # A phase's host deadline: well past the device deadline (every wait has its own).
    wait_s = max(120.0, 3 * timeout_s + 60) if target == "cuda" else max(600.0, 3 * timeout_s)
    index = 0
    try:
        for num_ranks in ranks:
            group = RankGroup(backend, num_ranks, wait_s, big=big)
            try:
                for path in (paths or PATHS):
                    planned = list(path.cases(group))
                    if timeouts and hasattr(path, "timeout_cases"):
                        planned += list(path.timeout_cases(group))
                    for case in planned:
                        if only and only not in f"{path.name}/{case.name}":
                            continue
                        case.seed = seed * 1000 + index
                        index += 1
                        runner = path.run_timeout if case.kind == "timeout" else path.run
                        result = run_case(_Bound(path, runner), group, case)
                        results.append(result)
                        log(result.line())
                        if target == "cuda" and backend.healthy() is not None:
                            raise HarnessHang(f"the CUDA context is broken after {path.name}/{case.name}: "
                                              f"{backend.healthy()}")
            finally:
                group.reset()
        if bench:
            from .bench import run_bench
            report.bench = run_bench(backend, log=log)
    except HarnessHang as exc:
        results.append(CaseResult("harness", "abort", 0, target, "fail", 0.0, seed, {}, error=str(exc)))
        log(results[-1].line())
    finally:
        backend.close()
    return report


@dataclasses.dataclass
class _Bound:
    """A path with `run` bound to the runner a case kind uses."""
    path: object
    runner: Callable

    @property
    def name(self) -> str:
        return self.path.name

    def run(self, group: RankGroup, case: Case):
        return self.runner(group, case)
