"""Tiny random Qwen-VL models, built from a config in well under a second.

``initializer_range=0.1`` (text and vision) on purpose: at the default 0.02 the outputs are so
uniform that a dropped ``mm_token_type_ids`` or swapped images move log-probs by only ~1e-3, and
tests could not see such bugs.
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
)

from models.qwen_vocab import SPECIAL_TOKENS

_TOKEN_ID = {token: 151_643 + i for i, token in enumerate(SPECIAL_TOKENS)}
INIT_RANGE = 0.1
HIDDEN = 64


def _ids(offset: int) -> dict[str, int]:
    """Ids of the special tokens given where the added tokens start (151643 for the real vocab)."""
    return {token: token_id - 151_643 + offset for token, token_id in _TOKEN_ID.items()}


def _text_config(vocab_size: int, ids: dict[str, int], **extra) -> dict:
    return dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32_768,
        initializer_range=INIT_RANGE,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **extra,
    )


def _vision_token_ids(ids: dict[str, int]) -> dict[str, int]:
    return dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )


def tiny_config(family: str, vocab_size: int, added_tokens_offset: int):
    """A tiny config whose vocabulary holds ``vocab_size`` ids and whose special tokens start at
    ``added_tokens_offset`` (the tokenizer's regular vocabulary size)."""
    ids = _ids(added_tokens_offset)
    if family == "qwen2.5-vl":
        text = _text_config(
            vocab_size,
            ids,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=14,
            window_size=112,
            fullatt_block_indexes=[1],
            initializer_range=INIT_RANGE,
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **_vision_token_ids(ids))
    elif family == "qwen3-vl":
        text = _text_config(
            vocab_size,
            ids,
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 5_000_000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        )
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=HIDDEN,
            patch_size=16,
            num_position_embeddings=256,
            deepstack_visual_indexes=[1],
            initializer_range=INIT_RANGE,
        )
        config = Qwen3VLConfig(text_config=text, vision_config=vision, **_vision_token_ids(ids))
    else:
        raise ValueError(f"unknown model family {family!r}; expected 'qwen2.5-vl' or 'qwen3-vl'")
    config.initializer_range = INIT_RANGE
    return config


MODEL_CLASSES = {"qwen2.5-vl": Qwen2_5_VLForConditionalGeneration, "qwen3-vl": Qwen3VLForConditionalGeneration}


def build_tiny_model(family: str, vocab_size: int, added_tokens_offset: int, seed: int = 0):
    torch.manual_seed(seed)
    return MODEL_CLASSES[family](tiny_config(family, vocab_size, added_tokens_offset)).eval()
