"""Running one rollout on the local backend: prompts -> n episodes each -> rewards.

The episodes are the plugin's own (``rollout.generate`` and ``rollout.reward``, exactly what slime
calls), run concurrently with ``asyncio.gather`` against an in-process engine that generates with
the model being trained, on a RolloutRuntime the run builds and passes (not the process-wide one
slime's entry points use). ``args`` is built like slime's: the plugin YAML's top-level keys are set
on a namespace with ``setattr`` (slime's merge), and the engine is handed over as
``args.rollout_engine``.

Sampling is a pure function of the run's seed: each episode gets a seed derived from
``(seed, rollout_id, sample position)`` and each of its turns one derived from that and the
turn's prompt length (which grows every turn). The tokens an episode samples therefore do not
depend on thread timing or on which episodes share an engine batch, so a resumed run samples
what the uninterrupted run would have.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

from rollout.runtime import RolloutRuntime
from rollout.seeds import derive_seed
from trainer.config import TrainConfig, plugin_config
from trainer.data import Prompt


def local_engine(policy, cfg: TrainConfig):
    """The in-process engine with the run's engine settings."""
    from rollout.engines.local import LocalEngine

    return LocalEngine(
        policy,
        max_batch_size=cfg.engine_max_batch_size,
        batch_wait_ms=cfg.engine_batch_wait_ms,
        decode=cfg.engine_decode,
        max_seq_len=cfg.engine_max_seq_len,
        seed=cfg.seed,
    )


def plugin_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The plugin YAML's settings with the trainer's overrides (max_turns, max_tokens_per_turn,
    env_kwargs), validated as every entry point validates them (trainer.config.plugin_config)."""
    config = plugin_config(cfg)
    return {name: getattr(config, name) for name in config.setting_names()}


def rollout_args(cfg: TrainConfig, engine: Any, hf_checkpoint: str) -> types.SimpleNamespace:
    """slime-like args for ``rollout.generate``: slime's fields the plugin reads, plus the plugin keys."""
    args = types.SimpleNamespace(
        rollout_engine=engine,
        hf_checkpoint=hf_checkpoint,
        rollout_max_response_len=cfg.rollout_max_response_len,
        rollout_max_context_len=None,
        rollout_temperature=cfg.rollout_temperature,
        n_samples_per_prompt=cfg.n_samples_per_prompt,
        apply_chat_template=True,
        apply_chat_template_kwargs={},
        partial_rollout=False,
    )
    # slime merges the YAML into args key by key; the plugin validates the values it reads.
    for key, value in plugin_settings(cfg).items():
        setattr(args, key, value)
    return args


def sampling_params(cfg: TrainConfig, seed: int) -> dict[str, Any]:
    """slime's sampling params for a rollout (SGLang names), plus the episode's seed."""
    params: dict[str, Any] = {
        "temperature": cfg.rollout_temperature,
        "top_p": cfg.rollout_top_p,
        "top_k": cfg.rollout_top_k,
        "max_new_tokens": cfg.rollout_max_response_len,
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
        "sampling_seed": seed,
    }
    if cfg.rollout_stop:
        params["stop"] = list(cfg.rollout_stop)
    if cfg.rollout_stop_token_ids:
        params["stop_token_ids"] = list(cfg.rollout_stop_token_ids)
    return params


def build_group_samples(prompts: list[Prompt], cfg: TrainConfig, tokenizer, rollout_id: int) -> list[Any]:
    """``n_samples_per_prompt`` fresh samples per prompt, prompt-major (a group's samples adjacent);
    prompts built from messages by the env module, with its TOOLS when ``tools_in_prompt`` is on."""
    from rollout.prompts import build_sample, prompt_context

    env_module, tools = prompt_context(types.SimpleNamespace(**plugin_settings(cfg)))
    samples = []
    for g, prompt in enumerate(prompts):
        group_index = rollout_id * cfg.rollout_batch_size + g
        for j in range(cfg.n_samples_per_prompt):
            samples.append(
                build_sample(
                    prompt.problem,
                    prompt.images,
                    prompt.label,
                    tokenizer,
                    index=group_index * cfg.n_samples_per_prompt + j,
                    group_index=group_index,
                    tools=tools,
                    env_module=env_module,
                )
            )
    return samples


async def run_rollout(
    args: Any, samples: list[Any], cfg: TrainConfig, rollout_id: int, runtime: RolloutRuntime
) -> list[Any]:
    """Run every episode concurrently on the run's own ``runtime`` (one per training run: its
    threads and caches outlive the step's event loop), then score them; returns ``samples`` with
    rewards set."""
    import rollout

    await asyncio.gather(
        *(
            rollout.generate(
                args,
                sample,
                sampling_params(cfg, derive_seed(cfg.seed, rollout_id, position)),
                runtime=runtime,
            )
            for position, sample in enumerate(samples)
        )
    )
    rewards = await rollout.reward(args, samples=samples)
    for sample, value in zip(samples, rewards, strict=True):
        sample.reward = float(value)
    return samples
