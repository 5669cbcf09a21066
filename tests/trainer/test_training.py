"""The trainer end to end on CPU: it learns a trivially learnable env, and a resumed run continues exactly."""

from __future__ import annotations

import json
import statistics

import pytest

from trainer.checkpoint import latest_checkpoint, load_trainer_state
from trainer.config import TrainConfig
from trainer.loop import train

pytestmark = pytest.mark.slow


def _config(task: dict, output_dir, **changes) -> TrainConfig:
    values = dict(
        hf_checkpoint="tiny-qwen2.5-vl-small-vocab",
        output_dir=str(output_dir),
        rollout_batch_size=4,
        n_samples_per_prompt=8,
        rollout_max_response_len=12,
        lr=3e-3,
        micro_batch_size=8,
        progress=False,
        device="cpu",
        report_episodes=4,
        **task,
    )
    values.update(changes)
    return TrainConfig(**values)


def test_mean_reward_rises_on_a_learnable_env(learnable_task, tmp_path):
    result = train(_config(learnable_task, tmp_path / "run", num_rollout=20, seed=2), log=lambda *_: None)
    rewards = [m["rollout/reward_mean"] for m in result.metrics]
    assert len(rewards) == 20
    first, last = statistics.fmean(rewards[:3]), statistics.fmean(rewards[-3:])
    assert first < 0.5, rewards
    assert last >= 0.8, rewards
    # Everything the rollout generated was scored with the same weights that sampled it.
    diffs = [m["train/logprob_abs_diff_max"] for m in result.metrics]
    assert max(diffs) < 1e-3, diffs
    # The run directory holds what the report promises.
    for name in ("metrics.jsonl", "episodes.jsonl", "training_curves.png", "report.html", "config.json"):
        assert (result.run_dir / name).is_file(), name
    assert result.last_checkpoint == latest_checkpoint(result.run_dir)
    assert load_trainer_state(result.last_checkpoint)["step"] == 20


def test_resumed_run_matches_the_uninterrupted_run(learnable_task, tmp_path):
    # Batch size 1 in the engine: a request's numbers then do not depend on which requests shared
    # its batch, so two runs sample bit-identical tokens.
    common = dict(num_rollout=4, seed=5, engine_max_batch_size=1, save_interval=2, keep_checkpoints=3)
    straight = train(_config(learnable_task, tmp_path / "straight", **common), log=lambda *_: None)
    checkpoint = straight.run_dir / "checkpoints" / "step_000002"
    assert load_trainer_state(checkpoint)["step"] == 2
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "config.json").is_file()

    resumed = train(
        _config(learnable_task, tmp_path / "resumed", **common), resume=checkpoint, log=lambda *_: None
    )
    assert [m["step"] for m in resumed.metrics] == [2, 3]
    for before, after in zip(straight.metrics[2:], resumed.metrics, strict=True):
        assert after["rollout/reward_mean"] == before["rollout/reward_mean"]
        assert after["rollout/response_length_mean"] == before["rollout/response_length_mean"]
        # step 2's loss checks the restored weights, step 3's the restored Adam moments
        assert after["train/loss"] == pytest.approx(before["train/loss"], abs=1e-6)
        assert after["train/grad_norm"] == pytest.approx(before["train/grad_norm"], rel=1e-5)
    state = json.loads((resumed.run_dir / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    assert state["initial_checkpoint"] == "tiny-qwen2.5-vl-small-vocab"


def test_training_with_the_static_decoder_frees_its_cache_before_each_update(
    learnable_task, tmp_path, monkeypatch
):
    from rollout.engines.local import LocalEngine

    releases = []
    real_release = LocalEngine.release_memory

    def counting_release(self):
        releases.append(self.decode)
        real_release(self)

    monkeypatch.setattr(LocalEngine, "release_memory", counting_release)
    cfg = _config(learnable_task, tmp_path / "run", num_rollout=2, seed=5, engine_decode="static")
    result = train(cfg, log=lambda *_: None)
    assert releases == ["static", "static"]
    # The trainer scores exactly what the static loop sampled, with the weights it sampled with.
    diffs = [m["train/logprob_abs_diff_max"] for m in result.metrics]
    assert max(diffs) < 1e-3, diffs
    assert all(m["rollout/response_length_mean"] > 0 for m in result.metrics)
