"""Every /generate body the rollout builds, checked by SGLang 0.5.23's own code (CONTRACT 7).

SGLang's front half (sglang_frontend.py: its route's contract check, GenerateReqInput,
SamplingParams.normalize/verify, QwenVLImageProcessor) serves the rollout's SGLang client over HTTP
here; the rollout's training sequence and ``multimodal_train_inputs`` are compared with what SGLang
made of each request: expanded input ids token for token, pixel tensors and grids exactly. Both
Qwen-VL families, images in the prompt and in observations, odd sizes.
"""

from __future__ import annotations

import argparse
import base64
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from aiohttp import web
from PIL import Image, ImageDraw

import rollout
from envs.images import to_data_uri
from rollout.sample import Sample
from tests.sglang_contract.conftest import PRESETS
from tests.sglang_contract.sglang_frontend import SGLangFrontEnd

ENV = str(Path(__file__).with_name("sized_image_env.py"))
ODD_SIZES = [(97, 131), (600, 20), (131, 97), (20, 600), (56, 84)]
LAYERS, TOPK = 2, 2

# What slime sends (CONTRACT 1), with the values its defaults give.
SLIME_SAMPLING_PARAMS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "max_new_tokens": 2048,
    "stop": ["</tool_call>"],
    "stop_token_ids": [],
    "skip_special_tokens": False,
    "no_stop_trim": True,
    "spaces_between_special_tokens": False,
}


def picture(size: tuple[int, int], shade: int) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    width, height = size
    ImageDraw.Draw(image).line([(0, height - 1), (width - 1, 0)], fill=(shade, 40, 200 - shade), width=3)
    return image


class SGLangServer:
    """/generate through SGLang's front half; the "model" answers each turn with ``reply`` tokens.
    Reports meta_info as SGLang 0.5.23 does: prompt_tokens is the length of SGLang's own expansion,
    routed_experts (when asked) one int32 row per position but the last, base64."""

    def __init__(self, front_end: SGLangFrontEnd, reply: list[int]) -> None:
        self.front_end = front_end
        self.reply = reply
        self.views = []
        self.errors: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        try:
            view = await self.front_end.handle(body)
        except (ValueError, TypeError) as exc:  # SGLang answers these with a 400
            self.errors.append(str(exc))
            return web.json_response({"error": {"message": str(exc)}}, status=400)
        self.views.append(view)
        limit = view.sampling_params.max_new_tokens
        output = list(self.reply[:limit] if limit is not None else self.reply)
        finish = {"type": "stop", "matched": "</tool_call>"} if len(output) == len(self.reply) else {"type": "length", "length": len(output)}
        meta = {
            "id": uuid.uuid4().hex,
            "finish_reason": finish,
            "prompt_tokens": len(view.input_ids),
            "completion_tokens": len(output),
            "cached_tokens": 0,
            "weight_version": "default",
            "output_token_logprobs": [[-0.25, token, None] for token in output],
        }
        if body.get("return_routed_experts"):
            rows = len(view.input_ids) + len(output) - 1
            ids = np.repeat(np.arange(rows, dtype=np.int32), LAYERS * TOPK)
            meta["routed_experts"] = base64.b64encode(ids.tobytes()).decode()
        return web.json_response({"text": "", "output_ids": output, "meta_info": meta})


async def serve(server: SGLangServer):
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/generate", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def run_episode(front_end, family, processing, prompt_sizes, observation_sizes, *, max_turns=3, **extra):
    tok = processing.tokenizer
    reply = tok.encode('<tool_call>{"name": "calc_score", "arguments": {"answer": "3"}}</tool_call>', add_special_tokens=False)
    server = SGLangServer(front_end, reply)
    runner, port = await serve(server)
    try:
        content = [{"type": "image"}] * len(prompt_sizes) + [{"type": "text", "text": "Find x."}]
        prompt = tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
        images = [picture(size, 40 * k) for k, size in enumerate(prompt_sizes)]
        sample = Sample(prompt=prompt, multimodal_inputs={"images": images} if images else None, label="3")
        args = argparse.Namespace(
            hf_checkpoint=PRESETS[family], sglang_router_ip="127.0.0.1", sglang_router_port=port,
            rollout_max_context_len=None, rollout_max_response_len=4096, max_turns=max_turns,
            rollout_interaction_env_path=ENV, env_kwargs={"sizes": [list(s) for s in observation_sizes]},
            request_max_retries=0, **extra,
        )  # fmt: skip
        out = await rollout.generate(args, sample, dict(SLIME_SAMPLING_PARAMS))
    finally:
        await runner.cleanup()
    return out, server


def assert_sglang_saw_the_training_sequence(out, server, processing):
    assert server.errors == []
    assert out.status == Sample.Status.COMPLETED, out.metadata["status_reason"]
    assert len(server.views) == len(out.metadata["turns"])
    for view in server.views:
        # SGLang's expansion of each request is the training sequence, token for token, up to there.
        assert view.input_ids == out.tokens[: len(view.input_ids)]
    last = server.views[-1]
    mm = out.multimodal_train_inputs
    if last.pixel_values is None:
        assert mm is None
        return
    assert torch.equal(last.image_grid_thw.to(mm["image_grid_thw"].dtype), mm["image_grid_thw"])
    assert last.pixel_values.shape == mm["pixel_values"].shape
    assert torch.equal(last.pixel_values.to(mm["pixel_values"].dtype), mm["pixel_values"])
    assert out.tokens.count(processing.image_pad_id) == sum(processing.pads_per_image(mm["image_grid_thw"]))


@pytest.mark.parametrize(
    ("prompt_sizes", "observation_sizes"),
    [
        ([(97, 131)], [(600, 20), (131, 97)]),
        ([(600, 20), (20, 600)], [(97, 131)]),
        ([], [(56, 84)]),
    ],
    ids=["odd-prompt-image", "two-prompt-images", "observation-images-only"],
)
async def test_multi_turn_episode_matches_sglangs_own_expansion(front_end, family, processing_of, prompt_sizes, observation_sizes):
    processing = processing_of(family)
    out, server = await run_episode(front_end, family, processing, prompt_sizes, observation_sizes)
    assert_sglang_saw_the_training_sequence(out, server, processing)
    assert len(server.views) == 3
    # Requests carry one pad per image; SGLang accepted every body and every sampling param.
    for view in server.views:
        assert view.request.input_ids.count(processing.image_pad_id) == len(view.request.image_data or [])
        assert view.sampling_params.top_k >= 1 and view.sampling_params.stop_strs == ["</tool_call>"]


async def test_routing_replay_rows_cover_sglangs_sequence(front_end, family, processing_of):
    """The request asks for routed experts; SGLang's row count (its expanded sequence) matches the
    Sample's tokens, so slime's trainer gets one row per position but the last."""
    processing = processing_of(family)
    out, server = await run_episode(
        front_end, family, processing, [(97, 131)], [(600, 20)], max_turns=2,
        use_rollout_routing_replay=True, num_layers=LAYERS, moe_router_topk=TOPK,
    )  # fmt: skip
    assert_sglang_saw_the_training_sequence(out, server, processing)
    assert all(view.request.return_routed_experts for view in server.views)
    assert tuple(out.rollout_routed_experts.shape) == (len(out.tokens) - 1, LAYERS, TOPK)


async def test_sglang_resizing_differently_is_caught(sglang, family, processing_of):
    """An SGLang whose image processor has a smaller max_pixels than the trainer's (the processor a
    deployment loads from its own config): its expansion of the prompt image differs, and the
    episode's prompt_tokens comparison fails the sample at the first turn."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from models.processors import IMAGE_PROCESSOR_SETTINGS, PROCESSOR_CLASSES

    processing = processing_of(family)
    settings = IMAGE_PROCESSOR_SETTINGS[family]
    size = settings["size"]
    small = Qwen2VLImageProcessorPil(**{**settings, "size": {**size, "longest_edge": size["shortest_edge"]}})
    other = PROCESSOR_CLASSES[family](small, processing.tokenizer, chat_template=processing.processor.chat_template)
    front_end = SGLangFrontEnd(PRESETS[family], processing, processor=other)
    out, server = await run_episode(front_end, family, processing, [(300, 300)], [(56, 84)], max_turns=1)
    assert out.status == Sample.Status.FAILED and out.remove_sample and out.reward == 0.0
    reason = out.metadata["status_reason"]
    theirs, ours = len(server.views[0].input_ids), out.prompt_length
    assert theirs < ours
    assert f"expanded the request to {theirs} prompt tokens but the training sequence holds {ours}" in reason


@pytest.mark.parametrize("size", ODD_SIZES, ids=[f"{w}x{h}" for w, h in ODD_SIZES])
async def test_prompt_expansion_and_pixels_match_per_image(front_end, family, processing_of, size):
    """One image at a time, the rollout's own helpers against SGLang's processor: the pad count, the
    expanded ids and the pixel tensors of the trainer's processor are SGLang's."""
    processing = processing_of(family)
    tok = processing.tokenizer
    image = picture(size, 90)
    text = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    ours = processing.process_images([image])
    rendered = processing.encode_prompt(text)
    expanded = processing.expand_image_pads(rendered, processing.pads_per_image(ours["image_grid_thw"]))
    body = {
        "input_ids": processing.compress_image_pads(rendered),
        "image_data": [to_data_uri(image)],
        "sampling_params": dict(SLIME_SAMPLING_PARAMS),
        "return_logprob": True,
    }
    view = await front_end.handle(body)
    assert view.input_ids == expanded
    assert torch.equal(view.image_grid_thw.to(ours["image_grid_thw"].dtype), ours["image_grid_thw"])
    assert torch.equal(view.pixel_values.to(ours["pixel_values"].dtype), ours["pixel_values"])


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"max_tokens": 8}, "max_tokens"),
    ],
)
async def test_rollout_server_refuses_what_sglang_refuses(front_end, family, processing_of, params, message):
    """rollout/server.py stands in for SGLang in the local backend: what SGLang refuses with a 400,
    it refuses too (and for top_k with SGLang's words)."""
    from rollout.server import BadRequest, parse_generate_request

    processing = processing_of(family)
    body = {"input_ids": processing.tokenizer.encode("hi"), "sampling_params": {**SLIME_SAMPLING_PARAMS, **params}}
    with pytest.raises((ValueError, TypeError), match=None) as sglang_error:
        await front_end.handle(body)
    assert message in str(sglang_error.value)
    if "top_k" in params:
        with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
            parse_generate_request(body)


def test_checks_cannot_pass_by_skipping_in_ci(monkeypatch):
    """With VLM_MULTITURN_REQUIRE_SGLANG=1 a missing sglang is a failure, not a skip."""
    import tests.sglang_contract.sglang_frontend as frontend
    from tests.sglang_contract import conftest

    monkeypatch.setattr(conftest, "sglang_missing_reason", lambda: "sglang is not installed")
    monkeypatch.setenv(frontend.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="VLM_MULTITURN_REQUIRE_SGLANG=1 but sglang is not installed"):
        conftest.require_sglang()
    monkeypatch.setenv(frontend.REQUIRE_ENV, "0")
    with pytest.raises(pytest.skip.Exception, match="sglang is not installed"):
        conftest.require_sglang()
