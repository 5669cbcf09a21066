"""LocalEngine: log-probs equal teacher forcing, image pad handling, batch invariance, SGLang's
finishing rules (stop strings, stop token ids, EOS, length), sampling filters, errors, aborts."""

from __future__ import annotations

import asyncio
import copy
import dataclasses

import pytest
import torch
from torch import nn

from envs.images import to_data_uri
from models.logprobs import mm_token_type_ids
from rollout.engines.base import EngineError
from rollout.engines.local import LocalEngine
from tests.engine.conftest import (
    chat_text,
    expanded_inputs,
    make_image,
    patch_sampler,
    single_pad_ids,
    teacher_forced,
)

pytestmark = pytest.mark.usefixtures("decode_mode")


def full_log_probs(policy, prompt: dict, generated: list[int]) -> torch.Tensor:
    """Teacher-forced log-softmax over the whole vocabulary at every generated position."""
    sequence = torch.cat([prompt["input_ids"], torch.tensor([generated])], dim=1)
    with torch.no_grad():
        logits = policy.model(
            input_ids=sequence,
            pixel_values=prompt.get("pixel_values"),
            image_grid_thw=prompt.get("image_grid_thw"),
            mm_token_type_ids=mm_token_type_ids(sequence, policy.model.config),
            logits_to_keep=len(generated) + 1,
        ).logits[0, :-1]
    return logits.float().log_softmax(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
async def test_log_probs_equal_teacher_forcing(any_policy, image_a, temperature):
    policy = any_policy
    text = chat_text(policy, "Find x.")
    async with LocalEngine(policy, seed=1) as engine:
        result = await engine.generate(
            single_pad_ids(policy, text),
            [to_data_uri(image_a)],
            {"temperature": temperature, "max_new_tokens": 12, "ignore_eos": True},
        )
    prompt = expanded_inputs(policy, text, [image_a])
    assert len(result.token_ids) == 12
    assert result.finish_reason == "length"
    assert result.meta_info["prompt_tokens"] == prompt["input_ids"].shape[1]
    forced = teacher_forced(policy, prompt, result.token_ids, temperature=temperature)
    assert (forced - torch.tensor(result.log_probs)).abs().max().item() <= 1e-4


async def test_single_pad_and_expanded_pad_requests_agree(qwen25_small_policy, image_a, image_b):
    policy = qwen25_small_policy
    text = chat_text(policy, "Compare the figures.", images=2)
    single = single_pad_ids(policy, text)
    expanded = expanded_inputs(policy, text, [image_a, image_b])["input_ids"][0].tolist()
    # Second image expanded, first one not: each run is handled on its own.
    first_pad = single.index(policy.model.config.image_token_id)
    mixed = single[: first_pad + 1] + expanded[expanded.index(policy.model.config.image_token_id) + 9 :]
    params = {"max_new_tokens": 10, "sampling_seed": 42, "ignore_eos": True}
    async with LocalEngine(policy) as engine:
        results = [
            await engine.generate(ids, [image_a, image_b], params) for ids in (single, expanded, mixed)
        ]
    assert len(single) < len(expanded)
    assert [r.meta_info["prompt_tokens"] for r in results] == [len(expanded)] * 3
    assert results[0].token_ids == results[1].token_ids == results[2].token_ids
    assert results[0].log_probs == results[1].log_probs == results[2].log_probs


async def test_images_as_pil_path_and_data_uri_agree(qwen3_small_policy, image_a, tmp_path):
    policy = qwen3_small_policy
    path = tmp_path / "figure.png"
    image_a.save(path)
    ids = single_pad_ids(policy, chat_text(policy, "Find y."))
    params = {"max_new_tokens": 6, "sampling_seed": 7}
    async with LocalEngine(policy) as engine:
        results = [
            await engine.generate(ids, [image], params)
            for image in (image_a, str(path), to_data_uri(image_a))
        ]
    assert results[0].token_ids == results[1].token_ids == results[2].token_ids
    assert results[0].log_probs == results[1].log_probs == results[2].log_probs


def _mixed_requests(policy) -> list[tuple[list[int], list, dict]]:
    """Eight requests of different lengths, image counts and sampling params."""
    requests = []
    for i in range(8):
        images = [make_image(56 + 28 * ((i + j) % 2), i + j) for j in range(i % 3)]
        ids = single_pad_ids(policy, chat_text(policy, "Find x" + "!" * i, images=len(images)))
        params = {
            "max_new_tokens": 6 + 2 * i,
            "temperature": [1.0, 0.7, 0.0][i % 3],
            "top_k": [-1, 5, 0, 40][i % 4],
            "top_p": [1.0, 0.9][i % 2],
            "ignore_eos": True,
        }
        requests.append((ids, images, params))
    return requests


async def test_batching_does_not_change_results(any_small_policy):
    """Left padding must not reach a row's results; for Qwen3.5 that includes the linear-attention
    layers' recurrent and convolution states (docs/pitfalls.md#padding-in-a-linear-attention-state)."""
    policy = any_small_policy
    requests = _mixed_requests(policy)
    # No batch wait at all: the burst still forms one batch, because the scheduler waits for
    # requests whose images are still being processed.
    async with LocalEngine(policy, seed=5, batch_wait_ms=0) as engine:
        batched = await asyncio.gather(*(engine.generate(*r) for r in requests))
        assert (engine.stats["batches"], engine.stats["requests"], engine.stats["max_batch_rows"]) == (
            1,
            8,
            8,
        )
    async with LocalEngine(policy, seed=5) as engine:
        alone = [await engine.generate(*r) for r in requests]
        assert (engine.stats["batches"], engine.stats["requests"], engine.stats["max_batch_rows"]) == (
            8,
            8,
            1,
        )
    for together, single, (_, _, params) in zip(batched, alone, requests, strict=True):
        assert len(together.token_ids) == params["max_new_tokens"]
        assert together.token_ids == single.token_ids
        # fp32 noise from the padded shapes; a padding leak is orders of magnitude larger.
        assert max(abs(a - b) for a, b in zip(together.log_probs, single.log_probs, strict=True)) <= 1e-4


async def test_greedy_follows_the_argmax_and_reports_temperature_one_log_probs(qwen25_small_policy, image_a):
    policy = qwen25_small_policy
    text = chat_text(policy, "Find x.")
    async with LocalEngine(policy) as engine:
        result = await engine.generate(
            single_pad_ids(policy, text),
            [image_a],
            {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True},
        )
    full = full_log_probs(policy, expanded_inputs(policy, text, [image_a]), result.token_ids)
    assert result.token_ids == full.argmax(-1).tolist()
    chosen = full.gather(-1, torch.tensor(result.token_ids).unsqueeze(-1)).squeeze(-1)
    assert (chosen - torch.tensor(result.log_probs)).abs().max().item() <= 1e-4


async def test_top_k_one_and_tiny_top_p_are_greedy_with_log_prob_zero(qwen25_small_policy, image_a):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Find x."))
    base = {"max_new_tokens": 8, "ignore_eos": True}
    async with LocalEngine(policy) as engine:
        greedy = await engine.generate(ids, [image_a], {**base, "temperature": 0})
        top_k = await engine.generate(ids, [image_a], {**base, "top_k": 1})
        top_p = await engine.generate(ids, [image_a], {**base, "top_p": 1e-6})
    assert top_k.token_ids == top_p.token_ids == greedy.token_ids
    assert top_k.log_probs == top_p.log_probs == [0.0] * 8


async def test_top_k_and_top_p_log_probs_are_renormalised_over_the_kept_tokens(qwen3_small_policy, image_a):
    policy = qwen3_small_policy
    text = chat_text(policy, "Find x.")
    ids = single_pad_ids(policy, text)
    async with LocalEngine(policy, seed=3) as engine:
        by_k = await engine.generate(ids, [image_a], {"max_new_tokens": 8, "top_k": 5, "ignore_eos": True})
        by_p = await engine.generate(ids, [image_a], {"max_new_tokens": 8, "top_p": 0.3, "ignore_eos": True})
    prompt = expanded_inputs(policy, text, [image_a])

    full = full_log_probs(policy, prompt, by_k.token_ids)
    kept = full.topk(5, dim=-1)
    for step, token in enumerate(by_k.token_ids):
        assert token in kept.indices[step].tolist()
        expected = full[step, token] - kept.values[step].logsumexp(-1)
        assert abs(by_k.log_probs[step] - expected.item()) <= 1e-4

    full = full_log_probs(policy, prompt, by_p.token_ids)
    for step, token in enumerate(by_p.token_ids):
        ordered = full[step].sort(descending=True)
        mass_before = ordered.values.exp().cumsum(-1) - ordered.values.exp()
        nucleus = ordered.indices[mass_before <= 0.3]
        assert token in nucleus.tolist()
        expected = full[step, token] - full[step, nucleus].logsumexp(-1)
        assert abs(by_p.log_probs[step] - expected.item()) <= 1e-4


# --- finishing rules -----------------------------------------------------------------------------

GREEDY = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True, "skip_special_tokens": False}


async def _greedy_baseline(engine, policy, image) -> tuple[list[int], list[int]]:
    ids = single_pad_ids(policy, chat_text(policy, "Describe the figure."))
    result = await engine.generate(ids, [image], GREEDY)
    assert len(result.token_ids) == 24
    return ids, result.token_ids


def _decode(policy, tokens: list[int]) -> str:
    return policy.tokenizer.decode(tokens, skip_special_tokens=False)


async def test_stop_string_ends_at_the_completing_token(qwen25_small_policy, image_a):
    policy = qwen25_small_policy
    async with LocalEngine(policy) as engine:
        ids, baseline = await _greedy_baseline(engine, policy, image_a)
        # A stop string made of two generated tokens' text, completed for the first time at `end`.
        start = next(i for i in range(4, 20) if _decode(policy, baseline[i : i + 2]).strip())
        stop = _decode(policy, baseline[start : start + 2])
        end = next(k for k in range(len(baseline)) if stop in _decode(policy, baseline[: k + 1]))
        kept = await engine.generate(
            ids, [image_a], {**GREEDY, "stop": ["never-seen-text", stop], "no_stop_trim": True}
        )
        trimmed = await engine.generate(ids, [image_a], {**GREEDY, "stop": stop, "no_stop_trim": False})
    full_text = _decode(policy, baseline[: end + 1])
    for result in (kept, trimmed):
        assert result.token_ids == baseline[: end + 1]
        assert (result.finish_reason, result.matched_stop) == ("stop", stop)
        assert result.meta_info["finish_reason"] == {"type": "stop", "matched": stop}
        assert len(result.log_probs) == end + 1
    assert kept.text == full_text
    assert trimmed.text == full_text[: full_text.index(stop)]


async def test_stop_token_id_and_length_priority(qwen25_small_policy, image_a):
    policy = qwen25_small_policy
    async with LocalEngine(policy) as engine:
        ids, baseline = await _greedy_baseline(engine, policy, image_a)
        j = next(i for i in range(3, 24) if baseline[i] not in baseline[:i])
        stop_id = baseline[j]
        # As in SGLang, ignore_eos also disables stop_token_ids.
        by_id = {**GREEDY, "stop_token_ids": [stop_id], "ignore_eos": False}
        kept = await engine.generate(ids, [image_a], {**by_id, "no_stop_trim": True})
        trimmed = await engine.generate(ids, [image_a], {**by_id, "no_stop_trim": False})
        ignored = await engine.generate(ids, [image_a], {**by_id, "ignore_eos": True})
        # SGLang checks the length budget before stops: a stop token as the last allowed token is "length".
        at_budget = await engine.generate(ids, [image_a], {**by_id, "max_new_tokens": j + 1})
    for result in (kept, trimmed):
        assert result.token_ids == baseline[: j + 1]
        assert (result.finish_reason, result.matched_stop) == ("stop", stop_id)
        assert result.meta_info["finish_reason"] == {"type": "stop", "matched": stop_id}
    assert kept.text == _decode(policy, baseline[: j + 1])
    assert trimmed.text == _decode(policy, baseline[:j])
    assert ignored.token_ids == baseline
    assert at_budget.token_ids == baseline[: j + 1]
    assert (at_budget.finish_reason, at_budget.matched_stop) == ("length", None)
    assert at_budget.meta_info["finish_reason"] == {"type": "length", "length": j + 1}


async def test_max_new_tokens_zero_none_and_context_cap(qwen25_small_policy, image_a):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Find x."))
    async with LocalEngine(policy, default_max_new_tokens=3) as engine:
        zero = await engine.generate(ids, [image_a], {"max_new_tokens": 0})
        default = await engine.generate(ids, [image_a], {"max_new_tokens": None, "ignore_eos": True})
        engine.max_context = zero.meta_info["prompt_tokens"] + 2
        capped = await engine.generate(ids, [image_a], {"max_new_tokens": 50, "ignore_eos": True})
    assert (zero.token_ids, zero.log_probs, zero.text) == ([], [], "")
    assert zero.meta_info["finish_reason"] == {"type": "length", "length": 0}
    assert len(default.token_ids) == 3
    assert default.meta_info["finish_reason"] == {"type": "length", "length": 3}
    assert capped.meta_info["finish_reason"] == {"type": "length", "length": 2}


@pytest.fixture(scope="module")
def eos_policy(qwen25_small_policy):
    """A copy of the small Qwen2.5-VL whose output layer strongly prefers <|im_end|> at every step."""
    policy = qwen25_small_policy
    model = copy.deepcopy(policy.model)
    old = model.lm_head
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    head.weight = nn.Parameter(old.weight.detach().clone())
    with torch.no_grad():
        head.bias.zero_()
        head.bias[policy.tokenizer.convert_tokens_to_ids("<|im_end|>")] = 60.0
    model.lm_head = head
    return dataclasses.replace(policy, model=model)


async def test_eos_is_a_stop_with_its_id(eos_policy, image_a):
    policy = eos_policy
    im_end = policy.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = single_pad_ids(policy, chat_text(policy, "Find x."))
    async with LocalEngine(policy) as engine:
        assert engine.eos_token_ids == frozenset({im_end})
        plain = await engine.generate(ids, [image_a], {"max_new_tokens": 5})
        raw = await engine.generate(
            ids, [image_a], {"max_new_tokens": 5, "skip_special_tokens": False, "no_stop_trim": True}
        )
        skipped = await engine.generate(ids, [image_a], {"max_new_tokens": 5, "no_stop_trim": True})
        ignored = await engine.generate(ids, [image_a], {"max_new_tokens": 3, "ignore_eos": True})
        # With EOS ignored, a stop string can still name the special token.
        by_string = await engine.generate(
            ids, [image_a], {"max_new_tokens": 3, "ignore_eos": True, "stop": "<|im_end|>"}
        )
    assert plain.token_ids == [im_end]
    assert (plain.finish_reason, plain.matched_stop, plain.text) == ("stop", im_end, "")
    assert plain.log_probs[0] > -1e-6
    assert raw.text == "<|im_end|>"
    assert skipped.text == ""
    assert ignored.token_ids == [im_end] * 3
    assert ignored.meta_info["finish_reason"] == {"type": "length", "length": 3}
    assert by_string.token_ids == [im_end]
    assert (by_string.finish_reason, by_string.matched_stop) == ("stop", "<|im_end|>")


# --- requests that are refused -----------------------------------------------------------------

BAD_REQUESTS = [
    ("http_image", "is a URL; images are read from local files and data URIs only"),
    ("more_images_than_runs", "input_ids contain 1 image pad run(s) but 2 image(s) were sent"),
    ("no_images", "input_ids contain 1 image pad run(s) but 0 image(s) were sent"),
    ("bad_run_length", "needs 9 <|image_pad|> tokens but its pad run has 3"),
    ("token_out_of_vocab", "is not a token id of this model (integers in [0, 891))"),
    ("token_not_int", "input_ids[0] = 1.5 is not a token id"),
    ("empty_input", "input_ids must be a non-empty list of token ids"),
    ("unknown_param", "unknown sampling param 'temprature'. Did you mean 'temperature'?"),
    ("negative_temperature", "temperature must be a number >= 0 (0 = greedy), got -1"),
    ("top_p_zero", "top_p must be a number in (0, 1], got 0"),
    ("negative_max_new_tokens", "max_new_tokens must be an integer >= 0 or null, got -1"),
    ("stop_not_strings", "stop must be a non-empty string or a list of them, got [1]"),
    ("unreadable_image", "image 0: image data URI data:image/png;base64,aGVsbG8= does not decode"),
]


@pytest.mark.parametrize(("case", "message"), BAD_REQUESTS, ids=[c for c, _ in BAD_REQUESTS])
async def test_bad_requests_are_refused_with_a_message(qwen25_small_policy, image_a, case, message):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Find x."))
    pad = policy.model.config.image_token_id
    images: list = [image_a]
    params: dict = {"max_new_tokens": 2}
    if case == "http_image":
        images = ["https://example.com/figure.png"]
    elif case == "more_images_than_runs":
        images = [image_a, image_a]
    elif case == "no_images":
        images = []
    elif case == "bad_run_length":
        at = ids.index(pad)
        ids = ids[:at] + [pad] * 3 + ids[at + 1 :]
    elif case == "token_out_of_vocab":
        ids = [*ids, 891]
    elif case == "token_not_int":
        ids = [1.5, *ids]
    elif case == "empty_input":
        ids = []
    elif case == "unknown_param":
        params = {"temprature": 1.0}
    elif case == "negative_temperature":
        params = {"temperature": -1}
    elif case == "top_p_zero":
        params = {"top_p": 0}
    elif case == "negative_max_new_tokens":
        params = {"max_new_tokens": -1}
    elif case == "stop_not_strings":
        params = {"stop": [1]}
    elif case == "unreadable_image":
        images = ["data:image/png;base64,aGVsbG8="]
    async with LocalEngine(policy) as engine:
        with pytest.raises(EngineError) as raised:
            await engine.generate(ids, images, params)
        assert (raised.value.status, raised.value.retriable) == (400, False)
        assert message in str(raised.value)
        # The engine keeps serving after a refused request.
        ok = await engine.generate(
            single_pad_ids(policy, chat_text(policy, "Find x.")), [image_a], {"max_new_tokens": 2}
        )
        assert len(ok.token_ids) in (1, 2)


# --- aborts, failures, bookkeeping ----------------------------------------------------------------


async def test_abort_and_cancel_stop_a_running_request(qwen25_small_policy, monkeypatch):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Write a long story.", images=0))
    long = {"max_new_tokens": 20_000, "ignore_eos": True}
    async with LocalEngine(policy, max_batch_size=1, batch_wait_ms=0) as engine:
        # Abort once a token has been sampled (observed, not waited for), so the result has some.
        sampled = []

        def counting_sample(real, *args):
            sampled.append(1)
            return real(*args)

        patch_sampler(monkeypatch, counting_sample)
        task = asyncio.create_task(engine.generate(ids, [], long, rid="story"))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        while len(sampled) < 2 and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert engine.abort("story") == 1
        aborted = await task
        assert aborted.finish_reason == "abort"
        assert aborted.meta_info["finish_reason"] == {"type": "abort", "message": "aborted by request"}
        assert 0 < len(aborted.token_ids) < 20_000
        assert len(aborted.log_probs) == len(aborted.token_ids)

        cancelled = asyncio.create_task(engine.generate(ids, [], long))
        while engine.stats["batches"] == 1:
            await asyncio.sleep(0.01)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        # The cancelled request stops generating, so the next one is served promptly.
        follow_up = await asyncio.wait_for(
            engine.generate(ids, [], {"max_new_tokens": 2, "ignore_eos": True}), 30
        )
        assert len(follow_up.token_ids) == 2


async def test_an_internal_error_mid_batch_aborts_its_rows(qwen25_small_policy, monkeypatch):
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Find x.", images=0))
    params = {"max_new_tokens": 8, "ignore_eos": True}
    async with LocalEngine(policy, batch_wait_ms=500) as engine:
        calls = []

        def failing_sample(real, *args):
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("boom")
            return real(*args)

        restore = patch_sampler(monkeypatch, failing_sample)
        first, second = await asyncio.gather(
            engine.generate(ids, [], params), engine.generate(ids, [], params)
        )
        restore()
        recovered = await engine.generate(ids, [], params)
    for result in (first, second):
        assert result.finish_reason == "abort"
        assert result.meta_info["finish_reason"] == {
            "type": "abort",
            "message": "engine error: RuntimeError: boom",
        }
        assert len(result.token_ids) == len(result.log_probs) == 2
    assert recovered.finish_reason == "length"
    assert len(recovered.token_ids) == 8


async def test_meta_info_reports_the_weight_version(qwen3_small_policy, image_a):
    policy = qwen3_small_policy
    text = chat_text(policy, "Find x.")
    async with LocalEngine(policy) as engine:
        engine.weight_version = 7
        result = await engine.generate(
            single_pad_ids(policy, text), [image_a], {"max_new_tokens": 4, "ignore_eos": True}, rid="r1"
        )
    meta = dict(result.meta_info)
    assert meta.pop("e2e_latency") > 0
    assert meta == {
        "id": "r1",
        "finish_reason": {"type": "length", "length": 4},
        "prompt_tokens": expanded_inputs(policy, text, [image_a])["input_ids"].shape[1],
        "completion_tokens": 4,
        "cached_tokens": 0,
        "weight_version": 7,
    }


async def test_a_model_left_in_train_mode_generates_and_keeps_its_mode(qwen25_small_policy):
    policy = dataclasses.replace(qwen25_small_policy, model=copy.deepcopy(qwen25_small_policy.model))
    policy.model.activation_checkpointing_enable()
    policy.model.train()
    ids = single_pad_ids(policy, chat_text(policy, "Find x.", images=0))
    async with LocalEngine(policy) as engine:
        result = await engine.generate(ids, [], {"max_new_tokens": 4, "ignore_eos": True})
    assert len(result.token_ids) == 4
    assert policy.model.training


async def test_generation_config_top_k_never_filters_sampling(qwen25_small_policy, image_a):
    """A checkpoint's generation_config (top_k=50 by default for configs built in code) must not
    filter what the engine samples: log-probs stay the policy's when the request disables top-k."""
    policy = qwen25_small_policy
    config = policy.model.generation_config
    saved = (config.top_k, config.top_p, config.temperature)
    config.top_k, config.top_p, config.temperature = 50, 0.5, 0.3
    try:
        text = chat_text(policy, "Find x.")
        async with LocalEngine(policy, seed=5) as engine:
            result = await engine.generate(
                single_pad_ids(policy, text),
                [image_a],
                {"max_new_tokens": 16, "ignore_eos": True, "top_k": -1},
            )
    finally:
        config.top_k, config.top_p, config.temperature = saved
    forced = teacher_forced(policy, expanded_inputs(policy, text, [image_a]), result.token_ids)
    assert (forced - torch.tensor(result.log_probs)).abs().max().item() <= 1e-4
