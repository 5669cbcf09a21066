"""Fixtures for the trainer tests: a tiny prompt file and a plugin config for the learnable env."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from PIL import Image

LEARNABLE_ENV = Path(__file__).with_name("learnable_env.py")
TARGET = "q"  # a tiny random small-vocab model writes it within 12 tokens in roughly 1 of 4 episodes


@dataclass(frozen=True)
class _Record:
    problem: str
    answer: str
    images: list


@pytest.fixture(scope="session")
def learnable_task(tmp_path_factory) -> dict:
    """Four one-image prompts and a plugin YAML that grades "did the model write TARGET"."""
    from envs.geo3k.dataset import write_geo3k_parquet

    root = tmp_path_factory.mktemp("learnable")
    records = [
        _Record(
            f"Problem {i}: write something. <image>", "1", [Image.new("RGB", (56, 56), (60 * i, 90, 160))]
        )
        for i in range(4)
    ]
    data = write_geo3k_parquet(records, root, split_name="train")
    plugin = root / "plugin.yaml"
    plugin.write_text(
        yaml.safe_dump(
            {
                "max_turns": 1,
                "rollout_interaction_env_path": str(LEARNABLE_ENV),
                "env_kwargs": {"target": TARGET},
            }
        )
    )
    # The target is also a stop string: a turn ends when the model writes it, and the env then pays 1.
    return {"prompt_data": str(data), "custom_config_path": str(plugin), "rollout_stop": [TARGET]}
