"""Building Samples the way slime's data loader does, for the local backend, evaluation and tests.

slime with ``--apply-chat-template`` renders each row's messages through the tokenizer's chat
template (with the generation prompt) into ``sample.prompt`` and decodes the row's images into
``sample.multimodal_inputs["images"]``; ``<image>`` placeholders become the template's image
tokens in order.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from envs.geo3k.dataset import build_prompt_messages
from rollout.sample import Sample


def build_sample(
    problem: str,
    images: list[Image.Image],
    label: str,
    tokenizer: Any,
    *,
    index: int | None = None,
    group_index: int | None = None,
    tools: list[dict] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Sample:
    messages = build_prompt_messages(problem, images)
    prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    return Sample(
        group_index=group_index,
        index=index,
        prompt=prompt,
        multimodal_inputs={"images": list(images)} if images else None,
        label=label,
        metadata=dict(metadata or {}),
    )
