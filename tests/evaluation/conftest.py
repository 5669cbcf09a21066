"""A scripted engine whose replies depend on the problem and the episode, not on arrival order."""

from __future__ import annotations

import re
from collections import Counter

from PIL import Image, ImageDraw

from rollout.engines.base import GenerateResult

SCRIPT_TAG = re.compile(r"\[script (\d+)\]")


def picture(shade: int = 0, size: int = 56) -> Image.Image:
    image = Image.new("RGB", (size, size), (255, 255, 255))
    ImageDraw.Draw(image).line([(4, size - 4), (size - 4, 4)], fill=(shade, 0, 0), width=3)
    return image


class ProblemScriptedEngine:
    """Replays per-problem scripts, whatever order concurrent episodes reach it in.

    ``scripts`` maps a marker that occurs in a problem's text to a list of scripts, one per episode;
    a script is a list of turns, each ``text`` or ``(text, finish_reason)``. The k-th episode of a
    problem to send its first turn follows script k; the first reply of every script carries a
    ``[script k]`` tag, by which the episode's later turns find their script again. The turn number is
    the count of assistant generation prompts in the request.
    """

    def __init__(self, tokenizer, scripts: dict[str, list[list]]) -> None:
        self.tokenizer = tokenizer
        self.scripts = scripts
        self.started: Counter[str] = Counter()
        self.requests: list[dict] = []

    async def generate(self, input_ids, images, sampling_params):
        text = self.tokenizer.decode(input_ids, skip_special_tokens=False)
        self.requests.append({"text": text, "images": len(images), "params": dict(sampling_params)})
        marker = next(m for m in self.scripts if m in text)
        turn = text.count("<|im_start|>assistant")
        tags = SCRIPT_TAG.findall(text)
        if turn == 1:
            script = self.started[marker]
            self.started[marker] += 1
        else:
            script = int(tags[0])
        reply = self.scripts[marker][script][turn - 1]
        reply_text, finish = reply if isinstance(reply, tuple) else (reply, "stop")
        if turn == 1:
            reply_text = f"[script {script}] {reply_text}"
        ids = self.tokenizer.encode(reply_text, add_special_tokens=False)
        meta = {"finish_reason": {"type": finish}}
        decoded = self.tokenizer.decode(ids, skip_special_tokens=False)
        return GenerateResult(ids, [-0.01] * len(ids), decoded, finish, None, meta)
