"""The supervised warm-start: transcripts tokenized by the rollout itself, loss on the model's tokens only."""

from __future__ import annotations

import pytest

from trainer.config import TrainConfig
from trainer.sft import build_transcripts, sft_data_rows, tokenize_transcripts

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sample_parquet(tmp_path_factory):
    from envs.geo3k.dataset import write_geo3k_parquet
    from envs.geo3k.sample_data import generate_problems

    root = tmp_path_factory.mktemp("sft-data")
    return write_geo3k_parquet(generate_problems(3, 0, image_size=168), root, split_name="train")


def _config(parquet, tmp_path, **changes) -> TrainConfig:
    values = dict(
        hf_checkpoint="tiny-qwen2.5-vl-small-vocab",
        prompt_data=str(parquet),
        output_dir=str(tmp_path / "run"),
        rollout_max_response_len=384,
        device="cpu",
        progress=False,
        sft_steps=6,
        sft_lr=3e-3,
        sft_batch_size=4,
        sft_transcripts_per_row=2,
        sft_wrong_first=1.0,
    )
    values.update(changes)
    return TrainConfig(**values)


def test_transcripts_are_tokenized_as_rollouts_with_only_the_model_turns_trained(
    sample_parquet, qwen25_small_policy, tmp_path
):
    policy = qwen25_small_policy
    cfg = _config(sample_parquet, tmp_path)
    rows = sft_data_rows(cfg)
    transcripts = build_transcripts(rows, per_row=1, wrong_first=1.0, max_turns=3, seed=0)
    assert all(len(t.turns) == 2 and t.turns[0] != t.turns[1] for t in transcripts)
    items, problems = tokenize_transcripts(
        transcripts, cfg, policy.tokenizer, str(policy.path), policy.model.config
    )
    assert problems == [] and len(items) == len(transcripts)
    for item, transcript in zip(items, transcripts, strict=True):
        response = item.input_ids[-item.response_length :].tolist()
        mask = item.loss_mask.tolist()
        trained = policy.tokenizer.decode([t for t, m in zip(response, mask, strict=True) if m])
        untrained = policy.tokenizer.decode([t for t, m in zip(response, mask, strict=True) if not m])
        # Exactly the scripted calls, each ended by the model's own end-of-turn token.
        assert trained == "".join(turn + "<|im_end|>" for turn in transcript.turns)
        # The env's verdict on the wrong first call, and the template's turn markers, are not trained.
        assert "is incorrect" in untrained and "<|im_start|>assistant" in untrained
        assert item.pixel_values is not None


def test_sft_lowers_the_loss_and_logs_before_grpo(sample_parquet, tmp_path):
    from trainer.loop import train

    cfg = _config(sample_parquet, tmp_path, num_rollout=1, rollout_batch_size=2, n_samples_per_prompt=2)
    result = train(cfg, log=lambda *_: None)
    sft = [m for m in result.metrics if m.get("phase") == "sft"]
    assert [m["step"] for m in sft] == list(range(-6, 0))
    assert sft[-1]["sft/loss"] < sft[0]["sft/loss"] / 2, [m["sft/loss"] for m in sft]
    assert sft[-1]["sft/token_accuracy"] > sft[0]["sft/token_accuracy"]
    # The initial policy's rollout of GRPO's first batch comes first, as the run's baseline.
    assert [(m["step"], m.get("phase")) for m in result.metrics if "rollout/reward_mean" in m] == [
        (-7, "before_sft"),
        (0, None),
    ]


def test_a_warm_start_whose_transcripts_all_fail_stops_the_launcher_with_the_cause(
    sample_parquet, capsys, tmp_path
):
    import importlib.util
    from pathlib import Path

    import yaml

    launcher_path = (
        Path(__file__).parents[2] / "examples" / "geo3k_vlm_multi_turn" / "run_geo3k_vlm_multi_turn.py"
    )
    spec = importlib.util.spec_from_file_location("run_geo3k_for_sft_test", launcher_path)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    plugin = tmp_path / "plugin.yaml"
    # An env that pays any first turn and ends: a wrong-first transcript's second call never comes.
    learnable = Path(__file__).with_name("learnable_env.py")
    plugin.write_text(
        yaml.safe_dump({"max_turns": 2, "rollout_interaction_env_path": str(learnable), "env_kwargs": {}})
    )
    code = launcher.main(
        [
            "--backend",
            "local",
            "--model",
            "tiny-qwen2.5-vl-small-vocab",
            "--data-dir",
            str(sample_parquet.parent),
            "--output-dir",
            str(tmp_path / "run"),
            "--config",
            str(plugin),
            "--sft-steps",
            "2",
            "--num-rollout",
            "1",
            "--rollout-batch-size",
            "1",
            "--n-samples-per-prompt",
            "2",
            "--set",
            "sft_wrong_first=1.0",
            "--set",
            "progress=false",
            "--set",
            "device=cpu",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: none of the 6 SFT transcripts played as scripted"), err
    assert "solved at turn 1, not at turn 2" in err
