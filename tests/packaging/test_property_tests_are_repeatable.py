"""The README's promise: property tests draw the same examples on every run unless asked not to."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

_drawn: list[list[tuple[int, ...]]] = []


@settings(max_examples=5, database=None)
@given(st.lists(st.integers(), max_size=5))
def _draw(values: list[int]) -> None:
    _drawn[-1].append(tuple(values))


def test_the_suite_profile_draws_the_same_examples_every_time():
    if os.environ.get("HYPOTHESIS_PROFILE", "suite") != "suite":
        assert not settings.default.derandomize  # the explore profile, asked for by name
        return
    assert settings.default.derandomize
    runs = []
    for _ in range(2):
        _drawn.append([])
        _draw()
        runs.append(_drawn[-1])
    assert runs[0] == runs[1] and len(runs[0]) > 1
