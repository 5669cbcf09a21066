"""Encoding an env observation as a continuation of the chat template.

After the model's turn the trainer must see exactly what a chat template would have rendered for
the conversation so far: the separator the template puts after the assistant's end-of-turn token
(a newline for Qwen), the observation turn, and the generation prompt. Rendering the observation
after a dummy prefix and trimming that prefix drops the separator (verl #6921), so instead the
pieces around the observation content are learned once per (template, tools, role, template
kwargs) by rendering a conversation with sentinel strings, and cached. The template kwargs are
slime's ``--apply-chat-template-kwargs`` (e.g. ``enable_thinking``): they render the first prompt,
so they must render every later turn's generation prompt too, or a Qwen3-style template would
prompt turn 1 with ``<think>\n\n</think>\n\n`` and later turns without it.

Per turn only the observation's own content is encoded: its text as *untrusted* (special-token
strings such as a quoted ``<|im_end|>`` stay text), images as the template's image placeholder.
Tokenization never crosses a special token, so the ids equal a whole-string tokenization of the
template's rendering whenever the observation text holds no special-token strings.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Any

from rollout.processing import Processing

_TEXT_SENTINEL = "\u2063OBSERVATION\u2063"
_MODEL_SENTINEL = "\u2063MODEL\u2063"


class TemplateShapeError(ValueError):
    """The chat template renders observations in a way this encoder cannot continue."""


@dataclass(frozen=True)
class ObservationPieces:
    before: str  # from just after the assistant's end-of-turn token to the observation content
    after: str  # from the end of the content through the generation prompt
    image: str  # how one image part of the content renders


@dataclass
class EncodedObservation:
    token_ids: list[int]
    text: str  # the rendered continuation (one pad per image), for logs and slime's `response`
    images: list[Any]


class ObservationEncoder:
    """Encodes observation messages for one tokenizer, caching template pieces and their ids."""

    def __init__(self, processing: Processing) -> None:
        self.processing = processing
        self._pieces: dict[tuple[str, str, str], ObservationPieces] = {}
        self._trusted_ids: dict[str, list[int | str]] = {}
        self._lock = threading.Lock()
        specials = sorted(processing.special_token_strings, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(s) for s in specials)) if specials else None

    # -- template pieces -------------------------------------------------------------------------
    def pieces(
        self, role: str, tools: list[dict] | None = None, template_kwargs: dict[str, Any] | None = None
    ) -> ObservationPieces:
        key = (
            role,
            json.dumps(tools, sort_keys=True) if tools else "",
            json.dumps(template_kwargs, sort_keys=True, default=repr) if template_kwargs else "",
        )
        with self._lock:
            if key not in self._pieces:
                self._pieces[key] = self._learn_pieces(role, tools, template_kwargs or {})
            return self._pieces[key]

    def _render(
        self,
        messages: list[dict],
        tools: list[dict] | None,
        generation_prompt: bool,
        template_kwargs: dict[str, Any],
    ) -> str:
        return self.processing.tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs
        )

    def _learn_pieces(
        self, role: str, tools: list[dict] | None, template_kwargs: dict[str, Any]
    ) -> ObservationPieces:
        eos = self.processing.eos_token
        base = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _MODEL_SENTINEL}]
        text_obs = {"role": role, "content": _TEXT_SENTINEL}
        image_obs = {"role": role, "content": [{"type": "image"}, {"type": "text", "text": _TEXT_SENTINEL}]}
        rendered = self._render(base + [text_obs], tools, True, template_kwargs)
        model_at = rendered.find(_MODEL_SENTINEL)
        end_of_turn = rendered.find(eos, model_at)
        if model_at < 0 or end_of_turn < 0:
            raise TemplateShapeError(f"the chat template does not end assistant turns with {eos!r}")
        continuation = rendered[end_of_turn + len(eos) :]
        before, sep, after = continuation.partition(_TEXT_SENTINEL)
        if not sep:
            raise TemplateShapeError(f"the chat template drops the content of {role!r} messages")
        with_image = self._render(base + [image_obs], tools, True, template_kwargs)
        image_continuation = with_image[with_image.find(eos, with_image.find(_MODEL_SENTINEL)) + len(eos) :]
        if not (image_continuation.startswith(before) and image_continuation.endswith(_TEXT_SENTINEL + after)):
            raise TemplateShapeError(f"the chat template renders images in {role!r} messages unexpectedly")
        image = image_continuation[len(before) : len(image_continuation) - len(_TEXT_SENTINEL + after)]
        if "<|image_pad|>" not in image:
            # docs/pitfalls.md#templates-that-drop-images-in-tool-messages: the model would never see them.
            raise TemplateShapeError(
                f"the chat template drops images in {role!r} messages; render image observations as 'user' turns"
            )
        return ObservationPieces(before=before, after=after, image=image)

    # -- encoding ---------------------------------------------------------------------------------
    def _split_trusted(self, text: str) -> list[int | str]:
        """Template text split into special-token ids and plain-text runs (cached per string)."""
        cached = self._trusted_ids.get(text)
        if cached is not None:
            return cached
        parts: list[int | str] = []
        position = 0
        if self._special_re is not None:
            convert = self.processing.tokenizer.convert_tokens_to_ids
            for match in self._special_re.finditer(text):
                if match.start() > position:
                    parts.append(text[position : match.start()])
                parts.append(convert(match.group(0)))
                position = match.end()
        if position < len(text):
            parts.append(text[position:])
        self._trusted_ids[text] = parts
        return parts

    def encode_message(
        self,
        message: dict[str, Any],
        tools: list[dict] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> EncodedObservation:
        """Token ids of ``message`` as the continuation after the assistant's end-of-turn token,
        rendered with ``template_kwargs`` (the ones the prompt was rendered with). Images are single
        ``<|image_pad|>`` placeholders here; the episode expands them."""
        role = message.get("role") or "tool"
        pieces = self.pieces(role, tools, template_kwargs)
        content = message.get("content")
        parts: list[int | str] = list(self._split_trusted(pieces.before))
        rendered = [pieces.before]
        images: list[Any] = []
        for kind, value in _content_parts(content):
            if kind == "image":
                images.append(value)
                parts.extend(self._split_trusted(pieces.image))
                rendered.append(pieces.image)
            else:
                parts.append(_Untrusted(value))
                rendered.append(value)
        parts.extend(self._split_trusted(pieces.after))
        rendered.append(pieces.after)
        return EncodedObservation(token_ids=self._encode_parts(parts), text="".join(rendered), images=images)

    def _encode_parts(self, parts: list[int | str]) -> list[int]:
        ids: list[int] = []
        run: list[str] = []
        for part in parts:
            if isinstance(part, int):
                if run:
                    ids.extend(self.processing.encode_plain("".join(run)))
                    run = []
                ids.append(part)
            else:
                run.append(str(part))
        if run:
            ids.extend(self.processing.encode_plain("".join(run)))
        return ids


class _Untrusted(str):
    """Observation text: joined with neighbouring plain template text, never parsed for specials."""


def _content_parts(content: Any) -> list[tuple[str, Any]]:
    if content is None:
        return []
    if isinstance(content, str):
        return [("text", content)] if content else []
    parts: list[tuple[str, Any]] = []
    for part in content:
        if isinstance(part, str):
            parts.append(("text", part))
        elif part.get("type") == "image" or "image" in part or "image_url" in part:
            parts.append(("image", part.get("image", part.get("image_url"))))
        elif "text" in part:
            parts.append(("text", str(part["text"])))
        else:
            raise TemplateShapeError(f"observation content part {sorted(part)} is neither text nor image")
    return parts
