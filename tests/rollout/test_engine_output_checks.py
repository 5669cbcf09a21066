"""Engine output is checked, never trusted (docs/pitfalls.md#engine-output-trusted-blindly): ids outside the vocabulary, non-finite
log-probs and a per-token list that does not cover the output each fail the sample (FAILED,
removed, reward 0) before any of the turn's tokens join the trajectory.

Malformed SGLang responses come from a real HTTP server on localhost that answers /generate with
them; an out-of-vocabulary id is also sampled for real, by the local engine (in process and behind
the project's SGLang-compatible server) over a model whose embedding is larger than its tokenizer.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from aiohttp import web

import rollout
from rollout.engines.local import LocalEngine
from rollout.sample import Sample
from rollout.server import start_server

from .conftest import call, make_args, make_sample

Status = Sample.Status


def _response(ids, log_probs, text, *, output_ids=None, completion_tokens=None, prompt_tokens=None):
    """SGLang 0.5.23's /generate JSON (CONTRACT 7); the per-token list is ``ids``/``log_probs``."""
    return {
        "text": text,
        "output_ids": list(ids) if output_ids is None else output_ids,
        "meta_info": {
            "id": "r1",
            "finish_reason": {"type": "stop", "matched": ids[-1] if ids else None},
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(ids) if completion_tokens is None else completion_tokens,
            "cached_tokens": 0,
            "weight_version": "default",
            "output_token_logprobs": [[lp, t, None] for lp, t in zip(log_probs, ids, strict=True)],
        },
    }


def _defective(defect: str, tok) -> dict:
    """A response to the first turn whose text is the correct answer (a reward of 1.0 if trusted)."""
    text = call("5") + "<|im_end|>"
    ids = tok.encode(text, add_special_tokens=False)
    log_probs = [-0.1] * len(ids)
    if defect == "clean":
        return _response(ids, log_probs, text)
    if defect == "log_probs_shorter_than_output_ids":
        # The tail (the answer and the end of turn) lost from the per-token list; text and
        # output_ids still hold it.
        half = len(ids) // 2
        return _response(ids[:half], log_probs[:half], text, output_ids=ids, completion_tokens=len(ids))
    if defect == "log_probs_shorter_than_completion_tokens":
        half = len(ids) // 2
        body = _response(ids[:half], log_probs[:half], text, completion_tokens=len(ids))
        del body["output_ids"]
        return body
    if defect == "log_probs_disagree_with_output_ids":
        swapped = list(ids)
        swapped[3] = ids[3] + 1
        return _response(swapped, log_probs, text, output_ids=ids)
    if defect == "id_past_the_tokenizer":
        ids[2] = len(tok)
        return _response(ids, log_probs, text)
    if defect == "negative_id":
        ids[2] = -1
        return _response(ids, log_probs, text)
    if defect == "float_id":
        body = _response(ids, log_probs, text)
        body["meta_info"]["output_token_logprobs"][2][1] = float(ids[2]) + 0.5
        return body
    if defect in ("nan_log_prob", "inf_log_prob"):
        log_probs[4] = math.nan if defect == "nan_log_prob" else -math.inf
        return _response(ids, log_probs, text)
    raise AssertionError(defect)


@pytest.fixture
async def fake_sglang():
    """Serves one scripted /generate body per request (JSON as Python writes it: NaN, -Infinity)."""
    runners = []

    async def start(bodies):
        bodies = list(bodies)
        requests = []

        async def handle(request):
            body = await request.json()
            requests.append(body)
            reply = bodies.pop(0)
            # SGLang reports the request's length (no images here, so nothing to expand).
            reply["meta_info"]["prompt_tokens"] = len(body["input_ids"])
            return web.Response(text=json.dumps(reply), content_type="application/json")

        app = web.Application()
        app.router.add_post("/generate", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return runner.addresses[0][1], requests

    yield start
    for runner in runners:
        await runner.cleanup()


REASONS = {
    "log_probs_shorter_than_output_ids": "output_token_logprobs disagrees with output_ids ({half} entries for {n} output_ids)",
    "log_probs_shorter_than_completion_tokens": "has {half} entries but meta_info.completion_tokens is {n}",
    "log_probs_disagree_with_output_ids": "at position 3 where output_ids has",
    "id_past_the_tokenizer": "is outside the vocabulary [0, ",
    "negative_id": "token id -1 at output position 2 is outside the vocabulary",
    "float_id": "is not an integer",
    "nan_log_prob": "log-prob nan at output position 4 is not a finite number",
    "inf_log_prob": "log-prob -inf at output position 4 is not a finite number",
}


@pytest.mark.parametrize("defect", list(REASONS))
async def test_malformed_sglang_output_fails_the_sample(fake_sglang, qwen25_processing, defect):
    tok = qwen25_processing.tokenizer
    port, requests = await fake_sglang([_defective(defect, tok)])
    args = make_args(None, sglang_router_ip="127.0.0.1", sglang_router_port=port)
    sample = make_sample(tok, images=0)
    out = await rollout.generate(args, sample, {"temperature": 1.0})
    assert len(requests) == 1
    assert out.status == Status.FAILED, out.metadata["status_reason"]
    n = len(tok.encode(call("5") + "<|im_end|>", add_special_tokens=False))
    assert REASONS[defect].format(n=n, half=n // 2) in out.metadata["status_reason"]
    assert out.remove_sample and out.reward == 0.0 and await rollout.reward(args, out) == 0.0
    # Nothing of the turn was kept: not the ids, not the log-probs, not the text the env never graded.
    assert out.tokens == requests[0]["input_ids"]
    assert out.response_length == 0 and out.loss_mask == [] and out.rollout_log_probs == []
    assert out.response == "" and out.metadata["turns"][0]["score"] is None


async def test_the_same_response_without_defects_is_rewarded(fake_sglang, qwen25_processing):
    """The control: the scripted answer is right, so only the defects above fail the samples."""
    tok = qwen25_processing.tokenizer
    port, _ = await fake_sglang([_defective("clean", tok)])
    args = make_args(None, sglang_router_ip="127.0.0.1", sglang_router_port=port)
    out = await rollout.generate(args, make_sample(tok, images=0), {"temperature": 1.0})
    assert out.status == Status.COMPLETED and out.reward is None and await rollout.reward(args, out) == 1.0
    assert out.response_length == len(tok.encode(call("5") + "<|im_end|>", add_special_tokens=False))


@pytest.fixture(scope="module")
def padded_vocab_policy():
    """tiny-qwen2.5-vl-small-vocab with an embedding twice the tokenizer's length, as real Qwen
    configs pad theirs (151936 rows for 151665 tokens). The extra output rows copy the real ones, so
    every sampled token has an even chance of being an id with no token behind it."""
    from models import load_policy

    policy = load_policy("tiny-qwen2.5-vl-small-vocab", device="cpu")
    tokens = len(policy.tokenizer)
    policy.model.resize_token_embeddings(2 * tokens, mean_resizing=False)
    with torch.no_grad():
        head = policy.model.get_output_embeddings().weight
        head[tokens:] = head[:tokens]
    assert policy.model.get_input_embeddings().num_embeddings == 2 * tokens
    return policy


@pytest.mark.parametrize("over_http", [False, True], ids=["in_process", "over_http"])
async def test_local_engine_sampling_an_id_with_no_token_fails_the_sample(padded_vocab_policy, over_http):
    policy = padded_vocab_policy
    tok = policy.tokenizer
    engine = LocalEngine(policy, max_batch_size=4, batch_wait_ms=0.0, seed=3)
    params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 16}
    try:
        if over_http:
            async with await start_server(engine) as server:
                args = make_args(None, checkpoint="tiny-qwen2.5-vl-small-vocab",
                                 sglang_router_ip=server.host, sglang_router_port=server.port)  # fmt: skip
                out = await rollout.generate(args, make_sample(tok), dict(params))
        else:
            args = make_args(engine, checkpoint="tiny-qwen2.5-vl-small-vocab")
            out = await rollout.generate(args, make_sample(tok), dict(params))
    finally:
        await engine.aclose()
    reason = out.metadata["status_reason"]
    assert out.status == Status.FAILED and out.remove_sample and out.reward == 0.0, reason
    assert f"is outside the vocabulary [0, {len(tok)})" in reason
    token = int(reason.split("token id ")[1].split()[0])
    assert len(tok) <= token < 2 * len(tok)  # sampled for real from the padding rows
    assert out.response_length == 0 and out.loss_mask == []
    assert max(out.tokens) < len(tok)  # the sequence the trainer would see holds no such id
