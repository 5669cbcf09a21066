"""Geometry3K: the ``calc_score`` tool environment (``build_env`` is the env-module entry point)."""

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
    "TOOL_ALIASES",
    "TOOL_NAME",
    "TOOL_SCHEMA",
    "TOOLS",
    "Geo3kEnv",
    "Geo3kOutcome",
    "Geo3kSettings",
    "build_env",
]
