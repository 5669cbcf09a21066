"""Interaction environments for multi-turn tool-calling RL.

This package owns the environment contract (``envs.base``), tool-call parsing shared by every env
(``envs.tool_calls``), answer grading in worker processes (``envs.grading``), the Geometry3K
environment (``envs.geo3k``), loading env modules by name or file (``envs.loader``) and the checker
for env authors (``python -m envs.check``).

Importing this package is cheap on purpose: submodules are imported by their users, so that a
rollout worker that only needs the protocol does not pay for grading or for an env it never builds.
"""
