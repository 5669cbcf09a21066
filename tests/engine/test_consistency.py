"""The train/inference log-prob consistency check on samples built from real engine responses."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from rollout.consistency import check_logprob_consistency, check_logprob_consistency_batch
from rollout.engines.local import LocalEngine
from rollout.sample import Sample
from tests.engine.conftest import chat_text, expanded_inputs, single_pad_ids

pytestmark = pytest.mark.usefixtures("decode_mode")

OBSERVATION = (
    "<|im_end|>\n<|im_start|>user\n<tool_response>\n<|vision_start|><|image_pad|><|vision_end|>"
    "Wrong, try again.\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
)


async def _two_turn_sample(policy, image_a, image_b) -> Sample:
    """Turn 1 answers a prompt with one image; an observation (mask 0) brings a second image;
    turn 2 answers again. Requests use single pads; the sample holds the expanded runs."""
    text = chat_text(policy, "Find x.")
    prompt = expanded_inputs(policy, text, [image_a])
    observation = policy.processor(text=[OBSERVATION], images=[image_b], return_tensors="pt")
    params = {"max_new_tokens": 6, "ignore_eos": True}
    async with LocalEngine(policy, seed=2) as engine:
        first = await engine.generate(single_pad_ids(policy, text), [image_a], params)
        request = single_pad_ids(policy, text) + first.token_ids + single_pad_ids(policy, OBSERVATION)
        second = await engine.generate(request, [image_a, image_b], {**params, "max_new_tokens": 5})
    observation_ids = observation["input_ids"][0].tolist()
    response = first.token_ids + observation_ids + second.token_ids
    return Sample(
        index=0,
        tokens=prompt["input_ids"][0].tolist() + response,
        response_length=len(response),
        loss_mask=[1] * 6 + [0] * len(observation_ids) + [1] * 5,
        rollout_log_probs=first.log_probs + [0.0] * len(observation_ids) + second.log_probs,
        multimodal_train_inputs={
            "pixel_values": torch.cat([prompt["pixel_values"], observation["pixel_values"]]),
            "image_grid_thw": torch.cat([prompt["image_grid_thw"], observation["image_grid_thw"]]),
        },
    )


@pytest.fixture
async def two_turn(any_small_policy, image_a, image_b):
    policy = any_small_policy
    return policy, await _two_turn_sample(policy, image_a, image_b)


async def test_engine_samples_are_consistent(two_turn):
    policy, sample = two_turn
    report = check_logprob_consistency(policy.model, sample)
    assert report.num_tokens == 11
    assert report.max_abs_diff <= 1e-4
    assert report.ok()


async def test_a_perturbed_log_prob_is_reported(two_turn):
    policy, sample = two_turn
    bad = list(sample.rollout_log_probs)
    bad[-2] += 0.5
    report = check_logprob_consistency(policy.model, dataclasses.replace(sample, rollout_log_probs=bad))
    assert report.max_abs_diff == pytest.approx(0.5, abs=1e-4)
    assert report.mean_abs_diff == pytest.approx(0.5 / 11, abs=1e-4)
    assert not report.ok()


async def test_dropped_images_are_reported(two_turn):
    policy, sample = two_turn
    report = check_logprob_consistency(
        policy.model, dataclasses.replace(sample, multimodal_train_inputs=None)
    )
    assert report.max_abs_diff > 0.5


async def test_batched_form_pools_every_sample(two_turn):
    policy, sample = two_turn
    bad = list(sample.rollout_log_probs)
    bad[0] -= 0.25
    # A slime-like object (duck typing): a short text-only sample sharing the micro-batch.
    short = SimpleNamespace(
        index=None,
        tokens=sample.tokens[:3] + [5, 6],
        response_length=2,
        loss_mask=[0, 0],
        rollout_log_probs=[0.0, 0.0],
        multimodal_train_inputs=None,
    )
    good = check_logprob_consistency_batch(policy.model, [sample, sample, short], micro_batch_size=2)
    assert good.num_tokens == 22
    assert good.max_abs_diff <= 1e-4
    perturbed = dataclasses.replace(sample, rollout_log_probs=bad)
    report = check_logprob_consistency_batch(policy.model, [sample, perturbed, short], micro_batch_size=3)
    assert report.num_tokens == 22
    assert report.max_abs_diff == pytest.approx(0.25, abs=1e-4)
    # Dropped images are scored on their own and show up as a large difference.
    blind = dataclasses.replace(sample, multimodal_train_inputs=None)
    report = check_logprob_consistency_batch(policy.model, [sample, blind, short], micro_batch_size=3)
    assert report.num_tokens == 22
    assert report.max_abs_diff > 0.5


async def test_malformed_samples_are_rejected_with_the_reason(two_turn):
    policy, sample = two_turn
    with pytest.raises(ValueError, match=r"sample \(index=0\): response_length=\d+, len\(loss_mask\)=\d+, "):
        check_logprob_consistency(policy.model, dataclasses.replace(sample, loss_mask=sample.loss_mask[:-1]))
    pad = policy.model.config.image_token_id
    missing_pads = dataclasses.replace(sample, tokens=[0 if t == pad else t for t in sample.tokens])
    with pytest.raises(ValueError, match="tokens hold 0 image pad tokens but image_grid_thw describes"):
        check_logprob_consistency(policy.model, missing_pads)
    with pytest.raises(ValueError, match="has no rollout_log_probs"):
        check_logprob_consistency(policy.model, dataclasses.replace(sample, rollout_log_probs=None))
