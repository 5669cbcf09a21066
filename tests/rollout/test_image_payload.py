"""What SGLang is sent for an image decodes to the pixels the trainer's processor saw, and the
pixel table gives the processor's own pixel_values."""

from __future__ import annotations

import base64
import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from envs.images import engine_data_uri, engine_image, load_image, to_data_uri
from rollout.engines.sglang_client import SGLangClient
from rollout.episode import run_episode
from rollout.image_cache import PixelRule, ProcessedImageCache
from rollout.runtime import RolloutRuntime
from rollout.sample import Sample
from tests.rollout.conftest import TEST_ENVS, ScriptedEngine, make_args

Status = Sample.Status


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Noise with structure: every byte value occurs, and JPEG has something to lose."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    ImageDraw.Draw(image).ellipse([width // 4, height // 4, width // 2, height // 2], fill=(250, 20, 20))
    return image


def _sglang_decode(uri: str) -> Image.Image:
    """What SGLang does with a data URI: base64-decode the payload and open it with PIL (its
    processor converts to RGB)."""
    image = Image.open(io.BytesIO(base64.b64decode(uri.partition(",")[2])))
    image.load()
    return image.convert("RGB")


def _same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def _file(tmp_path, image: Image.Image, name: str, **save) -> str:
    path = tmp_path / name
    image.save(path, **save)
    return str(path)


@pytest.mark.parametrize("name, save", [("a.png", {}), ("a.jpg", {"quality": 80})])
def test_a_loaded_file_is_sent_as_it_is(tmp_path, name, save):
    path = _file(tmp_path, _photo(96, 64), name, **save)
    image = load_image(path)
    mime, data = engine_image(image)
    assert data == Path(path).read_bytes()  # no decode and re-encode
    assert mime == ("image/png" if name.endswith("png") else "image/jpeg")
    assert _same_pixels(_sglang_decode(engine_data_uri(image)), image)
    # slime deep-copies each prompt's images n times: the copies still carry the file.
    assert engine_image(copy.deepcopy(image))[1] == data
    # A data URI of the file is the same bytes.
    uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
    assert engine_image(load_image(uri))[1] == data


def test_a_changed_image_is_encoded_from_its_pixels(tmp_path):
    path = _file(tmp_path, _photo(96, 64), "a.png")
    original = Path(path).read_bytes()
    drawn = load_image(path)
    ImageDraw.Draw(drawn).rectangle([0, 0, 10, 10], fill=(0, 0, 255))  # in place: info stays
    resized = load_image(path).resize((48, 32))  # a new image: info is copied
    for image in (drawn, resized):
        assert engine_image(image)[1] != original
        assert _same_pixels(_sglang_decode(engine_data_uri(image)), image)


def test_files_decoded_by_conversion_or_rotation_are_not_sent_as_they_are(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (10, 20, 30, 0))  # transparent: engines composite differently
    palette = _photo(40, 30).convert("P")
    rotated = _photo(40, 30)
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90": an engine may apply it, load_image does not
    for path in (
        _file(tmp_path, rgba, "rgba.png"),
        _file(tmp_path, palette, "p.png"),
        _file(tmp_path, rotated, "rot.jpg", exif=exif.tobytes()),
        _file(tmp_path, _photo(40, 30), "a.bmp"),
    ):
        image = load_image(path)
        mime, data = engine_image(image)
        assert (mime, data != Path(path).read_bytes()) == ("image/png", True), path
        assert _same_pixels(_sglang_decode(engine_data_uri(image)), image), path


@settings(max_examples=25, deadline=None)
@given(width=st.integers(1, 300), height=st.integers(1, 300), mode=st.sampled_from(["RGB", "L", "RGBA", "P"]))
def test_an_env_made_image_decodes_to_its_pixels(width, height, mode):
    image = _photo(width, height, seed=width * 1000 + height).convert(mode)
    decoded = Image.open(io.BytesIO(engine_image(image)[1]))
    decoded.load()
    assert decoded.mode == image.mode
    assert _same_pixels(decoded.convert("RGB"), image.convert("RGB"))


@pytest.mark.parametrize("family", ["qwen25_processing", "qwen3_processing", "qwen35_processing"])
@settings(max_examples=15, deadline=None)
@given(width=st.integers(20, 900), height=st.integers(20, 900))
def test_pixel_rule_gives_the_processors_pixel_values(request, family, width, height):
    processing = request.getfixturevalue(family)
    rule = PixelRule.for_processor(processing)
    assert rule is not None
    image = _photo(width, height, seed=width + height)  # sizes that resize up, down and not at all
    expected = processing.process_images([image])
    pixel_values, grid = rule(image)
    assert torch.equal(grid, expected["image_grid_thw"])
    assert pixel_values.dtype == expected["pixel_values"].dtype
    assert torch.equal(pixel_values, expected["pixel_values"])


def test_a_rule_that_disagrees_with_the_processor_is_not_used(qwen25_processing, monkeypatch):
    """The cache checks the rule against the processor on the first image; a processor whose
    arithmetic is not the rule's (here: shifted outputs) gets its own results for every image."""
    original = qwen25_processing.process_images

    def shifted(images):
        out = original(images)
        return {**out, "pixel_values": out["pixel_values"] + 1e-3}

    monkeypatch.setattr(qwen25_processing, "process_images", shifted)
    cache = ProcessedImageCache()
    try:
        for seed in range(3):
            image = _photo(84, 56, seed=seed)
            got = cache.get(qwen25_processing, image).tensors.result().pixel_values
            assert torch.equal(got, shifted([image])["pixel_values"])
    finally:
        cache.shutdown()


async def test_what_sglang_is_sent_is_what_the_trainer_trains_on(tmp_path, qwen25_processing):
    """Through a whole episode with the SGLang client's encoding: the prompt image (a JPEG file)
    and two image observations an env made, decoded the way SGLang decodes them and put through the
    processor, give exactly the sample's pixel_values."""
    tok = qwen25_processing.tokenizer
    client = SGLangClient("http://127.0.0.1:1")  # only its image encoding is used
    engine = ScriptedEngine(tok, ["look<|im_end|>"] * 3, prepare_image=client.prepare_image)
    runtime = RolloutRuntime()
    try:
        args = make_args(engine, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "image"})
        path = _file(tmp_path, _photo(140, 112), "prompt.jpg", quality=85)
        content = [{"type": "image"}, {"type": "text", "text": "Find x."}]
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        sample = Sample(prompt=prompt, multimodal_inputs={"images": [load_image(path)]}, label="5")
        out = await run_episode(runtime.context(args), args, sample, {})
        await runtime.aclose()
    finally:
        runtime.shutdown()
    assert out.status == Status.COMPLETED, out.metadata["status_reason"]
    sent = engine.requests[-1]["images"]
    assert len(sent) == 3  # the prompt image, then one per observation
    assert sent[0] == to_data_uri_of_file(path)
    decoded = [_sglang_decode(uri) for uri in sent]
    reprocessed = qwen25_processing.process_images(decoded)
    assert torch.equal(reprocessed["image_grid_thw"], out.multimodal_train_inputs["image_grid_thw"])
    assert torch.equal(reprocessed["pixel_values"], out.multimodal_train_inputs["pixel_values"])


def to_data_uri_of_file(path: str) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def test_to_data_uri_still_writes_compressed_png():
    """Data preparation keeps Pillow's compressed PNG (files on disk); only requests use the fast one."""
    image = _photo(64, 64)
    assert to_data_uri(image).startswith("data:image/png;base64,")
    assert _same_pixels(_sglang_decode(to_data_uri(image)), image)
