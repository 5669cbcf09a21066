"""generate() on Sample classes shaped like slime's, including the strict append_response_tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import pytest

import rollout

from .conftest import ScriptedEngine, call, make_args, make_sample


class StrictSlimeSample:
    """Mirrors current slime's Sample.append_response_tokens: trainable tokens need log-probs,
    non-trainable tokens must come without them (docs/pitfalls.md#env-tokens-with-log-probs), finish reasons set the status."""

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    def __init__(self, prompt, images, label):
        self.prompt = prompt
        self.multimodal_inputs = {"images": images}
        self.multimodal_train_inputs = None
        self.label = label
        self.tokens = []
        self.response = ""
        self.response_length = 0
        self.loss_mask = None
        self.rollout_log_probs = None
        self.reward = None
        self.status = self.Status.PENDING
        self.metadata = {}
        self.remove_sample = False
        self.calls = []

    def append_response_tokens(self, args=None, *, tokens=None, log_probs=None, trainable=True, meta_info=None, text=None):
        tokens = list(tokens or [])
        self.calls.append((len(tokens), trainable, log_probs is not None))
        if log_probs is not None and len(log_probs) != len(tokens):
            raise ValueError("log_probs length != tokens length")
        if tokens and trainable and log_probs is None:
            raise ValueError("trainable response tokens require rollout log probabilities.")
        if tokens and not trainable:
            if log_probs is not None:
                raise ValueError("non-trainable response tokens should not pass rollout log probabilities.")
            log_probs = [0.0] * len(tokens)
        previous = self.response_length
        if text is not None:
            self.response += text
        self.tokens += tokens
        self.response_length += len(tokens)
        if self.loss_mask is None:
            self.loss_mask = [1] * previous
        self.loss_mask += [1 if trainable else 0] * len(tokens)
        if log_probs is not None:
            if self.rollout_log_probs is None:
                self.rollout_log_probs = [0.0] * previous
            self.rollout_log_probs += log_probs
        if meta_info and "finish_reason" in meta_info:
            self.status = {"length": self.Status.TRUNCATED, "abort": self.Status.ABORTED}.get(
                meta_info["finish_reason"]["type"], self.Status.COMPLETED
            )


async def test_strict_append_response_tokens_is_used_and_satisfied(qwen25_processing):
    tok = qwen25_processing.tokenizer
    base = make_sample(tok)
    sample = StrictSlimeSample(base.prompt, base.multimodal_inputs["images"], "5")
    engine = ScriptedEngine(tok, [call("4"), call("5") + "<|im_end|>"])
    out = await rollout.generate(make_args(engine), sample, {"temperature": 1.0})
    assert out is sample
    assert out.status == StrictSlimeSample.Status.COMPLETED
    assert [(trainable, has_lp) for _, trainable, has_lp in sample.calls] == [(True, True), (False, False), (True, True)]
    assert len(out.loss_mask) == out.response_length == len(out.rollout_log_probs)
    assert out.tokens[: len(out.tokens) - out.response_length] == out.tokens[: -out.response_length]
    assert await rollout.reward(make_args(engine), out) == 1.0


async def test_truncated_status_survives_the_samples_own_finish_reason_handling(qwen25_processing):
    tok = qwen25_processing.tokenizer
    base = make_sample(tok)
    sample = StrictSlimeSample(base.prompt, base.multimodal_inputs["images"], "5")
    reply = call("4") + "<|im_end|>"
    n = len(tok.encode(reply, add_special_tokens=False))
    engine = ScriptedEngine(tok, [reply])
    out = await rollout.generate(make_args(engine), sample, {"max_new_tokens": n})
    # The engine said "stop" (COMPLETED by the Sample's rule), but the observation did not fit.
    assert out.status == StrictSlimeSample.Status.TRUNCATED


@dataclass
class PlainSlimeLikeSample:
    """Older slime: no append_response_tokens; invariants kept by hand."""

    class Status(Enum):
        PENDING = "pending"
        COMPLETED = "completed"
        TRUNCATED = "truncated"
        ABORTED = "aborted"
        FAILED = "failed"

    prompt: str = ""
    label: str = ""
    multimodal_inputs: dict | None = None
    tokens: list = field(default_factory=list)
    response: str = ""
    response_length: int = 0
    loss_mask: list | None = None
    rollout_log_probs: list | None = None
    reward: float | None = None
    status: Status = Status.PENDING
    metadata: dict = field(default_factory=dict)
    remove_sample: bool = False
    multimodal_train_inputs: dict | None = None


async def test_sample_without_append_method(qwen25_processing):
    tok = qwen25_processing.tokenizer
    base = make_sample(tok)
    sample = PlainSlimeLikeSample(prompt=base.prompt, label="5", multimodal_inputs=base.multimodal_inputs)
    engine = ScriptedEngine(tok, [call("4"), call("5")])
    out = await rollout.generate(make_args(engine), sample, {})
    assert out.status == PlainSlimeLikeSample.Status.COMPLETED
    assert len(out.loss_mask) == out.response_length == len(out.rollout_log_probs)
    assert 0 in out.loss_mask and out.loss_mask[0] == 1


async def test_real_slime_sample_when_slime_is_installed(qwen25_processing):
    slime_types = pytest.importorskip("slime.utils.types", reason="slime is not installed here")
    tok = qwen25_processing.tokenizer
    base = make_sample(tok)
    sample = slime_types.Sample(prompt=base.prompt, label="5", multimodal_inputs=base.multimodal_inputs)
    engine = ScriptedEngine(tok, [call("4"), call("5")])
    out = await rollout.generate(make_args(engine), sample, {})
    assert out.status == slime_types.Sample.Status.COMPLETED
    assert len(out.loss_mask) == out.response_length == len(out.rollout_log_probs)


def test_importing_rollout_does_not_import_slime():
    import subprocess
    import sys

    code = "import rollout, rollout.entrypoints, sys; print('slime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
