"""Builds moelink's two extensions from one kernel source (docs/architecture.md).

  moelink._host  g++, always: the SIMT host runtime and every kernel compiled as C++.
  moelink._cuda  nvcc, when nvcc is found: every kernel for the GPU, cudart linked statically.

Sources are found by naming convention (the globs below), so a new file needs no edit here.
Objects are cached in build/ and rebuilt when their command, their source or any csrc/ header
changes. The ptxas report (-Xptxas -v) of every nvcc TU goes to build/ptxas-report.txt and ships
as moelink/_ptxas_report.txt; tools/check_ptxas.py reads it. Each TU's block in the report ends
with the launch bounds of its kernels (.maxntid/.reqntid/.minnctapersm/.maxnreg), read from the
PTX that nvcc keeps (-keep) for the length of the compile: ptxas -v does not print them.

Environment:
  MOELINK_CUDA=0|1        force the CUDA extension off/on (default: on iff nvcc is found;
                          1 without nvcc is an error)
  MOELINK_CUDA_ARCHS=90   comma list of SM versions (90, 90a, sm_100a, ...)
  MOELINK_NCCL_HOME=DIR   NCCL with DIR/include/nccl.h; default: the nvidia-nccl-cu12 wheel, looked
                          up in this interpreter's site-packages even under pip's build isolation
  MOELINK_BUILD_JOBS=N    parallel compiles (default: CPU count)
  CUDA_HOME               use $CUDA_HOME/bin/nvcc rather than the nvcc on PATH
  CXX, CC                 C++ compiler, and the C compiler that assembles .S (default g++, gcc)
  MOELINK_SANITIZE=LIST   sanitizer build of moelink._host alone: "address,undefined" or "thread"
                          (-O1 -g1, its own objects and output in build/sanitize-<list>/, never
                          in place; tools/sanitize.py builds it and runs tests under it)
"""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pybind11
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
PTXAS_REPORT = ROOT / "build" / "ptxas-report.txt"
REPORT_NAME = "_ptxas_report.txt"  # the packaged copy, beside moelink/_cuda*.so

BOTH = ["csrc/runtime/ops_*.cu", "csrc/bindings/bind_*.cpp"]
HOST_ONLY = ["csrc/simt/*.cpp", "csrc/simt/*.S", "csrc/transport/host/*.cpp",
             "csrc/bindings/host_*.cpp", "csrc/runtime/*_host.cpp"]
CUDA_ONLY = ["csrc/runtime/*_cuda.cu", "csrc/runtime/cuda_*.cu", "csrc/bindings/cuda_*.cpp",
             "csrc/transport/nccl/*.cpp", "csrc/transport/nccl/*.cu"]
HEADERS = ["csrc/**/*.h", "csrc/**/*.cuh", "csrc/**/*.hpp", "csrc/**/*.inc"]

# -fno-trapping-math: kernels never read floating-point exception flags, and without it g++ may
# not if-convert a select whose arms hold a float operation (it could raise a flag), which keeps
# the codecs' per-channel loops from vectorising. Values are unchanged: no reassociation, no
# flush-to-zero (that would be -ffast-math's other parts).
# -ffp-contract=off: a * b + c is never fused into an FMA, whatever the instruction set (the
# codecs' bit-exactness rule, kernels/numeric.cuh; their host kernels also run AVX2/AVX-512
# clones chosen at load time, whose ISAs have FMA).
CXXFLAGS = ["-O3", "-std=c++20", "-fno-trapping-math", "-ffp-contract=off", "-fvisibility=hidden", "-fPIC",
            "-pthread", "-DNDEBUG", "-Wall"]
NVCCFLAGS = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas", "-v", "-lineinfo",
             "-Xcompiler", "-fPIC,-fvisibility=hidden,-pthread", "-DNDEBUG"]
# --exclude-libs keeps the static cudart's symbols private to our module.
HIDE_STATIC_LIBS = ["-Wl,--exclude-libs,ALL"]


def _terminal():
    """The user's terminal when stderr is not one. pip runs this build in a subprocess and keeps
    its output to itself unless -v is given (it shows a spinner for minutes), so progress also
    goes straight to /dev/tty when there is one; without a terminal (CI), stderr alone."""
    if sys.stderr.isatty() or os.environ.get("MOELINK_BUILD_QUIET"):
        return None
    try:
        return open("/dev/tty", "w")
    except OSError:
        return None


_TERMINAL = _terminal()
# --- sanitizer variant -----------------------------------------------------------------------

SANITIZERS = {"address,undefined", "address", "undefined", "thread"}


def sanitize_variant() -> str | None:
    """MOELINK_SANITIZE, validated: None for the normal build."""
    value = os.environ.get("MOELINK_SANITIZE", "").strip()
    if not value:
        return None
    if value not in SANITIZERS:
        raise SystemExit(f"moelink: MOELINK_SANITIZE={value!r}: want one of {sorted(SANITIZERS)}")
    return value


def sanitize_dir(variant: str) -> Path:
    return ROOT / "build" / ("sanitize-" + variant.replace(",", "-"))


def sanitize_flags(variant: str) -> tuple[list[str], list[str]]:
    """(compile flags replacing -O3 -DNDEBUG, link flags) of a sanitizer build. UBSan stops at the
    first error (-fno-sanitize-recover); vptr is off because the module's hidden visibility gives
    its classes their own type info, which vptr checks would take for a mismatch."""
    flags = ["-O1", "-g1", "-fno-omit-frame-pointer", f"-fsanitize={variant}"]  # -g1: line tables for reports
    if "undefined" in variant:
        flags += ["-fno-sanitize-recover=undefined", "-fno-sanitize=vptr"]
    return flags, [f"-fsanitize={variant}"]


def log(message: str) -> None:
    line = f"moelink build: {message}"
    print(line, file=sys.stderr, flush=True)
    if _TERMINAL is not None:
        try:
            _TERMINAL.write(f"\r\033[K{line}\n")  # start of line: pip's spinner may be on it
            _TERMINAL.flush()
        except OSError:
            pass


def glob(patterns: list[str]) -> list[str]:
    """Sorted paths relative to ROOT; a pattern matching nothing (yet) is fine."""
    found = {p.relative_to(ROOT).as_posix() for pattern in patterns for p in ROOT.glob(pattern)}
    return sorted(found)


def c_string(text: str) -> str:
    """`text` as a C string literal, for -DNAME=<literal>."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- CUDA toolchain and NCCL -----------------------------------------------------------------

class Cuda:
    """Where nvcc, the CUDA root and NCCL's headers are, and what we compile for."""

    def __init__(self, nvcc: str):
        self.nvcc = nvcc
        # nvcc may be a wrapper script; its dry run names the real toolkit root ("#$ TOP=...").
        dry = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True)
        top = re.search(r"^#\$ TOP=(.*)$", dry.stdout + dry.stderr, re.M)
        self.home = Path(os.environ.get("CUDA_HOME") or (top and top.group(1)) or
                         Path(nvcc).resolve().parent.parent).resolve()
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        self.version = re.search(r"V(\d+\.\d+\.\d+)", version).group(1)
        self.lib = next((d for d in (self.home / "lib64", self.home / "targets/x86_64-linux/lib")
                         if (d / "libcudart_static.a").is_file()), None)
        if self.lib is None:
            raise SystemExit(f"moelink: libcudart_static.a not found under {self.home}")
        self.archs = parse_archs(os.environ.get("MOELINK_CUDA_ARCHS", "90"))
        self.nccl = find_nccl()
        log(f"CUDA {self.version} at {self.home}, archs {','.join(self.archs)}")
        if self.nccl:
            log(f"NCCL headers {self.nccl / 'include'}, library dir {self.nccl / 'lib'} (not linked)")
        else:
            log("NCCL not found (install nvidia-nccl-cu12 or set MOELINK_NCCL_HOME)")

    @staticmethod
    def find() -> Cuda | None:
        """The toolchain to use, or None for a host-only build, honouring MOELINK_CUDA."""
        mode = os.environ.get("MOELINK_CUDA", "").strip()
        if mode not in ("", "0", "1"):
            raise SystemExit(f"moelink: MOELINK_CUDA must be 0 or 1, got {mode!r}")
        if mode == "0":
            log("MOELINK_CUDA=0: building the host extension only")
            return None
        home = os.environ.get("CUDA_HOME")
        nvcc = str(Path(home, "bin", "nvcc")) if home else shutil.which("nvcc")
        if nvcc and Path(nvcc).is_file():
            return Cuda(nvcc)
        if mode == "1":
            raise SystemExit("moelink: MOELINK_CUDA=1 but nvcc was not found "
                             "(put it on PATH or set CUDA_HOME)")
        log("nvcc not found: building the host extension only")
        return None


def parse_archs(text: str) -> list[str]:
    archs = [a.strip().removeprefix("sm_") for a in text.split(",") if a.strip()]
    bad = [a for a in archs if not re.fullmatch(r"\d+[af]?", a)]
    if not archs or bad:
        raise SystemExit(f"moelink: MOELINK_CUDA_ARCHS={text!r}: want a comma list like 90,100a")
    return archs


def find_nccl() -> Path | None:
    """Directory with include/nccl.h: $MOELINK_NCCL_HOME, else the nvidia-nccl-cu12 wheel.

    Under pip's build isolation the wheel is not importable (pip hides the target environment's
    site-packages from sys.path), but sysconfig and site still name those directories.
    """
    if os.environ.get("MOELINK_NCCL_HOME"):
        home = Path(os.environ["MOELINK_NCCL_HOME"])
        if not (home / "include" / "nccl.h").is_file():
            raise SystemExit(f"moelink: MOELINK_NCCL_HOME={home} has no include/nccl.h")
        return home
    candidates = []
    try:
        import nvidia.nccl  # namespace package: no __file__, but __path__
        candidates += [Path(p) for p in nvidia.nccl.__path__]
    except ImportError:
        pass
    dirs = [*sys.path, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"],
            *site.getsitepackages(), site.getusersitepackages()]
    candidates += [Path(d, "nvidia", "nccl") for d in dirs if d]
    return next((c.resolve() for c in candidates if (c / "include" / "nccl.h").is_file()), None)


# --- launch bounds -----------------------------------------------------------------------------

PTX_ENTRY = re.compile(r"^\s*(?:\.visible\s+|\.weak\s+|\.extern\s+)*\.entry\s+([\w$.]+)\s*\(", re.M)
PTX_TARGET = re.compile(r"^\s*\.target\s+(\w+)", re.M)
PTX_BOUNDS = ("maxntid", "reqntid", "minnctapersm", "maxnreg")


def launch_bounds_lines(keep_dir: Path) -> str:
    """One `moelink launch-bounds:` line per kernel and arch, from the PTX nvcc kept in keep_dir:
    the performance-tuning directives between a kernel's parameter list and its body."""
    ptx_files = sorted(keep_dir.glob("*.ptx"))
    lines = [f"moelink launch-bounds scanned: {len(ptx_files)} ptx"]
    for ptx in ptx_files:
        text = ptx.read_text()
        target = PTX_TARGET.search(text)
        arch = target.group(1) if target else "?"
        for entry in PTX_ENTRY.finditer(text):
            body = text.find("{", entry.end())
            head = text[entry.end():body if body >= 0 else len(text)]
            fields = []
            for name in PTX_BOUNDS:
                m = re.search(rf"\.{name}\s+([\d,\s]+?)\s*$", head, re.M)
                fields.append(f"{name}={re.sub(r'[^0-9,]', '', m.group(1)) if m else '-'}")
            lines.append(f"moelink launch-bounds: arch={arch} entry={entry.group(1)} {' '.join(fields)}")
    return "\n".join(lines) + "\n"


# --- build_ext -------------------------------------------------------------------------------

class BuildExt(build_ext):
    """Compiles each source with the command its suffix and extension call for, in parallel,
    caches objects per extension, then links with setuptools' linker."""

    def finalize_options(self):
        super().finalize_options()
        variant = sanitize_variant()
        if variant:  # never in place, never over the normal objects
            self.inplace = False
            self.build_temp = str(sanitize_dir(variant) / "temp")
            self.build_lib = str(sanitize_dir(variant) / "lib")

    def build_extensions(self):
        if sanitize_variant():
            super().build_extensions()
            return
        if not self.builds_cuda():
            # A previous CUDA build must not leak into this (host-only) wheel.
            cuda_so = Path(self.get_ext_fullpath("moelink._cuda"))
            for stale in (cuda_so, cuda_so.with_name(REPORT_NAME), PTXAS_REPORT):
                stale.unlink(missing_ok=True)
        super().build_extensions()

    def builds_cuda(self) -> bool:
        return any(ext.name == "moelink._cuda" for ext in self.extensions)

    def copy_extensions_to_source(self):
        """--inplace / editable installs: the ptxas report travels with moelink._cuda."""
        super().copy_extensions_to_source()
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir("moelink"))
        built = Path(self.build_lib, "moelink", REPORT_NAME)
        if self.builds_cuda() and built.is_file():
            shutil.copyfile(built, package_dir / REPORT_NAME)
        else:
            (package_dir / REPORT_NAME).unlink(missing_ok=True)
            for stale in package_dir.glob("_cuda.*.so"):
                stale.unlink()

    def build_extension(self, ext):
        cuda: Cuda | None = getattr(ext, "cuda", None)
        out_dir = Path(self.build_temp).resolve() / ext.name
        jobs = self.parallel or int(os.environ.get("MOELINK_BUILD_JOBS") or os.cpu_count() or 1)
        headers = [ROOT / h for h in ext.depends]
        newest_header = max((h.stat().st_mtime for h in headers), default=0.0)

        compiler = "nvcc for the GPU (sm_" + ",sm_".join(cuda.archs) + ")" if cuda else "g++ for the CPU host target"
        log(f"building {ext.name}: {len(ext.sources)} C++/CUDA sources with {compiler}, {jobs} at a time "
            "(objects are cached in build/)" +
            ("; MOELINK_CUDA=0 skips this GPU build" if cuda else ""))
        done = iter(range(1, len(ext.sources) + 1))

        def compile_one(src: str) -> str:
            obj = out_dir / (src + ".o")
            cmd = self.command(ext, cuda, ROOT / src, obj)
            # The cache key hides the (temporary, under build isolation) pybind11 path.
            key = "\n".join(cmd).replace(pybind11.get_include(), f"<pybind11 {pybind11.__version__}>")
            stamp = obj.with_name(obj.name + ".cmd")
            if (obj.is_file() and stamp.is_file() and stamp.read_text() == key and
                    obj.stat().st_mtime >= max(newest_header, (ROOT / src).stat().st_mtime)):
                return str(obj)
            obj.parent.mkdir(parents=True, exist_ok=True)
            stamp.unlink(missing_ok=True)
            keep = self.keep_dir(obj)
            if cuda and src.endswith(".cu"):
                shutil.rmtree(keep, ignore_errors=True)
                keep.mkdir(parents=True)
            start = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            log(f"[{next(done)}/{len(ext.sources)}] compiled {src} [{ext.name}] in {time.monotonic() - start:.1f}s")
            output = proc.stdout + proc.stderr
            if proc.returncode != 0:
                raise SystemExit(f"moelink: compiling {src} failed:\n{' '.join(cmd)}\n{output}")
            if cuda and src.endswith(".cu"):
                obj.with_name(obj.name + ".ptxas").write_text(output + launch_bounds_lines(keep))
                shutil.rmtree(keep, ignore_errors=True)  # megabytes of intermediates per TU
                output = "\n".join(l for l in output.splitlines()  # warnings only, not the report
                                   if not l.startswith(("ptxas info", "    ")))
            if output.strip():
                print(output, file=sys.stderr)
            stamp.write_text(key)
            return str(obj)

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            objects = list(pool.map(compile_one, ext.sources))
        log(f"{ext.name}: {len(objects)} objects ready in {time.monotonic() - start:.0f}s "
            f"({jobs} parallel jobs)")
        if cuda:
            self.write_ptxas_report(ext, out_dir)
        self.compiler.link_shared_object(
            objects, self.get_ext_fullpath(ext.name), extra_postargs=ext.extra_link_args,
            export_symbols=self.get_export_symbols(ext), build_temp=self.build_temp,
            target_lang="c++")

    @staticmethod
    def keep_dir(obj: Path) -> Path:
        """Where nvcc keeps a TU's intermediates (its PTX gives the launch bounds)."""
        return obj.with_name(obj.name + ".keep")

    @classmethod
    def command(cls, ext, cuda: Cuda | None, src: Path, obj: Path) -> list[str]:
        includes = [f"-I{d}" for d in ext.include_dirs]
        defines = [f"-D{name}={value}" for name, value in ext.define_macros]
        out = ["-c", str(src), "-o", str(obj)]
        if src.suffix == ".S":
            return [os.environ.get("CC", "gcc"), "-fPIC", *includes, *out]
        if src.suffix == ".cu" and cuda:
            ccbin = ["-ccbin", os.environ["CXX"]] if os.environ.get("CXX") else []
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in cuda.archs]
            keep = ["-keep", "-keep-dir", str(cls.keep_dir(obj))]
            return [cuda.nvcc, *ccbin, *NVCCFLAGS, *keep, *gencode, *includes, *defines, *out]
        language = ["-x", "c++"] if src.suffix == ".cu" else []  # host build of a kernel TU
        flags = CXXFLAGS
        if variant := sanitize_variant():
            flags = [f for f in CXXFLAGS if f not in ("-O3", "-DNDEBUG")] + sanitize_flags(variant)[0]
        return [os.environ.get("CXX", "g++"), *flags, *includes, *defines, *language, *out]

    def write_ptxas_report(self, ext, out_dir: Path) -> None:
        """build/ptxas-report.txt and the packaged copy: every .cu's report, `# <source>` first."""
        parts = [f"# {src}\n{(out_dir / (src + '.o.ptxas')).read_text()}"
                 for src in ext.sources if src.endswith(".cu")]
        text = "".join(parts)
        PTXAS_REPORT.parent.mkdir(parents=True, exist_ok=True)
        PTXAS_REPORT.write_text(text)
        packaged = Path(self.get_ext_fullpath(ext.name)).with_name(REPORT_NAME)
        packaged.parent.mkdir(parents=True, exist_ok=True)
        packaged.write_text(text)
        log(f"ptxas report: {PTXAS_REPORT} (check with: python tools/check_ptxas.py)")


# --- extensions ------------------------------------------------------------------------------

def extensions() -> list[Extension]:
    python_includes = {sysconfig.get_paths()["include"], sysconfig.get_paths()["platinclude"]}
    includes = ["csrc", pybind11.get_include(), *sorted(python_includes)]
    exts = []
    variant = sanitize_variant()
    if (ROOT / "csrc/bindings/host_module.cpp").is_file():
        link = ["-pthread", *HIDE_STATIC_LIBS, *(sanitize_flags(variant)[1] if variant else [])]
        exts.append(Extension("moelink._host", sources=glob(BOTH + HOST_ONLY), language="c++",
                              include_dirs=includes, depends=glob(HEADERS), extra_link_args=link))
    else:
        log("csrc/bindings/host_module.cpp missing: skipping moelink._host")

    if variant:
        log(f"MOELINK_SANITIZE={variant}: moelink._host only, into {sanitize_dir(variant).relative_to(ROOT)}/")
        return exts
    cuda = Cuda.find()
    if cuda:
        nccl = [str(cuda.nccl / "include")] if cuda.nccl else []
        ext = Extension(
            "moelink._cuda", sources=glob(BOTH + CUDA_ONLY), language="c++",
            include_dirs=[*includes, str(cuda.home / "include"), *nccl], depends=glob(HEADERS),
            define_macros=[("MOELINK_BUILD_CUDA_ARCHS", c_string(",".join(cuda.archs))),
                           ("MOELINK_BUILD_NVCC_VERSION", c_string(cuda.version)),
                           ("MOELINK_BUILD_NCCL_HOME", c_string(str(cuda.nccl or "")))],
            # Static cudart: no libcudart.so to find at run time; never -lcuda, so the module
            # imports on a machine with no driver and reports that when a GPU is asked for.
            extra_link_args=[f"-L{cuda.lib}", "-lcudart_static", "-ldl", "-lrt", "-lpthread",
                             *HIDE_STATIC_LIBS])
        ext.cuda = cuda
        exts.append(ext)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
