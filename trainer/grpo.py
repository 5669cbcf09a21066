"""GRPO's arithmetic: group-normalized advantages, the clipped policy loss, the KL penalty.

Pure tensor functions with no model, optimizer or I/O, so that each can be checked against
hand-computed values. They follow slime's definitions (``slime/ray/rollout.py`` reward
post-processing, ``slime/utils/ppo_utils.py`` and the megatron ``policy_loss_function``), so that a run
on the local backend optimizes the same objective as a run on slime:

* advantages: rewards are reshaped to ``(-1, n_samples_per_prompt)`` only when there are exactly
  ``n_samples_per_prompt * rollout_batch_size`` of them (otherwise the whole batch is one group),
  mean-centred per group and divided by ``std + 1e-6`` where std is torch's default *unbiased*
  (Bessel-corrected) standard deviation; every response token of a sample gets its sample's value;
* policy loss per token: ``max(-A * r, -A * clip(r, 1 - eps_clip, 1 + eps_clip_high))`` with
  ``r = exp(logp - old_logp)``;
* aggregation: a mean over each sample's loss-mask tokens (a sample with no such token contributes
  zero), summed over samples and divided by the number of samples in the optimizer step, so that
  micro-batches of one step add up to a plain mean over samples;
* KL to a reference policy (``low_var_kl``, Schulman's k3): ``exp(ref - logp) - 1 - (ref - logp)``,
  clamped to ``[-10, 10]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GRPO_STD_EPS = 1e-6
KL_LOSS_TYPES = ("k1", "k2", "low_var_kl")


def group_advantages(
    rewards: torch.Tensor | list[float],
    n_samples_per_prompt: int,
    rollout_batch_size: int,
    *,
    std_normalization: bool = True,
) -> torch.Tensor:
    """One advantage per sample, in the order of ``rewards`` (prompt-major: a group's samples are adjacent).

    A group whose rewards are all equal gets advantage 0 for each sample (0 / (0 + 1e-6)).
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    if rewards.ndim != 1:
        raise ValueError(f"rewards must be a flat list, one per sample; got shape {tuple(rewards.shape)}")
    if rewards.numel() == n_samples_per_prompt * rollout_batch_size:
        grouped = rewards.reshape(-1, n_samples_per_prompt)
    else:
        # Mirrors slime: when some samples are missing the grouping is unknown, so the batch is one group.
        grouped = rewards.reshape(1, -1)
    centred = grouped - grouped.mean(dim=-1, keepdim=True)
    if std_normalization:
        if grouped.shape[-1] < 2:
            raise ValueError(
                "std normalization needs at least 2 samples per group (the unbiased std of one value is "
                "undefined); set n_samples_per_prompt >= 2 or disable grpo_std_normalization"
            )
        centred = centred / (grouped.std(dim=-1, keepdim=True) + GRPO_STD_EPS)
    return centred.flatten()


def clipped_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO loss and clip indicator (1.0 where the clipped branch is strictly larger).

    ``advantages`` broadcasts against ``log_probs`` (pass ``(B, 1)`` for per-sample values).
    """
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + eps_clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).float()


def kl_penalty(
    log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_loss_type: str = "low_var_kl"
) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens (Schulman's k1/k2/k3)."""
    log_ratio = log_probs.float() - ref_log_probs.float()
    if kl_loss_type == "k1":
        return log_ratio
    if kl_loss_type == "k2":
        return log_ratio**2 / 2.0
    if kl_loss_type == "low_var_kl":
        return (torch.exp(-log_ratio) - 1.0 + log_ratio).clamp(-10.0, 10.0)
    raise ValueError(f"unknown kl_loss_type {kl_loss_type!r}; expected one of {', '.join(KL_LOSS_TYPES)}")


def sum_of_sample_means(values: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``sum_i (sum_t values[i,t] * mask[i,t]) / max(sum_t mask[i,t], 1)`` over rows i of a (B, T) batch."""
    mask = loss_mask.to(values.dtype)
    return ((values * mask).sum(dim=-1) / mask.sum(dim=-1).clamp_min(1.0)).sum()


@dataclass
class LossTerms:
    """One micro-batch's contribution to the step objective (already divided by the step's sample count).

    ``loss`` carries gradients; the other fields are detached and summed over the micro-batches of a
    step give the step's per-sample means.
    """

    loss: torch.Tensor
    pg_loss: torch.Tensor
    pg_clipfrac: torch.Tensor
    ppo_kl: torch.Tensor
    entropy: torch.Tensor
    kl_loss: torch.Tensor


def grpo_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    num_samples_in_step: int,
    eps_clip: float,
    eps_clip_high: float,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    ref_log_probs: torch.Tensor | None = None,
    kl_loss_coef: float = 0.0,
    kl_loss_type: str = "low_var_kl",
) -> LossTerms:
    """The GRPO objective for a (B, T) micro-batch of response positions.

    ``advantages`` has one value per sample (B,). ``loss_mask`` is 0 at env tokens, padding and every
    token of a removed sample. ``num_samples_in_step`` is the number of samples (removed ones
    included) in the optimizer step this micro-batch belongs to. ``ref_log_probs`` turns on the KL
    term (slime's ``--use-kl-loss``); ``entropy`` with a non-zero ``entropy_coef`` adds the bonus.
    """
    if num_samples_in_step < 1:
        raise ValueError(f"num_samples_in_step must be >= 1, got {num_samples_in_step}")
    shapes = {tuple(t.shape) for t in (log_probs, old_log_probs, loss_mask)}
    if len(shapes) != 1 or advantages.shape != log_probs.shape[:1]:
        raise ValueError(
            f"shape mismatch: log_probs {tuple(log_probs.shape)}, old_log_probs {tuple(old_log_probs.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}, advantages {tuple(advantages.shape)} (expected (B,))"
        )
    log_probs = log_probs.float()
    old_log_probs = old_log_probs.float()
    scale = 1.0 / num_samples_in_step
    pg_tokens, clipped = clipped_policy_loss(
        log_probs, old_log_probs, advantages.float().unsqueeze(-1), eps_clip, eps_clip_high
    )
    pg_loss = sum_of_sample_means(pg_tokens, loss_mask) * scale
    loss = pg_loss
    zero = pg_loss.new_zeros(())
    entropy_mean = zero
    if entropy is not None:
        entropy_mean = sum_of_sample_means(entropy.float(), loss_mask) * scale
        loss = loss - entropy_coef * entropy_mean
    kl_loss = zero
    if ref_log_probs is not None:
        kl_loss = sum_of_sample_means(kl_penalty(log_probs, ref_log_probs, kl_loss_type), loss_mask) * scale
        loss = loss + kl_loss_coef * kl_loss
    with torch.no_grad():
        clipfrac = sum_of_sample_means(clipped, loss_mask) * scale
        ppo_kl = sum_of_sample_means(old_log_probs - log_probs, loss_mask) * scale
    return LossTerms(
        loss=loss,
        pg_loss=pg_loss.detach(),
        pg_clipfrac=clipfrac,
        ppo_kl=ppo_kl,
        entropy=entropy_mean.detach(),
        kl_loss=kl_loss.detach(),
    )
