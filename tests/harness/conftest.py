"""Fixtures of the harness suite: helper processes that the suite always reaps, whatever fails.

Helpers are real processes running ``helper.py``; the tests talk to them over pipes and wait for
the lines they print (``expect``), never for a length of time.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.harness.procs import HelperPool


@pytest.fixture
def helpers():
    pool = HelperPool()
    try:
        yield pool
    finally:
        pool.cleanup()


@pytest.fixture
def lock_dir(tmp_path: Path) -> Path:
    path = tmp_path / "locks"
    path.mkdir()
    return path
