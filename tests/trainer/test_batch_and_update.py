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


def _mixed_precision_model() -> torch.nn.Module:
    """bf16 matrices and biases around an fp32 norm, as in a bf16 model with an fp32 layer."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8).to(torch.bfloat16),
        torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 5).to(torch.bfloat16),
    )
    return model


def _backward(model: torch.nn.Module, seed: int) -> None:
    inputs = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed))
    hidden = model[0](inputs.to(torch.bfloat16)).float()
    (model[2](model[1](hidden).to(torch.bfloat16)).float() ** 2).sum().backward()


def _reference_steps(model: torch.nn.Module, cfg: TrainConfig, seeds) -> list[torch.Tensor]:
    """Mixed-precision AdamW done the plain way: an fp32 copy of every gradient, clip, one step."""
    params = list(model.parameters())
    masters = [p.detach().float().clone() if p.dtype != torch.float32 else p for p in params]
    inner = torch.optim.AdamW(
        [
            {"params": [m for m in masters if m.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [m for m in masters if m.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )
    for seed in seeds:
        _backward(model, seed)
        for param, master in zip(params, masters, strict=True):
            if master is not param:
                master.grad = param.grad.float()
        torch.nn.utils.clip_grad_norm_(masters, cfg.clip_grad)
        inner.step()
        with torch.no_grad():
            for param, master in zip(params, masters, strict=True):
                param.copy_(master)
                param.grad = master.grad = None
    return [m.detach().clone() for m in masters]


@pytest.mark.parametrize("chunk_numel", [1, 20, 2**27])
def test_chunked_step_matches_one_step_over_fp32_gradient_copies(chunk_numel):
    # clip_grad small enough that clipping scales every step: each chunk must use the global norm
    cfg = TrainConfig(lr=1e-2, clip_grad=0.05, weight_decay=0.1)
    seeds = [1, 2, 3]
    expected = _reference_steps(_mixed_precision_model(), cfg, seeds)
    model = _mixed_precision_model()
    optimizer = MasterWeightAdamW(model, cfg, chunk_numel=chunk_numel)
    norms = []
    for seed in seeds:
        _backward(model, seed)
        norms.append(optimizer.step())
    assert all(norm > cfg.clip_grad for norm in norms)
    for master, reference in zip(optimizer.masters, expected, strict=True):
        # each parameter stepped exactly once per step, with the globally clipped gradient
        assert torch.allclose(master, reference, rtol=1e-6, atol=1e-7)
    for param, master in zip(model.parameters(), optimizer.masters, strict=True):
        assert torch.equal(param, master.to(param.dtype))
        assert param.grad is None and master.grad is None


def test_step_converts_one_chunk_of_gradients_at_a_time_and_frees_the_bf16_ones():
    import weakref

    model = _mixed_precision_model()
    optimizer = MasterWeightAdamW(model, TrainConfig(lr=1e-3), chunk_numel=40)
    _backward(model, 0)
    pairs = list(zip(optimizer.params, optimizer.masters, strict=True))
    bf16 = {i: weakref.ref(p.grad) for i, (p, _) in enumerate(pairs) if p.dtype == torch.bfloat16}
    largest = max(pairs[i][0].numel() for i in bf16)
    seen = []
    inner_step = optimizer.inner.step

    def step_and_record(*args, **kwargs):
        stepped = [i for i, (_, m) in enumerate(pairs) if m.grad is not None]
        fp32_copies = sum(pairs[i][1].grad.numel() for i in stepped if i in bf16)
        alive = sum(bf16[i]() is not None for i in stepped if i in bf16)
        seen.append((fp32_copies, alive))
        return inner_step(*args, **kwargs)

    optimizer.inner.step = step_and_record
    optimizer.step()
    assert len(seen) > 1
    # never more fp32 gradient elements at once than a chunk (or the one parameter larger than it)
    assert max(numel for numel, _ in seen) <= max(40, largest)
    # a bf16 gradient is gone by the time its fp32 copy is stepped
    assert all(alive == 0 for _, alive in seen), seen
    assert all(ref() is None for ref in bf16.values())


def test_fused_adamw_on_cuda_only(qwen25_small_policy):
    optimizer = MasterWeightAdamW(copy.deepcopy(qwen25_small_policy.model), TrainConfig())
    assert not optimizer.inner.defaults["fused"]  # CPU keeps torch's default implementation
    if torch.cuda.is_available():
        layer = torch.nn.Linear(4, 4, device="cuda", dtype=torch.bfloat16)
        assert MasterWeightAdamW(layer, TrainConfig()).inner.defaults["fused"]


def test_checkpointing_and_frozen_vision_keep_the_update_exact(qwen25_small_policy):
    import warnings

    from trainer.update import prepare_for_training

    cfg = TrainConfig(rollout_batch_size=2, n_samples_per_prompt=2, lr=1e-3, micro_batch_size=2, device="cpu")
    results = {}
    for name, changes in {
        "plain": dict(gradient_checkpointing=False),
        "auto": dict(),  # a tiny model on CPU: no checkpointing
        "checkpointed": dict(gradient_checkpointing=True),
        "frozen": dict(gradient_checkpointing=True, freeze_vision=True),
    }.items():
        run_cfg = cfg.replace(**changes)
        model = copy.deepcopy(qwen25_small_policy.model)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            enabled = prepare_for_training(model, run_cfg)
        assert not [w for w in caught if "deprecated" in str(w.message)], [str(w.message) for w in caught]
        assert enabled == model.is_activation_checkpointing == (run_cfg.gradient_checkpointing is True)
        items = [
            to_train_sample(s, i, a, model.config)
            for i, (s, a) in enumerate(
                zip(_text_samples(qwen25_small_policy, model), [1.0, -1.0, 0.5, -0.5], strict=True)
            )
        ]
        optimizer = MasterWeightAdamW(model, run_cfg)
        stats = policy_update(model, optimizer, items, run_cfg, pad_token_id=0)
        results[name] = (stats, model, len(optimizer.params))
    plain, plain_model, trainable = results["plain"]
    original = qwen25_small_policy.model
    for name in ("auto", "checkpointed"):
        stats, model, count = results[name]
        assert count == trainable
        assert stats.loss == pytest.approx(plain.loss, abs=1e-6)
        for mine, theirs in zip(model.parameters(), plain_model.parameters(), strict=True):
            assert torch.allclose(mine, theirs, atol=1e-6)
    stats, frozen, count = results["frozen"]
    vision = sum(1 for _ in original.model.visual.parameters())
    assert count == trainable - vision
    for mine, before in zip(
        frozen.model.visual.parameters(), original.model.visual.parameters(), strict=True
    ):
        assert torch.equal(mine, before)
    assert not torch.equal(frozen.lm_head.weight, original.lm_head.weight)
