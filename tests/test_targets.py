"""The two targets: `import moelink` needs neither a GPU nor the CUDA extension, and asking for
the GPU without one raises GPUUnavailable saying why."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap

import pytest
import torch

import moelink
from moelink import _backend, errors


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_without_the_cuda_extension():
    out = _run("""
        import sys
        sys.modules["moelink._cuda"] = None  # as if it was never built
        import moelink, torch
        from moelink import _backend, errors
        assert not moelink.cuda_available()
        try:
            _backend.cuda()
        except errors.GPUUnavailable as exc:
            print(exc)
        layout = moelink.get_dispatch_layout(torch.zeros(3, 2, dtype=torch.int64), 4, 2)
        print(layout.num_tokens_per_rank.tolist())
    """)
    assert "built without its CUDA extension" in out
    assert "[3, 0]" in out


@pytest.mark.skipif(importlib.util.find_spec("moelink._cuda") is None, reason="built without nvcc")
def test_cuda_extension_imports_beside_the_host_one_and_refuses_without_a_device():
    import moelink._cuda as cuda

    assert cuda.device_count() >= 0
    if cuda.device_count() > 0:
        pytest.skip("a GPU is present")
    with pytest.raises(errors.GPUUnavailable, match="no CUDA device is usable"):
        _backend.cuda()
    counts = torch.zeros(2, dtype=torch.int32)
    per_expert = torch.zeros(4, dtype=torch.int32)
    topk = torch.zeros(3, 2, dtype=torch.int64)
    in_rank = torch.zeros(3, 2, dtype=torch.bool)
    with pytest.raises(errors.GPUUnavailable):  # the module's own launch path refuses too
        cuda.dispatch_layout(topk.data_ptr(), 8, 3, 2, 2, 4, 2, 2, counts.data_ptr(), 0, per_expert.data_ptr(),
                             in_rank.data_ptr())
    assert moelink.cuda_available() is False


def test_gpu_tensors_are_refused_on_the_host_target():
    with pytest.raises(errors.InvalidDevice, match="expected a tensor on 'cpu'"):
        moelink.get_dispatch_layout(torch.zeros(3, 2, dtype=torch.int64, device="meta"), 4, 2)


def test_read_back_buffers_are_never_shared_within_a_call():
    """The GPU target's pinned read-back buffers (one per position): two counts tensors of one call
    with the same dtype and size (the internode notify's receive and forward starts at one rank per
    node) must not land in one buffer, or both read back as the last."""
    from moelink._target import HostStaging
    staging = HostStaging(pin_memory=False)
    a, b = torch.arange(5, dtype=torch.int32), torch.arange(5, 10, dtype=torch.int32)
    first = staging.buffers((a, b))
    assert first[0].data_ptr() != first[1].data_ptr()
    for host, t in zip(first, (a, b)):
        host.copy_(t)
    assert first[0].tolist() == a.tolist() and first[1].tolist() == b.tolist()
    again = staging.buffers((a.view(1, 5), b))  # reused by the next call, in its shape
    assert again[0].data_ptr() == first[0].data_ptr() and tuple(again[0].shape) == (1, 5)
