"""Building Samples the way slime's data loader does, for the local backend, evaluation and tests.

slime with ``--apply-chat-template`` renders each row's messages through the tokenizer's chat
template (with the generation prompt and ``--apply-chat-template-kwargs``) into ``sample.prompt``
and decodes the row's images into ``sample.multimodal_inputs["images"]``; ``<image>`` placeholders
become the template's image tokens in order.
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

from rollout.sample import Sample

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
) -> Sample:
    # Imported here: the dataset module needs pyarrow, which slime's processes (rollout.runtime
    # imports this module) must not.
    from envs.geo3k.dataset import build_prompt_messages

    messages = build_prompt_messages(problem, images)
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
