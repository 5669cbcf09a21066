"""Image processing runs in the background: requests need only pad counts, which follow from sizes."""

from __future__ import annotations

import asyncio
import threading

import pyarrow
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import rollout
from rollout.image_cache import ProcessedImageCache, image_digest, predicted_pad_count
from rollout.runtime import default_runtime
from rollout.sample import Sample
from tests.rollout.conftest import ScriptedEngine, call, diagram, make_args, make_sample

Status = Sample.Status


@pytest.fixture
def fresh_cache():
    """The default runtime with an empty image cache, restored afterwards."""
    runtime = default_runtime()
    saved = runtime.image_cache
    runtime.image_cache = ProcessedImageCache()
    yield runtime.image_cache
    runtime.image_cache.shutdown()
    runtime.image_cache = saved


@pytest.mark.parametrize("family", ["qwen25_processing", "qwen3_processing"])
@settings(max_examples=40, deadline=None)
@given(width=st.integers(8, 1400), height=st.integers(8, 1400))
def test_predicted_pad_count_is_the_processors_count(request, family, width, height):
    processing = request.getfixturevalue(family)
    if max(width, height) / min(width, height) > 200:  # the processor refuses such images outright
        return
    image = Image.new("RGB", (width, height), (200, 30, 30))
    grid = processing.process_images([image])["image_grid_thw"]
    assert predicted_pad_count(processing, image) == processing.pads_per_image(grid)[0]


def test_digest_depends_on_pixels_mode_and_size():
    a = diagram(112)
    assert image_digest(a) == image_digest(a.copy())
    assert image_digest(a) != image_digest(diagram(112, shade=1))
    assert image_digest(a) != image_digest(a.convert("RGBA"))
    flat = Image.new("RGB", (4, 2), (0, 0, 0))
    assert image_digest(flat) != image_digest(Image.new("RGB", (2, 4), (0, 0, 0)))



def test_digest_of_a_palette_image_covers_its_palette():
    red, blue = Image.new("P", (4, 4), 0), Image.new("P", (4, 4), 0)
    red.putpalette([255, 0, 0] * 256)
    blue.putpalette([0, 0, 255] * 256)
    assert red.tobytes() == blue.tobytes()  # same indices...
    assert image_digest(red) != image_digest(blue)  # ...different pictures


def test_digest_of_an_image_stored_in_several_blocks():
    """Pillow cannot export rows spread over several memory blocks; those are hashed repacked."""
    block_size = Image.core.get_block_size()
    Image.core.set_block_size(4096)
    try:
        split, same, changed = diagram(112), diagram(112), diagram(112)
        changed.putpixel((100, 100), (1, 2, 3))
    finally:
        Image.core.set_block_size(block_size)
    with pytest.raises(ValueError, match="contiguous"):
        pyarrow.array(split)
    assert image_digest(split) == image_digest(same)
    assert image_digest(split) != image_digest(changed)


def test_equal_pixels_in_different_storage_are_never_confused(qwen25_processing, fresh_cache):
    """``resize`` leaves an RGB pixel's unused storage byte at 0 where a decoded image has 255:
    the two may get two cache entries (each processed), and each gets its own correct tensors."""
    resized = diagram(224).resize((112, 112))
    rebuilt = Image.frombytes("RGB", resized.size, resized.tobytes())
    first, second = fresh_cache.get(qwen25_processing, resized), fresh_cache.get(qwen25_processing, rebuilt)
    expected = qwen25_processing.process_images([rebuilt])["pixel_values"]
    assert first.tensors.result().pixel_values.equal(expected)
    assert second.tensors.result().pixel_values.equal(expected)
    assert fresh_cache.get(qwen25_processing, rebuilt.copy()) is second

async def test_first_request_does_not_wait_for_image_processing(qwen25_processing, fresh_cache):
    """The request goes out (one pad per image, for the engine to expand) while the processor is
    still blocked, and the engine's prompt_tokens is checked against the predicted pad count; the
    finished sample then carries the processor's tensors."""
    tok = qwen25_processing.tokenizer
    release = threading.Event()
    original = qwen25_processing.process_images

    def blocked(images):
        if not release.wait(timeout=30):
            raise TimeoutError("the test never released image processing")
        return original(images)

    requested = asyncio.Event()

    def reply(input_ids, images, params):
        requested.set()
        from rollout.engines.base import GenerateResult

        ids = tok.encode(call("5"), add_special_tokens=False)
        # What SGLang reports: the request's length with its single pad expanded (140x140 -> 25).
        expanded = len(input_ids) - 1 + 25
        return GenerateResult(ids, [-0.1] * len(ids), tok.decode(ids), "stop", None, {}, prompt_tokens=expanded)

    engine = ScriptedEngine(tok, [reply])
    qwen25_processing.process_images = blocked
    try:
        args = make_args(engine)
        task = asyncio.ensure_future(rollout.generate(args, make_sample(tok, size=140), {}))
        await asyncio.wait_for(requested.wait(), timeout=30)
        assert not task.done()  # the sample cannot finish without its pixel_values
        (request,) = engine.requests
        assert request["input_ids"].count(qwen25_processing.image_pad_id) == 1
        release.set()
        out = await asyncio.wait_for(task, timeout=30)
    finally:
        release.set()
        qwen25_processing.process_images = original
    assert out.status == Status.COMPLETED, out.metadata["status_reason"]
    assert out.multimodal_train_inputs["image_grid_thw"].tolist() == [[1, 10, 10]]
    assert out.tokens.count(qwen25_processing.image_pad_id) == 25  # 140x140 -> 10x10 patches / 4


async def test_a_wrong_prediction_fails_the_sample_with_the_reason(qwen25_processing, fresh_cache, monkeypatch):
    tok = qwen25_processing.tokenizer
    image_processor = qwen25_processing.processor.image_processor
    monkeypatch.setattr(image_processor, "get_number_of_image_patches", lambda h, w, kwargs: 4 * 7)
    engine = ScriptedEngine(tok, [call("5")])
    out = await rollout.generate(make_args(engine), make_sample(tok, size=112), {})
    assert out.status == Status.FAILED and out.remove_sample and out.reward == 0.0
    assert "image processing failed" in out.metadata["status_reason"]
    assert "16 pads, but its size predicted 7" in out.metadata["status_reason"]
    assert out.multimodal_train_inputs is None and out.tokens == []


async def test_a_processor_that_cannot_predict_is_waited_for(qwen25_processing, fresh_cache, monkeypatch):
    tok = qwen25_processing.tokenizer
    image_processor = qwen25_processing.processor.image_processor
    monkeypatch.setattr(image_processor, "get_number_of_image_patches", None)
    engine = ScriptedEngine(tok, [call("5")])
    out = await rollout.generate(make_args(engine), make_sample(tok, size=112), {})
    assert out.status == Status.COMPLETED
    assert engine.requests[0]["input_ids"].count(qwen25_processing.image_pad_id) == 1
    assert out.tokens.count(qwen25_processing.image_pad_id) == 16


async def test_an_image_the_processor_refuses_fails_the_sample(qwen25_processing, fresh_cache):
    tok = qwen25_processing.tokenizer
    sample = make_sample(tok)
    sample.multimodal_inputs["images"] = [Image.new("RGB", (4000, 10), (0, 0, 0))]  # aspect ratio 400
    engine = ScriptedEngine(tok, [call("5")])
    out = await rollout.generate(make_args(engine), sample, {})
    assert out.status == Status.FAILED and out.remove_sample
    assert "prompt image could not be processed" in out.metadata["status_reason"]
    assert engine.requests == []
