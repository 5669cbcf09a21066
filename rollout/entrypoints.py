"""slime's entry points: ``--custom-generate-function-path rollout.generate`` and
``--custom-rm-path rollout.reward`` (``rollout.group_reward`` with ``--group-rm``). Importing them
never imports slime."""

from __future__ import annotations

from typing import Any

from rollout.episode import run_episode
from rollout.runtime import RolloutRuntime, default_runtime


async def generate(
    args: Any,
    sample: Any,
    sampling_params: dict[str, Any],
    evaluation: bool = False,
    *,
    runtime: RolloutRuntime | None = None,
) -> Any:
    """Run one multi-turn episode for ``sample`` and return the same sample, filled in.

    slime passes each of the n copies of a prompt its own ``sampling_params``, but in evaluation
    one dict is shared, so it is copied before anything changes it. slime passes no ``runtime``
    (its processes use :func:`rollout.runtime.default_runtime`); the local trainer, evaluation and
    tests pass their own.
    """
    ctx = await (default_runtime() if runtime is None else runtime).context_async(args)
    return await run_episode(ctx, args, sample, dict(sampling_params))


def reward_of(sample: Any) -> float:
    """The env's outcome score; 0.0 for samples our side failed or the engine aborted."""
    if getattr(sample, "reward", None) is not None:
        return sample.reward
    status = getattr(getattr(sample, "status", None), "name", None)
    if status in ("FAILED", "ABORTED"):
        return 0.0
    outcome = (getattr(sample, "metadata", None) or {}).get("outcome") or {}
    return float(outcome.get("score", 0.0))


async def reward(args: Any, sample: Any = None, samples: list[Any] | None = None, **_: Any) -> float | list[float]:
    """slime's ``--custom-rm-path rollout.reward``: ``reward(args, sample)`` -> a number.

    A list (positionally or as ``samples=``) gives a list. With ``--group-rm`` use
    :func:`group_reward` instead: slime's plugin contract wants the batched function's second
    parameter named ``samples``, the single one's ``sample``."""
    if samples is None and isinstance(sample, (list, tuple)):
        samples = sample  # batched mode called positionally
    if samples is not None:
        return [reward_of(s) for s in samples]
    if sample is None:
        raise TypeError("reward() needs `sample` or `samples`")
    return reward_of(sample)


async def group_reward(args: Any, samples: list[Any], **_: Any) -> list[float]:
    """slime's ``--custom-rm-path rollout.group_reward --group-rm``: ``(args, samples)`` -> one
    reward per sample, in order."""
    return [reward_of(s) for s in samples]
