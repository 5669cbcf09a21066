"""The plugin's settings: one validated object read from slime's ``args`` or from the YAML file.

slime merges each top-level key of ``--custom-config-path`` into ``args`` with ``setattr`` and no
schema, so a typo silently becomes a new attribute and a missing key raises AttributeError. We read
the YAML ourselves when its path is known (every key validated, unknown keys rejected with the
nearest valid name) and otherwise take the known keys from ``args`` with defaults.

Image tokens are not a setting: every request carries one ``<|image_pad|>`` per image and the
engine expands it with its own processor, while the training sequence holds the expanded run.
Sending the expanded run instead (the former ``image_token_mode: expanded``) fails on SGLang 0.5.23
(Qwen2.5-VL: the request never returns; Qwen3-VL: HTTP 500), and slime's patched SGLang collapses
such runs anyway (slime issues #1847, #2388). Whether the engine expanded each image to our pad
count is checked at every turn against ``meta_info.prompt_tokens`` (see rollout.episode).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from envs.base import did_you_mean

# Settings that no longer exist, with why: a YAML that still sets one fails with this, not with a
# generic unknown-key error that would suggest a near name.
REMOVED_SETTINGS = {
    "image_token_mode": (
        "requests always carry one <|image_pad|> per image, expanded by the engine (the training "
        "sequence keeps the expanded run); sending the expanded run fails on SGLang 0.5.23 (Qwen2.5-VL: "
        "the request never returns; Qwen3-VL: HTTP 500) and slime's patched SGLang collapses it anyway. "
        "Delete the key"
    ),
    "gc_pacing": (
        "the timed garbage collections shortened event-loop stalls but not the rollout's wall time "
        "(bench/RESULTS.md); the collector runs on its own rules. Delete the key"
    ),
}


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RolloutConfig:
    max_turns: int = 3
    rollout_interaction_env_path: str = "envs.geo3k"
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tokens_per_turn: int | None = None
    tools_in_prompt: bool = False
    request_timeout_s: float = 600.0
    request_max_retries: int = 3
    request_retry_backoff_s: float = 1.0
    env_step_threads: int = 64
    gc_freeze_after_load: bool = True

    def __post_init__(self) -> None:
        _check_type("max_turns", self.max_turns, int)
        if self.max_turns < 1:
            raise ConfigError(f"max_turns must be >= 1, got {self.max_turns}")
        _check_type("rollout_interaction_env_path", self.rollout_interaction_env_path, str)
        if not self.rollout_interaction_env_path.strip():
            raise ConfigError("rollout_interaction_env_path must name an env module or .py file, got ''")
        _check_type("env_kwargs", self.env_kwargs, dict)
        if self.max_tokens_per_turn is not None:
            _check_type("max_tokens_per_turn", self.max_tokens_per_turn, int)
            if self.max_tokens_per_turn < 1:
                raise ConfigError(f"max_tokens_per_turn must be >= 1 or null, got {self.max_tokens_per_turn}")
        _check_type("tools_in_prompt", self.tools_in_prompt, bool)
        _check_type("request_timeout_s", self.request_timeout_s, (int, float))
        if self.request_timeout_s <= 0:
            raise ConfigError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        _check_type("request_max_retries", self.request_max_retries, int)
        if self.request_max_retries < 0:
            raise ConfigError(f"request_max_retries must be >= 0, got {self.request_max_retries}")
        _check_type("request_retry_backoff_s", self.request_retry_backoff_s, (int, float))
        if self.request_retry_backoff_s < 0:
            raise ConfigError(f"request_retry_backoff_s must be >= 0, got {self.request_retry_backoff_s}")
        _check_type("gc_freeze_after_load", self.gc_freeze_after_load, bool)
        _check_type("env_step_threads", self.env_step_threads, int)
        if self.env_step_threads < 1:
            raise ConfigError(f"env_step_threads must be >= 1, got {self.env_step_threads}")

    @classmethod
    def setting_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: dict[str, Any], *, source: str = "config") -> RolloutConfig:
        """Build from a mapping of plugin keys; an unknown key is an error naming the nearest one."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of settings, got {type(values).__name__}")
        known = cls.setting_names()
        for key in values:
            if key in REMOVED_SETTINGS:
                raise ConfigError(_removed(source, key))
            if key not in known:
                raise ConfigError(
                    f"{source}: unknown plugin setting {key!r}.{did_you_mean(str(key), known)} "
                    f"Valid settings: {', '.join(known)}"
                )
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> RolloutConfig:
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"plugin config {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"plugin config {path} is not valid YAML: {exc}") from exc
        return cls.from_mapping(_env_file_beside(values, path), source=str(path))

    @classmethod
    def from_args(cls, args: Any) -> RolloutConfig:
        """From slime's args: the YAML at ``args.custom_config_path`` when there is one (validated
        in full), otherwise the known keys set on ``args`` (missing keys take defaults)."""
        path = getattr(args, "custom_config_path", None)
        if path:
            return _cached_yaml(str(path))
        for key in REMOVED_SETTINGS:
            if getattr(args, key, None) is not None:
                raise ConfigError(_removed("args", key))
        values = {key: getattr(args, key) for key in _SETTING_NAMES if getattr(args, key, None) is not None}
        # generate runs once per episode, hundreds at once, on the event loop: validate once per
        # args object, and again whenever one of its settings is no longer the very same object.
        cached = _ARGS_CACHE.get(id(args))
        if cached is not None and cached[0].keys() == values.keys() and all(
            values[key] is cached[0][key] for key in values
        ):
            return cached[1]
        config = cls.from_mapping(values, source="args")
        if len(_ARGS_CACHE) >= 64:
            _ARGS_CACHE.clear()
        _ARGS_CACHE[id(args)] = (values, config)
        return config


def _removed(source: str, key: str) -> str:
    return f"{source}: the plugin setting {key!r} was removed: {REMOVED_SETTINGS[key]}."


def _env_file_beside(values: Any, path: Path) -> Any:
    """A relative env file path in a YAML names the file next to the YAML when there is one, so a
    config and its env can move together and run from any working directory. Dotted module names
    (no ``/``, no ``.py``) are left to the import system."""
    env = values.get("rollout_interaction_env_path") if isinstance(values, dict) else None
    if not isinstance(env, str) or not (env.strip().endswith(".py") or "/" in env or "\\" in env):
        return values
    relative = Path(env.strip())
    if relative.is_absolute() or env.strip().startswith("~"):
        return values
    beside = path.parent / relative
    if not beside.is_file():
        return values
    return {**values, "rollout_interaction_env_path": str(beside.resolve())}


def _check_type(key: str, value: Any, expected: type | tuple[type, ...]) -> None:
    allowed = expected if isinstance(expected, tuple) else (expected,)
    # bool is an int subclass: `max_turns: true` must not pass as 1.
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join(t.__name__ for t in allowed)
        raise ConfigError(f"{key} must be {names}, got {type(value).__name__} {value!r}")


_SETTING_NAMES = RolloutConfig.setting_names()
_ARGS_CACHE: dict[int, tuple[dict[str, Any], RolloutConfig]] = {}
_YAML_CACHE: dict[tuple[str, float], RolloutConfig] = {}


def _cached_yaml(path: str) -> RolloutConfig:
    """Parse each YAML file once per modification time: generate runs once per episode."""
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        raise ConfigError(f"plugin config {path} (custom_config_path) does not exist") from None
    key = (path, mtime)
    if key not in _YAML_CACHE:
        _YAML_CACHE[key] = RolloutConfig.from_yaml(path)
    return _YAML_CACHE[key]
