"""Shared pytest setup: the ``slow`` and ``faults`` markers, and tests/ importable (``multiproc``,
``seeding``) also under ``--import-mode=importlib`` and in rank processes."""

from __future__ import annotations

import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "slow: long or large (e.g. 8-rank) tests; CI runs 2-4 ranks, deselect with -m 'not slow'"
    )
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one); run them with -m gpu")
    config.addinivalue_line(
        "markers", "faults: fault injection (tests/test_faults.py); runs only when selected, e.g. pytest -m faults "
        "(MOELINK_FAULTS_RUNS sets the runs per case)"
    )


def pytest_collection_modifyitems(config, items) -> None:
    # Fault injection kills rank processes and waits out deadlines: it runs only when a -m
    # expression names it, so the default test command stays fast.
    if "faults" in (config.getoption("markexpr") or ""):
        return
    kept = [item for item in items if item.get_closest_marker("faults") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("faults")])
        items[:] = kept


from seeding import seed  # noqa: E402,F401  (the `seed` fixture, for every test module)
