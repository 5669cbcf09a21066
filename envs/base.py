"""The interaction-environment contract, and helpers every env and its callers share.

An environment turns the model's text into feedback, one turn at a time::

    env = module.build_env(sample=sample, args=args)      # one env per episode
    obs, info = env.reset()
    obs, done, info = env.step(response_text)             # `step` may be `async def`
    message = env.format_observation(obs)                 # a chat message for the next turn
    env.close()

The rest of the project relies on these method names and return shapes only (duck typing), so
envs written for slime's geo3k example, which do not subclass anything of ours, work unchanged.
Subclassing :class:`BaseInteractionEnv` is a convenience: it provides ``format_observation`` and
``close``; tool-calling envs subclass :class:`envs.tool_env.ToolEnv`.

Observations are dicts in slime's shape: ``{"obs_str": text, "role": "tool"}``, optionally with
``"multi_modal_data": {"image": [image, ...]}`` (PIL images, file paths or data URIs).

Besides the methods, the rollout reads ``env.outcome`` (``score`` is the reward;
``grader_unavailable`` fails the episode), the step-info keys ``tool_executed``, ``tool_call``,
``answer``, ``score`` and ``error``, and the env module's ``TOOLS`` and optional
``build_prompt_messages``. docs/environments.md is the full contract: when observations are
inserted, how images count against budgets, where the reward comes from; ``python -m envs.check``
checks it.

This module also owns :func:`call_step` / :func:`call_reset`, which run a sync method in a worker
thread (so a slow step never blocks the rollout's event loop) and await an async one, and
:func:`nearest_name`, the "did you mean" helper used when validating settings and module names.
"""

from __future__ import annotations

import asyncio
import difflib
import inspect
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any

__all__ = [
    "BaseInteractionEnv",
    "EnvConfigError",
    "call_off_loop",
    "call_reset",
    "call_step",
    "did_you_mean",
    "nearest_name",
    "observation_to_message",
]

Observation = dict[str, Any]
Message = dict[str, Any]


class EnvConfigError(ValueError):
    """An env setting is missing, unknown or out of range; the message names the key and the fix."""


class BaseInteractionEnv:
    """Base class for interaction environments (optional: callers only use the method names).

    Subclasses implement :meth:`reset` and :meth:`step` (sync or ``async def``). ``step`` receives
    the model's text for one turn and must never raise because of what that text contains: bad
    model output becomes feedback, not an exception.
    """

    #: Chat role of observation messages when the observation does not name one.
    role: str = "tool"

    def reset(self) -> tuple[Observation, dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} must implement reset() -> (obs, info)")

    def step(self, response_text: str) -> tuple[Observation, bool, dict[str, Any]]:
        raise NotImplementedError(f"{type(self).__name__} must implement step(text) -> (obs, done, info)")

    def format_observation(self, observation: Observation) -> Message:
        """Render an observation as a chat message (see :func:`observation_to_message`)."""
        return observation_to_message(observation, default_role=self.role)

    def close(self) -> None:
        """Release resources held by the env; the default holds none."""


def observation_to_message(observation: Observation | None, default_role: str = "tool") -> Message:
    """Render ``{"obs_str", "role", "multi_modal_data": {"image": [...]}}`` as a chat message.

    Images come first, then the text, as Qwen-VL chat templates expect:
    ``{"role": role, "content": [{"type": "image", "image": img}, ..., {"type": "text", "text": s}]}``.
    Without images the content is the plain string, which every chat template accepts.
    """
    observation = observation or {}
    role = observation.get("role") or default_role
    text = observation.get("obs_str") or ""
    if not isinstance(text, str):
        text = str(text)
    images = _observation_images(observation)
    if not images:
        return {"role": role, "content": text}
    content: list[dict[str, Any]] = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": text})
    return {"role": role, "content": content}


def _observation_images(observation: Observation) -> list[Any]:
    media = observation.get("multi_modal_data") or {}
    if not isinstance(media, dict):
        return []
    # slime's example uses "image"; "images" is accepted because it is the obvious misspelling.
    images = media.get("image")
    if images is None:
        images = media.get("images")
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


async def call_step(env: Any, response_text: str) -> tuple[Observation, bool, dict[str, Any]]:
    """Run ``env.step(response_text)`` without blocking the event loop.

    An ``async def`` step is awaited on the loop; a sync step runs in a worker thread
    (the loop's default executor), because envs may grade answers or call services for seconds.
    """
    return await call_off_loop(env.step, response_text)


async def call_reset(env: Any) -> tuple[Observation, dict[str, Any]]:
    """Run ``env.reset()`` like :func:`call_step`: awaited if async, in a thread if sync."""
    return await call_off_loop(env.reset)


async def call_off_loop(method: Any, *args: Any, executor: Executor | None = None) -> Any:
    """Await ``method(*args)`` if it is ``async def``; otherwise run it in ``executor`` (the loop's
    default executor when None), never on the event loop thread."""
    if inspect.iscoroutinefunction(method):
        return await method(*args)
    result = await asyncio.get_running_loop().run_in_executor(executor, lambda: method(*args))
    # A sync wrapper may hand back a coroutine (e.g. a decorated async method).
    if inspect.isawaitable(result):
        result = await result
    return result


def nearest_name(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``name`` (difflib ratio >= cutoff), or None."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str], cutoff: float = 0.6) -> str:
    """``" Did you mean 'x'?"`` when a candidate is close to ``name``, else ``""``."""
    match = nearest_name(name, candidates, cutoff)
    return f" Did you mean '{match}'?" if match else ""
