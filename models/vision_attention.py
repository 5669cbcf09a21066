"""Vision-tower attention over all windows (or images) of a packed sequence in a few batched calls.

The Qwen-VL vision towers attend within segments of one packed sequence: Qwen2.5-VL within
windows of 8x8 patches (and whole images in a few layers), Qwen3-VL and Qwen3.5 within images.
Unless a flash-attention kernel takes the packed sequence with its ``cu_seqlens``, transformers
calls SDPA once per segment: for a batch of 64 448x448 images that is 1,024 calls in each windowed
layer, Python-bound on a GPU. ``segmented_sdpa`` takes the packed sequence and runs every group of
equally long segments as one batched SDPA call (all full windows of all images: one call).

transformers hands ``cu_seqlens`` only to attention implementations whose name contains "flash"
(``is_flash_attention_requested``), hence the registered name. The arithmetic is SDPA's, segment
by segment, as before; gradients flow through it as through SDPA.

``load_policy`` switches it on for models on CUDA: on an H200 (two leases), the vision tower of
Qwen2.5-VL-3B's shape took 0.57-0.72 s instead of 1.78-3.09 s for 64 new 448x448 images, and the
engine's prefill of them 0.97-1.06 s instead of 2.25-3.39 s (``bench/static_decode_check.py``). On
a CPU, where a call costs little beside its arithmetic, transformers' own choice stays.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "flash_api_segmented_sdpa"


def segmented_sdpa(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` (1, heads, tokens, dim) within the segments ``cu_seq_lens_q`` marks;
    returns (1, tokens, heads, dim) as transformers' attention functions do."""
    same_segments = (
        cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q or torch.equal(cu_seq_lens_k, cu_seq_lens_q)
    )
    if (
        cu_seq_lens_q is None
        or attention_mask is not None
        or is_causal
        or not same_segments
        or query.shape[0] != 1
    ):
        return sdpa_attention_forward(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    bounds = cu_seq_lens_q.tolist()
    starts_by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end > start:
            starts_by_length.setdefault(end - start, []).append(start)
    heads, dim = query.shape[1], query.shape[3]
    outputs, positions = [], []
    for length, starts in starts_by_length.items():
        index = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1).to(query.device)

        def segments(x: torch.Tensor, index=index, count=len(starts), length=length) -> torch.Tensor:
            return x[0][:, index].view(heads, count, length, dim).transpose(0, 1)

        out = torch.nn.functional.scaled_dot_product_attention(
            segments(query), segments(key), segments(value), dropout_p=dropout, scale=scaling
        )
        outputs.append(out.transpose(1, 2).reshape(-1, heads, dim))
        positions.append(index)
    order = torch.cat(positions)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(outputs)[inverse].unsqueeze(0), None


def use_segmented_vision_attention(model) -> bool:
    """Route ``model``'s vision tower through ``segmented_sdpa`` where it would run SDPA segment by
    segment; a flash-attention or eager choice is left as it is. Returns whether it now does."""
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None or vision_config._attn_implementation not in ("sdpa", NAME):
        return False
    AttentionInterface.register(NAME, segmented_sdpa)
    vision_config._attn_implementation = NAME
    return True


def use_transformers_vision_attention(model) -> bool:
    """Undo ``use_segmented_vision_attention``: transformers' SDPA, one call per segment."""
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None or vision_config._attn_implementation != NAME:
        return False
    vision_config._attn_implementation = "sdpa"
    return True


def use_default_vision_attention(model) -> bool:
    """The segmented attention for a model on CUDA, where per-segment calls are launch-bound;
    elsewhere the model is left as it is. Returns whether the model now uses it."""
    parameter = next(model.parameters(), None)
    if parameter is None or parameter.device.type != "cuda":
        return False
    return use_segmented_vision_attention(model)
