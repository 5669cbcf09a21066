"""rollout.server over real HTTP on localhost: SGLang's /generate, errors, health, model info,
and the command line (a subprocess that starts, serves and stops on SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from envs.images import to_data_uri
from rollout.engines.local import LocalEngine
from rollout.server import start_server
from tests.engine.conftest import chat_text, expanded_inputs, single_pad_ids

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def served(qwen25_small_policy):
    async with LocalEngine(qwen25_small_policy, seed=0) as engine:
        server = await start_server(engine, "127.0.0.1", 0, model_path="tiny-qwen2.5-vl-small-vocab")
        async with server, aiohttp.ClientSession(base_url=server.url) as session:
            yield engine, session, server.url


async def _post(session: aiohttp.ClientSession, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post("/generate", data=data, headers={"Content-Type": "application/json"}) as response:
        return response.status, await response.json()


async def test_generate_over_http_matches_the_engine(served, qwen25_small_policy, image_a):
    engine, session, _ = served
    policy = qwen25_small_policy
    text = chat_text(policy, "Find x.")
    ids = single_pad_ids(policy, text)
    params = {"max_new_tokens": 6, "sampling_seed": 11, "ignore_eos": True, "skip_special_tokens": False}
    status, body = await _post(
        session,
        {
            "input_ids": ids,
            "image_data": [to_data_uri(image_a)],
            "sampling_params": params,
            "return_logprob": True,
        },
    )
    direct = await engine.generate(ids, [image_a], params)
    assert status == 200
    assert body["text"] == direct.text
    assert body["output_ids"] == direct.token_ids
    meta = body["meta_info"]
    assert meta["output_token_logprobs"] == [
        [lp, t, None] for lp, t in zip(direct.log_probs, direct.token_ids, strict=True)
    ]
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == expanded_inputs(policy, text, [image_a])["input_ids"].shape[1]
    assert (meta["completion_tokens"], meta["cached_tokens"], meta["weight_version"]) == (6, 0, "default")
    # SGLang 0.5.23: a request sent without rid still gets an id (uuid4 hex), distinct per request.
    assert isinstance(meta["id"], str) and len(meta["id"]) == 32 and int(meta["id"], 16) >= 0

    # `text` instead of ids, one image as a plain string, no log-probs requested.
    status, by_text = await _post(
        session, {"text": text, "image_data": to_data_uri(image_a), "sampling_params": params}
    )
    assert status == 200
    assert by_text["output_ids"] == direct.token_ids
    assert "output_token_logprobs" not in by_text["meta_info"]
    assert by_text["meta_info"]["id"] != meta["id"]
    status, named = await _post(session, {"text": text, "image_data": to_data_uri(image_a), "sampling_params": params, "rid": "r-1"})
    assert (status, named["meta_info"]["id"]) == (200, "r-1")
    engine.weight_version = 4  # the local trainer's count of weight updates
    status, later = await _post(session, {"text": text, "image_data": to_data_uri(image_a), "sampling_params": params})
    assert (status, later["meta_info"]["weight_version"]) == (200, "4")


async def test_health_model_info_abort_and_flush(served):
    engine, session, _ = served
    async with session.get("/health") as response:
        assert (response.status, await response.text()) == (200, "ok")
    engine.weight_version = 3
    async with session.get("/get_model_info") as response:
        assert response.status == 200
        assert await response.json() == {
            "model_path": "tiny-qwen2.5-vl-small-vocab",
            "tokenizer_path": "tiny-qwen2.5-vl-small-vocab",
            "is_generation": True,
            "weight_version": "3",
            "max_batch_size": 32,
            "vocab_size": 891,
            "max_context_length": 32768,
        }
    async with session.post("/abort_request", json={"abort_all": True}) as response:
        assert (response.status, await response.json()) == (200, {"aborted": 0})
    async with session.post("/flush_cache") as response:
        assert response.status == 200


async def test_v1_loads_counts_requests_as_slime_reads_them(served, qwen25_small_policy):
    """slime's abort() polls /v1/loads?include=core after every rollout until it reports no
    request (num_running_reqs + num_waiting_reqs, or num_reqs / total_reqs); SGLang 0.5.23 answers
    {"timestamp", "version", "accelerator", "num_accelerators", "loads": [{"dp_rank", ...}]}."""
    engine, session, _ = served
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Find x.", images=0))

    async def load() -> dict:
        async with session.get("/v1/loads", params={"include": "core"}) as response:
            assert response.status == 200
            return await response.json()

    idle = await load()
    assert set(idle) == {"timestamp", "version", "accelerator", "num_accelerators", "loads"}
    (entry,) = idle["loads"]
    assert entry["dp_rank"] == 0 and entry["num_running_reqs"] + entry["num_waiting_reqs"] == 0
    assert _num_requests_as_slime_reads_them(idle) == 0
    # A request in flight is counted until it ends.
    # Long enough that it is still running when aborted, however slow the machine (a 400-token
    # request once finished first on a loaded machine).
    request = asyncio.ensure_future(
        _post(session, {"input_ids": ids, "sampling_params": {"max_new_tokens": 20_000, "ignore_eos": True}})
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 120
    busy = await load()
    while _num_requests_as_slime_reads_them(busy) != 1 and loop.time() < deadline:
        await asyncio.sleep(0.01)
        busy = await load()
    assert _num_requests_as_slime_reads_them(busy) == 1
    async with session.post("/abort_request", json={"abort_all": True}) as response:
        assert response.status == 200
    status, body = await request
    assert status == 200 and body["meta_info"]["finish_reason"]["type"] == "abort"
    assert _num_requests_as_slime_reads_them(await load()) == 0
    async with session.get("/v1/loads", params={"include": "cores"}) as response:
        assert response.status == 400 and "Invalid include sections" in (await response.json())["error"]["message"]


def _num_requests_as_slime_reads_them(load) -> int:
    """slime 624b824's server_control.num_requests_from_load, restated: the first count it finds."""
    if isinstance(load, list):
        return sum(_num_requests_as_slime_reads_them(item) for item in load)
    if not isinstance(load, dict):
        return 0
    if "loads" in load:
        return _num_requests_as_slime_reads_them(load["loads"])
    for key in ("num_reqs", "num_total_reqs", "total_reqs"):
        if isinstance(load.get(key), int):
            return load[key]
    running, waiting = load.get("num_running_reqs"), load.get("num_waiting_reqs")
    return (running if isinstance(running, int) else 0) + (waiting if isinstance(waiting, int) else 0)


def _bad_bodies(ids: list[int], image: str) -> list[tuple[str, object, str]]:
    pad_only = {"input_ids": ids, "image_data": [image]}
    return [
        ("malformed_json", b'{"input_ids": [1, 2', "the request body is not valid JSON"),
        ("not_an_object", [1, 2, 3], "the request body must be a JSON object, got list"),
        (
            "no_input",
            {"sampling_params": {}},
            "send exactly one of 'input_ids' (a list of token ids) and 'text'",
        ),
        ("both_inputs", {"input_ids": ids, "text": "hi"}, "send exactly one of 'input_ids'"),
        ("batched_ids", {"input_ids": [ids, ids]}, "batched input_ids (a list of lists) are not supported"),
        (
            "token_out_of_vocab",
            {**pad_only, "input_ids": [*ids, 10_000]},
            "input_ids[%d] = 10000 is not a token id",
        ),
        ("token_not_int", {**pad_only, "input_ids": ["a", *ids]}, "input_ids[0] = 'a' is not a token id"),
        (
            "image_count",
            {"input_ids": ids, "image_data": [image, image]},
            "1 image pad run(s) but 2 image(s)",
        ),
        (
            "image_not_string",
            {"input_ids": ids, "image_data": [3]},
            "image_data must be a string or a list of strings",
        ),
        ("http_image", {"input_ids": ids, "image_data": "http://example.com/a.png"}, "is a URL"),
        (
            "negative_temperature",
            {**pad_only, "sampling_params": {"temperature": -0.5}},
            "temperature must be",
        ),
        (
            "top_p_zero",
            {**pad_only, "sampling_params": {"top_p": 0.0}},
            "top_p must be a number in (0, 1], got 0.0",
        ),
        (
            "top_p_above_one",
            {**pad_only, "sampling_params": {"top_p": 1.5}},
            "top_p must be a number in (0, 1]",
        ),
        (
            "negative_max_new",
            {**pad_only, "sampling_params": {"max_new_tokens": -3}},
            "max_new_tokens must be",
        ),
        (
            "unknown_param",
            {**pad_only, "sampling_params": {"max_tokens": 5}},
            "unknown sampling param 'max_tokens'",
        ),
        (
            "unknown_field",
            {**pad_only, "sampling_param": {}},
            "unknown request field 'sampling_param'. Did you mean",
        ),
        ("streaming", {**pad_only, "stream": True}, "stream=True is not supported by this server"),
        ("logprob_not_bool", {**pad_only, "return_logprob": "yes"}, "return_logprob must be true or false"),
        # SGLang's SamplingParams.verify: 0 is not "no top-k" there (-1 is).
        ("top_k_zero", {**pad_only, "sampling_params": {"top_k": 0}}, "top_k must be -1 (disable) or at least 1, got 0."),
        ("top_k_minus_two", {**pad_only, "sampling_params": {"top_k": -2}}, "top_k must be -1 (disable) or at least 1"),
    ]


BAD_CASES = [case for case, _, _ in _bad_bodies([0], "")]


@pytest.mark.parametrize("case", BAD_CASES)
async def test_bad_requests_get_400_and_the_server_keeps_serving(served, qwen25_small_policy, image_a, case):
    _, session, _ = served
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Find x."))
    image = to_data_uri(image_a)
    _, body, message = next(c for c in _bad_bodies(ids, image) if c[0] == case)
    if "%d" in message:
        message = message % len(ids)
    status, error = await _post(session, body)
    assert status == 400
    assert error["error"]["code"] == 400
    assert message in error["error"]["message"]

    status, ok = await _post(
        session,
        {
            "input_ids": ids,
            "image_data": [image],
            "sampling_params": {"max_new_tokens": 2, "ignore_eos": True},
        },
    )
    assert status == 200
    assert len(ok["output_ids"]) == 2


async def test_command_line_server_starts_serves_and_stops_on_sigterm(qwen25_small_policy):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "rollout.server",
        "--model",
        "tiny-qwen2.5-vl-small-vocab",
        "--port",
        "0",
    ]
    # The static decoder (slots of 512 tokens) here; the other server tests run the default loop.
    command += ["--device", "cpu", "--dtype", "float32", "--decode", "static", "--max-seq-len", "512"]
    process = await asyncio.create_subprocess_exec(
        *command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines: list[str] = []
    try:
        while True:
            line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
            assert line, f"the server exited before serving: {''.join(lines)}"
            lines.append(line)
            if line.startswith("serving "):
                break
        url = line.split(" on ")[-1].strip()
        assert "engine: static decoding, batches of up to 32\n" in lines
        policy = qwen25_small_policy
        ids = single_pad_ids(policy, chat_text(policy, "Find x.", images=0))
        async with aiohttp.ClientSession(base_url=url) as session:
            async with session.get("/health") as response:
                assert response.status == 200
            request = {"input_ids": ids, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
            async with session.post("/generate", json={**request, "return_logprob": True}) as response:
                body = await response.json()
        assert len(body["meta_info"]["output_token_logprobs"]) == 3
        process.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, "".join(lines) + rest.decode()
        assert "shutting down" in rest.decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_the_sglang_client_gets_what_the_engine_generates(served, qwen25_small_policy, image_a):
    from rollout.engines.sglang_client import SGLangClient

    engine, _, url = served
    policy = qwen25_small_policy
    ids = single_pad_ids(policy, chat_text(policy, "Find x."))
    params = {"max_new_tokens": 5, "sampling_seed": 3, "stop": ["</tool_call>"], "no_stop_trim": True}
    client = SGLangClient(url, timeout_s=60, max_retries=0)
    try:
        over_http = await client.generate(ids, [image_a], params)
    finally:
        await client.close()
    direct = await engine.generate(ids, [image_a], params)
    assert over_http.token_ids == direct.token_ids
    assert over_http.log_probs == direct.log_probs
    assert (over_http.text, over_http.finish_reason, over_http.matched_stop) == (
        direct.text,
        direct.finish_reason,
        direct.matched_stop,
    )


async def test_episode_over_the_server_passes_the_prompt_tokens_check(served, qwen25_small_policy, image_a):
    """The server reports prompt_tokens exactly like SGLang (the prompt with each image's pad
    expanded): a multi-turn episode over it, with an image in every observation, passes the
    episode's comparison at every turn."""
    import argparse

    import rollout
    from rollout.sample import Sample

    _, _, url = served
    policy = qwen25_small_policy
    port = int(url.rsplit(":", 1)[1])
    args = argparse.Namespace(
        hf_checkpoint="tiny-qwen2.5-vl-small-vocab", sglang_router_ip="127.0.0.1", sglang_router_port=port,
        rollout_max_context_len=None, rollout_max_response_len=400, max_turns=2, max_tokens_per_turn=8,
        rollout_interaction_env_path=str(REPO_ROOT / "tests" / "rollout" / "envs_for_tests.py"),
        env_kwargs={"kind": "image"}, request_max_retries=0,
    )  # fmt: skip
    prompt = chat_text(policy, "Find x.")
    sample = Sample(prompt=prompt, multimodal_inputs={"images": [image_a]}, label="5")
    out = await rollout.generate(args, sample, {"max_new_tokens": 400, "temperature": 1.0, "top_k": -1})
    assert out.status == Sample.Status.COMPLETED, out.metadata["status_reason"]
    assert out.metadata["status_reason"] == "max_turns reached" and out.metadata["num_turns"] == 2
    assert out.weight_versions == ["default", "default"]
    assert len(out.multimodal_train_inputs["image_grid_thw"]) == 2  # the prompt's image and turn 1's
