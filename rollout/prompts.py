"""Prompts from messages: building Samples the way slime's data loader does, for the local backend,
evaluation and tests, and the seam through which an env package lays out its own prompts.

slime with ``--apply-chat-template`` renders each row's messages through the tokenizer's chat
template (with the generation prompt and ``--apply-chat-template-kwargs``) into ``sample.prompt``
and decodes the row's images into ``sample.multimodal_inputs["images"]``; ``<image>`` placeholders
become the template's image tokens in order.

The row's problem text is the user turn. An env module may define
``build_prompt_messages(problem, images) -> messages`` to lay it out otherwise; the default,
:func:`default_prompt_messages`, is one user message with each image where its ``<image>`` was.
With ``tools_in_prompt`` the env module's ``TOOLS`` go to the chat template
(:func:`prompt_context`), so the model is told about the env's tools in its own template's words.
Nothing here knows any particular env.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from PIL import Image

from rollout.sample import Sample

IMAGE_PLACEHOLDER = "<image>"

# Arguments the plugin passes to apply_chat_template itself: a template kwarg of the same name
# would be a TypeError deep inside an episode (or silently change what is rendered).
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {"conversation", "tools", "tokenize", "add_generation_prompt", "continue_final_message", "return_dict"}
)


def chat_template_kwargs(args: Any) -> dict[str, Any]:
    """slime's ``args.apply_chat_template_kwargs`` (e.g. ``{"enable_thinking": false}``), checked.

    slime renders the first prompt with them; every template rendering of ours (prompts from
    messages, observation turns) must use the same ones. Missing or None is ``{}``; a JSON string
    (what the command-line flag holds before slime parses it) is parsed.
    """
    value = getattr(args, "apply_chat_template_kwargs", None)
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"apply_chat_template_kwargs is not valid JSON ({exc}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"apply_chat_template_kwargs must be a mapping of template variables such as "
            f'{{"enable_thinking": false}}, got {type(value).__name__} {value!r}'
        )
    reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(value))
    if reserved:
        raise ValueError(
            f"apply_chat_template_kwargs sets {', '.join(reserved)}, which the rollout sets itself; "
            "remove them from --apply-chat-template-kwargs"
        )
    return value


def default_prompt_messages(problem: str, images: Sequence[Any]) -> list[dict[str, Any]]:
    """One user message: the text split at each ``<image>``, each image in its place (content parts
    ``{"type": "image", "image": img}`` and ``{"type": "text", "text": str}``; empty text left out)."""
    pieces = problem.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        raise ValueError(
            f"problem has {len(pieces) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s) "
            "were given; pass one image per placeholder, in order"
        )
    content: list[dict[str, Any]] = []
    for k, piece in enumerate(pieces):
        if k > 0:
            content.append({"type": "image", "image": images[k - 1]})
        if piece:
            content.append({"type": "text", "text": piece})
    return [{"role": "user", "content": content}]


def prompt_messages(problem: str, images: Sequence[Any], env_module: ModuleType | None = None) -> list[dict[str, Any]]:
    """The prompt's chat messages: the env module's ``build_prompt_messages`` when it has one, else
    :func:`default_prompt_messages`."""
    hook = getattr(env_module, "build_prompt_messages", None)
    if callable(hook):
        messages = hook(problem, list(images))
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TypeError(
                f"{env_module.__name__}.build_prompt_messages must return a list of chat messages "
                f"({{'role': ..., 'content': ...}}), got {type(messages).__name__}"
            )
        return messages
    return default_prompt_messages(problem, images)


def prompt_context(args: Any) -> tuple[ModuleType, list[dict[str, Any]] | None]:
    """The env module the plugin settings in ``args`` name, and the tools to render into prompts:
    its ``TOOLS`` with ``tools_in_prompt``, else None."""
    from envs.loader import load_env_module
    from rollout.config import RolloutConfig

    config = RolloutConfig.from_args(args)
    module = load_env_module(config.rollout_interaction_env_path)
    return module, (getattr(module, "TOOLS", None) if config.tools_in_prompt else None)


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
    template_kwargs: dict[str, Any] | None = None,
    env_module: ModuleType | None = None,
) -> Sample:
    """A fresh Sample whose prompt is ``problem`` as messages (see :func:`prompt_messages`) rendered
    by the chat template with ``tools`` and ``template_kwargs``."""
    messages = prompt_messages(problem, images, env_module)
    prompt = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, **(template_kwargs or {})
    )
    return Sample(
        group_index=group_index,
        index=index,
        prompt=prompt,
        multimodal_inputs={"images": list(images)} if images else None,
        label=label,
        metadata=dict(metadata or {}),
    )
