"""The trainer fails before its first step on bad rows and config typos, and loudly on envs that fail.

Checks that need no model run first in ``train``: these tests pass a checkpoint that does not exist,
so reaching the model load would fail with PolicyNotFound instead of the error under test.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from envs.geo3k.dataset import DatasetError, encode_png
from envs.loader import EnvLoadError
from rollout.config import ConfigError as PluginConfigError
from rollout.sample import Sample
from trainer.config import TrainConfig, plugin_config
from trainer.data import PromptSource
from trainer.loop import RolloutFailedError, _report_failures, train

from .conftest import LEARNABLE_ENV

NO_MODEL = "/nonexistent/checkpoint"


def _config(task: dict, output_dir, **changes) -> TrainConfig:
    values = dict(
        hf_checkpoint="tiny-qwen2.5-vl-small-vocab",
        output_dir=str(output_dir),
        num_rollout=1,
        rollout_batch_size=2,
        n_samples_per_prompt=2,
        rollout_max_response_len=8,
        micro_batch_size=4,
        progress=False,
        device="cpu",
        report_episodes=2,
        **task,
    )
    values.update(changes)
    return TrainConfig(**values)


def _bad_rows_parquet(directory) -> str:
    """train.parquet, six rows: two good, then a missing image, a corrupt (truncated) one, a
    placeholder mismatch, a null label; and int_labels.parquet, the same rows with integer labels."""
    directory.mkdir()
    png = encode_png(Image.new("RGB", (56, 56), (10, 90, 160)))
    (directory / "good.png").write_bytes(png)
    (directory / "corrupt.png").write_bytes(png[: len(png) // 2])
    problems = ["Find x. <image>", "Find y. <image>", "Find z. <image>", "Find w. <image>"]
    problems += ["Find v. <image> <image>", "Find u. <image>"]
    images = [["good.png"], ["good.png"], ["missing.png"], ["corrupt.png"], ["good.png"], ["good.png"]]
    labels = ["5", "6", "7", "8", "9", None]
    pq.write_table(
        pa.table({"problem": problems, "answer": labels, "images": images}), directory / "train.parquet"
    )
    integers = pa.array([5, 6, 7, 8, 9, 10])
    pq.write_table(
        pa.table({"problem": problems, "answer": integers, "images": images}),
        directory / "int_labels.parquet",
    )
    return str(directory / "train.parquet")


def test_bad_rows_stop_the_run_before_the_model_loads_with_every_row_named(learnable_task, tmp_path):
    data = _bad_rows_parquet(tmp_path / "data")
    cfg = _config(learnable_task, tmp_path / "run", prompt_data=data, hf_checkpoint=NO_MODEL)
    with pytest.raises(DatasetError) as raised:
        train(cfg, log=lambda *_: None)
    message = str(raised.value)
    assert message.startswith(f"{data}: 4 of 6 row(s) cannot be trained on:\n")
    for row, column in ((2, "images"), (3, "images"), (4, "problem"), (5, "answer")):
        assert f"  row {row} [{column}]: " in message
    assert "answer is empty" in message  # row 5's null label
    assert "--drop-bad-rows" in message
    listing = tmp_path / "run" / "bad_rows.txt"
    assert message.endswith(f"Every problem found: {listing}")
    assert [line.split(":")[0] for line in listing.read_text().splitlines()] == [
        "row 2 [images]",
        "row 3 [images]",
        "row 4 [problem]",
        "row 5 [answer]",
    ]


def test_integer_labels_are_reported_per_row(tmp_path):
    _bad_rows_parquet(tmp_path / "data")
    with pytest.raises(DatasetError) as raised:
        PromptSource(tmp_path / "data" / "int_labels.parquet", seed=0)
    assert [(p.index, p.column) for p in raised.value.problems if p.column == "answer"] == [
        (k, "answer") for k in range(6)
    ]
    assert "row 0 [answer]: answer is an int (5), not a string" in str(raised.value)


def test_drop_bad_rows_trains_on_the_other_rows(tmp_path):
    source = PromptSource(_bad_rows_parquet(tmp_path / "data"), seed=0, drop_bad_rows=True)
    assert source.dropped == [2, 3, 4, 5]
    assert len(source) == 2
    assert sorted(prompt.row for prompt in source.batch(0, 2)) == [0, 1]


def test_unknown_plugin_key_fails_every_entry_point_the_same_way(learnable_task, tmp_path):
    plugin = tmp_path / "typo.yaml"
    plugin.write_text("max_turn: 3\n")
    cfg = _config(learnable_task, tmp_path / "run", custom_config_path=str(plugin), hf_checkpoint=NO_MODEL)
    with pytest.raises(
        PluginConfigError, match=r"unknown plugin setting 'max_turn'\. Did you mean 'max_turns'\?"
    ):
        train(cfg, log=lambda *_: None)
    with pytest.raises(PluginConfigError, match=r"unknown plugin setting 'max_turn'"):
        plugin_config(cfg)


def test_a_wrong_env_path_fails_before_the_model_loads(learnable_task, tmp_path):
    plugin = tmp_path / "env.yaml"
    plugin.write_text("rollout_interaction_env_path: envs.geo3kk\n")
    cfg = _config(learnable_task, tmp_path / "run", custom_config_path=str(plugin), hf_checkpoint=NO_MODEL)
    with pytest.raises(
        EnvLoadError, match=r"env module 'envs\.geo3kk' not found.* Did you mean 'envs\.geo3k'\?"
    ):
        train(cfg, log=lambda *_: None)


def test_a_relative_env_file_is_found_next_to_the_yaml(learnable_task, tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    (folder / "envs_here").mkdir(parents=True)
    env_file = folder / "envs_here" / "target_env.py"
    env_file.write_text(LEARNABLE_ENV.read_text())
    plugin = folder / "plugin.yaml"
    plugin.write_text(yaml.safe_dump({"rollout_interaction_env_path": "envs_here/target_env.py"}))
    monkeypatch.chdir(tmp_path)  # the YAML's folder is not the working directory
    cfg = _config(learnable_task, tmp_path / "run", custom_config_path=str(plugin))
    assert plugin_config(cfg).rollout_interaction_env_path == str(env_file.resolve())
    # Not next to the YAML: left as written (relative to the working directory), dotted names too.
    plugin.write_text(yaml.safe_dump({"rollout_interaction_env_path": "elsewhere/env.py"}))
    assert plugin_config(cfg).rollout_interaction_env_path == "elsewhere/env.py"
    plugin.write_text(yaml.safe_dump({"rollout_interaction_env_path": "envs.geo3k"}))
    assert plugin_config(cfg).rollout_interaction_env_path == "envs.geo3k"


def _finished(status: str, reason: str) -> Sample:
    sample = Sample(status=Sample.Status[status])
    sample.metadata = {"status_reason": reason}
    return sample


def test_failed_episodes_are_reported_each_step_with_their_causes():
    lines: list[str] = []
    trace = 'Traceback (most recent call last):\n  File "env.py", line 3, in step\nZeroDivisionError: division by zero\n'
    samples = [
        _finished("FAILED", f"env.step raised at turn 1: {trace}"),
        _finished("FAILED", f"env.step raised at turn 2: {trace}"),
        _finished("FAILED", "the env could not be built or reset: KeyError: 'label'"),
        _finished("COMPLETED", "env done"),
    ]
    _report_failures(samples, 3, first=True, write=lines.append)
    assert lines == [
        "step 3: 3/4 episodes failed (75%): 2x env.step raised: ZeroDivisionError: division by zero; "
        "1x the env could not be built or reset: KeyError: 'label'"
    ]
    _report_failures([_finished("COMPLETED", "env done")], 4, first=False, write=lines.append)
    assert len(lines) == 1  # nothing failed, nothing said


def test_a_first_step_that_failed_entirely_for_one_cause_stops_the_run():
    samples = [
        _finished("FAILED", "the env could not be built or reset: EnvConfigError: bad") for _ in range(4)
    ]
    with pytest.raises(
        RolloutFailedError, match=r"failed with the same cause, so the run stops: the env could"
    ):
        _report_failures(samples, 0, first=True, write=lambda _: None)
    _report_failures(samples, 5, first=False, write=lambda _: None)  # later steps only report
    mixed = [*samples[:3], _finished("FAILED", "engine: connection refused")]
    _report_failures(mixed, 0, first=True, write=lambda _: None)  # two causes: reported, not fatal
    # The policy's own failures are not fatal: a random tiny model can fail a whole small step so.
    placeholders = [_finished("FAILED", "the model generated vision placeholder tokens") for _ in range(4)]
    _report_failures(placeholders, 0, first=True, write=lambda _: None)
    # ...and an episode the policy ended first does not hide an env that fails all the others.
    with pytest.raises(RolloutFailedError, match=r"so the run stops: the env could .*\(1 ended earlier"):
        _report_failures([*samples[:3], placeholders[0]], 0, first=True, write=lambda _: None)
    _report_failures([*samples[:1], *placeholders[:3]], 0, first=True, write=lambda _: None)  # too few to judge


@pytest.mark.parametrize(
    ("env_kwargs", "cause"),
    [
        ({"end_on_corect": True}, r"the env could not be built or reset: EnvConfigError: .*end_on_corect"),
        ({"bad_step": True}, r"env\.step returned a 5-tuple: .*it must return \(observation, done, info\)"),
    ],
)
def test_an_env_that_fails_every_episode_stops_the_first_step(learnable_task, tmp_path, env_kwargs, cause):
    env_file = tmp_path / "failing_env.py"
    env_file.write_text(FAILING_ENV)
    plugin = tmp_path / "plugin.yaml"
    plugin.write_text(
        yaml.safe_dump(
            {"max_turns": 1, "rollout_interaction_env_path": str(env_file), "env_kwargs": env_kwargs}
        )
    )
    # A 4-token cap hands every turn to the env (the 16-token budget is never the reason a turn ends).
    cfg = _config(
        learnable_task,
        tmp_path / "run",
        custom_config_path=str(plugin),
        max_tokens_per_turn=4,
        rollout_max_response_len=16,
    )
    lines: list[str] = []
    with pytest.raises(RolloutFailedError, match=cause):
        train(cfg, log=lines.append)


FAILING_ENV = """
from envs.base import BaseInteractionEnv, EnvConfigError


class Env(BaseInteractionEnv):
    def reset(self):
        return {"obs_str": "", "role": "tool"}, {}

    def step(self, response_text):
        return {"obs_str": "", "role": "tool"}, 0.0, True, False, {}


def build_env(sample=None, args=None, bad_step=False, **kwargs):
    if kwargs:
        raise EnvConfigError(f"unknown env setting(s) {sorted(kwargs)}")
    return Env()
"""
