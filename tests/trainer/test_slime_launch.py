"""The slime backend's argument list, environment and preflight, without slime or GPUs.

slime is not on PyPI and needs GPUs, so its parser cannot run here; ``data/slime_*_flags.txt`` hold
every flag the real parsers (slime, SGLang, patched Megatron-LM) registered, recorded once, and the
argument lists are checked against them: those parsers drop an unknown flag without a word."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

from trainer.config import TrainConfig
from trainer.slime_launch import (
    CUDNN_FIX,
    SLIME_MODELS,
    SLIME_RECIPE,
    SLIME_RELEASES,
    SlimeLaunch,
    _cudnn_finding,
    _release_finding,
    build_slime_args,
    check_dataset,
    installed_release,
    job_env,
    launcher_env,
    slime_model,
)

RUN_SCRIPT = (
    Path(__file__).resolve().parents[2] / "examples" / "geo3k_vlm_multi_turn" / "run_geo3k_vlm_multi_turn.py"
)
DATA = Path(__file__).resolve().parent / "data"
# The release each flag list was recorded from (see the files' header).
KNOWN_FLAGS_FILES = {"current": DATA / "slime_624b824_flags.txt", "legacy": DATA / "slime_2a60f00_flags.txt"}


def _known_flags(release: str) -> set[str]:
    lines = KNOWN_FLAGS_FILES[release].read_text().splitlines()
    return {line for line in lines if line and not line.startswith("#")}


def _flags(args: list[str]) -> set[str]:
    return {arg for arg in args if arg.startswith("--")}


def _value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"{flag} appears {args.count(flag)} times"
    return args[args.index(flag) + 1]


def _launch(name: str, gpus: int, **changes) -> SlimeLaunch:
    model = slime_model(name)
    values = dict(
        model=model,
        release=model.release,
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


def test_save_always_comes_with_a_save_interval():
    """Megatron's validate_args asserts save_interval whenever --save is given."""
    cfg = TrainConfig.from_dict({**SLIME_RECIPE, "num_rollout": 40})
    for name, gpus in (("Qwen3.5-35B-A3B", 8), ("Qwen3-VL-2B-Instruct", 4)):
        # no interval asked for: slime saves the last rollout whenever an interval is set
        args = build_slime_args(cfg, _launch(name, gpus, save_dir=Path("/ckpt")))
        assert _value(args, "--save") == "/ckpt" and _value(args, "--save-interval") == "40"
        args = build_slime_args(cfg, _launch(name, gpus, save_dir=Path("/ckpt"), save_interval=5))
        assert _value(args, "--save-interval") == "5"
        args = build_slime_args(cfg, _launch(name, gpus))
        assert "--save" not in args and "--save-interval" not in args


def _every_option(name: str, gpus: int) -> list[str]:
    """An argument list with every optional flag the launcher can emit."""
    model = slime_model(name)
    cfg = TrainConfig.from_dict(
        {
            **SLIME_RECIPE,
            "use_kl_loss": True,
            "use_rollout_logprobs": True,
            "rollout_top_p": 0.9,
            "rollout_stop": ["</tool_call>"],
            "rollout_stop_token_ids": [151645],
            "grpo_std_normalization": False,
        }
    )
    launch = _launch(
        name,
        gpus,
        save_dir=Path("/ckpt"),
        save_interval=20,
        wandb_project="p",
        rollout_routing_replay=model.moe,
    )
    return build_slime_args(cfg, launch)


@pytest.mark.parametrize("name", list(SLIME_MODELS))
def test_every_flag_is_known_to_the_targeted_slime(name):
    model = slime_model(name)
    known = _known_flags(model.release)
    assert len(known) > 1000  # slime + SGLang + Megatron: a truncated list would pass anything
    for args in (
        build_slime_args(TrainConfig.from_dict(SLIME_RECIPE), _launch(name, model.num_gpus)),
        _every_option(name, model.num_gpus),
    ):
        unknown = _flags(args) - known
        assert not unknown, f"{name} on {model.release} slime: flags its parser drops silently: {unknown}"


def test_flag_lists_tell_the_releases_apart():
    current, legacy = _known_flags("current"), _known_flags("legacy")
    assert "--megatron-to-hf-mode" in legacy and "--megatron-to-hf-mode" not in current
    for flag in ("--save-interval", "--sglang-ep-size", "--use-rollout-routing-replay", "--colocate"):
        assert flag in current and flag in legacy


def test_plugin_settings_overwrite_no_slime_argument():
    """slime copies every key of --custom-config-path onto its parsed arguments (slime_validate_args):
    a plugin key named like one of slime's arguments would silently replace it."""
    import yaml

    config = Path(__file__).resolve().parents[2] / "configs" / "geo3k_vlm_multi_turn.yaml"
    keys = set(yaml.safe_load(config.read_text()))
    assert "max_turns" in keys
    for release in KNOWN_FLAGS_FILES:
        dests = {flag[2:].replace("-", "_") for flag in _known_flags(release)}
        assert not keys & dests, f"plugin keys that are {release} slime arguments: {keys & dests}"


def test_default_recipe_is_qwen35_moe_with_expert_parallel_over_all_gpus(tmp_path, capsys):
    """The layout of slime's own examples/geo3k_vlm_multi_turn at 624b824."""
    script = _run_script()
    assert SLIME_RELEASES["current"].default_model == "Qwen3.5-35B-A3B"
    for gpus in (None, 4):
        argv = ["--backend", "slime", "--dry-run", "--model-root", str(tmp_path / "models")]
        argv += ["--data-dir", str(tmp_path / "data")] + (["--num-gpus", str(gpus)] if gpus else [])
        assert script.main(argv) == 0
        out = capsys.readouterr().out
        args = _printed_args(out)
        expected = str(gpus or 8)
        assert _value(args, "--hf-checkpoint") == str(tmp_path / "models" / "Qwen3.5-35B-A3B")
        assert "megatron_model_type='qwen3.5-35B-A3B-vl'" in out
        assert _value(args, "--tensor-model-parallel-size") == "2"
        for flag in ("--expert-model-parallel-size", "--sglang-ep-size", "--rollout-num-gpus-per-engine"):
            assert _value(args, flag) == expected, flag
        assert _value(args, "--actor-num-gpus-per-node") == expected
        assert _value(args, "--rollout-num-gpus") == expected
        assert "--colocate" in args
        assert "--megatron-to-hf-mode" not in args and "--use-rollout-routing-replay" not in args
        assert not _flags(args) - _known_flags("current")


def test_bridge_flag_only_on_the_legacy_release():
    cfg = TrainConfig.from_dict(SLIME_RECIPE)
    legacy = build_slime_args(cfg, _launch("Qwen3-VL-2B-Instruct", 4, release="legacy"))
    assert _value(legacy, "--megatron-to-hf-mode") == "bridge"
    current = build_slime_args(cfg, _launch("Qwen3.5-35B-A3B", 8, release="current"))
    assert "--megatron-to-hf-mode" not in current
    # A Qwen3-VL recipe on today's slime would lose the bridge flag silently: refused instead.
    with pytest.raises(ValueError, match="--slime-version legacy"):
        build_slime_args(cfg, _launch("Qwen3-VL-2B-Instruct", 4, release="current"))
    with pytest.raises(ValueError, match="--slime-version current"):
        build_slime_args(cfg, _launch("Qwen3.5-35B-A3B", 8, release="legacy"))


def test_layouts_the_moe_recipe_cannot_use_are_refused():
    cfg = TrainConfig.from_dict(SLIME_RECIPE)
    with pytest.raises(ValueError, match="tensor parallel size 2"):
        build_slime_args(cfg, _launch("Qwen3.5-35B-A3B", 3))
    with pytest.raises(ValueError, match="256 experts"):
        build_slime_args(cfg, _launch("Qwen3.5-35B-A3B", 6))
    with pytest.raises(ValueError, match="dense"):
        build_slime_args(cfg, _launch("Qwen3-VL-2B-Instruct", 4, rollout_routing_replay=True))
    args = build_slime_args(cfg, _launch("Qwen3.5-35B-A3B", 8, rollout_routing_replay=True))
    assert "--use-rollout-routing-replay" in args


def test_preflight_tells_which_release_is_installed(tmp_path):
    current, legacy = tmp_path / "current", tmp_path / "legacy"
    for checkout, parser in ((current, "--save-interval"), (legacy, "--megatron-to-hf-mode")):
        arguments = checkout / "slime" / "utils" / "arguments.py"
        arguments.parent.mkdir(parents=True)
        arguments.write_text(f'parser.add_argument("{parser}")\n')
    assert installed_release(current) == "current" and installed_release(legacy) == "legacy"
    assert _release_finding(current, "current").level == "ok"
    finding = _release_finding(legacy, "current")
    assert finding.level == "error" and "--slime-version legacy" in finding.message
    assert "Qwen3-VL-2B-Instruct" in finding.message


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


def test_dataset_check_rejects_relative_image_paths_in_every_row(tmp_path):
    from envs.geo3k.dataset import write_geo3k_parquet
    from envs.geo3k.sample_data import generate_problems

    problems = generate_problems(3, 0, image_size=160)
    relative = write_geo3k_parquet(problems, tmp_path / "rel", split_name="train")
    absolute = write_geo3k_parquet(problems, tmp_path / "abs", split_name="train", absolute_paths=True)
    [finding] = check_dataset(relative)
    assert finding.level == "error" and "3 problem(s) in 3 row(s)" in finding.message
    for row in range(3):
        assert re.search(rf"row {row} \[images\]: image 0 path 'images/\S+' is relative", finding.message)
    [finding] = check_dataset(absolute)
    assert finding.level == "ok" and "3 rows, all valid" in finding.message
    assert check_dataset(tmp_path / "missing.parquet")[0].level == "error"


def test_dataset_check_reports_every_bad_row_not_only_the_first(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from envs.geo3k.dataset import write_geo3k_parquet
    from envs.geo3k.sample_data import generate_problems

    path = write_geo3k_parquet(
        generate_problems(6, 1, image_size=160), tmp_path, split_name="train", absolute_paths=True
    )
    table = pq.read_table(path).to_pydict()
    table["answer"][2] = "x + 1"  # not a number: the reward could never match
    table["problem"][4] = table["problem"][4].replace("<image>", "")  # image without a placeholder
    table["images"][5] = ["https://example.com/figure.png"]  # the rollout reads local images only
    pq.write_table(pa.table(table), path)

    [finding] = check_dataset(path)
    assert finding.level == "error"
    assert "3 problem(s) in 3 row(s)" in finding.message
    assert "row 2 [answer]: answer 'x + 1' parses to an expression in the unknown(s) x" in finding.message
    assert (
        "row 4 [problem]: problem has 0 <image> placeholder(s) but the row has 1 image(s)" in finding.message
    )
    assert "row 5 [images]: image 0: image 'https://example.com/figure.png' is a URL" in finding.message
    for row in (0, 1, 3):
        assert f"row {row} " not in finding.message


def _run_script():
    spec = importlib.util.spec_from_file_location("run_geo3k_vlm_multi_turn", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _printed_args(out: str) -> list[str]:
    command = next(line for line in out.splitlines() if line.startswith("python3 train.py"))
    return shlex.split(command.removeprefix("python3 train.py ${MODEL_ARGS[@]} "))


def test_dry_run_prints_the_command_and_exits_zero(tmp_path, capsys):
    script = _run_script()
    argv = ["--backend", "slime", "--dry-run", "--slime-version", "legacy", "--model", "Qwen3-VL-2B-Instruct"]
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
    assert "# slime release: legacy" in out
    args = _printed_args(out)
    assert _value(args, "--num-rollout") == "7"
    assert _value(args, "--megatron-to-hf-mode") == "bridge"
    assert _value(args, "--actor-num-gpus-per-node") == "4"  # the Qwen3-VL recipe's GPU count
    assert _value(args, "--hf-checkpoint") == str(tmp_path / "models" / "Qwen3-VL-2B-Instruct")
    assert _value(args, "--prompt-data") == str(tmp_path / "data" / "train.parquet")
    assert _value(args, "--custom-config-path") == str(script.DEFAULT_PLUGIN_CONFIG.resolve())
    assert json.loads(_value(args, "--multimodal-keys")) == {"image": "images"}
    assert f"PYTHONPATH=/root/Megatron-LM/:{script.REPO_ROOT}" in out
    assert "export MODEL_ARGS_ROTARY_BASE=5000000" in out
    # the dataset and the checkpoint are missing: preflight says so, the dry run still succeeds
    assert "[error]" in out and "train.parquet does not exist" in out


def test_dry_run_refuses_a_model_of_the_other_release(tmp_path, capsys):
    script = _run_script()
    argv = ["--backend", "slime", "--dry-run", "--model", "Qwen3-VL-2B-Instruct"]
    argv += ["--data-dir", str(tmp_path / "data"), "--model-root", str(tmp_path / "models")]
    assert script.main(argv) == 2
    captured = capsys.readouterr()
    assert "Qwen3-VL-2B-Instruct runs on legacy slime" in captured.err
    assert "--slime-version legacy" in captured.err
    assert "python3 train.py" not in captured.out


def test_backend_defaults_to_local_without_slime():
    script = _run_script()
    backend, reason = script.choose_backend(None)
    assert (backend, reason) == ("local", "slime is not importable")
