"""Tiny random Qwen-VL models, built from a config in well under a second.

Qwen3.5 (dense and MoE) keeps its hybrid layout: the first five text layers of the released
pattern (``full_attention_interval`` 4: three Gated DeltaNet linear-attention layers, one
full-attention layer, then linear attention again), partial rotary embeddings with interleaved
multimodal RoPE, and for the MoE variant a few routed experts plus the shared expert. A linear layer
after a full-attention layer, and a non-zero ``<|endoftext|>`` (padding) embedding as in trained
checkpoints, make padding that leaks into the recurrent state visible: padded positions then carry
non-zero hidden states into a linear-attention layer.

``initializer_range=0.1`` (text and vision) on purpose: at the default 0.02 the outputs are so
uniform that a dropped ``mm_token_type_ids`` or swapped images move log-probs by only ~1e-3, and
tests could not see such bugs.
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3_5Config,
    Qwen3_5ForConditionalGeneration,
    Qwen3_5MoeConfig,
    Qwen3_5MoeForConditionalGeneration,
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
    return {**dict(
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
    ), **extra}


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
    elif family in ("qwen3.5", "qwen3.5-moe"):
        config = _qwen3_5_config(family, vocab_size, ids)
    else:
        raise ValueError(f"unknown model family {family!r}; expected one of {', '.join(MODEL_CLASSES)}")
    config.initializer_range = INIT_RANGE
    return config


def _qwen3_5_config(family: str, vocab_size: int, ids: dict[str, int]):
    text = _text_config(
        vocab_size,
        ids,
        num_hidden_layers=5,
        layer_types=["linear_attention"] * 3 + ["full_attention", "linear_attention"],
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        # 0.25 of head_dim rotates (8 of 32 dims), split over (t, h, w) as the released [11, 11, 10]
        # is over 64 dims.
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
    )
    if family == "qwen3.5-moe":
        del text["intermediate_size"]
        text.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=32,
        )
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=HIDDEN,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=256,
        initializer_range=INIT_RANGE,
    )
    config_class = Qwen3_5MoeConfig if family == "qwen3.5-moe" else Qwen3_5Config
    # Tied embeddings (as in the small released sizes) halve a tiny model made mostly of vocabulary.
    return config_class(
        text_config={**text, "tie_word_embeddings": True},
        vision_config=vision,
        tie_word_embeddings=True,
        **_vision_token_ids(ids),
    )


MODEL_CLASSES = {
    "qwen2.5-vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3-vl": Qwen3VLForConditionalGeneration,
    "qwen3.5": Qwen3_5ForConditionalGeneration,
    "qwen3.5-moe": Qwen3_5MoeForConditionalGeneration,
}


def build_tiny_model(family: str, vocab_size: int, added_tokens_offset: int, seed: int = 0):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[family](tiny_config(family, vocab_size, added_tokens_offset)).eval()
    if family.startswith("qwen3.5"):
        # transformers zero-initialises the padding row; a trained checkpoint's is not zero.
        pad = model.config.text_config.pad_token_id
        with torch.no_grad():
            model.get_input_embeddings().weight[pad].normal_(0.0, INIT_RANGE)
    return model
