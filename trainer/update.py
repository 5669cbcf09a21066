"""One policy update on one rollout: forward/backward per micro-batch, accumulate, clip, step.

The rollout's samples are split into ``steps_per_rollout`` optimizer steps of ``step_batch_size``
samples (one step by default). Within a step, gradients of left-padded micro-batches accumulate;
the GRPO loss is already divided by the step's sample count, so the accumulated gradient is the
gradient of the step's mean loss whatever the micro-batch size.

It also measures the train/rollout log-prob mismatch: how far the trainer's log-probs of the
sampled tokens, before any update, are from the engine's. With the local engine sharing the
weights it should be ~1e-6 in fp32; a large value means the trajectory was assembled wrongly
(wrong images, dropped ``mm_token_type_ids``, re-tokenized text) or the engine sampled from a
different distribution than it reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trainer.batch import MicroBatch, TrainSample, collate, micro_batch_log_probs, micro_batches
from trainer.config import TrainConfig
from trainer.grpo import grpo_loss
from trainer.optim import MasterWeightAdamW


@dataclass
class UpdateStats:
    loss: float = 0.0
    pg_loss: float = 0.0
    pg_clipfrac: float = 0.0
    ppo_kl: float = 0.0  # mean(old - new) over trained tokens: approx KL to the rollout policy
    entropy: float = 0.0
    kl_loss: float = 0.0
    grad_norm: float = 0.0
    optimizer_steps: int = 0
    trained_tokens: int = 0
    logprob_abs_diff_mean: float = 0.0  # |logp_train - logp_rollout| before the update, token mean
    logprob_abs_diff_max: float = 0.0


class _Mismatch:
    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0
        self.max = 0.0

    def add(self, train: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor) -> None:
        diff = (train.detach().float().cpu() - rollout).abs() * mask
        self.total += float(diff.sum())
        self.count += int(mask.sum())
        if self.count:
            self.max = max(self.max, float(diff.max()))

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


#: Above this many parameters "auto" turns activation checkpointing on (on CUDA): from there on
#: weights, gradients and optimizer state (16 bytes a parameter) leave an 80 GB card little room
#: for a long sample's activations, and recomputing them costs about a third more compute.
CHECKPOINTING_MIN_PARAMETERS = 1_000_000_000


def prepare_for_training(model, cfg: TrainConfig) -> bool:
    """Freeze the vision tower (``freeze_vision``) and turn activation checkpointing on where
    ``gradient_checkpointing`` says so; call before building the optimizer, which takes the
    trainable parameters. Returns whether checkpointing is on."""
    if cfg.freeze_vision:
        visual = getattr(getattr(model, "model", model), "visual", None)
        if visual is None:
            raise ValueError(
                f"freeze_vision: {type(model).__name__} has no vision tower at model.visual; "
                "set freeze_vision=false"
            )
        visual.requires_grad_(False)
    enable = cfg.gradient_checkpointing
    if enable == "auto":
        on_cuda = next(model.parameters()).device.type == "cuda"
        enable = on_cuda and sum(p.numel() for p in model.parameters()) > CHECKPOINTING_MIN_PARAMETERS
    if enable:
        # transformers 5.23 renamed gradient_checkpointing_enable (now a deprecated alias) to
        # activation_checkpointing_enable; older releases within the pin have only the old name.
        turn_on = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        turn_on({"use_reentrant": False})
    return bool(enable)


def _split_steps(items: list[TrainSample], cfg: TrainConfig) -> list[list[TrainSample]]:
    size = cfg.step_batch_size
    return [items[i : i + size] for i in range(0, len(items), size)]


@torch.no_grad()
def _log_probs_before_update(
    model, items: list[TrainSample], cfg: TrainConfig, pad_id: int
) -> dict[int, torch.Tensor]:
    """The trainer's log-probs for every trained sample, keyed by position (right-aligned rows)."""
    result: dict[int, torch.Tensor] = {}
    for group in micro_batches(items, cfg.micro_batch_size):
        batch = collate(group, pad_id)
        log_probs, _ = micro_batch_log_probs(
            model, batch, temperature=cfg.rollout_temperature, with_entropy=False
        )
        for row, item in enumerate(batch.items):
            result[item.position] = log_probs[row, batch.num_scored - item.response_length :].float().cpu()
    return result


def _aligned(batch: MicroBatch, per_position: dict[int, torch.Tensor]) -> torch.Tensor:
    rows = torch.zeros(len(batch.items), batch.num_scored)
    for row, item in enumerate(batch.items):
        values = per_position[item.position]
        rows[row, batch.num_scored - len(values) :] = values
    return rows


def policy_update(
    model,
    optimizer: MasterWeightAdamW,
    items: list[TrainSample],
    cfg: TrainConfig,
    *,
    pad_token_id: int,
    ref_model=None,
) -> UpdateStats:
    """Run ``cfg.steps_per_rollout`` optimizer steps over ``items`` (all samples of one rollout)."""
    if len(items) != cfg.samples_per_rollout:
        raise ValueError(f"expected {cfg.samples_per_rollout} samples for one rollout, got {len(items)}")
    stats = UpdateStats()
    mismatch = _Mismatch()
    steps = _split_steps(items, cfg)
    # With one step per rollout the first forward pass sees the pre-update weights, so its detached
    # log-probs serve as the "before" values; with several steps a separate pass is needed first.
    before = _log_probs_before_update(model, items, cfg, pad_token_id) if len(steps) > 1 else None
    device = next(model.parameters()).device
    model.train()  # Qwen-VL has no dropout: this only lets gradient checkpointing engage
    try:
        for step_items in steps:
            optimizer.zero_grad()
            for group in micro_batches(step_items, cfg.micro_batch_size):
                batch = collate(group, pad_token_id)
                log_probs, entropy = micro_batch_log_probs(
                    model, batch, temperature=cfg.rollout_temperature, with_entropy=True
                )
                if not cfg.entropy_coef:
                    # Only logged: dropping its graph here frees the saved exp(log-probs) over the
                    # whole vocabulary (0.6 GiB for 1,024 tokens of a 152k vocabulary) before backward.
                    entropy = entropy.detach()
                mask = batch.loss_mask
                train_before = (
                    _aligned(batch, before) if before is not None else log_probs.detach().float().cpu()
                )
                mismatch.add(train_before, batch.rollout_log_probs, mask)
                old = batch.rollout_log_probs if cfg.use_rollout_logprobs else train_before
                ref = None
                if ref_model is not None:
                    with torch.no_grad():
                        ref, _ = micro_batch_log_probs(
                            ref_model, batch, temperature=cfg.rollout_temperature, with_entropy=False
                        )
                terms = grpo_loss(
                    log_probs,
                    old.to(device),
                    batch.advantages.to(device),
                    mask.to(device),
                    num_samples_in_step=len(step_items),
                    eps_clip=cfg.eps_clip,
                    eps_clip_high=cfg.eps_clip_high,
                    entropy=entropy,
                    entropy_coef=cfg.entropy_coef,
                    ref_log_probs=ref,
                    kl_loss_coef=cfg.kl_loss_coef,
                    kl_loss_type=cfg.kl_loss_type,
                )
                terms.loss.backward()
                stats.loss += float(terms.loss.detach())
                stats.pg_loss += float(terms.pg_loss)
                stats.pg_clipfrac += float(terms.pg_clipfrac)
                stats.ppo_kl += float(terms.ppo_kl)
                stats.entropy += float(terms.entropy)
                stats.kl_loss += float(terms.kl_loss)
                stats.trained_tokens += int(mask.sum())
            stats.grad_norm += optimizer.step()
            stats.optimizer_steps += 1
    finally:
        model.eval()
    for name in ("loss", "pg_loss", "pg_clipfrac", "ppo_kl", "entropy", "kl_loss", "grad_norm"):
        setattr(stats, name, getattr(stats, name) / len(steps))
    stats.logprob_abs_diff_mean = mismatch.mean
    stats.logprob_abs_diff_max = mismatch.max
    return stats
