"""From samples to micro-batches, and one update: accumulation must not depend on the micro-batch size."""

from __future__ import annotations

import copy

import pytest
import torch

from models.logprobs import token_log_probs
from rollout.sample import Sample
from trainer.batch import collate, micro_batches, to_train_sample, untrainable_reason
from trainer.config import TrainConfig
from trainer.optim import MasterWeightAdamW
from trainer.update import policy_update


def _sample(tokens, response_length, mask, log_probs=None, **fields) -> Sample:
    return Sample(
        tokens=list(tokens),
        response_length=response_length,
        loss_mask=list(mask),
        rollout_log_probs=list(log_probs if log_probs is not None else [0.0] * response_length),
        **fields,
    )


def test_collate_right_aligns_sequences_and_scored_columns():
    a = to_train_sample(_sample([1, 2, 3, 4, 5], 2, [1, 1], [-0.5, -0.25]), 0, 1.0)
    b = to_train_sample(_sample([7, 8, 9], 1, [1], [-2.0]), 1, -1.0)
    batch = collate([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [0, 0, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert batch.num_scored == 2
    assert batch.loss_mask.tolist() == [[1.0, 1.0], [0.0, 1.0]]
    assert batch.rollout_log_probs.tolist() == [[-0.5, -0.25], [0.0, -2.0]]
    assert batch.advantages.tolist() == [1.0, -1.0]


def test_removed_samples_get_a_zero_mask_and_no_forward_pass():
    removed = to_train_sample(_sample([1, 2, 3], 2, [1, 1], remove_sample=True), 0, 0.5)
    kept = to_train_sample(_sample([1, 2, 3], 2, [1, 0]), 1, 0.5)
    assert removed.loss_mask.tolist() == [0.0, 0.0]
    assert [[item.position for item in group] for group in micro_batches([removed, kept], 4)] == [[1]]


def test_broken_invariants_are_named():
    with pytest.raises(ValueError, match="loss_mask has 1 entries, response_length is 2"):
        to_train_sample(_sample([1, 2, 3], 2, [1]), 0, 0.0)
    with pytest.raises(ValueError, match="rollout_log_probs has 1 entries"):
        to_train_sample(_sample([1, 2, 3], 2, [1, 1], [0.0]), 0, 0.0)


def test_sampled_vision_placeholders_make_a_sample_untrainable(qwen25_small_policy):
    config = qwen25_small_policy.model.config
    assert "video_pad" in untrainable_reason([5, config.video_token_id], {}, config)
    assert "1 image pad tokens but its images provide 0" in untrainable_reason(
        [5, config.image_token_id], {}, config
    )
    assert untrainable_reason([5, 6], {}, config) is None
    item = to_train_sample(_sample([5, 6, config.video_token_id], 2, [1, 1]), 0, 1.0, config)
    assert item.excluded and item.num_trained_tokens == 0


def _text_samples(policy, model):
    """Two groups of two text-only episodes whose log-probs are the model's own (as an engine's would be)."""
    tok = policy.tokenizer
    texts = [
        ("Hello there", " general"),
        ("Hello there", " kenobi you"),
        ("A B C", " D"),
        ("A B C", " E F G"),
    ]
    samples = []
    for prompt, response in texts:
        prompt_ids, response_ids = tok.encode(prompt), tok.encode(response)
        ids = torch.tensor([prompt_ids + response_ids])
        with torch.no_grad():
            log_probs = token_log_probs(model, ids, len(response_ids))[0].tolist()
        samples.append(
            _sample(prompt_ids + response_ids, len(response_ids), [1] * len(response_ids), log_probs)
        )
    samples[1].loss_mask[0] = 0  # an env token inside a response
    return samples


@pytest.mark.parametrize("micro_batch_size", [1, 3])
def test_update_is_the_same_for_any_micro_batch_size(qwen25_small_policy, micro_batch_size):
    cfg = TrainConfig(rollout_batch_size=2, n_samples_per_prompt=2, lr=1e-3, micro_batch_size=4, device="cpu")
    results = []
    for size in (4, micro_batch_size):
        model = copy.deepcopy(qwen25_small_policy.model)
        items = [
            to_train_sample(s, i, a, model.config)
            for i, (s, a) in enumerate(
                zip(_text_samples(qwen25_small_policy, model), [1.0, -1.0, 0.5, -0.5], strict=True)
            )
        ]
        optimizer = MasterWeightAdamW(model, cfg)
        stats = policy_update(model, optimizer, items, cfg.replace(micro_batch_size=size), pad_token_id=0)
        results.append((stats, model.get_input_embeddings().weight.detach().clone()))
    (full, full_weights), (split, split_weights) = results
    assert split.loss == pytest.approx(full.loss, abs=1e-6)
    assert split.grad_norm == pytest.approx(full.grad_norm, rel=1e-4)
    assert torch.allclose(split_weights, full_weights, atol=1e-6)
    # the update was computed against the log-probs that sampled: ratio 1, nothing clipped
    assert full.logprob_abs_diff_max < 1e-4 and full.pg_clipfrac == 0.0
    response_tokens = sum(item.response_length for item in items)
    assert full.trained_tokens == split.trained_tokens == response_tokens - 1  # one env token


def test_master_weights_keep_small_updates_of_bf16_parameters():
    layer = torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(0.5)
    optimizer = MasterWeightAdamW(layer, TrainConfig(lr=1e-4, weight_decay=0.0))
    for _ in range(10):
        layer(torch.ones(1, 4, dtype=torch.bfloat16)).sum().backward()
        optimizer.step()
    # each Adam step moves a weight by ~lr = 1e-4, far below bf16's spacing of 2**-9 at 0.5: in bf16
    # alone every step would round away; the fp32 masters accumulate them to ~1e-3
    assert optimizer.masters[0].dtype == torch.float32
    assert optimizer.masters[0].mean().item() == pytest.approx(0.5 - 10 * 1e-4, abs=1e-6)
    assert torch.equal(layer.weight, optimizer.masters[0].to(torch.bfloat16))
    assert layer.weight.float().mean().item() < 0.5
