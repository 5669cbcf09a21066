"""Qwen3.5 (dense and MoE) through the launcher's local backend: rollouts from the in-process
engine, GRPO updates of the same hybrid model, checkpoints, and engine/trainer log-probs that agree."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RUN_SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "geo3k_vlm_multi_turn" / "run_geo3k_vlm_multi_turn.py"


def _launcher():
    spec = importlib.util.spec_from_file_location("run_geo3k_vlm_multi_turn_qwen35", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The demo's sample problems, generated once by the first run and reused by the second."""
    return tmp_path_factory.mktemp("geo3k-sample")


@pytest.mark.parametrize("model", ["tiny-qwen3.5", "tiny-qwen3.5-moe"])
def test_launcher_trains_qwen35_for_two_steps(model, demo_data, tmp_path):
    run_dir = tmp_path / "run"
    argv = [
        "--backend", "local", "--demo", "--model", model,
        "--data-dir", str(demo_data), "--output-dir", str(run_dir),
        "--num-rollout", "2", "--rollout-batch-size", "1", "--n-samples-per-prompt", "2",
        "--rollout-max-response-len", "24", "--set", "max_tokens_per_turn=8", "--set", "micro_batch_size=2",
        "--sft-steps", "0",  # GRPO alone: the demo's supervised warm-start is tested on its own
    ]  # fmt: skip
    assert _launcher().main(argv) == 0
    metrics = [json.loads(line) for line in next(run_dir.rglob("metrics.jsonl")).read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    # The trainer re-scored every sampled token with the weights that sampled it.
    assert max(m["train/logprob_abs_diff_max"] for m in metrics) < 1e-3
    assert all(m["rollout/response_length_mean"] > 0 for m in metrics)
    assert next(run_dir.rglob("checkpoints")).is_dir()
