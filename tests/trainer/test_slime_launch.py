"""The slime backend's argument list, environment and preflight, without slime or GPUs."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.slime_launch import (
    CUDNN_FIX,
    SLIME_RECIPE,
    SlimeLaunch,
    _cudnn_finding,
    build_slime_args,
    check_dataset,
    job_env,
    launcher_env,
    slime_model,
)

RUN_SCRIPT = (
    Path(__file__).resolve().parents[2] / "examples" / "geo3k_vlm_multi_turn" / "run_geo3k_vlm_multi_turn.py"
)


def _value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times"
    return args[args.index(flag) + 1]


def _launch(name: str, gpus: int, **changes) -> SlimeLaunch:
    values = dict(
        model=slime_model(name),
        model_dir=Path("/models/m"),
        prompt_data=Path("/data/train.parquet"),
        plugin_config=Path("/repo/configs/geo3k_vlm_multi_turn.yaml"),
        num_gpus=gpus,
        repo_root=Path("/repo"),
    )
    values.update(changes)
    return SlimeLaunch(**values)


def test_recipe_arguments_for_qwen3_vl_on_a_bridge_release():
    args = build_slime_args(TrainConfig.from_dict(SLIME_RECIPE), _launch("Qwen3-VL-2B-Instruct", 4))
    expected = {
        "--hf-checkpoint": "/models/m",
        "--load": "/models/m",
        "--prompt-data": "/data/train.parquet",
        "--input-key": "problem",
        "--label-key": "answer",
        "--custom-generate-function-path": "rollout.generate",
        "--custom-rm-path": "rollout.reward",
        "--custom-config-path": "/repo/configs/geo3k_vlm_multi_turn.yaml",
        "--num-rollout": "3000",
        "--rollout-batch-size": "64",
        "--n-samples-per-prompt": "8",
        "--rollout-max-response-len": "4096",
        "--rollout-temperature": "1",
        "--global-batch-size": "512",
        "--advantage-estimator": "grpo",
        "--kl-loss-coef": "0",
        "--kl-loss-type": "low_var_kl",
        "--entropy-coef": "0",
        "--eps-clip": "0.2",
        "--eps-clip-high": "0.28",
        "--optimizer": "adam",
        "--lr": "1e-06",
        "--weight-decay": "0.1",
        "--adam-beta1": "0.9",
        "--adam-beta2": "0.98",
        "--tensor-model-parallel-size": "4",
        "--expert-model-parallel-size": "1",
        "--rollout-num-gpus-per-engine": "1",
        "--megatron-to-hf-mode": "bridge",
        "--max-tokens-per-gpu": "4096",
        "--actor-num-gpus-per-node": "4",
        "--rollout-num-gpus": "4",
    }
    for flag, value in expected.items():
        assert _value(args, flag) == value, flag
    assert json.loads(_value(args, "--multimodal-keys")) == {"image": "images"}
    for flag in ("--apply-chat-template", "--rollout-shuffle", "--colocate", "--use-dynamic-batch-size"):
        assert flag in args
    # slime's defaults, not the local trainer's: no KL loss, old log-probs recomputed by Megatron
    for flag in ("--use-kl-loss", "--use-rollout-logprobs", "--sglang-ep-size", "--use-wandb", "--rm-type"):
        assert flag not in args
    assert slime_model("Qwen/Qwen3-VL-8B-Thinking").megatron_model_type == "qwen3-8B"
    assert slime_model("Qwen3-VL-2B-Instruct").megatron_model_type == "qwen3-1.7B"


def test_moe_model_at_slime_head_spreads_experts_over_all_gpus():
    launch = _launch("Qwen3.5-35B-A3B", 8, save_dir=Path("/ckpt"), save_interval=20)
    args = build_slime_args(TrainConfig.from_dict(SLIME_RECIPE), launch)
    assert launch.model.megatron_model_type == "qwen3.5-35B-A3B-vl"
    assert _value(args, "--tensor-model-parallel-size") == "2"
    assert _value(args, "--expert-model-parallel-size") == "8"
    assert _value(args, "--sglang-ep-size") == "8"
    assert _value(args, "--rollout-num-gpus-per-engine") == "8"
    assert _value(args, "--micro-batch-size") == "1"
    assert _value(args, "--save") == "/ckpt" and _value(args, "--save-interval") == "20"
    assert "--megatron-to-hf-mode" not in args and "--use-dynamic-batch-size" not in args


def test_trainer_settings_reach_slime_flags():
    cfg = TrainConfig.from_dict(
        {
            **SLIME_RECIPE,
            "use_kl_loss": True,
            "kl_loss_coef": 0.01,
            "lr": 2e-6,
            "grpo_std_normalization": False,
        }
    )
    args = build_slime_args(cfg, _launch("Qwen3-VL-4B-Instruct", 4))
    assert "--use-kl-loss" in args and _value(args, "--kl-loss-coef") == "0.01"
    assert _value(args, "--lr") == "2e-06"
    assert "--disable-grpo-std-normalization" in args


def test_job_environment_puts_megatron_and_this_repo_on_pythonpath(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    launch = _launch("Qwen3-VL-2B-Instruct", 4, wandb_project="p")
    assert job_env(launch) == {"PYTHONPATH": "/root/Megatron-LM/:/repo", "WANDB_API_KEY": "secret"}
    assert launcher_env(launch) == {"MODEL_ARGS_ROTARY_BASE": "5000000"}
    assert launcher_env(_launch("Qwen3.5-35B-A3B", 8)) == {}
    args = build_slime_args(TrainConfig.from_dict(SLIME_RECIPE), launch)
    assert "secret" not in args and _value(args, "--wandb-project") == "p"


def test_unknown_model_names_the_nearest_one():
    with pytest.raises(KeyError, match="Did you mean 'Qwen3-VL-2B-Instruct'"):
        slime_model("Qwen3-VL-2B-Instruc")


def test_cudnn_warning_names_the_exact_fix():
    assert _cudnn_finding("2.9.1+cu128", 91002).level == "warn"
    assert CUDNN_FIX in _cudnn_finding("2.9.1+cu128", 91002).message
    assert CUDNN_FIX == "pip install nvidia-cudnn-cu12==9.16.0.29"
    assert _cudnn_finding("2.9.1+cu128", 91600).level == "ok"
    assert _cudnn_finding("2.10.0", 91002).level == "ok"


def test_dataset_check_rejects_relative_image_paths(tmp_path):
    from envs.geo3k.dataset import write_geo3k_parquet
    from envs.geo3k.sample_data import generate_problems

    problems = generate_problems(2, 0, image_size=160)
    relative = write_geo3k_parquet(problems, tmp_path / "rel", split_name="train")
    absolute = write_geo3k_parquet(problems, tmp_path / "abs", split_name="train", absolute_paths=True)
    [finding] = check_dataset(relative)
    assert finding.level == "error" and "relative" in finding.message
    [finding] = check_dataset(absolute)
    assert finding.level == "ok"
    assert check_dataset(tmp_path / "missing.parquet")[0].level == "error"


def _run_script():
    spec = importlib.util.spec_from_file_location("run_geo3k_vlm_multi_turn", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_the_command_and_exits_zero(tmp_path, capsys):
    script = _run_script()
    argv = ["--backend", "slime", "--dry-run", "--model", "Qwen3-VL-2B-Instruct", "--num-gpus", "4"]
    argv += [
        "--data-dir",
        str(tmp_path / "data"),
        "--model-root",
        str(tmp_path / "models"),
        "--num-rollout",
        "7",
    ]
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "backend: slime (--backend)" in out
    command = next(line for line in out.splitlines() if line.startswith("python3 train.py"))
    args = shlex.split(command.removeprefix("python3 train.py ${MODEL_ARGS[@]} "))
    assert _value(args, "--num-rollout") == "7"
    assert _value(args, "--hf-checkpoint") == str(tmp_path / "models" / "Qwen3-VL-2B-Instruct")
    assert _value(args, "--prompt-data") == str(tmp_path / "data" / "train.parquet")
    assert _value(args, "--custom-config-path") == str(script.DEFAULT_PLUGIN_CONFIG.resolve())
    assert json.loads(_value(args, "--multimodal-keys")) == {"image": "images"}
    assert f"PYTHONPATH=/root/Megatron-LM/:{script.REPO_ROOT}" in out
    assert "export MODEL_ARGS_ROTARY_BASE=5000000" in out
    # the dataset and the checkpoint are missing: preflight says so, the dry run still succeeds
    assert "[error]" in out and "train.parquet does not exist" in out


def test_backend_defaults_to_local_without_slime():
    script = _run_script()
    backend, reason = script.choose_backend(None)
    assert (backend, reason) == ("local", "slime is not importable")
