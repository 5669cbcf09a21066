"""Turning text and images into the token ids and tensors of a trajectory.

Owns: loading the tokenizer and processor once per checkpoint (an explicit cache object), encoding
untrusted text with special-token strings treated as plain text, processing images into
``pixel_values`` / ``image_grid_thw`` and expanding each image's pad run to the processor's count.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer

#: Distinct prompts whose token ids are remembered (a few rollout batches' worth).
PROMPT_CACHE_ENTRIES = 4096


class ImagePadMismatch(ValueError):
    """The image-pad tokens in a sequence do not match the processed images."""


@dataclass
class Processing:
    """Tokenizer, processor and the token ids the rollout relies on, for one checkpoint."""

    tokenizer: Any
    processor: Any
    plain_encoder: Tokenizer
    eos_token_id: int
    eos_token: str
    image_pad_id: int
    vision_start_id: int
    vision_end_id: int
    merge_size: int
    special_token_strings: tuple[str, ...]
    # Tokens only the processor may place; a model that samples one breaks the trainer's forward pass.
    vision_token_ids: frozenset[int]
    _prompt_ids: OrderedDict[str, list[int]] = field(default_factory=OrderedDict, repr=False)
    _prompt_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def from_tokenizer_and_processor(cls, tokenizer: Any, processor: Any) -> Processing:
        # A copy of the backend that encodes special-token strings as plain text: env feedback may
        # quote the model, and a quoted "<|im_end|>" must not become a real end-of-turn.
        plain = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        plain.encode_special_tokens = True
        ids = tokenizer.convert_tokens_to_ids
        eos = tokenizer.eos_token or "<|im_end|>"
        specials = tuple(t.content for t in tokenizer.backend_tokenizer.get_added_tokens_decoder().values() if t.special)
        return cls(
            tokenizer=tokenizer,
            processor=processor,
            plain_encoder=plain,
            eos_token_id=ids(eos),
            eos_token=eos,
            image_pad_id=ids("<|image_pad|>"),
            vision_start_id=ids("<|vision_start|>"),
            vision_end_id=ids("<|vision_end|>"),
            merge_size=int(getattr(processor.image_processor, "merge_size", 2)),
            special_token_strings=specials,
            vision_token_ids=frozenset(
                ids(token)
                for token in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>")
            ),
        )

    def encode_trusted(self, text: str) -> list[int]:
        """Template text: special-token strings become their special tokens."""
        return self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """:meth:`encode_trusted` for prompts, remembered: the n samples of a GRPO group share their
        prompt, and tokenizing it holds the GIL that the event loop needs (about 0.3 ms a prompt)."""
        with self._prompt_lock:
            ids = self._prompt_ids.get(text)
            if ids is not None:
                self._prompt_ids.move_to_end(text)
                return list(ids)
        ids = self.encode_trusted(text)
        with self._prompt_lock:
            self._prompt_ids[text] = ids
            while len(self._prompt_ids) > PROMPT_CACHE_ENTRIES:
                self._prompt_ids.popitem(last=False)
        return list(ids)

    def encode_plain(self, text: str) -> list[int]:
        """Untrusted text (model or env words): special-token strings stay text."""
        return self.plain_encoder.encode(text, add_special_tokens=False).ids

    def process_images(self, images: list[Any]) -> dict[str, torch.Tensor]:
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def pads_per_image(self, image_grid_thw: torch.Tensor) -> list[int]:
        # Plain ints: torch ops on a (n, 3) tensor cost more than the arithmetic.
        per_pad = self.merge_size**2
        return [t * h * w // per_pad for t, h, w in image_grid_thw.tolist()]

    def expand_image_pads(self, ids: list[int], pad_counts: list[int]) -> list[int]:
        """Give the i-th ``<|vision_start|> pad-run <|vision_end|>`` exactly ``pad_counts[i]`` pads.

        A run holding one pad (what chat templates render) is expanded; a run already holding the
        expected count is kept; any other length, or a different number of images, is an error.
        """
        # Runs of a processor's size are hundreds of pads: jump between them with list.index and
        # copy slices (this runs on the rollout's threads for every prompt and observation).
        start, pad = self.vision_start_id, self.image_pad_id
        out: list[int] = []
        image = position = 0
        n = len(ids)
        while True:
            try:
                run_start = ids.index(start, position) + 1
            except ValueError:
                break
            out += ids[position:run_start]
            position = run_start
            if run_start >= n or ids[run_start] != pad:
                continue
            run_end = _run_end(ids, run_start, pad)
            run = run_end - run_start
            if image >= len(pad_counts):
                raise ImagePadMismatch(f"the text has more image placeholders than the {len(pad_counts)} images given")
            expected = pad_counts[image]
            if run not in (1, expected):
                raise ImagePadMismatch(
                    f"image {image} has a run of {run} <|image_pad|> tokens; expected 1 (to expand) or {expected} "
                    "(the processor's count for this image)"
                )
            out += [pad] * expected
            image += 1
            position = run_end
        out += ids[position:]
        if image != len(pad_counts):
            raise ImagePadMismatch(f"the text has {image} image placeholders but {len(pad_counts)} images were given")
        return out

    def compress_image_pads(self, ids: list[int]) -> list[int]:
        """The inverse of expansion: every pad run reduced to one pad (SGLang expands it itself)."""
        pad = self.image_pad_id
        out: list[int] = []
        position = 0
        while True:
            try:
                run_start = ids.index(pad, position)
            except ValueError:
                break
            out += ids[position : run_start + 1]
            position = _run_end(ids, run_start + 1, pad)
        out += ids[position:]
        return out

    def count_image_pads(self, ids: list[int]) -> int:
        return ids.count(self.image_pad_id)


def _run_end(ids: list[int], position: int, token: int) -> int:
    """The index after the run of ``token`` that continues from ``position``."""
    n = len(ids)
    while position < n and ids[position] == token:
        position += 1
    return position


class ProcessingCache:
    """Loads each checkpoint's tokenizer and processor once (slime calls generate per sample)."""

    def __init__(self) -> None:
        self._items: dict[str, Processing] = {}
        self._lock = threading.Lock()

    def get(self, hf_checkpoint: str) -> Processing:
        key = str(hf_checkpoint)
        with self._lock:
            if key not in self._items:
                self._items[key] = _load(key)
            return self._items[key]

    def loaded(self, hf_checkpoint: str) -> bool:
        return str(hf_checkpoint) in self._items


def _load(hf_checkpoint: str) -> Processing:
    from models import load_processing

    policy = load_processing(hf_checkpoint)
    return Processing.from_tokenizer_and_processor(policy.tokenizer, policy.processor)
