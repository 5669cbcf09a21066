"""This project's own Sample: slime's field names and Status enum, for the local backend and tests.

The plugin works on slime's ``slime.utils.types.Sample`` as well; anything added here beyond
slime's fields must stay optional so that code written against this class runs on slime's too.
``append_response_tokens`` follows slime's (624b824) rules: trainable tokens need log-probs,
inserted tokens come without them (they get 0.0), and SGLang's ``meta_info`` sets the status from
the finish reason, records the weight version and takes ``routed_experts`` (one row per position
but the last, from ``routed_experts_start_len`` on; earlier rows are kept).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch


@dataclass
class Sample:
    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    group_index: int | None = None
    index: int | None = None
    prompt: str | list[dict[str, Any]] = ""
    tokens: list[int] = field(default_factory=list)
    multimodal_inputs: dict[str, Any] | None = None
    multimodal_train_inputs: dict[str, Any] | None = None
    response: str = ""
    response_length: int = 0
    label: str | None = None
    reward: float | dict[str, Any] | None = None
    loss_mask: list[int] | None = None
    weight_versions: list[str] = field(default_factory=list)
    rollout_log_probs: list[float] | None = None
    # (len(tokens) - 1, num_layers, moe_router_topk) int32 with --use-rollout-routing-replay
    rollout_routed_experts: torch.Tensor | None = None
    status: Sample.Status = Status.PENDING
    metadata: dict[str, Any] = field(default_factory=dict)
    remove_sample: bool = False

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length

    def append_response_tokens(
        self,
        args: Any = None,
        *,
        tokens: Any = None,
        log_probs: Any = None,
        trainable: bool = True,
        meta_info: dict[str, Any] | None = None,
        text: str | None = None,
        update_terminal_info: bool = True,
    ) -> None:
        tokens = [int(t) for t in (tokens if tokens is not None else [])]
        log_probs = None if log_probs is None else [float(v) for v in log_probs]
        if log_probs is not None and len(log_probs) != len(tokens):
            raise ValueError(f"log_probs length {len(log_probs)} != tokens length {len(tokens)}")
        if tokens and trainable and log_probs is None:
            raise ValueError("trainable response tokens require rollout log probabilities.")
        if tokens and not trainable:
            if log_probs is not None:
                raise ValueError("non-trainable response tokens should not pass rollout log probabilities.")
            log_probs = [0.0] * len(tokens)
        if text is not None:
            self.response += text
        previous = self.response_length
        if tokens:
            self.tokens += tokens
            self.response_length += len(tokens)
            if self.loss_mask is None:
                self.loss_mask = [1] * previous
            self.loss_mask += [1 if trainable else 0] * len(tokens)
        if log_probs is not None:
            if self.rollout_log_probs is None:
                if trainable and previous:
                    raise ValueError("cannot append log-probs to a response that has tokens but no rollout_log_probs")
                self.rollout_log_probs = [0.0] * previous
            self.rollout_log_probs += log_probs
        if meta_info:
            self._apply_meta_info(args, meta_info, update_terminal_info)

    def _apply_meta_info(self, args: Any, meta_info: dict[str, Any], update_terminal_info: bool) -> None:
        experts = _int32_ids(meta_info.get("routed_experts"))
        if experts is not None:
            start = int(meta_info.get("routed_experts_start_len", 0) or 0)
            if start < 0:
                raise ValueError(f"routed_experts_start_len must be non-negative, got {start}")
            rows = max(0, len(self.tokens) - 1 - start)
            layers, topk = getattr(args, "num_layers", None), getattr(args, "moe_router_topk", None)
            width = layers * topk if layers and topk else (experts.numel() // rows if rows else 0)
            if experts.numel() != rows * width or (rows and not width):
                raise ValueError(
                    f"routed_experts has {experts.numel()} ids, expected {rows} rows of {width} "
                    f"(tokens={len(self.tokens)}, routed_experts_start_len={start})"
                )
            shape = (rows, layers, topk) if layers and topk else (rows, width)
            experts = experts.reshape(shape)
            if start:
                existing = self.rollout_routed_experts
                if existing is None or existing.shape[0] < start:
                    raise ValueError(f"routed_experts_start_len={start} but fewer earlier rows are known")
                experts = torch.cat([existing[:start], experts])
            self.rollout_routed_experts = experts
        if not update_terminal_info or "finish_reason" not in meta_info:
            return
        if "weight_version" in meta_info:
            self.weight_versions.append(meta_info["weight_version"])
        reason = (meta_info.get("finish_reason") or {}).get("type")
        status = {"length": self.Status.TRUNCATED, "abort": self.Status.ABORTED, "stop": self.Status.COMPLETED}
        if reason in status:
            self.status = status[reason]


def _int32_ids(value: Any) -> torch.Tensor | None:
    """SGLang's int32 arrays in meta_info: base64 text (its JSON form), bytes, a tensor or a list."""
    if value is None:
        return None
    if isinstance(value, str):
        value = base64.b64decode(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(value), dtype=torch.int32)
    return torch.as_tensor(value, dtype=torch.int32).reshape(-1)
