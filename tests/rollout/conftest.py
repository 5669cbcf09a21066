"""Fixtures for episode tests: a scripted engine, argument namespaces and prompts with images."""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

from rollout.engines.base import GenerateResult
from rollout.sample import Sample

HERE = Path(__file__).parent
TEST_ENVS = str(HERE / "envs_for_tests.py")


def diagram(size: int = 112, shade: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.line([(10, size - 10), (size - 10, size - 10), (size - 10, 10), (10, size - 10)], fill=(shade, 0, 0), width=3)
    return image


class ScriptedEngine:
    """Replays scripted turns and records every request, like an SGLang server would see them.

    A reply is text (tokenized with the real tokenizer) or explicit token ids, with a finish
    reason; log-probs are distinct per position so misalignment would show.
    """

    def __init__(self, tokenizer, replies, *, prepare_image=None):
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.requests: list[dict] = []
        if prepare_image is not None:
            self.prepare_image = prepare_image

    async def generate(self, input_ids, images, sampling_params):
        self.requests.append({"input_ids": list(input_ids), "images": list(images), "params": dict(sampling_params)})
        if not self.replies:
            raise AssertionError("the episode asked for more turns than were scripted")
        reply = self.replies.pop(0)
        if callable(reply):
            return reply(input_ids, images, sampling_params)
        text, finish, matched = reply if isinstance(reply, tuple) else (reply, "stop", None)
        ids = text if isinstance(text, list) else self.tokenizer.encode(text, add_special_tokens=False)
        limit = sampling_params.get("max_new_tokens")
        if limit is not None and len(ids) > limit:
            ids, finish, matched = ids[:limit], "length", None
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        log_probs = [-0.01 * (i + 1) for i in range(len(ids))]
        meta = {"finish_reason": {"type": finish, **({"matched": matched} if matched is not None else {})}}
        return GenerateResult(ids, log_probs, text, finish, matched, meta)


def make_args(engine, checkpoint="tiny-qwen2.5-vl", **overrides):
    values = dict(
        hf_checkpoint=checkpoint,
        rollout_engine=engine,
        rollout_max_context_len=None,
        rollout_max_response_len=4096,
        max_turns=3,
        rollout_interaction_env_path="envs.geo3k",
        env_kwargs={},
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def make_sample(tokenizer, text="Find x.", images=1, label="5", size=112) -> Sample:
    content = [{"type": "image"}] * images + [{"type": "text", "text": text}]
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)
    pictures = [diagram(size, shade=40 * k) for k in range(images)]
    return Sample(prompt=prompt, multimodal_inputs={"images": pictures} if images else None, label=label)


def call(answer: str) -> str:
    return f'<tool_call>{{"name": "calc_score", "arguments": {{"answer": "{answer}"}}}}</tool_call>'
