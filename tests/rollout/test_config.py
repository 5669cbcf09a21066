import argparse
from pathlib import Path

import pytest
import yaml

from rollout.config import ConfigError, RolloutConfig

REPO = Path(__file__).resolve().parents[2]


def test_shipped_yaml_loads_with_the_documented_values():
    config = RolloutConfig.from_yaml(REPO / "configs" / "geo3k_vlm_multi_turn.yaml")
    assert config.max_turns == 3
    assert config.rollout_interaction_env_path == "envs.geo3k"
    assert config.env_kwargs == {"end_on_correct": True, "grade_final_answer": True, "grading_timeout_s": 5.0}


def test_every_setting_in_the_dataclass_is_documented_in_the_yaml():
    keys = set(yaml.safe_load((REPO / "configs" / "geo3k_vlm_multi_turn.yaml").read_text()))
    assert keys == set(RolloutConfig.setting_names())


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_turn": 3}, "unknown plugin setting 'max_turn'. Did you mean 'max_turns'?"),
        ({"rollout_interaction_env": "envs.geo3k"}, "Did you mean 'rollout_interaction_env_path'?"),
        ({"max_turns": True}, "max_turns must be int, got bool True"),
        ({"max_turns": "3"}, "max_turns must be int, got str '3'"),
        ({"max_turns": 0}, "max_turns must be >= 1, got 0"),
        ({"max_tokens_per_turn": 0}, "max_tokens_per_turn must be >= 1 or null, got 0"),
        ({"request_timeout_s": -1}, "request_timeout_s must be > 0, got -1"),
        ({"request_max_retries": -2}, "request_max_retries must be >= 0, got -2"),
        ({"env_kwargs": ["a"]}, "env_kwargs must be dict, got list"),
        ({"rollout_interaction_env_path": " "}, "rollout_interaction_env_path must name an env module"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError, match=_literal(message)):
        RolloutConfig.from_mapping(values)


def _literal(text):
    import re

    return re.escape(text)


def test_yaml_file_typo_is_caught_through_slime_args(tmp_path):
    path = tmp_path / "plugin.yaml"
    path.write_text("max_turns: 2\nrollout_interaction_env_path: envs.geo3k\nend_on_corect: true\n")
    # slime has already setattr-ed every top-level key, typo included; we read the file itself.
    args = argparse.Namespace(custom_config_path=str(path), max_turns=2, end_on_corect=True)
    with pytest.raises(ConfigError, match="unknown plugin setting 'end_on_corect'"):
        RolloutConfig.from_args(args)


def test_args_without_yaml_use_known_keys_and_defaults():
    args = argparse.Namespace(max_turns=5, env_kwargs={"end_on_correct": False}, unrelated_slime_flag=1)
    config = RolloutConfig.from_args(args)
    assert config.max_turns == 5 and config.env_kwargs == {"end_on_correct": False}
    assert config.request_max_retries == 3



def test_args_read_again_see_every_change():
    """Settings read from the same args object are remembered, but never past a change to it."""
    args = argparse.Namespace(max_turns=5)
    first = RolloutConfig.from_args(args)
    assert RolloutConfig.from_args(args) is first
    args.max_turns = 2
    assert RolloutConfig.from_args(args).max_turns == 2
    args.max_turn = 4  # an unknown attribute of args is slime's business, not ours
    args.max_turns = 0
    with pytest.raises(ConfigError, match="max_turns must be >= 1"):
        RolloutConfig.from_args(args)
    args.max_turns = 3
    assert RolloutConfig.from_args(args).max_turns == 3
    assert RolloutConfig.from_args(argparse.Namespace(max_turns=7)).max_turns == 7


@pytest.mark.parametrize("mode", ["single_pad", "expanded"])
def test_the_removed_image_token_mode_is_rejected_with_the_reason(tmp_path, mode):
    """Any value, even the old default: a mode that cannot be honoured must not look accepted."""
    path = tmp_path / "plugin.yaml"
    path.write_text(f"max_turns: 2\nimage_token_mode: {mode}\n")
    args = argparse.Namespace(custom_config_path=str(path), image_token_mode=mode)
    for read in (lambda: RolloutConfig.from_args(args), lambda: RolloutConfig.from_yaml(path)):
        with pytest.raises(ConfigError) as info:
            read()
        message = str(info.value)
        assert "'image_token_mode' was removed" in message and "unknown plugin setting" not in message
        assert "one <|image_pad|> per image" in message and "SGLang 0.5.23" in message
        assert "Delete the key" in message
    # Without a YAML path: the key set on args directly (the local trainer, tests).
    with pytest.raises(ConfigError, match="'image_token_mode' was removed"):
        RolloutConfig.from_args(argparse.Namespace(max_turns=2, image_token_mode=mode))


def test_the_removed_gc_pacing_is_rejected_with_the_reason(tmp_path):
    path = tmp_path / "plugin.yaml"
    path.write_text("max_turns: 2\ngc_pacing: true\n")
    with pytest.raises(ConfigError) as info:
        RolloutConfig.from_yaml(path)
    assert "'gc_pacing' was removed" in str(info.value) and "wall time" in str(info.value)


def test_yaml_is_reparsed_when_the_file_changes(tmp_path):
    import os

    path = tmp_path / "plugin.yaml"
    path.write_text("max_turns: 2\n")
    args = argparse.Namespace(custom_config_path=str(path))
    assert RolloutConfig.from_args(args).max_turns == 2
    path.write_text("max_turns: 4\n")
    os.utime(path, (1, 1))
    assert RolloutConfig.from_args(args).max_turns == 4


def test_missing_or_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        RolloutConfig.from_args(argparse.Namespace(custom_config_path=str(tmp_path / "nope.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_turns: [\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        RolloutConfig.from_yaml(bad)


async def test_the_first_episode_freezes_long_lived_objects_once(qwen25_processing, monkeypatch):
    """Counted through gc.freeze itself: the freeze count is global interpreter state that reference
    counting lowers at any moment (another thread frees a frozen object), so it is not asserted on."""
    import gc

    from rollout.runtime import RolloutRuntime

    from .conftest import ScriptedEngine, make_args

    calls: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: calls.append(1))
    runtime = RolloutRuntime()
    args = make_args(ScriptedEngine(qwen25_processing.tokenizer, []))
    await runtime.context_async(args)
    assert len(calls) == 1
    await runtime.context_async(args)
    assert len(calls) == 1  # once per runtime
    runtime.shutdown()
    other = RolloutRuntime()
    await other.context_async(args)
    assert len(calls) == 2  # each runtime freezes at its own first episode
    other.shutdown()
    off = RolloutRuntime()
    await off.context_async(make_args(args.rollout_engine, gc_freeze_after_load=False))
    assert len(calls) == 2
    off.shutdown()


def _load_function(path: str):
    """How slime's load_function resolves --custom-rm-path: import up to the last dot."""
    import importlib

    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


async def test_reward_entry_points_pass_slimes_plugin_contract():
    """slime's tests/plugin_contracts checks ``tuple(signature.parameters)[:2]``: ("args", "sample")
    for --custom-rm-path, ("args", "samples") with --group-rm; slime then calls them positionally
    (async_rm: ``fn(args, sample)``, batched_async_rm: ``fn(args, samples)``)."""
    import inspect

    from rollout.sample import Sample

    done = Sample(status=Sample.Status.COMPLETED, metadata={"outcome": {"score": 1.0}})
    failed = Sample(status=Sample.Status.FAILED, metadata={"outcome": {"score": 1.0}})
    args = argparse.Namespace(custom_rm_path="rollout.reward", group_rm=False)

    single = _load_function("rollout.reward")
    assert tuple(inspect.signature(single).parameters)[:2] == ("args", "sample")
    assert await single(args, done) == 1.0 and await single(args, failed) == 0.0

    group = _load_function("rollout.group_reward")
    assert inspect.iscoroutinefunction(group)
    assert tuple(inspect.signature(group).parameters)[:2] == ("args", "samples")
    assert await group(args, [done, failed, done]) == [1.0, 0.0, 1.0]
