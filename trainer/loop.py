"""Single-machine GRPO for multi-turn, tool-calling vision-language episodes.

Before the model loads, the plugin YAML, the env module and every row of the prompt file are
checked, so that a typo or a bad row fails in seconds with every problem named.

The algorithm, per rollout step ``k = 0 .. num_rollout - 1``:

1. Take ``rollout_batch_size`` prompts (a seeded walk over the parquet rows) and build
   ``n_samples_per_prompt`` samples of each: the GRPO group.
2. Run all episodes concurrently (``asyncio.gather`` over ``rollout.generate``, the same function
   slime calls) against the in-process ``LocalEngine``, which generates with the very module being
   trained, so no weight transfer is needed. An episode alternates model turns and env
   observations; env tokens are part of the sequence with loss mask 0.
3. Rewards are the env's outcome score (``rollout.reward``).
4. Advantages: per group, ``(r - mean) / (std + 1e-6)`` with the unbiased std; every model token
   of a sample gets its sample's advantage.
5. Update: clipped surrogate ``max(-A r, -A clip(r, 1 - eps_clip, 1 + eps_clip_high))`` with
   ``r = exp(logp - logp_old)``, a mean over each sample's model tokens, then over samples;
   optionally ``- entropy_coef * entropy`` and ``+ kl_loss_coef * KL(policy || reference)``.
   AdamW, gradients accumulated over micro-batches and clipped to ``clip_grad``.
6. Bump the engine's weight version, log metrics, record sample episodes, checkpoint.

Failed episodes are named on the console each step (how many, the most common causes); when every
episode of the first step failed for one cause (an env that cannot be built, a ``step`` that always
raises), the run stops with that cause instead of training on rewards of 0.

Where this departs from GRPO as published (DeepSeekMath, Shao et al. 2024), following slime's
defaults and the geo3k recipe so that both backends optimize the same thing:

- **No KL term by default** (``use_kl_loss=False``); when enabled it is a loss term with the
  k3 (``low_var_kl``) estimator against a frozen copy of the initial policy, as in the paper.
- **Asymmetric clipping**: ``eps_clip_high`` (0.28) > ``eps_clip`` (0.2), DAPO's "clip-higher",
  which leaves more room to raise the probability of unlikely tokens.
- **One optimizer step per rollout by default** (``global_batch_size`` = the whole rollout). The
  policy being updated is then the one that sampled, so the ratio starts at 1 (up to the
  train/rollout mismatch, which is logged) and clipping rarely engages: the step is a plain policy
  gradient with group-normalized advantages. Set ``global_batch_size`` smaller for the paper's
  several updates per batch.
- **Old log-probs come from the engine** (slime's ``--use-rollout-logprobs``); slime's default
  recomputes them with the trainer, which ``use_rollout_logprobs=False`` does here.
- **Aggregation** is the paper's (a token mean per sample, then a mean over samples), not DAPO's
  token-level mean over the batch; samples removed by the rollout (``remove_sample``, e.g. an
  engine failure) contribute zero loss but still count in the mean over samples, as in slime.
- **Multi-turn**: the reward is the episode's outcome and only the model's own tokens are trained.

The module reads top to bottom: setup, then the step loop, then the end-of-run report.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from envs.dataset import DatasetError
from envs.loader import load_env_module
from rollout.seeds import TurnSeededEngine
from trainer.batch import to_train_sample
from trainer.checkpoint import (
    describe_size,
    load_optimizer_state,
    load_trainer_state,
    resolve_resume,
    resolve_save_optimizer,
    restore_rng_state,
    save_checkpoint,
)
from trainer.config import ConfigError, TrainConfig, plugin_config
from trainer.data import PromptSource, prompt_dataset
from trainer.grpo import group_advantages
from trainer.metrics import (
    MetricsLogger,
    failure_causes,
    format_failures,
    peak_memory_metrics,
    read_metrics,
    reset_peak_memory,
    rollout_metrics,
)
from trainer.optim import MasterWeightAdamW
from trainer.report import append_episodes, episode_record, write_report
from trainer.rollouts import (
    RolloutRuntime,
    build_group_samples,
    local_engine,
    rollout_args,
    run_rollout,
)
from trainer.update import policy_update, prepare_for_training


@dataclass
class TrainResult:
    run_dir: Path
    metrics: list[dict[str, Any]]
    last_checkpoint: Path | None
    report: Path | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def limit_gpu_memory(limit_gib: float | None, device: str) -> str | None:
    """Cap this process's CUDA memory at ``limit_gib`` (``gpu_memory_limit_gib``); a line for the log."""
    if limit_gib is None:
        return None
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"gpu_memory_limit_gib={limit_gib} caps CUDA memory, but the run is on {device}")
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    card = torch.cuda.get_device_properties(index)
    if limit_gib * 2**30 > card.total_memory:
        raise ConfigError(
            f"gpu_memory_limit_gib={limit_gib} is more than the {card.total_memory / 2**30:.1f} GiB of "
            f"{card.name}; lower it or unset it"
        )
    torch.cuda.set_per_process_memory_fraction(limit_gib * 2**30 / card.total_memory, index)
    return f"CUDA memory capped at {limit_gib} GiB of the {card.total_memory / 2**30:.1f} GiB of {card.name}"


def _advantages(rewards: list[float], cfg: TrainConfig) -> torch.Tensor:
    if not cfg.rewards_normalization:
        return torch.tensor(rewards, dtype=torch.float32)
    return group_advantages(
        rewards,
        cfg.n_samples_per_prompt,
        cfg.rollout_batch_size,
        std_normalization=cfg.grpo_std_normalization,
    )


def _record_episodes(
    run_dir: Path, samples, advantages, tokenizer, step: int, cfg: TrainConfig, image_pad_id
) -> None:
    """Keep the first group of the step (all its samples) for the report."""
    chosen = range(min(cfg.n_samples_per_prompt, len(samples)))
    records = [
        episode_record(
            samples[i], tokenizer, step=step, advantage=float(advantages[i]), image_pad_id=image_pad_id
        )
        for i in chosen
    ]
    append_episodes(run_dir, records)


def train(
    cfg: TrainConfig,
    *,
    resume: str | Path | None = None,
    log=print,
) -> TrainResult:
    """Train ``cfg.hf_checkpoint`` on ``cfg.prompt_data``; ``resume`` is a checkpoint or run dir, or "latest"."""
    from models import load_policy

    run_dir = cfg.resolved_output_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    capped = limit_gpu_memory(cfg.gpu_memory_limit_gib, device)  # before anything is allocated
    if capped:
        log(capped)

    # --- checks that need no model, so that a typo or a bad row fails in seconds, not after loading ---
    load_env_module(plugin_config(cfg).rollout_interaction_env_path)
    prompts = _open_prompts(cfg, run_dir, log)

    # --- setup: model (from the checkpoint when resuming), optimizer, engine, data ---
    start_step = 0
    checkpoint = resolve_resume(resume, run_dir) if resume else None
    seed_everything(cfg.seed)
    policy = load_policy(checkpoint or cfg.hf_checkpoint, device=device)  # bf16 on GPU, fp32 on CPU
    # Before the optimizer, which takes the parameters that are still trainable.
    checkpointing = prepare_for_training(policy.model, cfg)
    save_optimizer = resolve_save_optimizer(cfg.save_optimizer, policy.model)
    if checkpoint is None and cfg.sft_steps:
        # The supervised warm-start belongs to the run's start (a resumed run has it in its
        # weights), and comes before GRPO's optimizer copies the weights into its master copies.
        from trainer.sft import run_sft

        run_sft(policy, cfg, run_dir, prompts=prompts, write=log)
    optimizer = MasterWeightAdamW(policy.model, cfg)
    if checkpoint is not None:
        state = load_trainer_state(checkpoint)
        start_step = int(state["step"])
        if not load_optimizer_state(checkpoint, optimizer):
            log(
                f"warning: {checkpoint} holds no optimizer state (save_optimizer); AdamW's moments start "
                "from zero and the fp32 master weights from the checkpoint's weights, so the run does not "
                "continue exactly as it would have"
            )
        restore_rng_state(checkpoint)
        log(f"resumed from {checkpoint} at step {start_step}")
    # The reference for the KL term is the initial policy; on resume it is the run's original
    # checkpoint, recorded in the trainer state, not the checkpoint being resumed from.
    ref_model = None
    if cfg.use_kl_loss:
        ref_source = load_trainer_state(checkpoint)["initial_checkpoint"] if checkpoint else None
        ref_model = (
            load_policy(ref_source, device=device).model if ref_source else copy.deepcopy(policy.model)
        )
        ref_model.requires_grad_(False).eval()
    engine = local_engine(policy, cfg)
    engine.weight_version = start_step
    args = rollout_args(cfg, TurnSeededEngine(engine), str(policy.path))
    runtime = RolloutRuntime()  # the run's env threads and image cache, across steps
    pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    image_pad_id = getattr(policy.model.config, "image_token_id", None)
    initial_checkpoint = (
        str(cfg.hf_checkpoint) if checkpoint is None else load_trainer_state(checkpoint)["initial_checkpoint"]
    )
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    logger = MetricsLogger(
        run_dir,
        total_steps=cfg.num_rollout,
        start_step=start_step,
        progress=cfg.progress,
        use_tensorboard=cfg.use_tensorboard,
        use_wandb=cfg.use_wandb,
        wandb_project=cfg.wandb_project,
        wandb_group=cfg.wandb_group,
        config=cfg.to_dict(),
    )
    logger.write(
        f"GRPO: {cfg.hf_checkpoint} on {device}, {len(prompts)} prompts, {cfg.num_rollout} steps of "
        f"{cfg.rollout_batch_size} prompts x {cfg.n_samples_per_prompt} episodes -> {run_dir}"
        f"{' (activation checkpointing)' if checkpointing else ''}"
    )

    # --- the loop ---
    last_checkpoint = checkpoint
    try:
        for step in range(start_step, cfg.num_rollout):
            started = time.perf_counter()
            reset_peak_memory(device)
            batch = prompts.batch(step, cfg.rollout_batch_size)
            samples = build_group_samples(batch, cfg, policy.tokenizer, step)
            asyncio.run(run_rollout(args, samples, cfg, step, runtime))
            rollout_time = time.perf_counter() - started
            memory = peak_memory_metrics(device, "rollout")
            engine.release_memory()  # the update is the step's peak: it gets the KV cache's memory
            reset_peak_memory(device)
            _report_failures(samples, step, first=step == start_step, write=logger.write)

            rewards = [float(s.reward) for s in samples]
            advantages = _advantages(rewards, cfg)
            items = [
                to_train_sample(s, i, float(a), policy.model.config)
                for i, (s, a) in enumerate(zip(samples, advantages, strict=True))
            ]

            update_started = time.perf_counter()
            stats = policy_update(
                policy.model, optimizer, items, cfg, pad_token_id=pad_id, ref_model=ref_model
            )
            engine.weight_version = step + 1
            update_time = time.perf_counter() - update_started
            memory.update(peak_memory_metrics(device, "update"))

            metrics = rollout_metrics(samples)
            metrics.update(
                {
                    "train/loss": stats.loss,
                    "train/pg_loss": stats.pg_loss,
                    "train/pg_clipfrac": stats.pg_clipfrac,
                    "train/ppo_kl": stats.ppo_kl,
                    "train/entropy": stats.entropy,
                    "train/kl_loss": stats.kl_loss,
                    "train/grad_norm": stats.grad_norm,
                    "train/lr": optimizer.lr,
                    "train/trained_tokens": float(stats.trained_tokens),
                    "train/logprob_abs_diff_mean": stats.logprob_abs_diff_mean,
                    "train/logprob_abs_diff_max": stats.logprob_abs_diff_max,
                    "train/advantage_abs_mean": float(advantages.abs().mean()),
                    "train/excluded_samples": float(sum(item.excluded is not None for item in items)),
                    "perf/rollout_time_s": rollout_time,
                    "perf/update_time_s": update_time,
                    "perf/step_time_s": time.perf_counter() - started,
                    "perf/rollout_tokens_per_s": sum(s.response_length for s in samples)
                    / max(rollout_time, 1e-9),
                }
            )
            metrics.update(memory)
            logger.log(step, metrics)
            _record_episodes(run_dir, samples, advantages, policy.tokenizer, step, cfg, image_pad_id)

            done = step + 1
            if done == cfg.num_rollout or (cfg.save_interval and done % cfg.save_interval == 0):
                last_checkpoint = save_checkpoint(
                    run_dir,
                    done,
                    policy,
                    optimizer,
                    {
                        "config": cfg.to_dict(),
                        "initial_checkpoint": initial_checkpoint,
                        "metrics": _finite(metrics),
                    },
                    keep=cfg.keep_checkpoints,
                    save_optimizer=save_optimizer,
                )
                logger.write(f"step {done}: saved {last_checkpoint} ({describe_size(last_checkpoint)})")
    finally:
        runtime.shutdown()
        logger.close()

    report = write_report(
        run_dir,
        title=f"GRPO on {Path(cfg.prompt_data).name}",
        limit=cfg.report_episodes,
        config=cfg.to_dict(),
    )
    log(f"report: {report}")
    return TrainResult(
        run_dir=run_dir,
        metrics=read_metrics(run_dir / "metrics.jsonl"),
        last_checkpoint=last_checkpoint,
        report=report,
    )


class RolloutFailedError(RuntimeError):
    """Every episode of the run's first step failed for one cause: more steps would fail the same way."""


def _open_prompts(cfg: TrainConfig, run_dir: Path, log) -> PromptSource:
    """The prompt rows, every one validated; the full list of bad rows goes to ``bad_rows.txt``."""
    try:
        prompts = PromptSource(
            cfg.prompt_data,
            seed=cfg.seed,
            shuffle=cfg.rollout_shuffle,
            drop_bad_rows=cfg.drop_bad_rows,
            dataset=prompt_dataset(cfg),
        )
    except DatasetError as error:
        if not error.problems:
            raise
        listing = _write_bad_rows(run_dir, error.problems)
        raise DatasetError(f"{error}\nEvery problem found: {listing}", error.problems) from None
    if prompts.dropped:
        listing = _write_bad_rows(run_dir, prompts.problems)
        log(
            f"dropped {len(prompts.dropped)} bad row(s) of {cfg.prompt_data} (drop_bad_rows); "
            f"training on the other {len(prompts)}; why each was dropped: {listing}"
        )
    return prompts


def _write_bad_rows(run_dir: Path, problems) -> Path:
    path = run_dir / "bad_rows.txt"
    path.write_text("".join(f"{problem}\n" for problem in problems))
    return path


#: Failures of the policy's own making: a random policy can fail a whole small step this way and
#: learn not to, while a broken env or setup fails every later step too.
_POLICY_CAUSES = ("the model generated",)


def _report_failures(samples, step: int, *, first: bool, write) -> None:
    """Failed episodes on the console, with their most common causes (episodes.jsonl has them all).
    A first step whose episodes all failed, the env's part of them (at least half) for one cause,
    stops the run: an env that cannot be built or whose step always raises would otherwise train on
    reward 0 and exit as if all went well. Episodes the policy ended first (it generated ids the
    rollout refuses) never reached the env, so they neither count for nor against it."""
    causes = failure_causes(samples)
    if not causes:
        return
    write(f"step {step}: {format_failures(causes, len(samples))}")
    env_causes = [
        (cause, count) for cause, count in causes.most_common() if not cause.startswith(_POLICY_CAUSES)
    ]
    if not first or sum(causes.values()) != len(samples) or len(env_causes) != 1:
        return
    cause, count = env_causes[0]
    if 2 * count >= len(samples):
        policy_ended = len(samples) - count
        note = f" ({policy_ended} ended earlier on ids the policy generated)" if policy_ended else ""
        raise RolloutFailedError(
            f"every episode of the first step failed with the same cause, so the run stops: {cause}{note}"
        )


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {
        k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v and abs(v) != float("inf")
    }


def default_run_dir(prefix: str = "runs/geo3k") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
