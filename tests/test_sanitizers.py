"""The sanitizer and schedule-fuzzing machinery checks itself: a clean run proves nothing unless
the tool would have reported the bug. Under ``tools/sanitize.py`` (MOELINK_SANITIZED is set) an
out-of-bounds kernel write must abort with ASan's report from inside a fiber; in every run,
MOELINK_SIMT_SCHEDULE must reach the cases of the rank processes. The ThreadSanitizer driver
(tools/tsan_intranode.py) carries its own negative control."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from moelink import runtime
from multiproc import RankGroup

SANITIZED = os.environ.get("MOELINK_SANITIZED", "")

_OUT_OF_BOUNDS = """
import torch
from moelink import _host
topk = torch.zeros(64, 2, dtype=torch.int64)
per_rank = torch.zeros(4, dtype=torch.int32)
per_expert = torch.zeros(8, dtype=torch.int32)
in_rank = torch.zeros(1, dtype=torch.bool)   # 64 x 4 expected: the kernel writes past the end
_host.dispatch_layout(topk.data_ptr(), 8, 64, 2, 2, 8, 4, 4, per_rank.data_ptr(), 0, per_expert.data_ptr(),
                      in_rank.data_ptr())
print("no report")
"""


@pytest.mark.skipif("address" not in SANITIZED, reason="runs under tools/sanitize.py (the ASan build)")
def test_asan_reports_an_out_of_bounds_write_from_a_kernel_fiber():
    proc = subprocess.run([sys.executable, "-c", _OUT_OF_BOUNDS], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no report" not in proc.stdout, proc.stdout + proc.stderr
    assert "AddressSanitizer: heap-buffer-overflow" in proc.stderr, proc.stderr[-4000:]
    # The write happens on a fiber's stack: the report must still carry the kernel's frames.
    assert "layout" in proc.stderr and "fiber_entry" in proc.stderr, proc.stderr[-4000:]


def _schedule_seen(ctx):
    import test_intranode  # the module's case helper, as its tests call it

    test_intranode._dispatch_and_combine(ctx, 5, dict(hidden=64, num_topk=4, experts_per_rank=2))
    return runtime.schedule()


def test_schedule_variable_reaches_the_intranode_cases():
    group = RankGroup(2, env={"MOELINK_SIMT_SCHEDULE": "random:77:0.25"})
    try:
        assert group.run(_schedule_seen) == ["random:77:0.25"] * 2
    finally:
        group.close()
