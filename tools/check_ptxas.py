#!/usr/bin/env python3
"""Summarise the ptxas resource report of the CUDA build and fail if any function spills.

    python tools/check_ptxas.py [REPORT]      (default: build/ptxas-report.txt)

setup.py writes the report when it builds moelink._cuda: nvcc's `-Xptxas -v` output for every
.cu file, each preceded by a `# <source>` line. One row per function and GPU arch: registers,
spill stores and loads, stack frame and static shared memory, in bytes. Non-entry rows are
`__noinline__` device functions (failure paths, mostly); their printf buffers are why a kernel
may show a small stack frame without spilling.

Exit status: 0 no spills (or no report, because nothing was built for CUDA), 1 a spill,
2 a report with no function in it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_REPORT = Path(__file__).resolve().parent.parent / "build" / "ptxas-report.txt"

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(?P<name>[^']+)' for '(?P<arch>\w+)'")
PROPERTIES = re.compile(r"ptxas info\s*: Function properties for (?P<name>\S+)")
FRAME = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<st>\d+) bytes spill stores, "
                   r"(?P<ld>\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (?P<regs>\d+) registers")
SMEM = re.compile(r"(?P<smem>\d+) bytes smem")


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

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def parse(text: str) -> list[Function]:
    """Functions in report order. ptxas prints, per entry: `Compiling entry function`, its
    `Function properties` + frame line, then `Used N registers, ... M bytes smem`; non-entry
    functions get only the properties + frame lines, after the entries."""
    functions: list[Function] = []
    source, arch, entry, current = "?", "?", None, None
    for line in text.splitlines():
        if line.startswith("# "):
            source, arch, entry, current = line[2:].strip(), "?", None, None
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
    header = f"{'arch':<8} {'regs':>5} {'spill-st':>9} {'spill-ld':>9} {'stack':>6} {'smem':>7}  function"
    source = None
    for f in functions:
        if f.source != source:
            source = f.source
            print(f"\n{source}\n{header}")
        regs = "-" if f.registers is None else str(f.registers)
        kind = "" if f.entry else "  (device function)"
        flag = "  <-- SPILLS" if f.spills else ""
        print(f"{f.arch:<8} {regs:>5} {f.spill_stores:>9} {f.spill_loads:>9} {f.stack:>6} "
              f"{f.smem:>7}  {names[f.name]}{kind}{flag}")


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
    print(f"ptxas resources from {report} (bytes, except regs)")
    print_table(functions)
    spilling = [f for f in functions if f.spills]
    kernels = sum(f.entry for f in functions)
    print(f"\n{kernels} kernels, {len(functions) - kernels} device functions, "
          f"{len(spilling)} spilling")
    if spilling:
        print("check_ptxas: FAIL: register spills (see rows marked SPILLS); moelink requires zero")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
