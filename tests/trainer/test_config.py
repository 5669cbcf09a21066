"""TrainConfig: slime's names and defaults, and errors that say what to write instead."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, TrainConfig


def test_defaults_are_slimes():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.weight_decay) == (1e-6, 0.9, 0.98, 0.1)
    assert (cfg.eps_clip, cfg.eps_clip_high, cfg.clip_grad) == (0.2, 0.28, 1.0)
    assert (cfg.n_samples_per_prompt, cfg.rollout_temperature, cfg.entropy_coef) == (8, 1.0, 0.0)
    assert cfg.use_kl_loss is False and cfg.kl_loss_type == "low_var_kl"
    assert cfg.steps_per_rollout == 1 and cfg.step_batch_size == cfg.rollout_batch_size * 8


def test_unknown_key_names_the_nearest_setting():
    with pytest.raises(
        ConfigError, match="unknown trainer setting 'eps_clip_hi'. Did you mean 'eps_clip_high'?"
    ):
        TrainConfig.from_dict({"eps_clip_hi": 0.3})
    with pytest.raises(ConfigError, match="unknown trainer setting 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.3})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"n_samples_per_prompt": 1}, "n_samples_per_prompt must be >= 2 for GRPO"),
        ({"global_batch_size": 3}, r"global_batch_size \(3\) must divide"),
        ({"rollout_temperature": 0.0}, "rollout_temperature must be > 0"),
        ({"kl_loss_coef": 0.1}, "has no effect without use_kl_loss=True"),
        ({"kl_loss_type": "k4"}, "kl_loss_type must be one of k1, k2, low_var_kl"),
        ({"micro_batch_size": 0}, "micro_batch_size must be >= 1"),
        ({"engine_decode": "fast"}, 'engine_decode must be "auto", "eager" or "static"'),
        ({"engine_max_seq_len": 1}, "engine_max_seq_len must be >= 2 or null"),
    ],
)
def test_out_of_range_values_are_rejected(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_several_optimizer_steps_per_rollout():
    cfg = TrainConfig(rollout_batch_size=4, n_samples_per_prompt=4, global_batch_size=8)
    assert (cfg.step_batch_size, cfg.steps_per_rollout) == (8, 2)
    assert cfg.replace(global_batch_size=None).steps_per_rollout == 1
