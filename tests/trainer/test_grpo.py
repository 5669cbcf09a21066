"""GRPO arithmetic against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.grpo import clipped_policy_loss, group_advantages, grpo_loss, kl_penalty, sum_of_sample_means


def test_advantages_are_centred_and_divided_by_the_unbiased_std_per_group():
    advantages = group_advantages([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0], 4, 2)
    # group 1: mean 0.25, centred (0.75, -0.25, -0.25, -0.25), unbiased variance 0.75 / 3 = 0.25, std 0.5
    expected_first = [0.75 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001, -0.25 / 0.500001]
    assert advantages[:4].tolist() == pytest.approx(expected_first, rel=1e-6)
    # group 2: equal rewards -> exactly zero advantages
    assert advantages[4:].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_a_group_with_equal_nonzero_rewards_has_zero_advantages():
    assert group_advantages([0.7, 0.7, 0.7], 3, 1).tolist() == [0.0, 0.0, 0.0]


def test_advantages_without_std_normalization_are_only_centred():
    assert group_advantages([3.0, 1.0, 2.0, 2.0], 2, 2, std_normalization=False).tolist() == [
        1.0,
        -1.0,
        0.0,
        0.0,
    ]


def test_a_batch_of_unexpected_size_is_normalized_as_one_group():
    # 3 rewards but n x batch = 4: slime treats the whole batch as one group
    advantages = group_advantages([1.0, 0.0, 0.0], 2, 2)
    std = math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 2)
    assert advantages.tolist() == pytest.approx(
        [(2 / 3) / (std + 1e-6), (-1 / 3) / (std + 1e-6)] + [(-1 / 3) / (std + 1e-6)]
    )


def test_group_of_one_with_std_normalization_is_refused():
    with pytest.raises(ValueError, match="at least 2 samples per group"):
        group_advantages([1.0], 1, 1)


def test_clipping_on_both_sides():
    ratio = torch.tensor([[1.5, 0.5, 1.1]])
    log_probs = ratio.log()
    old = torch.zeros_like(log_probs)
    # positive advantage: the upper bound 1 + 0.28 caps a ratio of 1.5; a ratio of 0.5 is not clipped
    loss, clipped = clipped_policy_loss(log_probs, old, torch.tensor([[1.0]]), 0.2, 0.28)
    assert loss[0].tolist() == pytest.approx([-1.28, -0.5, -1.1])
    assert clipped.tolist() == [[1.0, 0.0, 0.0]]
    # negative advantage: the lower bound 1 - 0.2 lifts a ratio of 0.5; a ratio of 1.5 is not clipped
    loss, clipped = clipped_policy_loss(log_probs, old, torch.tensor([[-1.0]]), 0.2, 0.28)
    assert loss[0].tolist() == pytest.approx([1.5, 0.8, 1.1])
    assert clipped.tolist() == [[0.0, 1.0, 0.0]]


def test_low_var_kl_k1_k2():
    log_probs = torch.tensor([math.log(0.5)])
    ref = torch.tensor([0.0])
    assert kl_penalty(log_probs, ref, "low_var_kl").item() == pytest.approx(1.0 - math.log(2.0))
    assert kl_penalty(log_probs, ref, "k1").item() == pytest.approx(-math.log(2.0))
    assert kl_penalty(log_probs, ref, "k2").item() == pytest.approx(math.log(2.0) ** 2 / 2)
    # clamped at 10 when the policy is far below the reference
    assert kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0])).item() == 10.0
    with pytest.raises(ValueError, match="unknown kl_loss_type 'k4'"):
        kl_penalty(log_probs, ref, "k4")


def test_sum_of_sample_means_ignores_masked_tokens_and_empty_samples():
    values = torch.tensor([[1.0, 3.0, 100.0], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    assert sum_of_sample_means(values, mask).item() == 2.0


def _two_sample_batch():
    ratio = torch.tensor([[1.5, 0.5, 3.0], [1.5, 0.5, 3.0], [1.5, 0.5, 3.0]])
    log_probs = ratio.log().requires_grad_(True)
    old = torch.zeros(3, 3)
    advantages = torch.tensor([1.0, -1.0, 2.0])
    # third sample is removed: its whole mask is zero, but it still counts as a sample of the step
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])
    return log_probs, old, advantages, mask


def test_grpo_loss_token_mean_per_sample_then_mean_over_the_step():
    log_probs, old, advantages, mask = _two_sample_batch()
    terms = grpo_loss(
        log_probs, old, advantages, mask, num_samples_in_step=4, eps_clip=0.2, eps_clip_high=0.28
    )
    # sample 1 (A=+1): tokens (-1.28 clipped, -0.5) -> mean -0.89; sample 2 (A=-1): (1.5, 0.8 clipped) -> 1.15
    assert terms.loss.item() == pytest.approx((-0.89 + 1.15) / 4)
    assert terms.pg_loss.item() == pytest.approx((-0.89 + 1.15) / 4)
    assert terms.pg_clipfrac.item() == pytest.approx((0.5 + 0.5) / 4)
    # ppo_kl = mean(old - logp) over mask tokens = -(log 1.5 + log 0.5) / 2 per sample
    assert terms.ppo_kl.item() == pytest.approx(2 * (-math.log(0.75) / 2) / 4)
    assert terms.kl_loss.item() == 0.0 and terms.entropy.item() == 0.0

    terms.loss.backward()
    grad = log_probs.grad
    # d/dlogp of -A * ratio is -A * ratio; clipped tokens and masked tokens get no gradient
    assert grad[0].tolist() == pytest.approx([0.0, -0.5 * 0.5 / 4, 0.0])
    assert grad[1].tolist() == pytest.approx([1.5 * 0.5 / 4, 0.0, 0.0])
    assert grad[2].tolist() == [0.0, 0.0, 0.0]


def test_grpo_loss_entropy_bonus_and_kl_term():
    log_probs, old, advantages, mask = _two_sample_batch()
    entropy = torch.tensor([[2.0, 4.0, 100.0], [1.0, 1.0, 100.0], [9.0, 9.0, 9.0]])
    ref = torch.zeros(3, 3)
    terms = grpo_loss(
        log_probs,
        old,
        advantages,
        mask,
        num_samples_in_step=4,
        eps_clip=0.2,
        eps_clip_high=0.28,
        entropy=entropy,
        entropy_coef=0.01,
        ref_log_probs=ref,
        kl_loss_coef=0.5,
    )
    entropy_mean = (3.0 + 1.0) / 4
    # low_var_kl per token: exp(-log r) - 1 + log r, r = 1.5 and 0.5
    kl_tokens = [1 / 1.5 - 1 + math.log(1.5), 2.0 - 1 + math.log(0.5)]
    kl_mean = 2 * (sum(kl_tokens) / 2) / 4
    assert terms.entropy.item() == pytest.approx(entropy_mean)
    assert terms.kl_loss.item() == pytest.approx(kl_mean)
    assert terms.loss.item() == pytest.approx((-0.89 + 1.15) / 4 - 0.01 * entropy_mean + 0.5 * kl_mean)


def test_grpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape mismatch"):
        grpo_loss(
            torch.zeros(2, 3),
            torch.zeros(2, 3),
            torch.zeros(3),
            torch.ones(2, 3),
            num_samples_in_step=2,
            eps_clip=0.2,
            eps_clip_high=0.28,
        )
