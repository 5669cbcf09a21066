"""Defence in depth (docs/pitfalls.md#engine-output-trusted-blindly): a sample the rollout kept although its ids fall outside the
model's embedding or its log-probs are not finite is refused by the trainer, counted per step, and
never reaches a forward pass or the loss."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from models.logprobs import token_log_probs
from rollout.sample import Sample
from trainer.batch import micro_batches, to_train_sample, untrainable_reason
from trainer.config import TrainConfig
from trainer.metrics import REFUSED_KEY, rollout_metrics
from trainer.optim import MasterWeightAdamW
from trainer.update import policy_update


def _episode(policy, model, prompt: str, response: str) -> Sample:
    """A text episode whose log-probs are the model's own, as an engine's would be."""
    tok = policy.tokenizer
    prompt_ids, response_ids = tok.encode(prompt), tok.encode(response)
    ids = torch.tensor([prompt_ids + response_ids])
    with torch.no_grad():
        log_probs = token_log_probs(model, ids, len(response_ids))[0].tolist()
    return Sample(
        tokens=prompt_ids + response_ids,
        response_length=len(response_ids),
        loss_mask=[1] * len(response_ids),
        rollout_log_probs=log_probs,
        reward=0.0,
        status=Sample.Status.COMPLETED,
        metadata={},
    )


def _vocab_size(config) -> int:
    return config.text_config.vocab_size


def test_ids_outside_the_embedding_are_named(qwen25_small_policy):
    config = qwen25_small_policy.model.config
    vocab = _vocab_size(config)
    assert vocab == qwen25_small_policy.model.get_input_embeddings().num_embeddings
    assert untrainable_reason([5, vocab - 1], {}, config) is None
    assert f"token id {vocab} at position 1 is outside the model's embedding [0, {vocab})" in untrainable_reason(
        [5, vocab], {}, config
    )
    assert "token id -3 at position 0" in untrainable_reason([-3, 5], {}, config)


@pytest.mark.parametrize("defect", ["id_too_large", "negative_id", "nan_log_prob", "inf_log_prob"])
def test_a_kept_sample_with_bad_engine_output_is_refused_and_counted(qwen25_small_policy, defect):
    model = copy.deepcopy(qwen25_small_policy.model)
    good = _episode(qwen25_small_policy, model, "Hello there", " general kenobi")
    bad = _episode(qwen25_small_policy, model, "A B C", " D E F")
    position = len(bad.tokens) - 2  # a model token
    if defect == "id_too_large":
        bad.tokens[position] = _vocab_size(model.config)
    elif defect == "negative_id":
        bad.tokens[position] = -1
    else:
        bad.rollout_log_probs[1] = math.nan if defect == "nan_log_prob" else -math.inf
    removed = copy.deepcopy(bad)
    removed.remove_sample, removed.status = True, Sample.Status.FAILED

    episodes = [(good, 1.0), (bad, -1.0), (removed, 0.0)]
    items = [to_train_sample(s, i, a, model.config) for i, (s, a) in enumerate(episodes)]
    assert items[0].excluded is None and REFUSED_KEY not in good.metadata
    expected = "is not a finite number" if "log_prob" in defect else "outside the model's embedding"
    assert expected in items[1].excluded
    assert bad.metadata[REFUSED_KEY] == items[1].excluded
    assert items[1].num_trained_tokens == 0 and torch.isfinite(items[1].rollout_log_probs).all()
    # The rollout already removed the third: the trainer excludes it too, but it is no refusal.
    assert items[2].excluded and REFUSED_KEY not in removed.metadata
    assert rollout_metrics([good, bad, removed])["train/refused_samples"] == 1.0
    assert [[item.position for item in group] for group in micro_batches(items, 4)] == [[0]]

    # The update runs on the good sample alone: no embedding lookup out of range, no NaN loss.
    cfg = TrainConfig(rollout_batch_size=1, n_samples_per_prompt=3, lr=1e-3, micro_batch_size=4, device="cpu")
    stats = policy_update(model, MasterWeightAdamW(model, cfg), items, cfg, pad_token_id=0)
    assert math.isfinite(stats.loss) and math.isfinite(stats.grad_norm)
    assert stats.trained_tokens == good.response_length


def test_nothing_is_refused_in_a_clean_rollout(qwen25_small_policy):
    model = qwen25_small_policy.model
    samples = [_episode(qwen25_small_policy, model, "A B C", " D"), _episode(qwen25_small_policy, model, "Hi", " yo")]
    items = [to_train_sample(s, i, 0.5, model.config) for i, s in enumerate(samples)]
    assert all(item.excluded is None for item in items)
    assert rollout_metrics(samples)["train/refused_samples"] == 0.0
