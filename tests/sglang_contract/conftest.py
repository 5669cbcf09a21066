"""Fixtures for the checks against SGLang's own request handling (see sglang_frontend.py).

Without sglang installed these tests skip, saying how to install it, except where
VLM_MULTITURN_REQUIRE_SGLANG=1 (CI) turns the skip into a failure: CI must never pass by skipping.
"""

from __future__ import annotations

import os

import pytest

from tests.sglang_contract.sglang_frontend import (
    REQUIRE_ENV,
    SGLangFrontEnd,
    sglang_missing_reason,
    sglang_modules,
)

PRESETS = {"qwen2.5-vl": "tiny-qwen2.5-vl", "qwen3-vl": "tiny-qwen3-vl"}


def require_sglang() -> dict:
    """SGLang's modules; skips (fails with VLM_MULTITURN_REQUIRE_SGLANG=1) when they cannot load."""
    reason = sglang_missing_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
        pytest.skip(reason)
    return sglang_modules()


@pytest.fixture(scope="session")
def sglang():
    return require_sglang()


@pytest.fixture(scope="session", params=sorted(PRESETS))
def family(request):
    return request.param


@pytest.fixture(scope="session")
def processing_of():
    from rollout.runtime import default_runtime

    return lambda family: default_runtime().processing.get(PRESETS[family])


@pytest.fixture(scope="session")
def front_end(sglang, family, processing_of):
    return SGLangFrontEnd(PRESETS[family], processing_of(family))
