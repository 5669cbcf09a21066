"""Geometry3K with a ``zoom`` tool: the model may look closer at part of the diagram (an image
observation) before it calls ``calc_score`` (``build_env`` is the env-module entry point; its prompt
data is Geometry3K's, so ``DATASET`` is geo3k's format: labels must be numbers)."""

from envs.geo3k import DATASET
from envs.geo3k_zoom.env import TOOLS, ZOOM_SCHEMA, Geo3kZoomEnv, build_env

__all__ = ["DATASET", "TOOLS", "ZOOM_SCHEMA", "Geo3kZoomEnv", "build_env"]
