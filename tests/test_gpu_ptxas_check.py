"""The CI check of the GPU build (tools/check_ptxas.py), on synthetic ptxas reports and on this
build's report when there is one. Needs no GPU (no `gpu` marker): it reads compiler output."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_ptxas", ROOT / "tools" / "check_ptxas.py")
check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("check_ptxas", check)  # dataclasses look their module up
_spec.loader.exec_module(check)


def _kernel(name: str, regs: int, *, spill: int = 0, bounds: str | None = "maxntid=256,1,1",
            arch: str = "sm_90") -> str:
    lines = [f"ptxas info    : Compiling entry function '{name}' for '{arch}'",
             f"ptxas info    : Function properties for {name}",
             f"    0 bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads",
             f"ptxas info    : Used {regs} registers, used 1 barriers, 16 bytes smem, 400 bytes cmem[0]"]
    return "\n".join(lines)


def _bounds_line(name: str, fields: str, arch: str = "sm_90") -> str:
    defaults = {"maxntid": "-", "reqntid": "-", "minnctapersm": "-", "maxnreg": "-"}
    for item in fields.split():
        key, _, value = item.partition("=")
        defaults[key] = value
    return f"moelink launch-bounds: arch={arch} entry={name} " + " ".join(f"{k}={v}" for k, v in defaults.items())


def _report(*kernels: tuple[str, int, str, int], scanned: bool = True) -> str:
    """kernels: (name, registers, launch-bounds fields or '', spill bytes)."""
    body = ["# csrc/runtime/ops_x.cu", *[_kernel(n, r, spill=s) for n, r, _, s in kernels]]
    if scanned:
        body.append("moelink launch-bounds scanned: 1 ptx")
        body += [_bounds_line(n, b) for n, _, b, _ in kernels]
    return "\n".join(body) + "\n"


def _one(report: str) -> "check.Function":
    (f,) = [f for f in check.parse(report) if f.entry]
    return f


def test_register_allocation_arithmetic():
    f = _one(_report(("k", 109, "maxntid=256,1,1", 0)))
    # 109 registers -> 109 * 32 = 3488 per warp, rounded to 3584 (units of 256); 8 warps.
    assert (f.block, f.block_registers, f.blocks_per_sm, f.problems()) == (256, 8 * 3584, 2, [])
    g = _one(_report(("k", 64, "reqntid=128,2,1", 0)))
    assert (g.block, g.block_registers, g.blocks_per_sm) == (256, 8 * 2048, 4)


@pytest.mark.parametrize("regs, bounds, flag", [
    (109, "maxntid=1024,1,1", "REGISTER FILE"),   # 3584 * 32 warps = 114688 > 65536
    (65, "maxntid=1024,1,1", "REGISTER FILE"),    # 65 -> 2304 per warp * 32 = 73728
    (64, "maxntid=256,1,1 minnctapersm=5", "MIN BLOCKS"),  # 16384 per block: 4 fit, 5 promised
    (32, "maxntid=2048,1,1", "BLOCK TOO LARGE"),
    (30, "", "NO LAUNCH BOUNDS"),
    (30, "maxnreg=64", "NO LAUNCH BOUNDS"),       # a register cap is not a block size
])
def test_kernels_that_cannot_launch_fail(regs, bounds, flag):
    f = _one(_report(("k", regs, bounds, 0)))
    assert [code for code, _ in f.problems()] == [flag]


@pytest.mark.parametrize("regs, bounds", [(64, "maxntid=1024,1,1"), (64, "maxntid=256,1,1 minnctapersm=4"),
                                          (255, "maxntid=256,1,1"), (32, "maxntid=1024,1,1 minnctapersm=2")])
def test_kernels_at_the_limit_pass(regs, bounds):
    assert _one(_report(("k", regs, bounds, 0))).problems() == []


def test_spills_fail_even_with_bounds():
    f = _one(_report(("k", 40, "maxntid=128,1,1", 8)))
    assert [code for code, _ in f.problems()] == ["SPILLS"]


def test_report_without_bounds_lines_is_not_trusted():
    f = _one(_report(("k", 40, "maxntid=128,1,1", 0), scanned=False))
    assert [code for code, _ in f.problems()] == ["BOUNDS UNKNOWN"]


def test_bounds_attach_by_name_and_arch():
    report = "\n".join(["# a.cu", _kernel("k", 40), _kernel("k", 48, arch="sm_100a"),
                        "moelink launch-bounds scanned: 2 ptx", _bounds_line("k", "maxntid=128,1,1"),
                        _bounds_line("k", "maxntid=64,1,1", arch="sm_100a")]) + "\n"
    blocks = {(f.arch, f.block) for f in check.parse(report) if f.entry}
    assert blocks == {("sm_90", 128), ("sm_100a", 64)}


def test_exit_status(tmp_path, capsys):
    good, bad, empty = tmp_path / "good.txt", tmp_path / "bad.txt", tmp_path / "empty.txt"
    good.write_text(_report(("k", 40, "maxntid=128,1,1", 0)))
    bad.write_text(_report(("k", 40, "maxntid=128,1,1", 0), ("u", 40, "", 0)))
    empty.write_text("# x.cu\n")
    assert check.main(["check", str(good)]) == 0
    assert check.main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "NO LAUNCH BOUNDS" in out and "1 kernels without launch bounds, 1 failing" in out
    assert check.main(["check", str(empty)]) == 2
    assert check.main(["check", str(tmp_path / "missing.txt")]) == 0


def test_this_builds_report_carries_launch_bounds():
    report = ROOT / "build" / "ptxas-report.txt"
    if not report.is_file():
        pytest.skip("no CUDA build in this checkout")
    functions = check.parse(report.read_text())
    kernels = [f for f in functions if f.entry]
    assert kernels and all(f.bounds_known for f in kernels)  # setup.py scanned every TU's PTX
    assert all(f.bounds for f in kernels)  # every kernel of the report was found in the PTX
