"""The engine interface: (input ids, images, sampling params) -> sampled tokens with log-probs.

Both the SGLang HTTP client and the in-process local engine implement it, so the episode loop
never knows which one it talks to.
"""

from __future__ import annotations

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
