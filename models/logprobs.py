"""Teacher-forced log-probs of a Qwen-VL model over the last tokens of each sequence.

Shared by the trainer, the train/infer consistency check and tests, so that all of them score a
trajectory the same way: ``mm_token_type_ids`` marks image tokens (without it Qwen2.5-VL silently
drops multimodal RoPE and Qwen3-VL raises), and logits are computed only for the positions that
predict the scored tokens (``logits_to_keep``), which on small models is most of the cost.
"""

from __future__ import annotations

import torch


def mm_token_type_ids(input_ids: torch.Tensor, config) -> torch.Tensor:
    """1 at image-pad tokens, 2 at video-pad tokens, 0 elsewhere (transformers' convention)."""
    types = torch.zeros_like(input_ids)
    types[input_ids == config.image_token_id] = 1
    video_id = getattr(config, "video_token_id", None)
    if video_id is not None:
        types[input_ids == video_id] = 2
    return types


def token_log_probs(
    model,
    input_ids: torch.Tensor,
    num_scored: int,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """Log-probs (batch, num_scored) of ``input_ids[:, -num_scored:]`` given everything before them.

    Sequences are right-aligned (left padding). With ``return_entropy`` also returns the entropy of
    each scored position's distribution.
    """
    if num_scored < 1 or num_scored >= input_ids.shape[1]:
        raise ValueError(f"num_scored must be in [1, {input_ids.shape[1] - 1}], got {num_scored}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=pixel_values,
        image_grid_thw=image_grid_thw,
        mm_token_type_ids=mm_token_type_ids(input_ids, model.config),
        logits_to_keep=num_scored + 1,
        use_cache=False,
    )
    logits = outputs.logits[:, :-1, :].float()
    if temperature != 1.0:
        logits = logits / temperature
    log_probs_all = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, -num_scored:]
    scored = log_probs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return scored
    entropy = -(log_probs_all.exp() * log_probs_all).sum(-1)
    return scored, entropy
