"""Train/inference consistency: do the rollout's log-probs match what the trainer computes?

For a finished sample, the trainer's teacher-forced log-probs of the sampled tokens (same model,
same tokens, same images) must equal ``rollout_log_probs`` up to numerical noise. A large gap means
the two sides do not see the same thing: images dropped or re-ordered, pads expanded differently,
a chat-template drift, a sampling filter (top-k/top-p) in the engine, or stale weights. The trainer
reports the batched form as a metric; tests use the single-sample form.

Works on this project's ``rollout.sample.Sample`` and on slime's (duck typing: ``tokens``,
``response_length``, ``loss_mask``, ``rollout_log_probs``, ``multimodal_train_inputs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.logprobs import token_log_probs


@dataclass(frozen=True)
class ConsistencyReport:
    """Absolute differences between rollout and teacher-forced log-probs over loss-mask-1 tokens."""

    max_abs_diff: float
    mean_abs_diff: float
    num_tokens: int

    def ok(self, tolerance: float = 1e-3) -> bool:
        return self.max_abs_diff <= tolerance


def _describe(sample: Any, position: int | None) -> str:
    index = getattr(sample, "index", None)
    where = f"sample {position}" if position is not None else "the sample"
    return f"{where} (index={index})" if index is not None else where


def _checked_fields(
    sample: Any, position: int | None = None
) -> tuple[list[int], int, list[int], list[float]]:
    tokens = list(sample.tokens)
    length = int(sample.response_length)
    loss_mask = list(sample.loss_mask) if sample.loss_mask is not None else [1] * length
    log_probs = sample.rollout_log_probs
    name = _describe(sample, position)
    if log_probs is None:
        raise ValueError(f"{name} has no rollout_log_probs; the engine must return log-probs for every token")
    if not len(loss_mask) == length == len(log_probs):
        raise ValueError(
            f"{name}: response_length={length}, len(loss_mask)={len(loss_mask)}, "
            f"len(rollout_log_probs)={len(log_probs)}; all three must be equal"
        )
    if not 0 < length < len(tokens):
        raise ValueError(f"{name}: response_length={length} must be in [1, len(tokens)={len(tokens)})")
    return tokens, length, loss_mask, list(log_probs)


def _mm_inputs(sample: Any, tokens: list[int], image_token_id: int, merge_size: int, name: str):
    mm = getattr(sample, "multimodal_train_inputs", None) or {}
    pixel_values, grid = mm.get("pixel_values"), mm.get("image_grid_thw")
    if grid is not None:
        features = int((grid.prod(-1) // merge_size**2).sum())
        pads = sum(1 for token in tokens if token == image_token_id)
        if features != pads:
            raise ValueError(
                f"{name}: tokens hold {pads} image pad tokens but image_grid_thw describes {features} image "
                "features; every image's expanded pad run must be in tokens, in the order of image_grid_thw"
            )
    return pixel_values, grid


def _merge_size(model) -> int:
    return getattr(model.config.vision_config, "spatial_merge_size", 2)


def _diffs(
    model, samples: Sequence[Any], temperature: float, positions: Sequence[int | None]
) -> list[torch.Tensor]:
    """One tensor of |rollout - teacher-forced| per sample (loss-mask-1 positions), one forward."""
    device = next(model.parameters()).device
    image_token_id = model.config.image_token_id
    rows = []
    pixel_values, grids = [], []
    for sample, position in zip(samples, positions, strict=True):
        tokens, length, loss_mask, log_probs = _checked_fields(sample, position)
        pv, grid = _mm_inputs(sample, tokens, image_token_id, _merge_size(model), _describe(sample, position))
        if pv is not None and grid is not None:
            pixel_values.append(pv)
            grids.append(grid)
        rows.append((tokens, length, loss_mask, log_probs))
    width = max(len(tokens) for tokens, *_ in rows)
    num_scored = max(length for _, length, *_ in rows)
    input_ids = torch.full((len(rows), width), 0, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (tokens, *_) in enumerate(rows):
        input_ids[i, width - len(tokens) :] = torch.tensor(tokens)
        attention[i, width - len(tokens) :] = 1
    with torch.no_grad():
        forced = (
            token_log_probs(
                model,
                input_ids.to(device),
                num_scored,
                attention_mask=attention.to(device),
                pixel_values=torch.cat(pixel_values).to(device) if pixel_values else None,
                image_grid_thw=torch.cat(grids).to(device) if grids else None,
                temperature=temperature,
            )
            .float()
            .cpu()
        )
    diffs = []
    for i, (_, length, loss_mask, log_probs) in enumerate(rows):
        mask = torch.tensor(loss_mask, dtype=torch.bool)
        recomputed = forced[i, num_scored - length :]
        diffs.append((recomputed - torch.tensor(log_probs, dtype=torch.float32))[mask].abs())
    return diffs


def _report(diffs: list[torch.Tensor]) -> ConsistencyReport:
    joined = torch.cat(diffs) if diffs else torch.zeros(0)
    if joined.numel() == 0:
        return ConsistencyReport(max_abs_diff=0.0, mean_abs_diff=0.0, num_tokens=0)
    return ConsistencyReport(
        max_abs_diff=float(joined.max()), mean_abs_diff=float(joined.mean()), num_tokens=int(joined.numel())
    )


def check_logprob_consistency(model, sample: Any, *, temperature: float = 1.0) -> ConsistencyReport:
    """Compare ``sample.rollout_log_probs`` with the teacher-forced log-probs of ``model`` at
    ``temperature`` over the positions where ``loss_mask`` is 1. Raises ValueError when the sample
    is malformed (lengths disagree, image pads not matching ``image_grid_thw``)."""
    return _report(_diffs(model, [sample], temperature, [None]))


def _pads_without_images(model, sample: Any) -> bool:
    mm = getattr(sample, "multimodal_train_inputs", None) or {}
    return mm.get("image_grid_thw") is None and model.config.image_token_id in sample.tokens


def check_logprob_consistency_batch(
    model, samples: Sequence[Any], *, temperature: float = 1.0, micro_batch_size: int = 8
) -> ConsistencyReport:
    """The same over many samples (left-padded micro-batches); the report pools all their tokens.

    A sample whose tokens hold image pads but which carries no images (dropped multimodal inputs)
    is scored on its own, so that it shows up as a large difference instead of breaking the
    feature count of the micro-batch it would share.
    """
    indexed = list(enumerate(samples))
    blind = [(i, s) for i, s in indexed if _pads_without_images(model, s)]
    sighted = [(i, s) for i, s in indexed if not _pads_without_images(model, s)]
    chunks = [sighted[start : start + micro_batch_size] for start in range(0, len(sighted), micro_batch_size)]
    chunks += [[item] for item in blind]
    diffs: list[torch.Tensor] = []
    for chunk in chunks:
        diffs += _diffs(model, [s for _, s in chunk], temperature, [i for i, _ in chunk])
    return _report(diffs)
