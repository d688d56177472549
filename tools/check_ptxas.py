#!/usr/bin/env python3
"""Check the sm_90 resource report of the CUDA build: no spills, and every kernel launchable.

    python tools/check_ptxas.py [REPORT]      (default: build/ptxas-report.txt)

setup.py writes the report when it builds moelink._cuda: for every .cu file a `# <source>` line,
nvcc's `-Xptxas -v` output, then `moelink launch-bounds:` lines read from the TU's PTX (ptxas does
not print launch bounds): each kernel's `.maxntid` / `.reqntid` (from `__launch_bounds__`),
`.minnctapersm` and `.maxnreg`.

One row per function and GPU arch: registers, spill stores and loads, stack frame and static
shared memory in bytes, then for kernels the block size they promise (the product of maxntid, or
reqntid), the registers one such block is allocated, and how many such blocks fit an SM's
register file. Non-entry rows are `__noinline__` device functions (failure paths, mostly); their
printf buffers are why a kernel may show a small stack frame without spilling.

A kernel fails the check when it
  - spills (any spill store or load);
  - declares no launch bounds: without them its block size is not promised, ptxas may use up to
    255 registers, and a launch above 65536 / registers threads fails at run time;
  - cannot launch at the block size it promises: registers are allocated per warp in units of
    256 (ceil(regs * 32 / 256) * 256 per warp), and a block's warps must fit the SM's register
    file (65536 32-bit registers on sm_70 ... sm_120), and block <= 1024 threads;
  - promises a minimum of blocks per SM (`__launch_bounds__(n, m)`) the register file cannot hold.
ptxas enforces the last two itself when the bounds are declared (it spills rather than exceed
them), so with zero spills they fail only on a report this tool cannot trust; they are checked
anyway because the report, not the compiler, is what CI reads.

Exit status: 0 all kernels pass (or no report, because nothing was built for CUDA), 1 a kernel
fails, 2 a report with no function in it.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_REPORT = Path(__file__).resolve().parent.parent / "build" / "ptxas-report.txt"

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(?P<name>[^']+)' for '(?P<arch>\w+)'")
PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (?P<name>\S+)")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
                   r"(?P<ld>\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (?P<regs>\d+) registers")
SMEM = re.compile(r"(?P<smem>\d+) bytes smem")
BOUNDS_SCANNED = re.compile(r"^moelink launch-bounds scanned: (?P<count>\d+) ptx")
BOUNDS = re.compile(r"^moelink launch-bounds: arch=(?P<arch>\w+) entry=(?P<name>\S+) (?P<fields>.*)$")

# Per-SM limits, identical for every arch moelink builds (sm_70 ... sm_120; CUDA programming
# guide, "Technical Specifications per Compute Capability").
REGISTER_FILE = 65536        # 32-bit registers per SM, and per block
MAX_THREADS_PER_BLOCK = 1024
REGISTER_ALLOCATION_UNIT = 256  # registers, allocated per warp
WARP = 32


@dataclass
class Function:
    source: str
    name: str
    arch: str
    entry: bool
    registers: int | None = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    bounds: dict[str, tuple[int, ...] | None] = field(default_factory=dict)  # from the PTX
    bounds_known: bool = False  # the TU's PTX was scanned

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    @property
    def block(self) -> int | None:
        """Threads per block the kernel promises: reqntid if given, else maxntid."""
        dims = self.bounds.get("reqntid") or self.bounds.get("maxntid")
        return math.prod(dims) if dims else None

    @property
    def min_blocks(self) -> int | None:
        value = self.bounds.get("minnctapersm")
        return value[0] if value else None

    @property
    def block_registers(self) -> int | None:
        """Registers allocated to one block of `block` threads."""
        if self.block is None or self.registers is None:
            return None
        per_warp = math.ceil(self.registers * WARP / REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        return math.ceil(self.block / WARP) * per_warp

    @property
    def blocks_per_sm(self) -> int | None:
        """Blocks of `block` threads the register file holds at once."""
        regs = self.block_registers
        return None if regs is None else (REGISTER_FILE // regs if regs else None)

    def problems(self) -> list[tuple[str, str]]:
        """(flag for the table, explanation) of every reason this function fails the check."""
        found = []
        if self.spills:
            found.append(("SPILLS", f"spills ({self.spill_stores} bytes stored, {self.spill_loads} loaded)"))
        if not self.entry:
            return found
        if not self.bounds_known:
            found.append(("BOUNDS UNKNOWN", "the report has no launch-bounds lines for this file: rebuild "
                                            "with the current setup.py"))
            return found
        if self.block is None:
            found.append(("NO LAUNCH BOUNDS", "no __launch_bounds__: its block size is not promised, and "
                                              "ptxas may use up to 255 registers per thread"))
            return found
        if self.block > MAX_THREADS_PER_BLOCK:
            found.append(("BLOCK TOO LARGE", f"block of {self.block} threads > {MAX_THREADS_PER_BLOCK}"))
        regs = self.block_registers
        if regs is not None and regs > REGISTER_FILE:
            found.append(("REGISTER FILE", f"{self.registers} registers x {self.block} threads allocate {regs} "
                                           f"registers > the {REGISTER_FILE}-register file"))
        elif self.min_blocks and (self.blocks_per_sm or 0) < self.min_blocks:
            found.append(("MIN BLOCKS", f"promises {self.min_blocks} blocks per SM, the register file holds "
                                        f"{self.blocks_per_sm}"))
        return found


def _parse_bounds(fields: str) -> dict[str, tuple[int, ...] | None]:
    out: dict[str, tuple[int, ...] | None] = {}
    for item in fields.split():
        key, _, value = item.partition("=")
        out[key] = None if value in ("", "-") else tuple(int(v) for v in value.split(",") if v)
    return out


def parse(text: str) -> list[Function]:
    """Functions in report order. ptxas prints, per entry: `Compiling entry function`, its
    `Function properties` + frame line, then `Used N registers, ... M bytes smem`; non-entry
    functions get only the properties + frame lines, after the entries. Each TU's launch-bounds
    lines follow its ptxas output and are attached to its entries by (name, arch)."""
    functions: list[Function] = []
    bounds: dict[tuple[str, str, str], dict] = {}
    scanned: set[str] = set()
    source, arch, entry, current = "?", "?", None, None
    for line in text.splitlines():
        if line.startswith("# "):
            source, arch, entry, current = line[2:].strip(), "?", None, None
        elif m := BOUNDS_SCANNED.match(line):
            scanned.add(source)
        elif m := BOUNDS.match(line):
            bounds[(source, m["name"], m["arch"])] = _parse_bounds(m["fields"])
        elif m := ENTRY.search(line):
            arch = m["arch"]
            entry = Function(source, m["name"], arch, entry=True)
            functions.append(entry)
            current = entry
        elif m := PROPERTIES.search(line):
            if entry is not None and m["name"] == entry.name:
                current = entry
            else:
                current = Function(source, m["name"], arch, entry=False)
                functions.append(current)
        elif (m := FRAME.search(line)) and current is not None:
            current.stack, current.spill_stores, current.spill_loads = (
                int(m["stack"]), int(m["st"]), int(m["ld"]))
        elif (m := USED.search(line)) and entry is not None:
            entry.registers = int(m["regs"])
            if s := SMEM.search(line):
                entry.smem = int(s["smem"])
    for f in functions:
        if f.entry:
            f.bounds_known = f.source in scanned
            f.bounds = bounds.get((f.source, f.name, f.arch), {})
    return functions


def demangle(names: list[str]) -> dict[str, str]:
    """Readable names via c++filt when it is installed; mangled names otherwise."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    readable = out.splitlines()
    return dict(zip(names, readable)) if len(readable) == len(names) else {n: n for n in names}


def print_table(functions: list[Function]) -> None:
    names = demangle(sorted({f.name for f in functions}))
    header = (f"{'arch':<8} {'regs':>5} {'spill-st':>9} {'spill-ld':>9} {'stack':>6} {'smem':>7} "
              f"{'block':>6} {'regs/blk':>9} {'blk/SM':>6}  function")
    source = None
    for f in functions:
        if f.source != source:
            source = f.source
            print(f"\n{source}\n{header}")
        regs = "-" if f.registers is None else str(f.registers)
        if f.entry:
            block = "-" if f.block is None else str(f.block)
            per_block = "-" if f.block_registers is None else str(f.block_registers)
            per_sm = "-" if f.blocks_per_sm is None else str(f.blocks_per_sm)
            kind = ""
        else:
            block = per_block = per_sm = ""
            kind = "  (device function)"
        problems = f.problems()
        flag = f"  <-- {', '.join(code for code, _ in problems)}" if problems else ""
        print(f"{f.arch:<8} {regs:>5} {f.spill_stores:>9} {f.spill_loads:>9} {f.stack:>6} {f.smem:>7} "
              f"{block:>6} {per_block:>9} {per_sm:>6}  {names[f.name]}{kind}{flag}")


def main(argv: list[str]) -> int:
    report = Path(argv[1]) if len(argv) > 1 else DEFAULT_REPORT
    if not report.is_file():
        print(f"check_ptxas: no report at {report}: moelink._cuda was not built "
              "(no nvcc, or MOELINK_CUDA=0); nothing to check.")
        return 0
    functions = parse(report.read_text())
    if not functions:
        print(f"check_ptxas: {report} names no function: was it written by a CUDA build?")
        return 2
    print(f"ptxas resources from {report} (bytes, except regs; block = threads the kernel's launch "
          f"bounds promise, regs/blk = registers one block is allocated, blk/SM = blocks the "
          f"{REGISTER_FILE}-register file holds)")
    print_table(functions)
    kernels = [f for f in functions if f.entry]
    spilling = [f for f in functions if f.spills]
    unbounded = [f for f in kernels if f.bounds_known and f.block is None]
    failing = [f for f in functions if f.problems()]
    print(f"\n{len(kernels)} kernels, {len(functions) - len(kernels)} device functions, "
          f"{len(spilling)} spilling, {len(unbounded)} kernels without launch bounds, {len(failing)} failing")
    if failing:
        names = demangle(sorted({f.name for f in failing}))
        print("check_ptxas: FAIL: moelink requires zero spills and, for every kernel, launch bounds "
              "whose block fits the register file:")
        for f in failing:
            print(f"  {f.arch} {names[f.name]}: {'; '.join(text for _, text in f.problems())}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
