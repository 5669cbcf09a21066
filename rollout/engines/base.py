"""The engine interface: (input ids, images, sampling params) -> sampled tokens with log-probs.

Both the SGLang HTTP client and the in-process local engine implement it, so the episode loop
never knows which one it talks to.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

# An image as an engine accepts it: a data URI, a file path, an http(s) URL, or a PIL image.
ImageInput = str | Image.Image

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclass
class GenerateResult:
    token_ids: list[int]
    log_probs: list[float]
    text: str
    finish_reason: str  # FINISH_STOP | FINISH_LENGTH | FINISH_ABORT
    # What ended a "stop": a stop string (str) or a stop token id (int, EOS included, as SGLang reports it).
    matched_stop: int | str | None = None
    meta_info: dict[str, Any] = field(default_factory=dict)
    # SGLang's meta_info.prompt_tokens: the request's length after the engine expanded each image's
    # pad (None: an engine that does not report it, which skips the episode's check against ours).
    prompt_tokens: int | None = None
    # With return_routed_experts: SGLang's meta_info.routed_experts (int32 expert ids, base64 or a
    # list), one row per position of the sequence but the last, from position
    # ``routed_experts_start_len`` on. Not kept in meta_info: it is large and only the last turn's
    # (which covers the whole sequence) reaches the Sample.
    routed_experts: Any = None
    routed_experts_start_len: int = 0

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.log_probs):
            raise ValueError(
                f"engine returned {len(self.token_ids)} tokens but {len(self.log_probs)} log-probs"
            )


class EngineError(RuntimeError):
    """The engine could not serve a request (after any retries). ``retriable`` says whether the
    cause was transient (timeout, connection, 5xx) or the request itself was refused (4xx)."""

    def __init__(self, message: str, *, retriable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retriable = retriable
        self.status = status


@runtime_checkable
class Engine(Protocol):
    async def generate(
        self,
        input_ids: list[int],
        images: list[ImageInput],
        sampling_params: dict[str, Any],
    ) -> GenerateResult:
        """Continue ``input_ids``. ``images`` are every image whose pad run occurs in ``input_ids``,
        in token order. Raises EngineError when the request cannot be served."""
        ...


def output_problem(result: GenerateResult, vocab_size: int) -> str | None:
    """What makes ``result`` unusable for training, or None: a token id outside
    ``[0, vocab_size)`` or a log-prob that is not a finite number. Every engine's result is checked
    before any of it joins a trajectory.

    ``vocab_size`` is the tokenizer's length (``len(tokenizer)``), not the model config's
    ``vocab_size``: Qwen configs pad the embedding past the tokenizer (151936 rows for 151665
    tokens), and an id in that padding would pass the trainer's embedding lookup but has no token
    text, so the text the env graded would not be the ids that are trained. For these models the
    tokenizer's length is never larger than the embedding, so ids that pass never break the
    forward pass either (the trainer checks against the embedding itself).

    A wrong id breaks the trainer's forward pass (an out-of-range embedding lookup); a NaN or
    infinite log-prob makes the importance ratio NaN or infinite (even where the loss mask is 0,
    ``NaN * 0`` is NaN). Both are engine faults, never something the policy should learn from.
    """
    ids = result.token_ids
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        position, token = next((i, t) for i, t in enumerate(ids) if not 0 <= t < vocab_size)
        return (
            f"token id {token} at output position {position} is outside the vocabulary [0, {vocab_size}) "
            "(do the engine and the rollout load the same checkpoint?)"
        )
    # A sum first (one pass in C, where NaN and +-inf propagate), the per-entry scan only when it
    # is not finite (which finite entries of absurd size can also cause).
    log_probs = result.log_probs
    if log_probs and not math.isfinite(sum(log_probs)):
        bad = next(((i, v) for i, v in enumerate(log_probs) if not math.isfinite(v)), None)
        if bad is not None:
            return f"log-prob {bad[1]} at output position {bad[0]} is not a finite number"
    return None
