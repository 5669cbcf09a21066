"""The episode loop against a scripted engine, with the real Qwen tokenizers, processors and envs."""

from __future__ import annotations

import asyncio

import pytest
import torch

import rollout
from envs.tool_calls import call_form_for, format_call
from rollout.sample import Sample

from .conftest import TEST_ENVS, ScriptedEngine, call, make_args, make_sample

Status = Sample.Status


def assert_invariants(sample):
    assert len(sample.loss_mask) == sample.response_length == len(sample.rollout_log_probs)
    assert sample.tokens[len(sample.tokens) - sample.response_length :] == sample.tokens[sample.prompt_length :]
    for mask, log_prob in zip(sample.loss_mask, sample.rollout_log_probs, strict=True):
        if mask == 0:
            assert log_prob == 0.0


def model_spans(sample):
    """Token runs with loss mask 1, as lists."""
    spans, current = [], []
    response = sample.tokens[sample.prompt_length :]
    for token, mask in zip(response, sample.loss_mask, strict=True):
        if mask:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return spans


async def test_correct_answer_on_second_turn_completes(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [call("4") + "<|im_end|>", call("5") + "<|im_end|>"])
    sample = await rollout.generate(make_args(engine), make_sample(tok), {"temperature": 1.0})
    assert sample.status == Status.COMPLETED
    assert_invariants(sample)
    assert [t["score"] for t in sample.metadata["turns"]] == [0.0, 1.0]
    assert sample.metadata["outcome"]["solved_at_turn"] == 2
    assert await rollout.reward(make_args(engine), sample) == 1.0
    assert await rollout.reward(make_args(engine), samples=[sample, sample]) == [1.0, 1.0]
    # Model tokens carry the engine's log-probs verbatim.
    first = tok.encode(call("4") + "<|im_end|>", add_special_tokens=False)
    assert sample.rollout_log_probs[: len(first)] == [-0.01 * (i + 1) for i in range(len(first))]
    assert model_spans(sample)[0] == first


def call_in(checkpoint: str, answer: str) -> str:
    """A calc_score call in the form the checkpoint's template teaches (Qwen3.5: XML)."""
    return format_call("calc_score", {"answer": answer}, call_form_for(checkpoint))


# Model turns per family whose template re-rendering is exact: Qwen3.5's generation prompt already
# opens <think>, and its template writes every assistant turn after the query with a think block.
SEQUENCE_TURNS = {
    "tiny-qwen2.5-vl": ("<think>\nLegs 3 and 4.\n</think>\n\n{call4}", "{call5}"),
    "tiny-qwen3-vl": ("<think>\nLegs 3 and 4.\n</think>\n\n{call4}", "{call5}"),
    "tiny-qwen3.5": ("Legs 3 and 4.\n</think>\n\n{call4}", "Recheck.\n</think>\n\n{call5}"),
    "tiny-qwen3.5-moe": ("Legs 3 and 4.\n</think>\n\n{call4}", "Recheck.\n</think>\n\n{call5}"),
}


@pytest.mark.parametrize("checkpoint", list(SEQUENCE_TURNS))
async def test_sequence_equals_chat_template_rendering(checkpoint):
    """docs/pitfalls.md#separator-after-end-of-turn: the separator after <|im_end|> and the generation prompt are in the sequence."""
    from rollout.runtime import default_runtime

    processing = default_runtime().processing.get(checkpoint)
    tok = processing.tokenizer
    calls = {"call4": call_in(checkpoint, "4"), "call5": call_in(checkpoint, "5")}
    turn1, turn2 = (t.format(**calls) + "<|im_end|>" for t in SEQUENCE_TURNS[checkpoint])
    engine = ScriptedEngine(tok, [turn1, turn2])
    sample = make_sample(tok, images=0)
    prompt = sample.prompt
    opened = "<think>\n" if prompt.endswith("<think>\n") else ""
    out = await rollout.generate(make_args(engine, checkpoint=checkpoint), sample, {})
    assert out.metadata["turns"][0]["tool_executed"]  # the call was read in the family's form
    feedback = out.metadata["turns"][0]["observation_text"]
    assert feedback.startswith("\n<|im_start|>user\n<tool_response>\n")
    assert feedback.endswith("<|im_start|>assistant\n" + opened)
    tool_text = feedback[len("\n<|im_start|>user\n<tool_response>\n") : feedback.index("\n</tool_response>")]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Find x."}]},
        {"role": "assistant", "content": opened + turn1[: -len("<|im_end|>")]},
        {"role": "tool", "content": tool_text},
        {"role": "assistant", "content": opened + turn2[: -len("<|im_end|>")]},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert prompt + out.response == rendered[: len(prompt + out.response)]
    assert rendered == prompt + out.response + "\n"  # the template's separator after the last <|im_end|>
    assert out.tokens == tok.encode(rendered, add_special_tokens=False)[:-1]


@pytest.mark.parametrize("checkpoint", ["tiny-qwen3-vl-thinking", "tiny-qwen3.5"])
async def test_thinking_template_difference_is_confined_to_unnormalized_reasoning(checkpoint):
    """docs/pitfalls.md#thinking-templates-rewrite-history: thinking templates re-render reasoning as '<think>\\n...\\n</think>\\n\\n'; the
    trained sequence keeps the model's own spacing. Normalized turns render identically. (Qwen3.5 keeps
    the reasoning of every turn after the user's query: tool responses are not queries.)"""
    from rollout.runtime import default_runtime

    processing = default_runtime().processing.get(checkpoint)
    tok = processing.tokenizer
    normalized = "Legs 3 and 4.\n</think>\n\n" + call_in(checkpoint, "4") + "<|im_end|>"
    normalized_final = "Recheck.\n</think>\n\n" + call_in(checkpoint, "5") + "<|im_end|>"
    unnormalized = "Legs 3 and 4.</think>" + call_in(checkpoint, "5") + "<|im_end|>"
    for turn2, same in ((normalized_final, True), (unnormalized, False)):
        engine = ScriptedEngine(tok, [normalized, turn2])
        sample = make_sample(tok, images=0)
        prompt = sample.prompt
        assert prompt.endswith("<|im_start|>assistant\n<think>\n")
        out = await rollout.generate(make_args(engine, checkpoint=checkpoint), sample, {})
        feedback = out.metadata["turns"][0]["observation_text"]
        assert feedback.endswith("<|im_start|>assistant\n<think>\n")  # generation prompt inserted, masked
        tool_text = feedback[len("\n<|im_start|>user\n<tool_response>\n") : feedback.index("\n</tool_response>")]
        messages = [
            {"role": "user", "content": [{"type": "text", "text": "Find x."}]},
            {"role": "assistant", "content": "<think>\n" + normalized[: -len("<|im_end|>")]},
            {"role": "tool", "content": tool_text},
            {"role": "assistant", "content": "<think>\n" + turn2[: -len("<|im_end|>")]},
        ]
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert (rendered == prompt + out.response + "\n") is same
        if not same:
            assert "Legs 3 and 4.</think>" in out.response
            assert "Legs 3 and 4.\n</think>\n\n" + call_in(checkpoint, "5") in rendered


@pytest.mark.parametrize("checkpoint", ["tiny-qwen2.5-vl", "tiny-qwen3.5"])
async def test_stop_string_end_of_turn_is_inserted_once(checkpoint):
    """docs/pitfalls.md#end-of-turn-after-a-stop-string: stopped on '</tool_call>' -> <|im_end|> inserted (mask 0); stopped on <|im_end|>
    -> nothing inserted."""
    from rollout.runtime import default_runtime

    tok = default_runtime().processing.get(checkpoint).tokenizer
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    call4, call6, call5 = (call_in(checkpoint, a) for a in "465")
    engine = ScriptedEngine(tok, [(call4, "stop", "</tool_call>"), (call6 + "<|im_end|>", "stop", eos), call5])
    args = make_args(engine, checkpoint=checkpoint)
    out = await rollout.generate(args, make_sample(tok), {"stop": ["</tool_call>"]})
    assert_invariants(out)
    assert [t["tool_executed"] for t in out.metadata["turns"]] == [True, True, True]
    response = out.tokens[out.prompt_length :]
    positions = [i for i, t in enumerate(response) if t == eos]
    masks = [out.loss_mask[i] for i in positions]
    # turn 1: inserted (0), observation 1 end (0); turn 2: the model's own (1), observation 2 end (0)
    assert masks == [0, 0, 1, 0]
    first_turn = len(tok.encode(call4, add_special_tokens=False))
    assert positions[0] == first_turn
    assert all(response[p + 1] != eos for p in positions if p + 1 < len(response))
    assert out.response.count("<|im_end|><|im_end|>") == 0


async def test_model_tokens_are_never_retokenized(qwen25_processing):
    """docs/pitfalls.md#decoding-and-re-tokenizing: ids that do not survive decode/encode are kept exactly as generated."""
    tok = qwen25_processing.tokenizer
    odd = [tok.convert_tokens_to_ids("Ġ"), 220, 220, 9707]  # 'Ġ' + two spaces + 'Hello' re-encode differently
    text = tok.decode(odd)
    assert tok.encode(text, add_special_tokens=False) != odd
    engine = ScriptedEngine(tok, [odd + tok.encode(call("5"), add_special_tokens=False)])
    out = await rollout.generate(make_args(engine), make_sample(tok), {})
    assert out.tokens[out.prompt_length : out.prompt_length + 4] == odd


async def test_images_reach_engine_and_train_inputs_in_token_order(qwen25_processing, tmp_path):
    """docs/pitfalls.md#image-pads-expanded-once, #every-image-reaches-the-engine, #processor-output-keys: every image of every turn is sent (one pad each, for the engine to
    expand); the training sequence has pads expanded exactly once."""
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, ["first look", "second look", "third look"], prepare_image=lambda im: ("sent", im.size))
    args = make_args(engine, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "image"})
    sample = make_sample(tok, images=1, size=112)
    out = await rollout.generate(args, sample, {})
    assert out.status == Status.COMPLETED and out.metadata["status_reason"] == "max_turns reached"
    assert_invariants(out)
    assert [r["images"] for r in engine.requests] == [
        [("sent", (112, 112))],
        [("sent", (112, 112)), ("sent", (56, 84))],
        [("sent", (112, 112)), ("sent", (56, 84)), ("sent", (56, 84))],
    ]
    mm = out.multimodal_train_inputs
    assert set(mm) == {"pixel_values", "image_grid_thw"}
    assert mm["image_grid_thw"].tolist() == [[1, 8, 8], [1, 6, 4], [1, 6, 4]]  # (t, h, w); PIL size is (w, h)
    pad = qwen25_processing.image_pad_id
    runs = _pad_runs(out.tokens, pad)
    assert runs == [16, 6, 6]
    assert mm["pixel_values"].shape[0] == 64 + 24 + 24
    for request in engine.requests:
        request_runs = _pad_runs(request["input_ids"], pad)
        assert request_runs == [1] * len(request_runs)
    # Train inputs equal processing each image alone, in order.
    alone = qwen25_processing.process_images([out.multimodal_inputs["images"][0]])
    assert torch.equal(mm["pixel_values"][:64], alone["pixel_values"])


def _pad_runs(ids, pad):
    runs, count = [], 0
    for token in ids + [None]:
        if token == pad:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs


async def test_prompt_pad_count_mismatch_fails_the_sample(qwen25_processing):
    tok = qwen25_processing.tokenizer
    sample = make_sample(tok, images=1)
    sample.multimodal_inputs["images"].append(sample.multimodal_inputs["images"][0])  # 2 images, 1 placeholder
    engine = ScriptedEngine(tok, [])
    out = await rollout.generate(make_args(engine), sample, {})
    assert out.status == Status.FAILED and out.remove_sample and out.reward == 0.0
    assert "1 image placeholders but 2 images" in out.metadata["status_reason"]
    assert engine.requests == []


@pytest.mark.parametrize("token", ["<|video_pad|>", "<|vision_end|>"])
async def test_model_generating_other_vision_tokens_fails(qwen25_processing, token):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [[9707, tok.convert_tokens_to_ids(token), 1879]])
    out = await rollout.generate(make_args(engine), make_sample(tok), {})
    assert out.status == Status.FAILED and out.tokens[out.prompt_length :] == [9707]


async def test_model_generating_image_pads_fails_instead_of_breaking_training(qwen25_processing):
    tok = qwen25_processing.tokenizer
    pad = qwen25_processing.image_pad_id
    engine = ScriptedEngine(tok, [[9707, pad, 1879]])
    out = await rollout.generate(make_args(engine), make_sample(tok), {})
    assert out.status == Status.FAILED and out.remove_sample
    assert out.metadata["status_reason"] == "the model generated vision placeholder tokens"
    assert_invariants(out)
    # The response stops before the placeholder, so a forward pass over the sample still works.
    assert out.tokens[out.prompt_length :] == [9707]
    assert _pad_runs(out.tokens, pad) == [16]


# -- budgets (docs/pitfalls.md#image-tokens-never-cut-by-truncation, #the-prompt-is-not-subtracted-from-the-response-budget) -------------------------------------------------------------------------
async def test_response_budget_does_not_subtract_the_prompt(qwen25_processing):
    tok = qwen25_processing.tokenizer
    sample = make_sample(tok, images=1, size=448)  # 256 image tokens, more than the budget below
    assert len(tok.encode(sample.prompt)) < 100
    engine = ScriptedEngine(tok, [call("5")])
    out = await rollout.generate(make_args(engine), sample, {"max_new_tokens": 100})
    assert out.prompt_length > 256
    assert engine.requests[0]["params"]["max_new_tokens"] == 100
    assert out.status == Status.COMPLETED and out.reward is None


async def test_exactly_full_budget_then_observation_does_not_fit(qwen25_processing):
    tok = qwen25_processing.tokenizer
    reply = call("4") + "<|im_end|>"
    n = len(tok.encode(reply, add_special_tokens=False))
    engine = ScriptedEngine(tok, [reply])
    out = await rollout.generate(make_args(engine), make_sample(tok), {"max_new_tokens": n})
    assert out.status == Status.TRUNCATED
    assert "does not fit (0 left)" in out.metadata["status_reason"]
    assert out.response_length == n and all(out.loss_mask)
    assert_invariants(out)


async def test_one_token_over_budget_is_cut_by_the_engine(qwen25_processing):
    tok = qwen25_processing.tokenizer
    reply = call("4") + "<|im_end|>"
    n = len(tok.encode(reply, add_special_tokens=False))
    engine = ScriptedEngine(tok, [reply])
    out = await rollout.generate(make_args(engine), make_sample(tok), {"max_new_tokens": n - 1})
    assert out.status == Status.TRUNCATED
    assert out.response_length == n - 1
    assert out.metadata["turns"][0]["finish_reason"] == "length"


async def test_image_observation_that_does_not_fit_is_not_inserted(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, ["look"])
    args = make_args(engine, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "image"})
    n = len(tok.encode("look", add_special_tokens=False))
    out = await rollout.generate(args, make_sample(tok), {"max_new_tokens": n + 10})  # the image alone needs 6 pads + 20
    assert out.status == Status.TRUNCATED
    assert out.response_length == n and out.multimodal_train_inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert _pad_runs(out.tokens, qwen25_processing.image_pad_id) == [16]


async def test_context_budget_caps_the_whole_sequence(qwen25_processing):
    tok = qwen25_processing.tokenizer
    sample = make_sample(tok)
    prompt_len = len(qwen25_processing.expand_image_pads(tok.encode(sample.prompt), [16]))
    engine = ScriptedEngine(tok, [call("4") + "<|im_end|>"])
    out = await rollout.generate(make_args(engine, rollout_max_context_len=prompt_len + 5), sample, {"max_new_tokens": 999})
    assert engine.requests[0]["params"]["max_new_tokens"] == 5
    assert out.status == Status.TRUNCATED and len(out.tokens) == prompt_len + 5


async def test_per_turn_cap_ends_the_turn_not_the_episode(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [call("4"), call("5"), "ok<|im_end|>"])
    args = make_args(engine, max_tokens_per_turn=7)
    out = await rollout.generate(args, make_sample(tok), {"max_new_tokens": 500})
    assert [r["params"]["max_new_tokens"] for r in engine.requests] == [7, 7, 7]
    first = out.metadata["turns"][0]
    assert first["finish_reason"] == "length" and first["model_tokens"] == 7
    assert "block is not closed" in first["error"]  # the env saw the cut-off tool call
    assert out.tokens[out.prompt_length + 7] == qwen25_processing.eos_token_id  # end-of-turn inserted
    assert out.loss_mask[7] == 0
    assert out.status == Status.COMPLETED
    assert [t["finish_reason"] for t in out.metadata["turns"]] == ["length", "length", "stop"]
    assert_invariants(out)


async def test_budget_cut_is_truncated_even_with_a_turn_cap(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [call("4")])
    out = await rollout.generate(make_args(engine, max_tokens_per_turn=50), make_sample(tok), {"max_new_tokens": 6})
    assert engine.requests[0]["params"]["max_new_tokens"] == 6
    assert out.status == Status.TRUNCATED and out.response_length == 6


async def test_max_turns_reached_is_completed(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [call("1"), call("2")])
    args = make_args(engine, max_turns=2, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "text"})
    out = await rollout.generate(args, make_sample(tok), {})
    assert out.status == Status.COMPLETED
    assert out.metadata["status_reason"] == "max_turns reached"
    assert len(engine.requests) == 2
    assert out.tokens[-len(tok.encode(call("2"))) :] == tok.encode(call("2"))  # nothing after the last turn
    # Geo3kEnv ends the episode itself at its last turn.
    engine = ScriptedEngine(tok, [call("1"), call("2")])
    out = await rollout.generate(make_args(engine, max_turns=2), make_sample(tok), {})
    assert out.status == Status.COMPLETED and out.metadata["outcome"]["done_reason"] == "max_turns"
    assert await rollout.reward(make_args(engine), out) == 0.0


# -- failures (docs/pitfalls.md#server-faults-as-a-training-signal, #aborted-is-slimes-failed-is-ours) --------------------------------------------------------------------
async def test_env_that_raises_fails_the_sample_with_the_reason(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, ["hello"])
    args = make_args(engine, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "raising"})
    out = await rollout.generate(args, make_sample(tok), {})
    assert out.status == Status.FAILED and out.remove_sample and out.reward == 0.0
    assert "the tool backend is down" in out.metadata["status_reason"]
    assert out.metadata["turns"][0]["error"] == "RuntimeError: the tool backend is down"
    assert_invariants(out)


async def test_aborted_engine_gives_aborted_status(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [("partial", "abort", None)])
    out = await rollout.generate(make_args(engine), make_sample(tok), {})
    assert out.status == Status.ABORTED
    assert not out.remove_sample
    assert await rollout.reward(make_args(engine), out) == 0.0
    assert_invariants(out)


async def test_sync_env_step_never_runs_on_the_event_loop(qwen25_processing):
    """Four concurrent episodes' synchronous steps block until the event loop
    releases them, which it can only do if none of them runs on it."""
    import tests.rollout.envs_for_tests as test_envs  # noqa: F401 (the loader imports it by path)
    from envs.loader import load_env_module

    module = load_env_module(TEST_ENVS)
    module.EVENTS.clear()
    module.RELEASE.clear()
    tok = qwen25_processing.tokenizer
    samples = [make_sample(tok) for _ in range(4)]
    engines = [ScriptedEngine(tok, ["x"]) for _ in samples]

    async def release_once_all_steps_started():
        loop = asyncio.get_running_loop()
        deadline = loop.time() + module.RELEASE_TIMEOUT_S
        while len(module.EVENTS) < len(samples) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        module.RELEASE.set()

    release = asyncio.create_task(release_once_all_steps_started())
    outs = await asyncio.gather(*[
        rollout.generate(make_args(e, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "gated"}), s, {})
        for e, s in zip(engines, samples, strict=True)
    ])  # fmt: skip
    await release
    assert [o.status for o in outs] == [Status.COMPLETED] * 4, [o.metadata.get("status_reason") for o in outs]
    assert len(module.EVENTS) == 4
    assert all(event.startswith("step on env-step") for event in module.EVENTS)


@pytest.mark.parametrize(
    ("kind", "feedback"),
    [
        ("text", "Try again."),
        ("async_step", "async feedback on "),
        ("async_observation", "formatted: Try again."),
        ("coroutine_returning", "from a coroutine"),
    ],
)
async def test_observations_are_encoded_off_the_event_loop(qwen25_processing, monkeypatch, kind, feedback):
    """Sync and async envs alike: the observation is tokenized in the env threads, never on the loop
    (a burst of episodes released together by the grader would otherwise encode in one iteration)."""
    import threading

    import rollout.episode as episode

    tok = qwen25_processing.tokenizer
    threads = []
    original = episode._encode_observation

    def recording(*args):
        threads.append(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(episode, "_encode_observation", recording)
    engine = ScriptedEngine(tok, ["one", "two"])
    args = make_args(engine, max_turns=2, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": kind})
    out = await rollout.generate(args, make_sample(tok), {})
    assert out.status == Status.COMPLETED, out.metadata["status_reason"]
    assert out.metadata["status_reason"] == "max_turns reached"
    assert feedback in out.metadata["turns"][0]["observation_text"]
    assert len(threads) == 1 and threads[0].startswith("env-step")
    # The inserted observation is exactly what the engine's second request continues from.
    second = engine.requests[1]["input_ids"]
    assert second[-out.metadata["turns"][0]["env_tokens"] :] == tok.encode(
        out.metadata["turns"][0]["observation_text"], add_special_tokens=False
    )
    assert_invariants(out)


async def test_an_observation_that_cannot_be_formatted_fails_the_sample(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, ["one", "two"])
    args = make_args(engine, max_turns=2, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "unformattable"})
    out = await rollout.generate(args, make_sample(tok), {})
    assert out.status == Status.FAILED and out.remove_sample and out.reward == 0.0
    assert out.metadata["status_reason"] == "observation at turn 1 could not be encoded: no template for this observation"
    assert out.metadata["turns"][0]["error"] == "ValueError: no template for this observation"
    assert len(engine.requests) == 1
    assert_invariants(out)


async def test_reward_comes_from_the_outcome_not_the_text(qwen25_processing):
    """docs/pitfalls.md#reward-read-from-env-text: env feedback may quote \\boxed{...}; a wrong final answer still scores 0."""
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [call("5") + "<|im_end|>"])
    sample = make_sample(tok, label="7")
    out = await rollout.generate(make_args(engine, max_turns=1), sample, {})
    assert await rollout.reward(make_args(engine), out) == 0.0
    engine = ScriptedEngine(tok, ["Answer: \\boxed{7}<|im_end|>"])
    out = await rollout.generate(make_args(engine), make_sample(tok, label="7"), {})
    assert out.metadata["outcome"]["score"] == 1.0
    assert await rollout.reward(make_args(engine), out) == 1.0


async def test_a_groups_copies_of_an_image_are_processed_and_encoded_once(qwen25_processing):
    """slime deep-copies each prompt n times: the image is processed once, off the event loop (on
    the image cache's own thread), and sent as one payload; the samples share its tensors."""
    import copy
    import threading

    from rollout.image_cache import ProcessedImageCache
    from rollout.runtime import default_runtime

    tok = qwen25_processing.tokenizer
    runtime = default_runtime()
    runtime.image_cache = ProcessedImageCache()  # fresh counters for this test
    threads, encoded = [], []
    original = qwen25_processing.process_images

    def recording(images):
        threads.append(threading.current_thread().name)
        return original(images)

    qwen25_processing.process_images = recording
    try:
        base = make_sample(tok, size=140)
        samples = [copy.deepcopy(base) for _ in range(4)]
        engine = ScriptedEngine(tok, [call("5")] * 4, prepare_image=lambda im: encoded.append(im.size) or "uri")
        outs = await asyncio.gather(*[rollout.generate(make_args(engine), s, {}) for s in samples])
    finally:
        qwen25_processing.process_images = original
    assert all(o.status == Status.COMPLETED for o in outs)
    assert len(threads) == 1 and threads[0].startswith("rollout-pixels")
    assert encoded == [(140, 140)]
    assert all(r["images"] == ["uri"] for r in engine.requests)
    first = outs[0].multimodal_train_inputs["pixel_values"]
    assert all(o.multimodal_train_inputs["pixel_values"] is first for o in outs)
    assert (runtime.image_cache.misses, runtime.image_cache.hits) == (1, 3)


async def test_a_sample_the_env_cannot_be_built_for_fails_alone(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [])
    out = await rollout.generate(make_args(engine), make_sample(tok, label=""), {})
    assert out.status == Status.FAILED and out.remove_sample and out.reward == 0.0
    assert out.metadata["status_reason"].startswith("the env could not be built or reset: EnvConfigError: ")
    assert engine.requests == []
    assert_invariants(out)


def test_prompt_token_ids_are_remembered_and_never_shared(qwen25_processing):
    text = "<|im_start|>user\nFind x in the triangle.<|im_end|>\n<|im_start|>assistant\n"
    first = qwen25_processing.encode_prompt(text)
    assert first == qwen25_processing.encode_trusted(text)
    first.append(-1)  # a caller's list is its own
    second = qwen25_processing.encode_prompt(text)
    assert second == qwen25_processing.encode_trusted(text) and second is not first
