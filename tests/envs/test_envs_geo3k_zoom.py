"""Geo3K with zoom: the crop is right, bad regions are feedback, and in a real episode the crop
reaches the engine's request and the training tensors in token order (Qwen2.5-VL and Qwen3-VL)."""

from __future__ import annotations

import argparse

import pytest
import torch
from PIL import Image, ImageDraw

import rollout
from envs.base import EnvConfigError
from envs.check import check_env_module
from envs.geo3k_zoom import Geo3kZoomEnv, build_env
from envs.grading import Grader
from envs.images import load_image
from envs.tool_calls import call_form_for, format_call
from rollout.sample import Sample
from tests.rollout.conftest import ScriptedEngine, make_args, make_sample

BOX = {"left": 0.25, "top": 0.25, "right": 0.75, "bottom": 0.75}


def _picture() -> Image.Image:
    # White, with a red square exactly where BOX points on a 112x112 image.
    image = Image.new("RGB", (112, 112), (255, 255, 255))
    ImageDraw.Draw(image).rectangle([28, 28, 83, 83], fill=(255, 0, 0))
    return image


def _env(grader: Grader, **kwargs) -> Geo3kZoomEnv:
    sample = argparse.Namespace(label="5", multimodal_inputs={"images": [_picture()]})
    env = build_env(sample, argparse.Namespace(max_turns=3), grader=grader, **kwargs)
    env.reset()
    return env


def test_zoom_returns_the_region_enlarged(grader: Grader) -> None:
    env = _env(grader)
    obs, done, info = env.step(format_call("zoom", BOX))
    assert not done and info["tool_executed"] and info["tool_call"] == {"name": "zoom", "arguments": BOX}
    (crop,) = obs["multi_modal_data"]["image"]
    assert crop.size == (224, 224)
    assert crop.getpixel((112, 112)) == (255, 0, 0) and crop.getpixel((2, 2)) == (255, 0, 0)
    assert obs["obs_str"].startswith("zoom: the region from (0.25, 0.25) to (0.75, 0.75) of the diagram, enlarged.")
    message = env.format_observation(obs)
    assert [part["type"] for part in message["content"]] == ["image", "text"]
    assert env.outcome.score == 0.0 and env.outcome.valid_tool_calls == 1
    obs, done, info = env.step(format_call("calc_score", {"answer": "5"}))
    assert done and env.outcome.score == 1.0 and info["done_reason"] == "correct"


def test_zoom_size_sets_the_crops_longer_side(grader: Grader) -> None:
    env = _env(grader, zoom_size=56)
    obs, _, _ = env.step(format_call("zoom", {"left": 0, "top": 0, "right": 1, "bottom": 0.5}))
    assert obs["multi_modal_data"]["image"][0].size == (56, 28)


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ({**BOX, "right": 0.25}, "the region is empty: right must be greater than left, and bottom greater than top"),
        ({**BOX, "right": 0.27}, "the region is 2x56 pixels of a 112x112 diagram; zoom into a region of at least 8x8 pixels"),
        ({**BOX, "left": 1.5}, 'the argument "left" must be between 0 and 1, got 1.5'),
        ({**BOX, "zoom": 2}, 'zoom has no argument "zoom" (its arguments: "left", "top", "right", "bottom")'),
    ],
)
def test_bad_regions_are_feedback_not_images(grader: Grader, box, message: str) -> None:
    env = _env(grader)
    obs, done, info = env.step(format_call("zoom", box))
    assert (done, info["tool_executed"], info["error"]) == (False, False, message)
    assert "multi_modal_data" not in obs
    assert obs["obs_str"].startswith(f"Your tool call was not run: {message}. The expected format is:\n")
    assert format_call("zoom", {"left": 0.25, "top": 0.25, "right": 0.75, "bottom": 0.75}) in obs["obs_str"]


def test_a_sliver_is_refused_before_the_processor_sees_it(grader: Grader) -> None:
    sample = argparse.Namespace(label="5", multimodal_inputs={"images": [Image.new("RGB", (400, 400))]})
    env = build_env(sample, argparse.Namespace(max_turns=3), grader=grader)
    env.reset()
    _, _, info = env.step(format_call("zoom", {"left": 0, "top": 0, "right": 1, "bottom": 0.03}))
    assert info["error"] == "the region is 400x12 pixels; make it at most 20 times longer than wide"


def test_build_env_errors(grader: Grader) -> None:
    with pytest.raises(EnvConfigError, match="zooms into the sample's first image, but the sample has no images"):
        build_env(argparse.Namespace(label="5", multimodal_inputs=None), grader=grader)
    with pytest.raises(EnvConfigError, match="'zoom_size' must be an integer from 28 to 1024, got 4"):
        build_env(argparse.Namespace(label="5", multimodal_inputs={"images": [_picture()]}), grader=grader, zoom_size=4)


def test_checker_passes_it_with_the_real_processor(grader: Grader, qwen25_processing) -> None:
    report = check_env_module(
        "envs.geo3k_zoom", env_kwargs={"grader": grader, "grading_timeout_s": 3.0}, processing=qwen25_processing
    )
    assert (report.errors, report.warnings) == ([], [])
    # The valid zoom the checker generated from the schema's examples: 224 px is 16x16 patches, 64 pads.
    assert [(r.case, r.size, r.pads) for r in report.images] == [("zoom: valid", (224, 224), 64)]
    cases = [t.case for t in report.timings]
    assert "zoom: left above its maximum" in cases and "calc_score: answer of the wrong type" in cases


@pytest.mark.parametrize(("checkpoint", "fixture"), [("tiny-qwen2.5-vl", "qwen25_processing"), ("tiny-qwen3-vl", "qwen3_processing")])
async def test_the_crop_reaches_the_engine_and_the_training_tensors(request, checkpoint: str, fixture: str) -> None:
    processing = request.getfixturevalue(fixture)
    tok = processing.tokenizer
    form = call_form_for(checkpoint)
    engine = ScriptedEngine(
        tok,
        [format_call("zoom", BOX, form), format_call("calc_score", {"answer": "5"}, form)],
        prepare_image=lambda image: ("sent", image.size),
    )
    args = make_args(engine, checkpoint=checkpoint, rollout_interaction_env_path="envs.geo3k_zoom", env_kwargs={})
    sample = make_sample(tok, images=1, label="5", size=112)
    out = await rollout.generate(args, sample, {})
    assert out.status == Sample.Status.COMPLETED, out.metadata["status_reason"]
    assert await rollout.reward(args, out) == 1.0
    # Turn 2's request carries the prompt's image and the crop, in that order.
    assert [r["images"] for r in engine.requests] == [[("sent", (112, 112))], [("sent", (112, 112)), ("sent", (224, 224))]]
    turns = out.metadata["turns"]
    assert [t["observation_images"] for t in turns] == [1, 0]
    assert turns[0]["tool_call"] == {"name": "zoom", "arguments": BOX}
    # The training tensors: the prompt image's rows, then the crop's, as processing them alone gives.
    prompt_image = out.multimodal_inputs["images"][0]
    crop = prompt_image.crop((28, 28, 84, 84)).resize((224, 224), Image.Resampling.BICUBIC)
    alone = [processing.process_images([image]) for image in (prompt_image, crop)]
    mm = out.multimodal_train_inputs
    assert torch.equal(mm["image_grid_thw"], torch.cat([a["image_grid_thw"] for a in alone]))
    assert torch.equal(mm["pixel_values"], torch.cat([a["pixel_values"] for a in alone]))
    # Pad runs in token order: the prompt's, then the crop's in the inserted tool turn (mask 0).
    pads = processing.pads_per_image(mm["image_grid_thw"])
    runs, count = [], 0
    for token in [*out.tokens, None]:
        if token == processing.image_pad_id:
            count += 1
        elif count:
            runs, count = [*runs, count], 0
    assert runs == pads
    start = len(out.tokens) - out.response_length
    crop_at = out.tokens.index(processing.image_pad_id, start)
    assert out.loss_mask[crop_at - start] == 0


class _ServedScript(ScriptedEngine):
    """A scripted engine behind the real SGLang-compatible HTTP server: what the server decodes
    from each request is what an SGLang engine would get."""

    weight_version = 0
    max_batch_size = 1
    max_context = 32768

    def __init__(self, tokenizer, replies, path):
        super().__init__(tokenizer, replies)
        self.vocab_size = len(tokenizer)
        self.policy = argparse.Namespace(path=path)

    async def generate(self, input_ids, images, sampling_params, rid=None):
        return await super().generate(input_ids, images, sampling_params)

    def abort(self, rid):
        return 0

    async def aclose(self):
        pass


async def test_the_crop_reaches_an_sglang_server_over_http(qwen25_processing) -> None:
    from models import resolve_checkpoint
    from rollout.server import start_server

    tok = qwen25_processing.tokenizer
    path = str(resolve_checkpoint("tiny-qwen2.5-vl"))
    engine = _ServedScript(tok, [format_call("zoom", BOX), format_call("calc_score", {"answer": "5"})], path)
    sample = make_sample(tok, images=1, label="5", size=112)
    async with await start_server(engine) as server:
        args = argparse.Namespace(
            hf_checkpoint=path,
            sglang_router_ip=server.host,
            sglang_router_port=server.port,
            rollout_max_context_len=None,
            rollout_max_response_len=4096,
            max_turns=3,
            rollout_interaction_env_path="envs.geo3k_zoom",
            env_kwargs={},
        )
        out = await rollout.generate(args, sample, {"max_new_tokens": 4096})
    assert out.status == Sample.Status.COMPLETED, out.metadata["status_reason"]
    assert await rollout.reward(args, out) == 1.0
    sent = engine.requests[1]["images"]
    assert len(sent) == 2 and all(ref.startswith("data:image/") for ref in sent)
    crop = load_image(sent[1])
    expected = out.multimodal_inputs["images"][0].crop((28, 28, 84, 84)).resize((224, 224), Image.Resampling.BICUBIC)
    # Sent as a PNG data URI: the server decodes exactly the crop's pixels.
    assert crop.size == (224, 224) and crop.tobytes() == expected.convert("RGB").tobytes()
    assert len(engine.requests[0]["images"]) == 1
