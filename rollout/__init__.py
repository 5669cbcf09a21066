"""Multi-turn rollouts: slime's ``generate`` / ``reward`` entry points, engines and the episode loop.

``rollout.generate`` and ``rollout.reward`` are what slime's ``--custom-generate-function-path``
and ``--custom-rm-path`` name (``rollout.group_reward`` with ``--group-rm``). They are imported lazily so that ``import rollout`` stays cheap and
never imports slime.
"""

from __future__ import annotations

from typing import Any

__all__ = ["generate", "group_reward", "reward"]


async def generate(
    args: Any, sample: Any, sampling_params: dict[str, Any], evaluation: bool = False, *, runtime: Any = None
) -> Any:
    from rollout.entrypoints import generate as _generate

    return await _generate(args, sample, sampling_params, evaluation=evaluation, runtime=runtime)


async def reward(args: Any, sample: Any = None, samples: list[Any] | None = None, **kwargs: Any):
    from rollout.entrypoints import reward as _reward

    return await _reward(args, sample, samples=samples, **kwargs)


async def group_reward(args: Any, samples: list[Any], **kwargs: Any) -> list[float]:
    from rollout.entrypoints import group_reward as _group_reward

    return await _group_reward(args, samples, **kwargs)
