"""Suite-wide settings and session-scoped fixtures (tiny offline models are built once, cached)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

# Property tests draw the same examples on every run, so the suite's outcome depends on the code
# alone; HYPOTHESIS_PROFILE=explore draws new ones (to look for failures, not to gate a change).
settings.register_profile("suite", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


@pytest.fixture(scope="session")
def qwen25_policy():
    from models import load_policy

    return load_policy("tiny-qwen2.5-vl", device="cpu")


@pytest.fixture(scope="session")
def qwen3_policy():
    from models import load_policy

    return load_policy("tiny-qwen3-vl", device="cpu")


@pytest.fixture(scope="session")
def qwen25_small_policy():
    from models import load_policy

    return load_policy("tiny-qwen2.5-vl-small-vocab", device="cpu")


@pytest.fixture(scope="session")
def qwen3_small_policy():
    from models import load_policy

    return load_policy("tiny-qwen3-vl-small-vocab", device="cpu")


@pytest.fixture(scope="session")
def qwen35_policy():
    from models import load_policy

    return load_policy("tiny-qwen3.5", device="cpu")


@pytest.fixture(scope="session")
def qwen35_moe_policy():
    from models import load_policy

    return load_policy("tiny-qwen3.5-moe", device="cpu")


@pytest.fixture(scope="session")
def qwen35_small_policy():
    from models import load_policy

    return load_policy("tiny-qwen3.5-small-vocab", device="cpu")


# Every model family the fidelity tests cover: Qwen2.5-VL, Qwen3-VL and the hybrid (linear + full
# attention) Qwen3.5, dense and MoE.
FAMILY_POLICIES = ["qwen25_policy", "qwen3_policy", "qwen35_policy", "qwen35_moe_policy"]
SMALL_VOCAB_POLICIES = ["qwen25_small_policy", "qwen3_small_policy", "qwen35_small_policy"]


@pytest.fixture(params=FAMILY_POLICIES)
def any_policy(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=SMALL_VOCAB_POLICIES)
def any_small_policy(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session", autouse=True)
async def close_default_runtime_clients():
    """SGLang client pools belong to the session's event loop; close them before it ends."""
    yield
    from rollout.runtime import default_runtime

    await default_runtime().aclose()


@pytest.fixture(scope="session")
def qwen25_processing():
    """The rollout's view of tiny-qwen2.5-vl (tokenizer, processor, special ids), loaded once."""
    from rollout.runtime import default_runtime

    return default_runtime().processing.get("tiny-qwen2.5-vl")


@pytest.fixture(scope="session")
def qwen3_processing():
    from rollout.runtime import default_runtime

    return default_runtime().processing.get("tiny-qwen3-vl")


@pytest.fixture(scope="session")
def qwen35_processing():
    from rollout.runtime import default_runtime

    return default_runtime().processing.get("tiny-qwen3.5")
