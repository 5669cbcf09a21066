"""Loading env modules: dotted names and files, and the errors for each way it can fail."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

import envs.geo3k
from envs.loader import EnvLoadError, build_and_check_env, load_env_module


def test_dotted_module_loads() -> None:
    assert load_env_module("envs.geo3k") is envs.geo3k


def test_file_loads_once_under_a_private_name(fixtures_dir: Path) -> None:
    path = str(fixtures_dir / "good_sync_env.py")
    module = load_env_module(path)
    assert module.__name__.startswith("_envfile_good_sync_env_")
    assert load_env_module(path) is module
    env = build_and_check_env(module)
    assert env.step("abc") == ({"obs_str": "you wrote 3 characters", "role": "tool"}, False, {"score": 0.0})


def test_typo_in_module_name_suggests_the_sibling() -> None:
    with pytest.raises(EnvLoadError) as info:
        load_env_module("envs.geo3kk")
    assert str(info.value) == (
        "env module 'envs.geo3kk' not found: package 'envs' has no module 'geo3kk'. Did you mean 'envs.geo3k'? "
        "Pass a dotted module name importable from the working directory, or a path to a .py file"
    )
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_missing_top_level_package() -> None:
    with pytest.raises(
        EnvLoadError,
        match="env module 'no_such_pkg_xyz.env' not found: no top-level module 'no_such_pkg_xyz'",
    ):
        load_env_module("no_such_pkg_xyz.env")


def test_typo_in_file_name_suggests_the_sibling(fixtures_dir: Path) -> None:
    with pytest.raises(EnvLoadError) as info:
        load_env_module(str(fixtures_dir / "good_synk_env.py"))
    assert str(info.value) == (
        f"env file '{fixtures_dir / 'good_synk_env.py'}' does not exist in {fixtures_dir}. "
        "Did you mean 'good_sync_env.py'?"
    )


def test_import_error_carries_the_original_traceback(fixtures_dir: Path) -> None:
    path = fixtures_dir / "import_error_env.py"
    with pytest.raises(EnvLoadError) as info:
        load_env_module(str(path))
    message = str(info.value)
    assert message.startswith(f"importing env file '{path}' failed with KeyError: 'max_turn'\n")
    assert "Original traceback:\nTraceback (most recent call last):" in message
    assert f'File "{path}", line 4, in <module>\n    TURNS = SETTINGS["max_turn"]' in message
    assert isinstance(info.value.__cause__, KeyError)
    # A failed file import leaves nothing half-initialized behind.
    with pytest.raises(EnvLoadError):
        load_env_module(str(path))


def test_import_error_of_a_dependency_is_not_reported_as_not_found(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "env_with_missing_dep.py").write_text("import surely_missing_dependency_abc\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(EnvLoadError) as info:
        load_env_module("env_with_missing_dep")
    assert str(info.value).startswith(
        "importing env module 'env_with_missing_dep' failed with ModuleNotFoundError: "
        "No module named 'surely_missing_dependency_abc'\n"
    )
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_module_without_build_env(fixtures_dir: Path) -> None:
    path = fixtures_dir / "no_build_env.py"
    with pytest.raises(EnvLoadError) as info:
        load_env_module(str(path))
    assert str(info.value) == (
        f"env module '{path}' has no callable build_env (build_env is missing). Did you mean "
        "'build_environment'? Fix: define `def build_env(sample=None, args=None, **kwargs)` returning an env "
        "with reset(), step(text) and format_observation(obs) (subclass envs.base.BaseInteractionEnv)"
    )


def test_build_env_returning_an_incomplete_env(fixtures_dir: Path) -> None:
    path = fixtures_dir / "missing_method_env.py"
    with pytest.raises(EnvLoadError) as info:
        build_and_check_env(str(path), None, argparse.Namespace(max_turns=3))
    assert str(info.value) == (
        f"build_env of '{path}' returned NoFormat, which has no callable format_observation. The module "
        "defines format_observation as a function; make it a method of the env. Fix: define `def build_env("
        "sample=None, args=None, **kwargs)` returning an env with reset(), step(text) and "
        "format_observation(obs) (subclass envs.base.BaseInteractionEnv)"
    )


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("", "env module path must be a dotted module name or a .py file path, got ''"),
        ("my env", "'my env' is neither a dotted module name (like envs.geo3k) nor a .py file path"),
    ],
)
def test_malformed_paths(path: str, message: str) -> None:
    with pytest.raises(EnvLoadError) as info:
        load_env_module(path)
    assert str(info.value) == message


def test_errors_are_import_errors() -> None:
    # Callers that already catch ImportError around module loading keep working.
    assert issubclass(EnvLoadError, ImportError)


def test_package_directory_asks_for_the_dotted_name() -> None:
    root = Path(__file__).resolve().parents[2]
    with pytest.raises(EnvLoadError) as info:
        load_env_module(str(root / "envs" / "geo3k"))
    assert str(info.value) == (
        f"'{root / 'envs' / 'geo3k'}' is a package directory; pass its dotted module name (e.g. envs.geo3k) "
        "or the path of a .py file"
    )


def test_a_relative_env_file_in_a_plugin_yaml_is_found_next_to_the_yaml(fixtures_dir, tmp_path, monkeypatch):
    """Every entry point reads the YAML through RolloutConfig.from_yaml (slime's generate too), so
    a config and its env file can move together and run from any working directory."""
    from rollout.config import RolloutConfig

    folder = tmp_path / "configs"
    (folder / "envs").mkdir(parents=True)
    (folder / "envs" / "my_env.py").write_text((fixtures_dir / "good_sync_env.py").read_text())
    plugin = folder / "plugin.yaml"
    plugin.write_text("rollout_interaction_env_path: envs/my_env.py\n")
    monkeypatch.chdir(tmp_path)
    path = RolloutConfig.from_yaml(plugin).rollout_interaction_env_path
    assert path == str((folder / "envs" / "my_env.py").resolve())
    assert callable(load_env_module(path).build_env)
    # A file that is not next to the YAML stays relative to the working directory; dotted names stay.
    (tmp_path / "here.py").write_text((fixtures_dir / "good_sync_env.py").read_text())
    plugin.write_text("rollout_interaction_env_path: here.py\n")
    assert RolloutConfig.from_yaml(plugin).rollout_interaction_env_path == "here.py"
    plugin.write_text("rollout_interaction_env_path: envs.geo3k\n")
    assert RolloutConfig.from_yaml(plugin).rollout_interaction_env_path == "envs.geo3k"


def test_the_zoom_plugin_config_validates_and_builds_the_zoom_env(grader) -> None:
    """configs/geo3k_zoom.yaml goes through the validation every entry point uses, has the keys of
    the calc_score recipe's YAML, and its env path and env_kwargs build a Geo3kZoomEnv."""
    import yaml
    from PIL import Image

    import envs.geo3k_zoom
    from rollout.config import RolloutConfig
    from rollout.sample import Sample
    from trainer.config import TrainConfig, plugin_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    config = RolloutConfig.from_yaml(configs / "geo3k_zoom.yaml")
    assert config.rollout_interaction_env_path == "envs.geo3k_zoom"
    assert load_env_module(config.rollout_interaction_env_path) is envs.geo3k_zoom
    assert plugin_config(TrainConfig(custom_config_path=str(configs / "geo3k_zoom.yaml"))) == config
    zoom_keys = set(yaml.safe_load((configs / "geo3k_zoom.yaml").read_text()))
    assert zoom_keys == set(yaml.safe_load((configs / "geo3k_vlm_multi_turn.yaml").read_text()))

    sample = Sample(label="5", multimodal_inputs={"images": [Image.new("RGB", (112, 112), "white")]})
    args = argparse.Namespace(max_turns=config.max_turns)
    env = build_and_check_env(envs.geo3k_zoom, sample, args, grader=grader, **config.env_kwargs)
    try:
        assert isinstance(env, envs.geo3k_zoom.Geo3kZoomEnv)
        assert (env.zoom_size, env.settings.max_turns) == (224, 4)
    finally:
        env.close()
