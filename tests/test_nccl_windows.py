"""NCCL windows without a GPU (csrc/transport/nccl/, moelink._nccl_windows): which libnccl is
loaded and why one is refused (bogus file, missing symbols, every version rule, through stub
libraries compiled here), how NCCL results map onto moelink's errors, and that a bootstrap that
cannot succeed fails on every rank with the same typed error instead of hanging.

The GPU half is tests/test_gpu_nccl_windows.py."""

from __future__ import annotations

import ctypes.util
import os
import shutil
import subprocess

import pytest

from moelink import _backend, errors
from multiproc import rank_group_fixture

cuda = _backend._load_cuda()
pytestmark = pytest.mark.skipif(cuda is None, reason="moelink._cuda was not built (no nvcc or MOELINK_CUDA=0)")
nccl = cuda.nccl if cuda is not None else None
needs_headers = pytest.mark.skipif(nccl is None or not nccl.AVAILABLE, reason="built without NCCL headers")

if nccl is not None and nccl.AVAILABLE:
    from moelink import _nccl_windows as nw

group = rank_group_fixture(2)


@pytest.fixture
def no_override(monkeypatch):
    monkeypatch.delenv("MOELINK_NCCL_LIBRARY", raising=False)


def _wheel_library():
    candidates = nw.library_candidates() if nccl.AVAILABLE else []
    return next((c for c in candidates if os.path.isabs(c)), None)


# --- stub libraries --------------------------------------------------------------------------

def _stub_library(tmp_path, name: str, version: int, omit: tuple[str, ...] = ()) -> str:
    """A shared library exporting every symbol moelink resolves (but `omit`), whose
    ncclGetVersion reports `version`. Nothing else in it is ever called by the loader."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build a stub library")
    lines = ["int ncclGetVersion(int* v) { *v = %d; return 0; }" % version]
    lines += [f"int {s}(void) {{ return 3; }}" for s in nccl.symbol_names() if s != "ncclGetVersion" and s not in omit]
    source = tmp_path / f"{name}.c"
    source.write_text("\n".join(lines) + "\n")
    library = tmp_path / f"{name}.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return str(library)


# --- the library -----------------------------------------------------------------------------

def test_build_without_headers_says_why():
    if nccl.AVAILABLE:
        pytest.skip("this build has NCCL headers")
    with pytest.raises(errors.NcclUnavailable, match="without NCCL"):
        nccl.load_library("libnccl.so.2")


@needs_headers
def test_wheel_library_found_and_version_read(no_override):
    path = _wheel_library()
    if path is None:
        pytest.skip("no nvidia-nccl wheel on sys.path")
    info = nw.nccl_library_info()
    assert info["path"] == path and os.path.samefile(info["resolved_path"], path)
    assert info["header_version"] == nccl.HEADER_VERSION == 23203
    # The wheel and the headers moelink was built with come from the same package here.
    assert info["version"] >= nccl.HEADER_VERSION and nccl.version_problem(info["version"]) == ""
    assert nw.load_library() is not None and nw.load_library().version == info["version"]


@needs_headers
def test_override_names_exactly_one_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELINK_NCCL_LIBRARY", str(tmp_path / "libnccl.so.2"))
    assert nw.library_candidates() == [str(tmp_path / "libnccl.so.2")]


@needs_headers
def test_bogus_file_is_refused(monkeypatch, tmp_path):
    bogus = tmp_path / "libnccl.so.2"
    bogus.write_text("this is not an ELF file\n")
    monkeypatch.setenv("MOELINK_NCCL_LIBRARY", str(bogus))
    with pytest.raises(errors.NcclUnavailable) as info:
        nw.load_library()
    message = str(info.value)
    assert str(bogus) in message and "dlopen failed" in message and "MOELINK_NCCL_LIBRARY" in message
    assert isinstance(info.value, errors.GPUUnavailable)  # callers catching GPUUnavailable catch this too


@needs_headers
def test_missing_file_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MOELINK_NCCL_LIBRARY", str(tmp_path / "nothing-here.so"))
    with pytest.raises(errors.NcclUnavailable, match="nothing-here.so.*dlopen failed"):
        nw.load_library()


@needs_headers
def test_library_without_nccl_symbols_is_refused(monkeypatch):
    libm = ctypes.util.find_library("m")
    if libm is None:
        pytest.skip("no libm to load")
    monkeypatch.setenv("MOELINK_NCCL_LIBRARY", libm)
    with pytest.raises(errors.NcclUnavailable, match="does not export ncclGetVersion, ncclGetErrorString"):
        nw.load_library()


@needs_headers
@pytest.mark.parametrize("omit", [("ncclGetLsaDevicePointer",), ("ncclCommWindowRegister", "ncclMemFree")])
def test_every_symbol_is_resolved_at_load(monkeypatch, tmp_path, omit):
    path = _stub_library(tmp_path, "missing", nccl.HEADER_VERSION, omit=omit)
    monkeypatch.setenv("MOELINK_NCCL_LIBRARY", path)
    with pytest.raises(errors.NcclUnavailable) as info:
        nw.load_library()
    in_order = [s for s in nccl.symbol_names() if s in omit]
    assert f"does not export {', '.join(in_order)} (" in str(info.value)


@needs_headers
@pytest.mark.parametrize("version, problem", [
    (22705, "needs NCCL >= 2.28.0"),        # before the device API
    (2804, "needs NCCL >= 2.28.0"),         # the pre-2.9 encoding: 2.8.4
    (22800, "older than the NCCL 2.32.3 headers"),
    (23202, "older than the NCCL 2.32.3 headers"),
    (30000, "different major version"),
])
def test_unsupported_versions_are_refused(monkeypatch, tmp_path, version, problem):
    path = _stub_library(tmp_path, f"v{version}", version)
    monkeypatch.setenv("MOELINK_NCCL_LIBRARY", path)
    with pytest.raises(errors.NcclUnavailable) as info:
        nw.load_library()
    assert problem in str(info.value) and nccl.version_text(version) in str(info.value) and path in str(info.value)


@needs_headers
@pytest.mark.parametrize("version", [23203, 23204, 23400])
def test_same_or_newer_versions_load(monkeypatch, tmp_path, version):
    path = _stub_library(tmp_path, f"ok{version}", version)
    monkeypatch.setenv("MOELINK_NCCL_LIBRARY", path)
    lib = nw.load_library()
    assert (lib.path, lib.version) == (path, version)
    assert nw.load_library() is not None and nw.load_library().version == version  # cached per path


@needs_headers
def test_version_rules_and_text():
    assert [nccl.version_text(v) for v in (23203, 22800, 2804, 30102)] == ["2.32.3", "2.28.0", "2.8.4", "3.1.2"]
    assert nccl.MINIMUM_VERSION == 22800
    assert nccl.version_problem(22800, 22800) == "" and nccl.version_problem(22900, 22800) == ""
    assert "older than" in nccl.version_problem(22800, 22900)
    assert "needs NCCL >= 2.28.0" in nccl.version_problem(22700, 22700)


# --- errors ----------------------------------------------------------------------------------

@needs_headers
@pytest.mark.parametrize("code, cls, name", [
    (1, errors.CudaError, "ncclUnhandledCudaError"),
    (2, errors.NcclError, "ncclSystemError"),
    (3, errors.NcclError, "ncclInternalError"),
    (4, errors.NcclError, "ncclInvalidArgument"),
    (5, errors.NcclError, "ncclInvalidUsage"),
    (6, errors.NcclError, "ncclRemoteError"),
    (7, errors.NcclError, "ncclInProgress"),
    (8, errors.CommTimeout, "ncclTimeout"),
    (42, errors.NcclError, "ncclResult(42)"),
])
def test_nccl_results_map_to_typed_errors(code, cls, name):
    with pytest.raises(cls) as info:
        nccl._raise_for_result(code, "ncclCommWindowRegister")
    assert type(info.value) is cls and str(info.value) == f"ncclCommWindowRegister failed: {name}"
    assert nccl.result_name(code) == name


@needs_headers
def test_success_is_not_an_error():
    with pytest.raises(errors.InvalidArgument, match="failing ncclResult_t"):
        nccl._raise_for_result(0, "x")


@needs_headers
def test_windows_need_a_device_and_valid_ranks(no_override):
    if cuda.device_count() > 0:
        pytest.skip("a GPU is present")
    lib = nw.load_library()
    with pytest.raises(errors.InvalidArgument, match=r"rank: expected in \[0, 2\), got 2"):
        nccl.Windows(lib, 2, 2, 0)
    with pytest.raises(errors.InvalidArgument, match="num_ranks"):
        nccl.Windows(lib, 0, 0, 0)
    with pytest.raises(errors.GPUUnavailable, match="need a CUDA device"):
        nccl.Windows(lib, 0, 1, 0)


# --- bootstrap on a machine without a GPU: every rank fails, none waits ---------------------

def _bootstrap(ctx, override=None, override_rank=None, **kwargs):
    from moelink import _nccl_windows
    if override is not None and ctx.rank == override_rank:
        os.environ["MOELINK_NCCL_LIBRARY"] = override
    try:
        _nccl_windows.bootstrap_nccl_windows(ctx.group, 1 << 20, **kwargs)
        return None
    except errors.MoelinkError as exc:
        return type(exc).__name__, str(exc)
    finally:
        os.environ.pop("MOELINK_NCCL_LIBRARY", None)


@needs_headers
def test_bootstrap_without_gpu_fails_on_every_rank(group):
    if cuda.device_count() > 0:
        pytest.skip("a GPU is present")
    results = group.run(_bootstrap)
    for name, message in results:
        assert name == "GPUUnavailable"
        assert "prepare failed on 2 of 2 ranks" in message
        assert "rank 0: GPUUnavailable" in message and "rank 1: GPUUnavailable" in message


@needs_headers
def test_bootstrap_one_bad_library_fails_every_rank(group, tmp_path):
    bogus = tmp_path / "libnccl.so.2"
    bogus.write_text("not a library")
    results = group.run(_bootstrap, str(bogus), 1)
    for name, message in results:
        assert "rank 1: NcclUnavailable" in message and str(bogus) in message
        assert name in ("GPUUnavailable", "NcclUnavailable")  # the first failed rank's class
    if cuda.device_count() == 0:
        assert "rank 0: GPUUnavailable" in results[0][1]


@needs_headers
def test_bootstrap_checks_arguments_on_every_rank(group):
    results = group.run(_bootstrap, timeout_s=-1.0)
    for name, message in results:
        assert name == "InvalidArgument" and "timeout_s: expected a positive number of seconds, got -1.0" in message
