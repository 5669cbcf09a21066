"""An Engine over SGLang's native ``POST /generate`` (the endpoint slime's router exposes).

Unlike slime's own HTTP helper (no timeout, every error retried 60 times at 1 s, 4xx included),
each request here has a timeout, and only transient failures (connection errors, timeouts, 5xx) are
retried, a bounded number of times with exponential backoff. A 4xx or an unreadable response is
final. Either way the caller gets an EngineError and records the episode as FAILED rather than
turning a server fault into a training signal.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import orjson
from PIL import Image

from envs.images import to_data_uri
from rollout.engines.base import FINISH_ABORT, EngineError, GenerateResult, ImageInput


def _data_uri(image: Image.Image) -> str:
    return to_data_uri(image)


_JSON_HEADERS = {"Content-Type": "application/json"}


def _dumps(payload: dict[str, Any]) -> bytes:
    # orjson: a request carries thousands of ids and a data URI, and every one is serialized on the
    # event loop (about 15x faster than json here).
    try:
        return orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError:  # a type only the standard encoder's rules accept (or reject with its message)
        return json.dumps(payload).encode()


def _loads(data: bytes) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        # The standard parser also accepts NaN / Infinity, which some servers emit for log-probs.
        return json.loads(data)


class SGLangClient:
    """One client per server URL; sessions (connection pools) are kept per event loop."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_connections: int = 0,
    ) -> None:
        self.url = base_url.rstrip("/") + "/generate"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_connections = max_connections
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    @classmethod
    def from_args(cls, args: Any, config) -> SGLangClient:
        host, port = getattr(args, "sglang_router_ip", None), getattr(args, "sglang_router_port", None)
        if not host or not port:
            raise EngineError(
                "no engine: args has neither `rollout_engine` nor `sglang_router_ip`/`sglang_router_port`",
                retriable=False,
            )
        return cls(
            f"http://{host}:{port}",
            timeout_s=config.request_timeout_s,
            max_retries=config.request_max_retries,
            backoff_s=config.request_retry_backoff_s,
        )

    def prepare_image(self, image: ImageInput) -> str:
        """Encode an image for requests; the episode calls this once per image, not once per turn."""
        return image if isinstance(image, str) else _data_uri(image)

    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._sessions.get(id(loop))
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            session = aiohttp.ClientSession(connector=connector)
            self._sessions[id(loop)] = session
        return session

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            if not session.closed:
                await session.close()

    async def generate(
        self, input_ids: list[int], images: list[ImageInput], sampling_params: dict[str, Any]
    ) -> GenerateResult:
        payload: dict[str, Any] = {
            "input_ids": input_ids,
            "sampling_params": sampling_params,
            "return_logprob": True,
        }
        if images:
            payload["image_data"] = [self.prepare_image(image) for image in images]
        body = await self._post_with_retries(payload)
        return parse_generate_response(body)

    async def _post_with_retries(self, payload: dict[str, Any]) -> Any:
        body = _dumps(payload)
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                timeout = aiohttp.ClientTimeout(total=self.timeout_s)
                async with self._session().post(self.url, data=body, headers=_JSON_HEADERS, timeout=timeout) as response:
                    data = await response.read()
                    text = data.decode("utf-8", errors="replace") if response.status >= 400 else ""
                    if response.status >= 500:
                        last_error = f"HTTP {response.status} from {self.url}: {text[:300]}"
                        continue
                    if response.status >= 400:
                        raise EngineError(
                            f"HTTP {response.status} from {self.url} (not retried): {text[:500]}",
                            retriable=False,
                            status=response.status,
                        )
                    try:
                        return _loads(data)
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        raise EngineError(
                            f"{self.url} answered with invalid JSON ({exc}): {data[:200]!r}", retriable=False
                        ) from None
            except asyncio.TimeoutError:
                last_error = f"no answer from {self.url} within {self.timeout_s} s"
            except aiohttp.ClientError as exc:
                last_error = f"{type(exc).__name__} talking to {self.url}: {exc}"
        raise EngineError(
            f"gave up after {self.max_retries + 1} attempts: {last_error}", retriable=True, status=None
        )


def parse_generate_response(body: Any) -> GenerateResult:
    """SGLang's response JSON -> GenerateResult; a body that breaks the contract is an EngineError."""
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise EngineError(f"response has no meta_info object: {str(body)[:200]}", retriable=False)
    # Kept for slime's append_response_tokens (finish reason, weight version, cache and routing
    # data), without the per-token list: tokens and log-probs are taken out of it below, and its
    # hundreds of small lists per turn would otherwise live as long as the episode, each one walked
    # by every full garbage collection.
    meta = {key: value for key, value in body["meta_info"].items() if key != "output_token_logprobs"}
    finish = meta.get("finish_reason") or {}
    if isinstance(finish, str):
        finish = {"type": finish}
    reason = finish.get("type")
    if reason not in ("stop", "length", "abort"):
        raise EngineError(f"unknown finish_reason {finish!r}", retriable=False)
    entries = body["meta_info"].get("output_token_logprobs")
    if entries is None:
        if reason != FINISH_ABORT:
            raise EngineError("response has no output_token_logprobs (was return_logprob sent?)", retriable=False)
        entries = []  # an early abort may carry no tokens at all
    try:
        log_probs = [float(entry[0]) for entry in entries]
        token_ids = [int(entry[1]) for entry in entries]
    except (TypeError, ValueError, IndexError) as exc:
        raise EngineError(f"malformed output_token_logprobs: {exc}", retriable=False) from None
    return GenerateResult(
        token_ids=token_ids,
        log_probs=log_probs,
        text=str(body.get("text", "")),
        finish_reason=reason,
        matched_stop=finish.get("matched"),
        meta_info=meta,
    )
