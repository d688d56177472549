"""Shared pytest setup: the ``slow`` marker, and tests/ importable (``multiproc``, ``seeding``)
also under ``--import-mode=importlib`` and in rank processes."""

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


from seeding import seed  # noqa: E402,F401  (the `seed` fixture, for every test module)
