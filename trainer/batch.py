"""From finished episodes to model inputs: per-sample tensors, left-padded micro-batches, log-probs.

A sample's sequence is ``tokens`` (prompt then response); the trainer scores only the response
positions, where ``loss_mask`` is 1 at the model's own tokens and 0 at env tokens. Several samples
are left-padded into one micro-batch so that every response ends at the last column; the scored
window is the longest response, and columns before a shorter sample's response are masked out.
Images of all samples of a micro-batch are concatenated in sample order, which is the order their
pad runs occur in the flattened batch (what Qwen-VL models expect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.logprobs import token_log_probs
from trainer.metrics import REFUSED_KEY

_MM_KEYS = ("pixel_values", "image_grid_thw")


@dataclass
class TrainSample:
    """One episode as the trainer needs it. ``position`` is the sample's index in the rollout."""

    position: int
    input_ids: torch.Tensor  # (L,) long: prompt and response
    response_length: int
    loss_mask: torch.Tensor  # (R,) float: 1 at trained tokens; all 0 for a removed sample
    rollout_log_probs: torch.Tensor  # (R,) float: the engine's log-probs (0 at env tokens)
    advantage: float
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    excluded: str | None = None  # why the sample is not trained on although the rollout kept it

    @property
    def num_trained_tokens(self) -> int:
        return int(self.loss_mask.sum().item())


def untrainable_reason(tokens: list[int], mm: dict, model_config) -> str | None:
    """Why a sequence cannot go through the model's forward pass, or None.

    Token ids index the embedding, so each must be in ``[0, vocab_size)`` of the model config (the
    embedding's size, which may exceed the tokenizer's length; the rollout checks the tighter
    tokenizer bound). Qwen-VL matches vision placeholders to features: every ``<|video_pad|>``
    needs video inputs (we have none) and the image-pad count must equal what ``image_grid_thw``
    provides. A sampled placeholder token breaks that, and the forward pass would raise mid-update.
    """
    vocab_size = getattr(getattr(model_config, "text_config", model_config), "vocab_size", None)
    if vocab_size is not None and tokens and (min(tokens) < 0 or max(tokens) >= vocab_size):
        position, token = next((i, t) for i, t in enumerate(tokens) if not 0 <= t < vocab_size)
        return f"token id {token} at position {position} is outside the model's embedding [0, {vocab_size})"
    video_id = getattr(model_config, "video_token_id", None)
    if video_id is not None and video_id in tokens:
        return "the sequence holds <|video_pad|> tokens but no video inputs"
    image_id = getattr(model_config, "image_token_id", None)
    grid = mm.get("image_grid_thw")
    pads = tokens.count(image_id) if image_id is not None else 0
    merge = getattr(getattr(model_config, "vision_config", None), "spatial_merge_size", 2)
    expected = int(grid.prod(dim=-1).sum().item()) // (merge * merge) if grid is not None else 0
    if pads != expected:
        return f"the sequence holds {pads} image pad tokens but its images provide {expected} features"
    return None


def to_train_sample(sample, position: int, advantage: float, model_config=None) -> TrainSample:
    """Check the trajectory invariants of a finished sample and turn it into tensors.

    A removed sample (``remove_sample``) keeps its place but gets an all-zero loss mask, exactly as
    slime zeroes it, so it adds nothing to the loss yet still counts in the step's sample mean. A
    sample the model cannot be run on (see :func:`untrainable_reason`, checked when
    ``model_config`` is given) or with a log-prob that is not finite is treated the same way and
    says why in ``excluded``; when the rollout kept it, the reason is also written to
    ``sample.metadata[REFUSED_KEY]``, which :func:`trainer.metrics.rollout_metrics` counts.
    """
    tokens = list(sample.tokens)
    response_length = int(sample.response_length)
    loss_mask = list(sample.loss_mask) if sample.loss_mask is not None else [1] * response_length
    log_probs = sample.rollout_log_probs
    where = f"sample index={sample.index} group_index={sample.group_index}"
    if response_length > len(tokens) - 1 and response_length > 0:
        raise ValueError(
            f"{where}: response_length {response_length} leaves no prompt in {len(tokens)} tokens"
        )
    if len(loss_mask) != response_length:
        raise ValueError(
            f"{where}: loss_mask has {len(loss_mask)} entries, response_length is {response_length}"
        )
    if log_probs is None:
        if any(loss_mask) and not sample.remove_sample:
            raise ValueError(
                f"{where}: rollout_log_probs is None; the engine must return log-probs for every generated token"
            )
        log_probs = [0.0] * response_length
    if len(log_probs) != response_length:
        raise ValueError(
            f"{where}: rollout_log_probs has {len(log_probs)} entries, response_length is {response_length}"
        )
    mm = sample.multimodal_train_inputs or {}
    excluded = untrainable_reason(tokens, mm, model_config) if model_config is not None else None
    if excluded is None and not math.isfinite(sum(log_probs)):
        bad = next(((i, v) for i, v in enumerate(log_probs) if not math.isfinite(v)), None)
        if bad is not None:
            excluded = f"rollout log-prob {bad[1]} at response position {bad[0]} is not a finite number"
    if excluded and not sample.remove_sample and isinstance(sample.metadata, dict):
        # The rollout should have failed this sample; what got through is recorded with it and
        # counted per step (train/refused_samples).
        sample.metadata[REFUSED_KEY] = excluded
    if sample.remove_sample or excluded:
        loss_mask = [0] * response_length
        # Left out of every forward pass (no trained token), and zeroed so that a NaN cannot
        # reach the loss even through a masked position (NaN * 0 is NaN).
        log_probs = [0.0] * response_length
    return TrainSample(
        position=position,
        input_ids=torch.tensor(tokens, dtype=torch.long),
        response_length=response_length,
        loss_mask=torch.tensor(loss_mask, dtype=torch.float32),
        rollout_log_probs=torch.tensor(log_probs, dtype=torch.float32),
        advantage=float(advantage),
        pixel_values=mm.get("pixel_values"),
        image_grid_thw=mm.get("image_grid_thw"),
        excluded=excluded,
    )


@dataclass
class MicroBatch:
    items: list[TrainSample]
    input_ids: torch.Tensor  # (B, L) left-padded
    attention_mask: torch.Tensor  # (B, L)
    num_scored: int  # the longest response: scored columns are the last num_scored
    loss_mask: torch.Tensor  # (B, num_scored)
    rollout_log_probs: torch.Tensor  # (B, num_scored)
    advantages: torch.Tensor  # (B,)
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None


def _right_align(rows: list[torch.Tensor], width: int, fill: float | int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), fill, dtype=dtype)
    for i, row in enumerate(rows):
        if len(row):
            out[i, width - len(row) :] = row
    return out


def collate(items: list[TrainSample], pad_token_id: int) -> MicroBatch:
    """Left-pad ``items`` into one micro-batch (on CPU; :func:`micro_batch_log_probs` moves it)."""
    if not items:
        raise ValueError("collate needs at least one sample")
    length = max(len(item.input_ids) for item in items)
    num_scored = max(item.response_length for item in items)
    input_ids = _right_align([item.input_ids for item in items], length, pad_token_id, torch.long)
    attention_mask = _right_align([torch.ones_like(item.input_ids) for item in items], length, 0, torch.long)
    pixel_values = [item.pixel_values for item in items if item.pixel_values is not None]
    grids = [item.image_grid_thw for item in items if item.image_grid_thw is not None]
    return MicroBatch(
        items=items,
        input_ids=input_ids,
        attention_mask=attention_mask,
        num_scored=num_scored,
        loss_mask=_right_align([item.loss_mask for item in items], num_scored, 0.0, torch.float32),
        rollout_log_probs=_right_align(
            [item.rollout_log_probs for item in items], num_scored, 0.0, torch.float32
        ),
        advantages=torch.tensor([item.advantage for item in items], dtype=torch.float32),
        pixel_values=torch.cat(pixel_values, dim=0) if pixel_values else None,
        image_grid_thw=torch.cat(grids, dim=0) if grids else None,
    )


def micro_batches(items: list[TrainSample], micro_batch_size: int) -> list[list[TrainSample]]:
    """Split into micro-batches, leaving out samples with no trained token (they add exactly zero).

    Samples are sorted by length first so that padding stays small; the loss does not depend on
    the order.
    """
    trained = sorted(
        (item for item in items if item.num_trained_tokens > 0), key=lambda item: len(item.input_ids)
    )
    return [trained[i : i + micro_batch_size] for i in range(0, len(trained), micro_batch_size)]


def micro_batch_log_probs(
    model, batch: MicroBatch, *, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (B, num_scored) of the scored columns under ``model`` (and their entropies)."""
    device = next(model.parameters()).device
    pixel_values = batch.pixel_values
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=device, dtype=model.dtype)
    grid = batch.image_grid_thw.to(device) if batch.image_grid_thw is not None else None
    result = token_log_probs(
        model,
        batch.input_ids.to(device),
        batch.num_scored,
        attention_mask=batch.attention_mask.to(device),
        pixel_values=pixel_values,
        image_grid_thw=grid,
        temperature=temperature,
        return_entropy=with_entropy,
    )
    if with_entropy:
        return result[0], result[1]
    return result, None
