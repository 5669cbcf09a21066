"""models.vision_attention: the vision tower's segments in batched SDPA calls give SDPA's results."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw
from transformers import AttentionInterface

from models import load_policy, vision_attention
from models.vision_attention import (
    NAME,
    segmented_sdpa,
    use_default_vision_attention,
    use_segmented_vision_attention,
    use_transformers_vision_attention,
)


def _images() -> list[Image.Image]:
    # Sizes whose windows are not all full (Qwen2.5-VL), so segments of several lengths occur.
    images = []
    for i, size in enumerate([(84, 84), (97, 131), (131, 97), (600, 28)]):
        image = Image.new("RGB", size, (255, 255 - 40 * i, 200))
        ImageDraw.Draw(image).line([(0, 0), size], fill=(0, 0, 0), width=3)
        images.append(image)
    return images


def _features(model, inputs) -> torch.Tensor:
    output = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    return output.pooler_output if hasattr(output, "pooler_output") else output


@pytest.mark.parametrize("preset", ["tiny-qwen2.5-vl-small-vocab", "tiny-qwen3-vl-small-vocab"])
def test_segmented_vision_attention_gives_sdpas_features_and_gradients(preset, monkeypatch):
    policy = load_policy(preset, device="cpu")  # its own copy: the switch changes the model's config
    inputs = policy.processor.image_processor(images=_images(), return_tensors="pt")
    model = policy.model
    reference = _features(model, inputs)
    reference_pooled = torch.cat(list(reference)) if isinstance(reference, (list, tuple)) else reference
    reference_pooled.sum().backward()
    reference_grads = [None if p.grad is None else p.grad.clone() for p in model.model.visual.parameters()]
    model.zero_grad()

    segment_counts = []

    def spy(module, query, key, value, attention_mask=None, **kwargs):
        bounds = kwargs["cu_seq_lens_q"]
        segment_counts.append(len({int(b - a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)}))
        return segmented_sdpa(module, query, key, value, attention_mask, **kwargs)

    assert use_segmented_vision_attention(model)
    AttentionInterface.register(NAME, spy)
    try:
        features = _features(model, inputs)
    finally:
        AttentionInterface.register(NAME, segmented_sdpa)
    pooled = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    pooled.sum().backward()
    assert segment_counts and len(segment_counts) == model.config.vision_config.depth  # every layer
    if "2.5" in preset:
        assert max(segment_counts) > 1  # windows of several sizes, batched by size
    assert torch.allclose(pooled, reference_pooled, atol=1e-5, rtol=0)
    grads = [p.grad for p in model.model.visual.parameters()]
    assert sum(g is not None for g in grads) > 0
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        assert (grad is None) == (reference_grad is None)
        if grad is not None:
            assert torch.allclose(grad, reference_grad, atol=1e-5, rtol=1e-4)


def test_without_segments_it_is_sdpa_and_other_implementations_are_left_alone(qwen25_small_policy):
    query, key, value = (torch.randn(1, 2, 10, 8) for _ in range(3))
    module = torch.nn.Module()
    module.is_causal = False  # as the vision towers' attention modules
    plain, _ = vision_attention.sdpa_attention_forward(module, query, key, value, None, scaling=0.3)
    unsegmented, _ = segmented_sdpa(module, query, key, value, None, scaling=0.3)
    assert torch.equal(plain, unsegmented)
    one_segment, _ = segmented_sdpa(
        module, query, key, value, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 10])
    )
    assert torch.allclose(one_segment, plain, atol=1e-6)

    class Config:
        vision_config = type("VisionConfig", (), {"_attn_implementation": "flash_attention_2"})()

    class Model:
        config = Config()

    assert not use_segmented_vision_attention(Model())
    assert Model.config.vision_config._attn_implementation == "flash_attention_2"


def _model_on(device: str, attention: str):
    """A stand-in with a vision config and one parameter reporting ``device`` (no GPU needed)."""

    class Config:
        vision_config = type("VisionConfig", (), {"_attn_implementation": attention})()

    class Model:
        config = Config()

        def parameters(self):
            return iter([SimpleNamespace(device=torch.device(device))])

    return Model()


def test_the_default_is_segmented_on_cuda_only_and_can_be_undone():
    on_gpu = _model_on("cuda", "sdpa")
    assert use_default_vision_attention(on_gpu)
    assert on_gpu.config.vision_config._attn_implementation == NAME
    assert use_transformers_vision_attention(on_gpu)
    assert on_gpu.config.vision_config._attn_implementation == "sdpa"
    assert not use_transformers_vision_attention(on_gpu)  # nothing to undo

    on_cpu = _model_on("cpu", "sdpa")
    assert not use_default_vision_attention(on_cpu)
    assert on_cpu.config.vision_config._attn_implementation == "sdpa"
    flash = _model_on("cuda", "flash_attention_2")
    assert not use_default_vision_attention(flash)  # a packed-sequence kernel already
    assert flash.config.vision_config._attn_implementation == "flash_attention_2"


def test_load_policy_keeps_transformers_attention_on_cpu(qwen25_small_policy):
    assert qwen25_small_policy.model.config.vision_config._attn_implementation == "sdpa"
