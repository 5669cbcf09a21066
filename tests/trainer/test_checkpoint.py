"""Checkpoints: safetensors weights that reload for inference, optional optimizer state, sizes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from PIL import Image

from models import load_policy
from models.logprobs import token_log_probs
from trainer.checkpoint import (
    OPTIMIZER_FILE,
    RNG_FILE,
    checkpoint_sizes,
    describe_size,
    load_optimizer_state,
    resolve_save_optimizer,
    save_checkpoint,
)
from trainer.config import ConfigError, TrainConfig
from trainer.optim import MasterWeightAdamW
from trainer.update import prepare_for_training


@pytest.fixture(scope="module")
def trained_policy(qwen25_small_policy):
    """The tiny policy with weights moved off the preset's, as after some training."""
    model = copy.deepcopy(qwen25_small_policy.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    return dataclasses.replace(qwen25_small_policy, model=model)


def _image_sample(policy) -> dict:
    text = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = policy.processor(
        text=[text], images=[Image.new("RGB", (56, 84), (200, 40, 90))], return_tensors="pt"
    )
    response = torch.tensor([policy.tokenizer.encode(" x = 3, so the answer is 3")])
    return {
        "input_ids": torch.cat([inputs["input_ids"], response], dim=1),
        "num_scored": response.shape[1],
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
    }


def _log_probs(model, sample: dict) -> torch.Tensor:
    with torch.no_grad():
        return token_log_probs(
            model,
            sample["input_ids"],
            sample["num_scored"],
            pixel_values=sample["pixel_values"].to(model.dtype),
            image_grid_thw=sample["image_grid_thw"],
        )


def test_weights_are_safetensors_and_reload_for_inference_with_identical_log_probs(trained_policy, tmp_path):
    optimizer = MasterWeightAdamW(trained_policy.model, TrainConfig())
    checkpoint = save_checkpoint(tmp_path, 3, trained_policy, optimizer, {}, save_optimizer=False)
    assert list(checkpoint.glob("*.safetensors"))
    pickles = [f.name for f in checkpoint.iterdir() if f.suffix in (".bin", ".pt", ".pth")]
    assert pickles == [RNG_FILE]  # no weights in pickle files
    reloaded = load_policy(checkpoint, device="cpu")
    sample = _image_sample(reloaded)
    expected = _log_probs(trained_policy.model, sample)
    assert torch.equal(_log_probs(reloaded.model, sample), expected)
    # the weights that reloaded are the trained ones, not the preset's
    assert not torch.equal(
        expected, _log_probs(load_policy("tiny-qwen2.5-vl-small-vocab", device="cpu").model, sample)
    )


def test_optimizer_state_is_optional(trained_policy, tmp_path):
    optimizer = MasterWeightAdamW(trained_policy.model, TrainConfig())
    without = save_checkpoint(tmp_path / "a", 1, trained_policy, optimizer, {}, save_optimizer=False)
    assert not (without / OPTIMIZER_FILE).exists()
    assert not load_optimizer_state(without, optimizer)
    assert "no optimizer state" in describe_size(without)

    kept = [save_checkpoint(tmp_path / "b", s, trained_policy, optimizer, {}, keep=3) for s in (1, 2)]
    assert all((c / OPTIMIZER_FILE).is_file() for c in kept)
    assert load_optimizer_state(kept[0], optimizer)

    latest = [
        save_checkpoint(tmp_path / "c", s, trained_policy, optimizer, {}, keep=3, save_optimizer="latest")
        for s in (1, 2, 3)
    ]
    assert [(c / OPTIMIZER_FILE).is_file() for c in latest] == [False, False, True]
    assert all(list(c.glob("*.safetensors")) for c in latest)  # the older ones are still whole models

    with pytest.raises(ValueError, match="save_optimizer"):
        save_checkpoint(tmp_path / "d", 1, trained_policy, optimizer, {}, save_optimizer="auto")


def test_sizes_name_weights_and_optimizer_state(trained_policy, tmp_path):
    optimizer = MasterWeightAdamW(trained_policy.model, TrainConfig())
    checkpoint = save_checkpoint(tmp_path, 1, trained_policy, optimizer, {})
    sizes = checkpoint_sizes(checkpoint)
    weights = sum(p.numel() * p.element_size() for p in trained_policy.model.parameters())
    assert weights <= sizes["weights"] < weights + 100_000  # fp32 tensors plus the safetensors header
    assert sizes["optimizer"] == (checkpoint / OPTIMIZER_FILE).stat().st_size > 0
    assert sizes["total"] > sizes["weights"] + sizes["optimizer"]  # config, tokenizer, state files
    text = describe_size(checkpoint)
    assert text.startswith(f"{sizes['total'] / 1e6:.3g} MB: weights") and "optimizer state" in text


def test_auto_keeps_optimizer_state_in_every_checkpoint_of_small_models_only(trained_policy):
    assert resolve_save_optimizer("auto", trained_policy.model) is True
    big = torch.nn.Linear(40_000, 30_000, device="meta")  # 1.2B parameters, no memory
    assert resolve_save_optimizer("auto", big) == "latest"
    assert resolve_save_optimizer(False, big) is False
    with pytest.raises(ConfigError, match="save_optimizer"):
        TrainConfig(save_optimizer="sometimes")
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        TrainConfig(gradient_checkpointing=1)


def test_optimizer_state_of_another_trainable_set_is_refused_by_name(trained_policy, tmp_path):
    optimizer = MasterWeightAdamW(trained_policy.model, TrainConfig())
    checkpoint = save_checkpoint(tmp_path, 1, trained_policy, optimizer, {})
    frozen = copy.deepcopy(trained_policy.model)
    prepare_for_training(frozen, TrainConfig(freeze_vision=True, gradient_checkpointing=False))
    with pytest.raises(ValueError, match="freeze_vision"):
        load_optimizer_state(checkpoint, MasterWeightAdamW(frozen, TrainConfig()))


@pytest.mark.slow
def test_run_logs_sizes_and_resumes_from_a_checkpoint_without_optimizer_state(
    learnable_task, tmp_path, capsys
):
    from trainer.loop import train

    cfg = TrainConfig(
        hf_checkpoint="tiny-qwen2.5-vl-small-vocab",
        output_dir=str(tmp_path / "run"),
        rollout_batch_size=2,
        n_samples_per_prompt=2,
        rollout_max_response_len=8,
        micro_batch_size=4,
        num_rollout=2,
        save_interval=1,
        save_optimizer="latest",
        progress=False,
        device="cpu",
        report_episodes=2,
        **learnable_task,
    )
    result = train(cfg, log=lambda *_: None)
    printed = capsys.readouterr().out
    assert printed.count(" MB: weights ") == 2 and "optimizer state" in printed
    first = result.run_dir / "checkpoints" / "step_000001"
    assert not (first / OPTIMIZER_FILE).exists() and (result.last_checkpoint / OPTIMIZER_FILE).is_file()

    lines: list[str] = []
    resumed = train(cfg.replace(output_dir=str(tmp_path / "resumed")), resume=first, log=lines.append)
    assert [m["step"] for m in resumed.metrics] == [1]
    assert any("holds no optimizer state" in line for line in lines), lines
