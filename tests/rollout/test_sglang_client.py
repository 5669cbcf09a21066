"""The SGLang client against real HTTP servers on localhost that misbehave on purpose (docs/pitfalls.md#server-faults-as-a-training-signal)."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import socket
import threading
import uuid

import numpy as np
import pytest
from aiohttp import web
from PIL import Image

import rollout
from envs.images import load_image
from rollout.engines.base import EngineError
from rollout.engines.sglang_client import SGLangClient
from rollout.image_cache import predicted_pad_count
from rollout.sample import Sample

from .conftest import TEST_ENVS, call, diagram, make_args, make_sample

Status = Sample.Status


class FakeSGLang:
    """Answers /generate from a script: ("ok", text_ids), ("status", code), ("sleep", s), ("garbage",).

    ``prompt_tokens`` is reported as SGLang 0.5.23 does: the request's length after each image's
    single pad was expanded, here by ``image_pads(image) -> count`` (SGLang's own resize rule), or
    not at all when ``image_pads`` is None and the request has images (an older server)."""

    def __init__(self, script, image_pads=None, pad_id=None):
        self.script = list(script)
        self.requests = []
        self.image_pads = image_pads
        self.pad_id = pad_id

    def prompt_tokens(self, body):
        images = body.get("image_data") or []
        if not images:
            return len(body["input_ids"])
        if self.image_pads is None:
            return None
        assert body["input_ids"].count(self.pad_id) == len(images), "one pad per image"
        return len(body["input_ids"]) + sum(self.image_pads(load_image(uri)) - 1 for uri in images)

    async def handle(self, request):
        self.requests.append(await request.json())
        action = self.script.pop(0) if self.script else ("status", 500)
        if action[0] == "ok":
            ids = action[1]
            meta = {
                "id": uuid.uuid4().hex,
                "finish_reason": {"type": "stop", "matched": 151645},
                "output_token_logprobs": [[-0.5, t, None] for t in ids],
                "prompt_tokens": self.prompt_tokens(self.requests[-1]),
                "completion_tokens": len(ids), "cached_tokens": 0, "weight_version": "default",
            }  # fmt: skip
            if meta["prompt_tokens"] is None:
                del meta["prompt_tokens"]
            return web.json_response({"text": action[2] if len(action) > 2 else "t", "output_ids": ids, "meta_info": meta})
        if action[0] == "status":
            return web.json_response({"error": {"message": "nope"}}, status=action[1])
        if action[0] == "sleep":
            await asyncio.sleep(action[1])
            return web.json_response({})
        return web.Response(text="<html>not json</html>", content_type="text/html")


@pytest.fixture
async def serve():
    runners = []

    async def start(script, fake_class=None, **options):
        fake = (fake_class or FakeSGLang)(script, **options)
        app = web.Application()
        app.router.add_post("/generate", fake.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = site._server.sockets[0].getsockname()[1]
        return fake, port

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
def http_args():
    """slime-like args whose engine is the SGLang client for a server on this port."""

    def build(port: int, **overrides):
        return make_args(None, sglang_router_ip="127.0.0.1", sglang_router_port=port, **overrides)

    return build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_happy_path_request_shape(serve):
    fake, port = await serve([("ok", [9707, 1879])])
    client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=5, max_retries=0)
    from PIL import Image

    result = await client.generate([1, 2, 3], [Image.new("RGB", (8, 8)), "data:image/png;base64,AAAA"], {"temperature": 1.0})
    await client.close()
    assert result.token_ids == [9707, 1879] and result.log_probs == [-0.5, -0.5]
    assert result.finish_reason == "stop" and result.matched_stop == 151645
    body = fake.requests[0]
    assert body["input_ids"] == [1, 2, 3] and body["return_logprob"] is True
    assert body["sampling_params"] == {"temperature": 1.0}
    assert body["image_data"][0].startswith("data:image/png;base64,")
    assert body["image_data"][1] == "data:image/png;base64,AAAA"


def test_kept_meta_info_drops_only_the_per_token_list():
    """slime's append_response_tokens reads finish reason, weight version and cache data from
    meta_info; the per-token list is already in token_ids / log_probs and is not kept."""
    from rollout.engines.sglang_client import parse_generate_response

    meta = {
        "finish_reason": {"type": "stop", "matched": 151645},
        "output_token_logprobs": [[-0.25, 7, None], [-1.5, 8, None]],
        "weight_version": "3", "cached_tokens": 12, "prompt_tokens": 40, "completion_tokens": 2,
    }  # fmt: skip
    result = parse_generate_response({"text": "ab", "meta_info": meta})
    assert result.token_ids == [7, 8] and result.log_probs == [-0.25, -1.5]
    assert result.meta_info == {k: v for k, v in meta.items() if k != "output_token_logprobs"}
    assert "output_token_logprobs" in meta  # the caller's body is not modified


async def test_non_standard_json_numbers_are_still_read():
    """A server that writes -Infinity (Python's json does by default) is read, not rejected."""
    seen = []

    async def handle(request):
        seen.append(await request.read())
        body = '{"text": "t", "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-Infinity, 5, null]]}}'
        return web.Response(text=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/generate", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]
        client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=5, max_retries=0)
        result = await client.generate([1, 2], [], {"temperature": 1.0})
        await client.close()
    finally:
        await runner.cleanup()
    assert result.token_ids == [5] and result.log_probs == [float("-inf")]
    assert json.loads(seen[0]) == {"input_ids": [1, 2], "sampling_params": {"temperature": 1.0}, "return_logprob": True}


async def test_5xx_is_retried_then_succeeds(serve):
    fake, port = await serve([("status", 503), ("status", 502), ("ok", [5])])
    client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=5, max_retries=2, backoff_s=0.01)
    result = await client.generate([1], [], {})
    await client.close()
    assert result.token_ids == [5] and len(fake.requests) == 3


async def test_4xx_is_never_retried(serve):
    fake, port = await serve([("status", 400), ("ok", [5])])
    client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=5, max_retries=5, backoff_s=0.01)
    with pytest.raises(EngineError) as info:
        await client.generate([1], [], {})
    await client.close()
    assert info.value.status == 400 and not info.value.retriable
    assert "HTTP 400" in str(info.value) and "nope" in str(info.value)
    assert len(fake.requests) == 1


async def test_timeout_is_bounded(serve):
    fake, port = await serve([("sleep", 5), ("sleep", 5)])
    client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=0.3, max_retries=1, backoff_s=0.01)
    # Each attempt gives up at the client's timeout (the server would answer after 5 s, and then
    # the call would succeed): the message says so, and there were exactly 1 + max_retries attempts.
    with pytest.raises(EngineError, match="no answer .* within 0.3 s"):
        await client.generate([1], [], {})
    await client.close()
    assert len(fake.requests) == 2


async def test_connection_refused_gives_up_after_bounded_retries():
    client = SGLangClient(f"http://127.0.0.1:{free_port()}", timeout_s=1, max_retries=2, backoff_s=0.01)
    with pytest.raises(EngineError, match="gave up after 3 attempts: ClientConnectorError"):
        await client.generate([1], [], {})
    await client.close()


async def test_malformed_json_is_final(serve):
    fake, port = await serve([("garbage",)])
    client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=5, max_retries=3, backoff_s=0.01)
    with pytest.raises(EngineError, match="invalid JSON"):
        await client.generate([1], [], {})
    await client.close()
    assert len(fake.requests) == 1


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ([("status", 500)] * 2, "HTTP 500"),
        ([("status", 422)], "HTTP 422"),
        ([("garbage",)], "invalid JSON"),
    ],
)
async def test_server_faults_fail_the_sample_not_the_model(serve, qwen25_processing, script, reason, tmp_path):
    fake, port = await serve(script)
    tok = qwen25_processing.tokenizer
    config = tmp_path / "plugin.yaml"
    config.write_text(
        json.dumps({"max_turns": 3, "request_timeout_s": 2.0, "request_max_retries": 1, "request_retry_backoff_s": 0.01})
    )
    args = make_args(None, custom_config_path=str(config), sglang_router_ip="127.0.0.1", sglang_router_port=port)
    out = await rollout.generate(args, make_sample(tok), {"temperature": 1.0})
    assert out.status == Status.FAILED and out.remove_sample and out.reward == 0.0
    assert reason in out.metadata["status_reason"]
    assert out.response_length == 0 and out.loss_mask == [] and out.rollout_log_probs == []


async def test_full_episode_over_http_sends_each_image_encoded_once(serve, qwen25_processing, tmp_path, monkeypatch):
    tok = qwen25_processing.tokenizer
    ids4 = tok.encode(call("4"), add_special_tokens=False)
    ids5 = tok.encode(call("5"), add_special_tokens=False)
    pads = qwen25_processing.image_pad_id
    fake, port = await serve(
        [("ok", ids4, call("4")), ("ok", ids5, call("5"))],
        image_pads=lambda image: predicted_pad_count(qwen25_processing, image), pad_id=pads,
    )
    import rollout.engines.sglang_client as client_module

    encoded = []
    real = client_module._data_uri
    monkeypatch.setattr(client_module, "_data_uri", lambda image: encoded.append(image.size) or real(image))
    args = make_args(None, sglang_router_ip="127.0.0.1", sglang_router_port=port)
    out = await rollout.generate(args, make_sample(tok), {"temperature": 1.0})
    assert out.status == Status.COMPLETED and out.metadata["outcome"]["score"] == 1.0
    assert encoded == [(112, 112)]  # encoded once for two requests
    assert fake.requests[0]["image_data"] == fake.requests[1]["image_data"]
    # One pad per image in every request; the engine's expansion agreed with ours at both turns.
    assert fake.requests[1]["input_ids"].count(pads) == 1


def _http_threads() -> list:
    import threading

    return [t for t in threading.enumerate() if t.name == "sglang-http" and t.is_alive()]


async def test_requests_run_on_the_clients_own_thread_and_close_stops_it(serve):
    fake, port = await serve([("ok", [5]), ("ok", [6])])
    before = len(_http_threads())
    client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=5, max_retries=0)
    assert (await client.generate([1], [], {})).token_ids == [5]
    assert len(_http_threads()) == before + 1
    await client.close()
    assert len(_http_threads()) == before
    # A client used again after close starts over.
    assert (await client.generate([1], [], {})).token_ids == [6]
    await client.close()
    assert len(_http_threads()) == before


async def test_cancelling_the_caller_cancels_the_request(serve):
    """slime cancels generate tasks when it has enough samples: the request must not live on."""
    fake, port = await serve([("sleep", 3)])  # the server is not told; its handler finishes later
    client = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=60, max_retries=0)
    task = asyncio.ensure_future(client.generate([1], [], {}))
    while not fake.requests:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    loop = client._http.loop()
    for _ in range(100):  # the cancellation crosses to the client's loop asynchronously
        pending = asyncio.run_coroutine_threadsafe(_other_tasks(), loop).result(5)
        if not pending:
            break
        await asyncio.sleep(0.01)
    assert pending == []
    await client.close()


async def _other_tasks() -> list:
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current]


async def test_closing_the_client_fails_requests_in_flight(serve, monkeypatch):
    """Neither a request on the wire nor one waiting to be retried outlives close(), or hangs."""
    real_sleep, backing_off = asyncio.sleep, threading.Event()

    async def observed_sleep(delay, *args, **kwargs):
        if delay >= 60:  # the retrying client's backoff, on the client's HTTP thread
            backing_off.set()
        return await real_sleep(delay, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", observed_sleep)
    fake, port = await serve([("sleep", 3), ("status", 500)])
    on_the_wire = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=60, max_retries=0)
    retrying = SGLangClient(f"http://127.0.0.1:{port}", timeout_s=60, max_retries=1, backoff_s=60)
    first = asyncio.ensure_future(on_the_wire.generate([1], [], {}))
    while len(fake.requests) < 1:
        await asyncio.sleep(0.01)
    second = asyncio.ensure_future(retrying.generate([2], [], {}))
    while len(fake.requests) < 2:
        await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while not backing_off.is_set() and loop.time() < deadline:  # the 500 arrived; the retry waits 60 s
        await asyncio.sleep(0.01)
    assert backing_off.is_set()
    await on_the_wire.close()
    await retrying.close()
    with pytest.raises(EngineError, match="Server disconnected"):
        await asyncio.wait_for(first, 5)
    with pytest.raises(EngineError, match="the SGLang client was closed during the request"):
        await asyncio.wait_for(second, 5)


def _engine_image_pads(family: str, **size):
    """An engine-side image processor (SGLang resizes with its own): the pad count it gives an image."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from models.processors import IMAGE_PROCESSOR_SETTINGS

    processor = Qwen2VLImageProcessorPil(**{**IMAGE_PROCESSOR_SETTINGS[family], "size": size})
    return lambda image: processor.get_number_of_image_patches(image.height, image.width, {}) // 4


async def test_an_engine_that_resizes_images_differently_fails_the_sample(serve, qwen25_processing, http_args):
    """docs/pitfalls.md#the-engine-resizes-images-its-own-way: the engine's processor caps images at 56x56 pixels (4 pads for a 112x112 image,
    where the trainer's gives 16). The model then saw other image tokens than the trainer will
    feed it: the sample is FAILED at the first turn, the reason naming both counts and the fix."""
    tok = qwen25_processing.tokenizer
    ids = tok.encode(call("5"), add_special_tokens=False)
    pads = _engine_image_pads("qwen2.5-vl", shortest_edge=56 * 56, longest_edge=56 * 56)
    fake, port = await serve([("ok", ids, call("5"))], image_pads=pads, pad_id=qwen25_processing.image_pad_id)
    out = await rollout.generate(http_args(port), make_sample(tok, size=112), {"temperature": 1.0})
    assert out.status == Status.FAILED and out.remove_sample and out.reward == 0.0
    request = fake.requests[0]["input_ids"]
    ours, theirs = len(request) - 1 + 16, len(request) - 1 + 4
    reason = out.metadata["status_reason"]
    assert f"expanded the request to {theirs} prompt tokens but the training sequence holds {ours}" in reason
    assert "min_pixels / max_pixels" in reason
    assert out.response_length == 0  # nothing generated from the engine's other view is trained on


async def test_an_observation_image_resized_differently_fails_at_its_turn(serve, qwen25_processing, http_args):
    """The prompt's 112x112 image fits both processors; the env's 56x84 observation image is
    resized differently by an engine with a larger minimum: turn 1 passes, turn 2 fails."""
    tok = qwen25_processing.tokenizer
    engine_pads = _engine_image_pads("qwen2.5-vl", shortest_edge=112 * 112, longest_edge=12_845_056)
    assert engine_pads(diagram(112)) == 16 and engine_pads(Image.new("RGB", (56, 84))) != 6
    ids = tok.encode("first look", add_special_tokens=False)
    fake, port = await serve(
        [("ok", ids, "first look"), ("ok", ids, "first look")], image_pads=engine_pads, pad_id=qwen25_processing.image_pad_id
    )
    args = http_args(port, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "image"})
    out = await rollout.generate(args, make_sample(tok, size=112), {"temperature": 1.0})
    assert out.status == Status.FAILED and out.remove_sample
    assert out.metadata["status_reason"].startswith("turn 2: the engine expanded the request to")
    assert len(fake.requests) == 2


async def test_an_engine_that_does_not_report_prompt_tokens_is_not_checked(serve, qwen25_processing, http_args):
    tok = qwen25_processing.tokenizer
    ids = tok.encode(call("5"), add_special_tokens=False)
    fake, port = await serve([("ok", ids, call("5"))])  # no image_pads: prompt_tokens left out
    out = await rollout.generate(http_args(port), make_sample(tok, size=112), {"temperature": 1.0})
    assert out.status == Status.COMPLETED, out.metadata["status_reason"]


# --- routing replay (slime's --use-rollout-routing-replay, docs/pitfalls.md#routing-replay-across-turns) -----------------------------

LAYERS, TOPK = 3, 2


class RoutingSGLang(FakeSGLang):
    """Also answers ``return_routed_experts`` like SGLang 0.5.23 with --enable-return-routed-experts:
    ``meta_info.routed_experts`` is base64 of int32 ids, one row (layers x top-k) per position of
    prompt + output but the last, from the request's ``routed_experts_start_len`` (default 0) on.
    Position p's ids are all p, so a test can tell which rows reached the Sample."""

    async def handle(self, request):
        response = await super().handle(request)
        body = self.requests[-1]
        if not body.get("return_routed_experts") or response.status != 200:
            return response
        data = json.loads(response.body)
        total = data["meta_info"]["prompt_tokens"] + len(data["output_ids"])
        start = body.get("routed_experts_start_len", 0)
        rows = np.repeat(np.arange(start, total - 1, dtype=np.int32), LAYERS * TOPK)
        data["meta_info"]["routed_experts"] = base64.b64encode(rows.tobytes()).decode()
        return web.json_response(data)


async def test_routing_replay_over_a_multi_turn_episode(serve, qwen25_processing, http_args):
    """Every request asks for routed experts; the Sample gets one row per position of the whole
    multi-turn sequence but the last (prompt, both turns and the observation between them), shaped
    (len(tokens) - 1, num_layers, moe_router_topk) as slime's trainer reads it."""
    tok = qwen25_processing.tokenizer
    ids4 = tok.encode(call("4"), add_special_tokens=False)
    ids5 = tok.encode(call("5"), add_special_tokens=False)
    fake, port = await serve(
        [("ok", ids4, call("4")), ("ok", ids5, call("5"))], fake_class=RoutingSGLang,
        image_pads=lambda image: predicted_pad_count(qwen25_processing, image), pad_id=qwen25_processing.image_pad_id,
    )  # fmt: skip
    args = http_args(port, use_rollout_routing_replay=True, num_layers=LAYERS, moe_router_topk=TOPK)
    out = await rollout.generate(args, make_sample(tok), {"temperature": 1.0})
    assert out.status == Status.COMPLETED, out.metadata["status_reason"]
    assert [r.get("return_routed_experts") for r in fake.requests] == [True, True]
    experts = out.rollout_routed_experts
    assert tuple(experts.shape) == (len(out.tokens) - 1, LAYERS, TOPK)
    assert experts[:, 0, 0].tolist() == list(range(len(out.tokens) - 1))
    assert out.metadata["turns"][1]["model_tokens"] == len(ids5)  # the second turn's rows are in


async def test_routing_replay_without_experts_from_the_engine_fails_the_sample(serve, qwen25_processing, http_args):
    """An SGLang started without --enable-return-routed-experts answers without them: training
    would replay no routing (or the wrong one), so the sample is FAILED and says why."""
    tok = qwen25_processing.tokenizer
    ids = tok.encode(call("5"), add_special_tokens=False)
    fake, port = await serve([("ok", ids, call("5"))])
    out = await rollout.generate(http_args(port, use_rollout_routing_replay=True), make_sample(tok), {})
    assert fake.requests[0]["return_routed_experts"] is True
    assert out.status == Status.FAILED and out.remove_sample
    assert "--enable-return-routed-experts" in out.metadata["status_reason"]


async def test_without_routing_replay_no_experts_are_requested(serve, qwen25_processing, http_args):
    tok = qwen25_processing.tokenizer
    ids = tok.encode(call("5"), add_special_tokens=False)
    fake, port = await serve([("ok", ids, call("5"))])
    out = await rollout.generate(http_args(port), make_sample(tok), {})
    assert out.status == Status.COMPLETED
    assert "return_routed_experts" not in fake.requests[0] and out.rollout_routed_experts is None


def test_routed_experts_start_len_keeps_the_earlier_rows():
    """slime's Sample rule, restated for ours: rows before routed_experts_start_len are kept."""
    sample = Sample(tokens=[1, 2, 3])
    args = argparse.Namespace(num_layers=1, moe_router_topk=2)
    first = np.array([[0, 0], [1, 1], [2, 2], [3, 3]], dtype=np.int32)  # 3 prompt + 2 generated - 1
    sample.append_response_tokens(args, tokens=[7, 8], log_probs=[-1.0, -1.0], meta_info={"routed_experts": base64.b64encode(first.tobytes()).decode()})
    later = np.array([[9, 9], [10, 10]], dtype=np.int32)
    meta = {"routed_experts": base64.b64encode(later.tobytes()).decode(), "routed_experts_start_len": 4}
    sample.append_response_tokens(args, tokens=[5, 6], trainable=False, meta_info=meta)
    assert sample.rollout_routed_experts[:, 0, 0].tolist() == [0, 1, 2, 3, 9, 10]
    with pytest.raises(ValueError, match="routed_experts has 4 ids, expected 7 rows of 2"):
        sample.append_response_tokens(args, tokens=[4], log_probs=[-1.0], meta_info={"routed_experts": [1, 2, 3, 4]})


_EXIT_SCRIPT = """
import asyncio, atexit, sys
from aiohttp import web
import rollout.engines.sglang_client as client_module

async def handle(request):
    await request.read()
    meta = {"finish_reason": {"type": "stop"}, "output_token_logprobs": [[-0.5, 5, None]], "prompt_tokens": 1}
    return web.json_response({"text": "t", "output_ids": [5], "meta_info": meta})

async def main():
    app = web.Application()
    app.router.add_post("/generate", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client = client_module.SGLangClient(f"http://127.0.0.1:{port}", timeout_s=10, max_retries=0)
    assert (await client.generate([1], [], {})).token_ids == [5]
    await runner.cleanup()
    return client  # never closed, as slime never closes its generate function's resources

if sys.argv[1] == "no-hook":
    atexit.unregister(client_module._close_open_clients)
client = asyncio.run(main())
print("generated", flush=True)
"""


@pytest.mark.parametrize("hook", ["hook", "no-hook"])
def test_a_client_left_open_is_closed_at_exit_without_a_warning(hook):
    """slime never closes the client; at interpreter exit its pool is closed by the module's atexit
    hook. Without the hook (the control case) aiohttp's "Unclosed client session" shows up, which
    proves the check can fail."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", _EXIT_SCRIPT, hook], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "generated" in done.stdout, done.stderr
    if hook == "hook":
        assert "Unclosed" not in done.stderr, done.stderr
    else:
        assert "Unclosed client session" in done.stderr
