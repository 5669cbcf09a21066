"""Accumulating a trajectory and writing it onto a Sample with the trainer's invariants.

Segments are appended as the episode runs (model tokens: loss mask 1 and the engine's log-probs;
inserted tokens: mask 0 and log-prob 0.0) and written onto the Sample once at the end, either
through slime's ``Sample.append_response_tokens`` when the Sample has it (which rejects log-probs on
non-trainable tokens, so none are passed) or by hand with the same invariants:
``len(loss_mask) == response_length == len(rollout_log_probs)`` and the response is the last
``response_length`` entries of ``tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Segment:
    tokens: list[int]
    trainable: bool
    text: str
    log_probs: list[float] | None = None  # one per token of a trainable segment
    meta_info: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.trainable and (self.log_probs is None or len(self.log_probs) != len(self.tokens)):
            raise ValueError("model tokens need exactly one log-prob each")
        if not self.trainable and self.log_probs is not None:
            raise ValueError("inserted tokens carry no log-probs")


@dataclass
class Trajectory:
    prompt_ids: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    response_length: int = 0

    def append(self, segment: Segment) -> None:
        if segment.tokens:
            self.segments.append(segment)
            self.response_length += len(segment.tokens)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + self.response_length

    def write_to(self, sample: Any, args: Any) -> None:
        sample.tokens = list(self.prompt_ids)
        sample.response = ""
        sample.response_length = 0
        sample.loss_mask = None
        sample.rollout_log_probs = None
        append = getattr(sample, "append_response_tokens", None)
        if callable(append):
            for segment in self.segments:
                append(
                    args,
                    tokens=list(segment.tokens),
                    log_probs=list(segment.log_probs) if segment.trainable else None,
                    trainable=segment.trainable,
                    meta_info=segment.meta_info,
                    text=segment.text,
                )
        else:
            mask: list[int] = []
            log_probs: list[float] = []
            for segment in self.segments:
                sample.tokens.extend(segment.tokens)
                mask.extend([1 if segment.trainable else 0] * len(segment.tokens))
                log_probs.extend(segment.log_probs if segment.trainable else [0.0] * len(segment.tokens))
                sample.response += segment.text
            sample.response_length = len(mask)
            sample.loss_mask = mask
            sample.rollout_log_probs = log_probs
        # An episode with no response at all still gets empty lists, never None.
        if sample.loss_mask is None:
            sample.loss_mask = []
        if sample.rollout_log_probs is None:
            sample.rollout_log_probs = [0.0] * sample.response_length
