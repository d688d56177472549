"""The README's code example runs as written, on 2 ranks started by torchrun (as the README says),
and the README keeps what CI and newcomers rely on."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import moelink
from multiproc import leftover_segments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _example() -> str:
    match = re.search(r"<!-- readme:example -->\s*```python\n(.*?)```", _readme(), re.S)
    assert match, "README.md: no ```python block after <!-- readme:example -->"
    return match.group(1)


def test_readme_example_is_short_and_complete():
    code = _example()
    lines = [line for line in code.splitlines() if line.strip()]
    assert len(lines) <= 18, f"the README example grew to {len(lines)} lines"
    for step in ("moelink.Buffer(", "get_dispatch_layout(", "buffer.dispatch(", "buffer.combine(", "buffer.destroy()"):
        assert step in code, step
    readme = _readme()
    assert "<!-- ci:test-command -->\n```sh\npip install torch==2.13.0 && pip install '.[test]' && python -m pytest -q tests\n```" in readme
    assert "torchrun --nproc-per-node 2 moe_step.py" in readme


def test_readme_example_runs_on_two_ranks(tmp_path):
    script = tmp_path / "moe_step.py"
    script.write_text(_example())
    tag = f"readme{os.getpid()}"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", MOELINK_SHM_TAG=tag, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(moelink.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for rank in (0, 1):
        assert re.search(rf"rank {rank}: received \d+ rows \[\d+, \d+, \d+, \d+\], combined \(128, 256\)", output), output
    assert leftover_segments(tag) == []


def _run(args, timeout=240):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(moelink.__file__)),
                                           os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    return proc.returncode, proc.stdout + proc.stderr


def test_demo_moves_real_data():
    code, output = _run(["-m", "moelink.demo", "--ranks", "2", "--tokens", "64", "--hidden", "128", "--experts", "4"])
    assert code == 0, output
    assert "received rows equal moelink.reference bit for bit on every rank: True" in output, output
    assert re.search(r"rank 1: sent \d+ token copies, received \d+ rows", output) and "-> OK" in output, output
    code, output = _run(["-m", "moelink.demo", "--layout-only", "--ranks", "16", "--tokens", "256", "--experts", "64"])
    assert code == 0 and "matches moelink.reference: True" in output, output

