"""Geometry3K with a ``zoom`` tool: the model may look closer at part of the diagram (an image
observation) before it calls ``calc_score`` (``build_env`` is the env-module entry point)."""

from envs.geo3k_zoom.env import TOOLS, ZOOM_SCHEMA, Geo3kZoomEnv, build_env

__all__ = ["TOOLS", "ZOOM_SCHEMA", "Geo3kZoomEnv", "build_env"]
