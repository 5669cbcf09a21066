"""Fixtures for the envs tests: one grader for the whole session, so workers spawn once."""

from __future__ import annotations

from pathlib import Path

import pytest

from envs.grading import Grader

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def grader():
    # Two workers as in production. The timeout is far above what an ordinary answer takes on a
    # loaded machine; hostile-answer tests pass a short one. Normal priority: at the production
    # niceness, on a machine loaded by other processes, a worker can take minutes to start.
    g = Grader(workers=2, timeout_s=60.0, niceness=0)
    g.wait_ready(120.0)
    yield g
    g.close()


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
