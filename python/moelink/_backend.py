"""Which extension runs a call: ``moelink._host`` for CPU tensors, ``moelink._cuda`` for CUDA ones.

``import moelink`` never needs a GPU: the CUDA extension is imported lazily, and asking for it on a
machine without one raises :class:`moelink.errors.GPUUnavailable` saying why.
"""

from __future__ import annotations

import importlib
import re
from types import ModuleType

import torch

from . import _host
from .errors import GPUUnavailable, InvalidDevice, argument_error

__all__ = ["host", "cuda", "cuda_available", "for_device", "is_sm90_compiled", "stream_handle"]

_cuda_module: ModuleType | None = None
_cuda_import_error: str | None = None


def host() -> ModuleType:
    return _host


def _load_cuda() -> ModuleType | None:
    global _cuda_module, _cuda_import_error
    if _cuda_module is None and _cuda_import_error is None:
        try:
            _cuda_module = importlib.import_module("moelink._cuda")
        except ImportError as exc:
            _cuda_import_error = str(exc)
    return _cuda_module


def cuda_available() -> bool:
    """True when the CUDA extension was built and sees at least one device."""
    module = _load_cuda()
    return module is not None and module.device_count() > 0


def is_sm90_compiled() -> bool:
    """True when the CUDA extension was built for at least one arch with Hopper's features
    (compute capability >= 9.0: sm_90, sm_90a, sm_100a, ...), which is what DeepEP's
    ``Buffer.is_sm90_compiled()`` reports (its SM90 features were not disabled). False without
    the CUDA extension. Reads the build info only; needs no GPU."""
    module = _load_cuda()
    if module is None:
        return False
    versions = [re.match(r"\d+", arch.removeprefix("sm_")) for arch in module.build_info()["archs"]]
    return any(v is not None and int(v.group()) >= 90 for v in versions)


def cuda() -> ModuleType:
    """The CUDA extension, or GPUUnavailable with the reason it cannot be used."""
    module = _load_cuda()
    if module is None:
        raise GPUUnavailable(
            "moelink was built without its CUDA extension (no nvcc at build time, or MOELINK_CUDA=0): "
            f"{_cuda_import_error}. Rebuild on a machine with the CUDA toolkit to use GPU tensors."
        )
    if module.device_count() == 0:
        raise GPUUnavailable("moelink's CUDA extension is present but no CUDA device is usable (no driver or no GPU)")
    return module


def for_device(name: str, device: torch.device) -> ModuleType:
    """The extension for tensors on ``device``; ``name`` is the argument the device came from."""
    if device.type == "cpu":
        return host()
    if device.type == "cuda":
        return cuda()
    raise argument_error(InvalidDevice, name, "a tensor on 'cpu' (host target) or 'cuda'", f"device '{device}'")


def stream_handle(device: torch.device) -> int:
    """The raw cudaStream_t of torch's current stream on ``device`` (0 on the host target)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.current_stream(device).cuda_stream
