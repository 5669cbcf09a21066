"""Helpers for the engine tests: deterministic images and chat-templated prompts with image pads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw

from models.logprobs import token_log_probs
from rollout.engines import local, static_decode


def make_image(size: int, seed: int) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.polygon(
        [(10 + seed * 5, size - 10), (size - 10, size - 10), (size - 10, 10 + seed * 3)], outline=(0, 0, 0)
    )
    draw.rectangle([seed * 7, seed * 5, seed * 7 + 20, seed * 5 + 12], fill=(200, 37 * seed % 255, 90))
    return image


def chat_text(policy, question: str, images: int = 1) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    return policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def single_pad_ids(policy, text: str) -> list[int]:
    """The prompt as a client sends it to SGLang: one <|image_pad|> per image."""
    return policy.tokenizer(text)["input_ids"]


def expanded_inputs(policy, text: str, images: list[Image.Image]) -> dict:
    """The prompt as the trainer sees it: the processor's expanded pads, pixel_values, grids."""
    return policy.processor(text=[text], images=images or None, return_tensors="pt")


def teacher_forced(policy, prompt: dict, generated: list[int], temperature: float = 1.0) -> torch.Tensor:
    sequence = torch.cat([prompt["input_ids"], torch.tensor([generated])], dim=1)
    with torch.no_grad():
        return token_log_probs(
            policy.model,
            sequence,
            len(generated),
            pixel_values=prompt.get("pixel_values"),
            image_grid_thw=prompt.get("image_grid_thw"),
            temperature=temperature,
        )[0]


@pytest.fixture
def image_a() -> Image.Image:
    return make_image(84, 1)


@pytest.fixture
def image_b() -> Image.Image:
    return make_image(112, 3)


@pytest.fixture(params=["eager", "static"])
def decode_mode(request, monkeypatch) -> str:
    """Runs a test under both decode loops: every LocalEngine it builds without an explicit
    ``decode`` uses this one (the static loop without CUDA graphs on this CPU)."""
    mode = request.param
    original = local.LocalEngine.__init__

    def init(self, policy, *args, decode=None, **kwargs):
        if decode is None:
            decode = (
                mode if mode == "eager" or static_decode.unsupported_reason(policy.model) is None else "eager"
            )
        original(self, policy, *args, decode=decode, **kwargs)

    monkeypatch.setattr(local.LocalEngine, "__init__", init)
    return mode


def patch_sampler(monkeypatch, wrapper):
    """Route both decode loops' token sampling through ``wrapper(real_sample, *args)``; returns a
    function that restores the real one."""
    real = local.sample_tokens

    def sample(*args):
        return wrapper(real, *args)

    for module in (local, static_decode):
        monkeypatch.setattr(module, "sample_tokens", sample)

    def restore() -> None:
        for module in (local, static_decode):
            monkeypatch.setattr(module, "sample_tokens", real)

    return restore


def small_3b_shape(shapes):
    """Qwen2.5-VL-3B's shape (its vocabulary, tied embeddings, rope and vision layout) with tiny
    widths and depths, from a benchmark's shape table: random-init code paths at CPU speed."""
    return dataclasses.replace(
        shapes["qwen2.5-vl-3b"],
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        mrope_section=(2, 3, 3),
        vision_depth=2,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_heads=2,
        vision_fullatt_block_indexes=(1,),
    )
