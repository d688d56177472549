"""Fresh random inputs per test, reproducible on demand.

Each test that takes the ``seed`` fixture gets a new seed (or MOELINK_TEST_SEED to replay one);
the seed is attached to the test report and printed when the test fails.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def seed(request) -> int:
    fixed = os.environ.get("MOELINK_TEST_SEED")
    value = int(fixed) if fixed else int.from_bytes(os.urandom(4), "little")
    request.node.add_report_section("call", "seed", f"MOELINK_TEST_SEED={value} reproduces this test's inputs")
    return value


def proof_seed() -> int:
    """The seed of a module's proof run (a module-scoped report): MOELINK_TEST_SEED, or a fresh one,
    which the report carries (``report.meta["seed"]``) and :func:`proof_failures` prints."""
    fixed = os.environ.get("MOELINK_TEST_SEED")
    return int(fixed) if fixed else int.from_bytes(os.urandom(2), "little")


def proof_failures(report) -> str:
    return f"seed {report.meta['seed']} (MOELINK_TEST_SEED replays it):\n" + "\n".join(r.line() for r in report.failed)
