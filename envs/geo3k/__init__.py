"""Geometry3K: the ``calc_score`` tool environment (``build_env`` is the env-module entry point;
``DATASET`` is its prompt-data format, whose labels must be numbers)."""

from envs.geo3k.dataset import GEO3K_DATASET as DATASET
from envs.geo3k.env import (
    TOOL_ALIASES,
    TOOL_NAME,
    TOOL_SCHEMA,
    TOOLS,
    Geo3kEnv,
    Geo3kOutcome,
    Geo3kSettings,
    build_env,
)

__all__ = [
    "DATASET",
    "TOOL_ALIASES",
    "TOOL_NAME",
    "TOOL_SCHEMA",
    "TOOLS",
    "Geo3kEnv",
    "Geo3kOutcome",
    "Geo3kSettings",
    "build_env",
]
