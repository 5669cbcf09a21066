"""Fixtures for the envs tests: one grader for the whole session, so workers spawn once."""

from __future__ import annotations

from pathlib import Path

import pytest

from envs.grading import Grader

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def grader():
    # Two workers as in production. The timeout is far above what an ordinary answer takes on a
    # loaded machine (the workers run at a low priority); hostile-answer tests pass a short one.
    g = Grader(workers=2, timeout_s=60.0)
    g.wait_ready()
    yield g
    g.close()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
