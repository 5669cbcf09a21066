"""Fixtures for the envs tests: one grader for the whole session, so workers spawn once."""

from __future__ import annotations

from pathlib import Path

import pytest

from envs.grading import Grader

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def grader():
    # A 1 s timeout keeps the hostile-answer tests short; two workers as in production.
    g = Grader(workers=2, timeout_s=1.0)
    g.wait_ready()
    yield g
    g.close()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
