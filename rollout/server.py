"""An SGLang-compatible HTTP server over the local engine: ``python -m rollout.server --model DIR``.

It speaks the subset of SGLang's native API that slime and this project's SGLang client use, so
the same rollout code can talk to a real SGLang deployment or to this process:

- ``POST /generate``: ``input_ids`` (or ``text``), ``image_data`` (a list of data URIs / file paths, or
  one string), ``sampling_params``, ``return_logprob``. The response carries ``text``,
  ``output_ids`` and ``meta_info`` (``finish_reason``, ``prompt_tokens``, ``completion_tokens``,
  ``cached_tokens``, ``weight_version`` and, with ``return_logprob``, ``output_token_logprobs`` as
  ``[logprob, token_id, null]`` triples);
- ``GET /health`` (and ``/health_generate``), ``GET /get_model_info``, ``POST /abort_request``,
  ``POST /flush_cache`` (a no-op: there is no prefix cache), ``GET /v1/loads`` (slime's ``abort()``
  polls it after every rollout until no request is left).

Field formats follow SGLang 0.5.23: ``meta_info.id`` is the request's ``rid`` or a generated hex
string, ``weight_version`` a string (``"default"`` until the trainer first updates the weights),
``prompt_tokens`` the prompt's length after each image's pad was expanded, and ``top_k`` must be -1
or >= 1 (0 is a 400, as SGLang's ``SamplingParams.verify`` says).

Bad requests get a 4xx with ``{"error": {"message": ..., "code": ...}}`` naming what was wrong and
the server keeps serving; a 5xx means the server itself failed. ``make_app`` and ``start_server``
let tests run the server in-process on a free port.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from difflib import get_close_matches
from typing import Any

from aiohttp import web

from rollout.engines.base import EngineError
from rollout.engines.local import LocalEngine

logger = logging.getLogger(__name__)

_ENGINE_KEY = web.AppKey("engine", LocalEngine)
_IN_FLIGHT_KEY = web.AppKey("in_flight", list)
_MODEL_PATH_KEY = web.AppKey("model_path", str)
# Bodies carry images as data URIs; aiohttp's default limit (1 MiB) is smaller than one large PNG.
MAX_BODY_BYTES = 256 * 1024 * 1024

# SGLang request fields this server understands; the ones in _ONLY_DEFAULT are accepted only with
# their default value (the feature is not implemented here).
_REQUEST_KEYS = (
    "input_ids",
    "text",
    "image_data",
    "sampling_params",
    "return_logprob",
    "return_text_in_logprobs",
    "logprob_start_len",
    "top_logprobs_num",
    "rid",
    "stream",
    "return_routed_experts",
)
_ONLY_DEFAULT = {"stream": (False,), "top_logprobs_num": (0, None), "return_routed_experts": (False,)}


class BadRequest(ValueError):
    pass


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


@dataclass
class GenerateRequest:
    input_ids: list[int] | None
    text: str | None
    images: list[str]
    sampling_params: dict[str, Any]
    return_logprob: bool
    return_text_in_logprobs: bool
    rid: str | None


def parse_generate_request(body: Any) -> GenerateRequest:
    """Check the shape of a /generate body (values of token ids and sampling params are checked
    by the engine). Raises BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    for key in body:
        if key not in _REQUEST_KEYS:
            hint = get_close_matches(key, _REQUEST_KEYS, n=1)
            suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
            raise BadRequest(
                f"unknown request field {key!r}.{suggestion} Supported: {', '.join(_REQUEST_KEYS)}"
            )
    for key, allowed in _ONLY_DEFAULT.items():
        if key in body and body[key] not in allowed:
            raise BadRequest(f"{key}={body[key]!r} is not supported by this server; leave it out")
    input_ids, text = body.get("input_ids"), body.get("text")
    if (input_ids is None) == (text is None):
        raise BadRequest("send exactly one of 'input_ids' (a list of token ids) and 'text'")
    if input_ids is not None:
        if not isinstance(input_ids, list) or not input_ids:
            raise BadRequest("input_ids must be a non-empty list of token ids")
        if isinstance(input_ids[0], list):
            raise BadRequest(
                "batched input_ids (a list of lists) are not supported; send one request per sequence"
            )
    if text is not None and (not isinstance(text, str) or not text):
        raise BadRequest("text must be a non-empty string (batched text lists are not supported)")
    image_data = body.get("image_data")
    if image_data is None:
        images: list[str] = []
    elif isinstance(image_data, str):
        images = [image_data]
    elif isinstance(image_data, list) and all(isinstance(item, str) for item in image_data):
        images = list(image_data)
    else:
        raise BadRequest("image_data must be a string or a list of strings (data URIs or file paths)")
    sampling_params = body.get("sampling_params")
    if sampling_params is None:
        sampling_params = {}
    if not isinstance(sampling_params, dict):
        raise BadRequest(f"sampling_params must be an object, got {type(sampling_params).__name__}")
    top_k, temperature = sampling_params.get("top_k"), sampling_params.get("temperature")
    greedy = isinstance(temperature, (int, float)) and 0 <= temperature < 1e-6  # SGLang sets top_k=1 then
    if isinstance(top_k, int) and not isinstance(top_k, bool) and not greedy and (top_k < 1 and top_k != -1):
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    flags = {}
    for key in ("return_logprob", "return_text_in_logprobs"):
        value = body.get(key, False)
        if not isinstance(value, bool):
            raise BadRequest(f"{key} must be true or false, got {value!r}")
        flags[key] = value
    rid = body.get("rid")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest(f"rid must be a string, got {rid!r}")
    return GenerateRequest(input_ids, text, images, sampling_params, rid=rid, **flags)


async def _generate(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return _error(400, f"the request body is not valid JSON: {exc}")
    try:
        parsed = parse_generate_request(body)
    except BadRequest as exc:
        return _error(400, str(exc))
    input_ids = parsed.input_ids
    if input_ids is None:
        input_ids = engine.tokenizer.encode(parsed.text)
    # SGLang gives every request an id (a uuid4 hex) when the client sends none; /abort_request
    # can then stop it by the id its response reports.
    rid = parsed.rid if parsed.rid is not None else uuid.uuid4().hex
    in_flight = request.app[_IN_FLIGHT_KEY]
    in_flight[0] += 1
    try:
        result = await engine.generate(input_ids, parsed.images, parsed.sampling_params, rid=rid)
    except EngineError as exc:
        status = exc.status or (503 if exc.retriable else 400)
        return _error(status, str(exc))
    except Exception as exc:
        logger.exception("/generate failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        in_flight[0] -= 1
    meta_info = dict(result.meta_info)
    meta_info["id"] = rid
    meta_info["weight_version"] = weight_version_string(engine.weight_version)
    if parsed.return_logprob:
        meta_info["output_token_logprobs"] = [
            [log_prob, token, engine.tokenizer.decode([token]) if parsed.return_text_in_logprobs else None]
            for log_prob, token in zip(result.log_probs, result.token_ids, strict=True)
        ]
    return web.json_response({"text": result.text, "output_ids": result.token_ids, "meta_info": meta_info})


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def _model_info(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    return web.json_response(
        {
            "model_path": request.app[_MODEL_PATH_KEY],
            "tokenizer_path": request.app[_MODEL_PATH_KEY],
            "is_generation": True,
            "weight_version": weight_version_string(engine.weight_version),
            "max_batch_size": engine.max_batch_size,
            "vocab_size": engine.vocab_size,
            "max_context_length": engine.max_context,
        }
    )


async def _abort(request: web.Request) -> web.Response:
    engine = request.app[_ENGINE_KEY]
    try:
        body = await request.json() if request.can_read_body else {}
    except json.JSONDecodeError as exc:
        return _error(400, f"the request body is not valid JSON: {exc}")
    if not isinstance(body, dict):
        return _error(400, 'the request body must be a JSON object like {"rid": ...} or {"abort_all": true}')
    rid = body.get("rid")
    if not body.get("abort_all") and not isinstance(rid, str):
        return _error(400, 'send {"rid": "<request id>"} or {"abort_all": true}')
    aborted = engine.abort(None if body.get("abort_all") else rid)
    return web.json_response({"aborted": aborted})


async def _flush_cache(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def weight_version_string(version: Any) -> str:
    """SGLang's ``weight_version`` is a string, "default" until an update names one; the local
    trainer counts updates from 0 (the initial weights)."""
    return "default" if version is None or version == 0 else str(version)


# SGLang's /v1/loads sections (``include=``); this server has only the core scalars.
_LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})


async def _loads(request: web.Request) -> web.Response:
    """SGLang's ``GET /v1/loads``: one load entry per data-parallel rank (here one). slime's
    ``abort()`` reads ``num_running_reqs`` + ``num_waiting_reqs`` from it after each rollout."""
    include = request.query.get("include")
    sections = {part.strip() for part in include.split(",")} if include else set()
    if not sections <= _LOAD_SECTIONS:
        return _error(
            400,
            f"Invalid include sections: {sections - _LOAD_SECTIONS}. Valid options: {sorted(_LOAD_SECTIONS)}",
        )
    if request.query.get("format") == "prometheus":
        return _error(400, "format=prometheus is not supported by this server; leave it out for JSON")
    engine = request.app[_ENGINE_KEY]
    in_flight = request.app[_IN_FLIGHT_KEY][0]
    waiting = min(in_flight, len(getattr(engine, "_waiting", ())))
    load = {
        "timestamp": time.time(),
        "dp_rank": 0,
        "num_running_reqs": in_flight - waiting,
        "num_waiting_reqs": waiting,
        "max_running_requests": engine.max_batch_size,
    }
    if "dp_rank" in request.query and request.query["dp_rank"] != "0":
        return _error(400, f"dp_rank {request.query['dp_rank']} does not exist (this server has dp_rank 0 only)")
    return web.json_response(
        {
            "timestamp": datetime.now(timezone.utc).isoformat(),
            "version": "vlm-multiturn-local",
            "accelerator": None,
            "num_accelerators": 1,
            "loads": [load],
        }
    )


def make_app(engine: LocalEngine, model_path: str) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[_ENGINE_KEY] = engine
    app[_MODEL_PATH_KEY] = str(model_path)
    app[_IN_FLIGHT_KEY] = [0]  # /generate requests being served (one list: handlers update it in place)
    app.router.add_post("/generate", _generate)
    app.router.add_get("/health", _health)
    app.router.add_get("/health_generate", _health)
    app.router.add_get("/get_model_info", _model_info)
    app.router.add_post("/abort_request", _abort)
    app.router.add_route("*", "/flush_cache", _flush_cache)
    app.router.add_get("/v1/loads", _loads)
    return app


@dataclass
class RunningServer:
    """A started server; ``close()`` stops HTTP serving (the engine stays open: it is the caller's)."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def close(self) -> None:
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_server(
    engine: LocalEngine, host: str = "127.0.0.1", port: int = 0, *, model_path: str | None = None
) -> RunningServer:
    """Serve ``engine`` on ``host:port`` (port 0: a free port, see ``.port``) from the running loop."""
    app = make_app(engine, model_path if model_path is not None else str(engine.policy.path))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    return RunningServer(runner=runner, host=host, port=bound_port)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], prog="python -m rollout.server")
    parser.add_argument(
        "--model", required=True, help="a checkpoint directory or a preset name (tiny-qwen2.5-vl, ...)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000, help="0 picks a free port (printed at start)")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--default-max-new-tokens", type=int, default=128)
    parser.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "eager", "static"],
        help="static: KV cache slots, CUDA graphs, continuous batching; auto: static on CUDA where supported",
    )
    parser.add_argument(
        "--max-seq-len", type=int, default=None, help="static decoding: tokens one request may hold (8192)"
    )
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    import torch

    from models import load_policy

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    policy = await asyncio.to_thread(load_policy, args.model, device=args.device, dtype=dtype)
    engine = LocalEngine(
        policy,
        max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms,
        seed=args.seed,
        default_max_new_tokens=args.default_max_new_tokens,
        decode=args.decode,
        max_seq_len=args.max_seq_len,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = await start_server(engine, args.host, args.port, model_path=args.model)
    print(f"engine: {engine.decode} decoding, batches of up to {engine.max_batch_size}", flush=True)
    print(f"serving {args.model} on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        print("shutting down", flush=True)
        await server.close()
        await engine.aclose()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(_serve(_parse_args(argv)))


if __name__ == "__main__":
    main()
