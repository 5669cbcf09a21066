"""The launcher's local backend: config typos, wrong paths, bad data and failing envs end in one
clear message and a non-zero exit, before anything is downloaded or loaded where possible."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from envs.geo3k.dataset import write_geo3k_parquet

from .conftest import LEARNABLE_ENV, _Record

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_SCRIPT = REPO_ROOT / "examples" / "geo3k_vlm_multi_turn" / "run_geo3k_vlm_multi_turn.py"


def _launcher():
    spec = importlib.util.spec_from_file_location("run_geo3k_vlm_multi_turn_errors", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def launcher():
    return _launcher()


def _run(launcher, capsys, *argv: str) -> tuple[int, str, str]:
    code = launcher.main(["--backend", "local", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_yaml_typo_fails_a_dry_run_without_a_traceback(tmp_path):
    """The user's command, as a process: `max_turn: 3` used to train and exit 0."""
    plugin = tmp_path / "typo.yaml"
    plugin.write_text("max_turn: 3\n")
    result = subprocess.run(
        [
            sys.executable,
            str(RUN_SCRIPT),
            "--backend",
            "local",
            "--demo",
            "--dry-run",
            "--config",
            str(plugin),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(
        f"error: {plugin}: unknown plugin setting 'max_turn'. Did you mean 'max_turns'? Valid settings: "
    )
    assert "Traceback" not in result.stderr


def test_broken_yaml_and_wrong_env_paths_fail_a_dry_run(launcher, capsys, tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("max_turns: [3\n")
    code, _, err = _run(launcher, capsys, "--demo", "--dry-run", "--config", str(broken))
    assert code == 2
    assert err.startswith(f"error: plugin config {broken} is not valid YAML: ")

    wrong_env = tmp_path / "env.yaml"
    wrong_env.write_text("rollout_interaction_env_path: envs.geo3kk\n")
    code, _, err = _run(launcher, capsys, "--demo", "--dry-run", "--config", str(wrong_env))
    assert code == 2
    assert err.startswith("error: env module 'envs.geo3kk' not found: package 'envs' has no module 'geo3kk'.")
    assert "Did you mean 'envs.geo3k'?" in err


def test_a_dry_run_finds_a_relative_env_file_next_to_its_yaml(launcher, capsys, tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "my_env.py").write_text(LEARNABLE_ENV.read_text())
    plugin = tmp_path / "configs" / "plugin.yaml"
    plugin.write_text("rollout_interaction_env_path: ./my_env.py\n")
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run(launcher, capsys, "--demo", "--dry-run", "--config", "configs/plugin.yaml")
    assert code == 0
    assert out.splitlines()[-1] == (
        f"plugin config configs/plugin.yaml: valid; env module {(tmp_path / 'configs' / 'my_env.py').resolve()}: loads"
    )


def test_a_mistyped_model_preset_gets_a_suggestion(launcher, capsys):
    code, _, err = _run(launcher, capsys, "--demo", "--dry-run", "--model", "tiny-qwen25-vl")
    assert code == 2
    assert err.startswith(
        "error: model 'tiny-qwen25-vl' is not a preset, not a checkpoint directory, and not a Hugging Face "
        "repo (owner/name). Did you mean 'tiny-qwen2.5-vl'?"
    )


def test_a_mistyped_data_dir_says_to_check_the_path(launcher, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "geo3k").mkdir()
    code, _, err = _run(
        launcher, capsys, "--data-dir", str(tmp_path / "geo3kk"), "--output-dir", str(tmp_path / "run")
    )
    assert code == 2
    assert err.startswith(f"error: {tmp_path / 'geo3kk'} does not exist, and downloading ")
    assert "Check the --data-dir path. Did you mean 'geo3k'?" in err


def _small_data(directory: Path) -> Path:
    records = [
        _Record(
            f"Problem {i}: write something. <image>", "1", [Image.new("RGB", (56, 56), (60 * i, 90, 160))]
        )
        for i in range(2)
    ]
    return write_geo3k_parquet(records, directory, split_name="train")


def test_bad_rows_stop_the_launcher_before_training(launcher, capsys, tmp_path):
    train = _small_data(tmp_path / "data")
    table = pq.read_table(train).to_pydict()
    table["problem"][1] = "Problem 1 has no placeholder."
    pq.write_table(pa.table(table), train)
    argv = ["--demo", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")]
    code, _, err = _run(launcher, capsys, *argv)
    assert code == 1
    assert err.startswith(
        f"error: {train}: 1 of 2 row(s) cannot be trained on:\n  row 1 [problem]: problem has 0"
    )
    assert "Traceback" not in err


def test_an_env_failing_every_episode_stops_the_launcher_with_its_cause(launcher, capsys, tmp_path):
    _small_data(tmp_path / "data")
    # The learnable env without **kwargs: a typo in env_kwargs makes every build_env call raise.
    strict_env = tmp_path / "strict_env.py"
    strict_env.write_text(LEARNABLE_ENV.read_text().replace(", **kwargs):", "):"))
    plugin = tmp_path / "plugin.yaml"
    plugin.write_text(
        yaml.safe_dump(
            {"max_turns": 1, "rollout_interaction_env_path": str(strict_env), "env_kwargs": {"nope": 1}}
        )
    )
    argv = [
        "--demo",
        "--data-dir",
        str(tmp_path / "data"),
        "--output-dir",
        str(tmp_path / "run"),
        "--config",
        str(plugin),
        "--num-rollout",
        "2",
        "--rollout-batch-size",
        "1",
        "--n-samples-per-prompt",
        "2",
        "--sft-steps",
        "0",  # GRPO's first step meets the env (the warm-start's own failure is tested in test_sft)
        "--set",
        "progress=false",
    ]
    code, out, err = _run(launcher, capsys, *argv)
    assert code == 1
    assert "step 0: 2/2 episodes failed (100%): 2x the env could not be built or reset: TypeError: " in out
    assert err.startswith(
        "error: every episode of the first step failed with the same cause, so the run stops: the env could "
        "not be built or reset: TypeError: build_env() got an unexpected keyword argument 'nope'"
    )


def test_set_values_of_the_wrong_type_fail_and_exponents_are_numbers(launcher, capsys):
    code, _, err = _run(launcher, capsys, "--demo", "--dry-run", "--set", "lr=1e-5x")
    assert (code, err) == (2, "error: lr must be float, got str '1e-5x'\n")
    code, _, err = _run(launcher, capsys, "--demo", "--dry-run", "--set", "num_rollout=true")
    assert (code, err) == (2, "error: num_rollout must be int, got bool True\n")
    code, out, _ = _run(launcher, capsys, "--demo", "--dry-run", "--set", "lr=1e-5")
    assert code == 0
    assert "  lr: 1e-05" in out.splitlines()


def test_drop_bad_rows_trains_on_the_rest_and_says_how_many_were_dropped(launcher, capsys, tmp_path):
    train = _small_data(tmp_path / "data")
    table = pq.read_table(train).to_pydict()
    table["images"][1] = [str(tmp_path / "gone.png")]
    pq.write_table(pa.table(table), train)
    argv = ["--demo", "--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "run")]
    argv += [
        "--drop-bad-rows",
        "--num-rollout",
        "1",
        "--rollout-batch-size",
        "1",
        "--n-samples-per-prompt",
        "2",
    ]
    code, out, _ = _run(launcher, capsys, *argv, "--set", "progress=false")
    assert code == 0
    assert (
        f"dropped 1 bad row(s) of {train} (drop_bad_rows); training on the other 1; why each was dropped: "
        f"{tmp_path / 'run' / 'bad_rows.txt'}"
    ) in out.splitlines()
    assert (tmp_path / "run" / "bad_rows.txt").read_text() == (
        f"row 1 [images]: image 0: image file {tmp_path / 'gone.png'} does not exist\n"
    )
