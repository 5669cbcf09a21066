"""An Engine over SGLang's native ``POST /generate`` (the endpoint slime's router exposes).

Unlike slime's own HTTP helper (no timeout, every error retried 60 times at 1 s, 4xx included),
each request here has a timeout, and only transient failures (connection errors, timeouts, 5xx) are
retried, a bounded number of times with exponential backoff. A 4xx or an unreadable response is
final. Either way the caller gets an EngineError and records the episode as FAILED rather than
turning a server fault into a training signal.

The HTTP work runs on an event loop of the client's own, in a thread (``sglang-http``): a request
costs the loop that sends it about 0.4 ms (aiohttp's bookkeeping, a body of tens of kilobytes
written to the socket, the reply parsed), and when dozens of episodes move on at once, the rollout's
event loop would otherwise spend tens of milliseconds in one iteration sending them, with every
other episode waiting. The caller's loop only hands the request over and is woken with the result.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

import aiohttp
import orjson
from PIL import Image

from envs.images import engine_data_uri
from rollout.engines.base import FINISH_ABORT, EngineError, GenerateResult, ImageInput


def _data_uri(image: Image.Image) -> str:
    """The image's original file when it still holds its pixels, else a fast lossless PNG
    (envs.images.engine_image): SGLang decodes either with PIL to exactly these pixels."""
    return engine_data_uri(image)


_JSON_HEADERS = {"Content-Type": "application/json"}
_T = TypeVar("_T")


class _LoopThread:
    """An event loop running in a daemon thread, started on first use and stopped by ``stop``.

    Work handed over in one iteration of the caller's loop wakes this loop once: every wake-up is
    a write to its self-pipe, a system call during which the caller's thread lets go of the GIL,
    and a busy thread here would then keep the caller waiting for it, once per request.

    A hand-over is one :class:`_HandOver` and one future on the caller's loop, not a
    ``concurrent.futures.Future`` wrapped into an asyncio one: that pair costs about twenty objects
    (a condition, its lock and bound methods, chaining closures) for every request in flight, all
    walked by each garbage collection meanwhile, whose pauses stall every thread of the process.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._inbox: list[_HandOver] = []
        self._wake_pending = False

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name=self.name, daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    async def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coro`` on the thread's loop and await its result from the calling loop. Cancelling
        the caller cancels the coroutine over there too."""
        caller = asyncio.get_running_loop()
        handover = _HandOver(coro, caller.create_future(), caller)
        with self._lock:
            self._inbox.append(handover)
            wake, self._wake_pending = not self._wake_pending, True
        if wake:  # at the end of the caller's iteration, for everything handed over in it
            caller.call_soon(self._wake)
        try:
            return await handover.result
        except asyncio.CancelledError:
            handover.cancelled = True  # one still in the inbox is never started
            loop = self._loop
            if loop is not None:
                with contextlib.suppress(RuntimeError):  # closed meanwhile: nothing runs there
                    loop.call_soon_threadsafe(handover.cancel)
            raise

    def _wake(self) -> None:
        # The loop of now: one stopped since the hand-over is started again, so nothing waits forever.
        self.loop().call_soon_threadsafe(self._start_inbox)

    def _start_inbox(self) -> None:
        """On the thread's loop: start everything handed over since the last wake-up."""
        with self._lock:
            inbox, self._inbox, self._wake_pending = self._inbox, [], False
        for handover in inbox:
            handover.start()

    def stop(self) -> None:
        """Cancel what still runs there (its callers get an EngineError), then stop the thread."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(_cancel_all_and_stop(), loop)
        thread.join(timeout=5)
        if not thread.is_alive():
            loop.close()


class _HandOver:
    """One coroutine handed to the HTTP thread. ``start`` and ``cancel`` run on that thread's loop,
    ``result`` belongs to the caller's loop and is only touched there (through
    ``call_soon_threadsafe``)."""

    __slots__ = ("coro", "result", "caller", "task", "cancelled")

    def __init__(self, coro: Coroutine[Any, Any, Any], result: asyncio.Future, caller: asyncio.AbstractEventLoop):
        self.coro = coro
        self.result = result
        self.caller = caller
        self.task: asyncio.Task | None = None
        self.cancelled = False

    def start(self) -> None:
        if self.cancelled:  # the caller gave up before it started
            self.coro.close()
            return
        self.task = asyncio.get_running_loop().create_task(self.coro)
        self.coro = None
        self.task.add_done_callback(self._finished)

    def cancel(self) -> None:
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()

    def _finished(self, task: asyncio.Task) -> None:
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting
            self.caller.call_soon_threadsafe(self._deliver, task)

    def _deliver(self, task: asyncio.Task) -> None:
        """On the caller's loop. A task cancelled over there without its caller asking was cut
        short by close()."""
        if self.result.done():  # the caller was cancelled meanwhile
            return
        if task.cancelled():
            self.result.set_exception(EngineError("the SGLang client was closed during the request", retriable=False))
        elif task.exception() is not None:
            self.result.set_exception(task.exception())
        else:
            self.result.set_result(task.result())


async def _cancel_all_and_stop() -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    asyncio.get_running_loop().stop()


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
    """One client per server URL, with one connection pool on its HTTP thread's loop."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 1.0,
        max_connections: int = 0,
        return_routed_experts: bool = False,
    ) -> None:
        self.url = base_url.rstrip("/") + "/generate"
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_connections = max_connections
        # slime's --use-rollout-routing-replay (MoE): every request asks for the experts each
        # position was routed to, as slime's own rollout does.
        self.return_routed_experts = return_routed_experts
        self._http = _LoopThread("sglang-http")
        self._session_: aiohttp.ClientSession | None = None
        _OPEN_CLIENTS.add(self)

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
            return_routed_experts=bool(getattr(args, "use_rollout_routing_replay", False)),
        )

    def prepare_image(self, image: ImageInput) -> str:
        """Encode an image for requests; the episode calls this once per image, not once per turn."""
        return image if isinstance(image, str) else _data_uri(image)

    def _session(self) -> aiohttp.ClientSession:
        """The connection pool; used on the HTTP thread's loop only."""
        if self._session_ is None or self._session_.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections)
            self._session_ = aiohttp.ClientSession(connector=connector)
        return self._session_

    async def close(self) -> None:
        """Close the connection pool and stop the HTTP thread (a later request starts them again)."""
        if self._session_ is not None:
            await self._http.run(self._close_session())
        self._http.stop()

    async def _close_session(self) -> None:
        session, self._session_ = self._session_, None
        if session is not None and not session.closed:
            await session.close()

    def close_at_exit(self) -> None:
        """Close the pool from a thread outside any event loop (the interpreter's exit): slime never
        closes its generate function's resources, and a pool left to the garbage collector prints
        "Unclosed client session" at every exit. A daemon thread still runs while atexit hooks do."""
        loop = self._http._loop
        if self._session_ is not None and loop is not None and loop.is_running():
            future = asyncio.run_coroutine_threadsafe(self._close_session(), loop)
            with contextlib.suppress(Exception):  # exiting anyway: a pool that will not close is dropped
                future.result(timeout=5)
        self._http.stop()

    async def generate(
        self, input_ids: list[int], images: list[ImageInput], sampling_params: dict[str, Any]
    ) -> GenerateResult:
        payload: dict[str, Any] = {
            "input_ids": input_ids,
            "sampling_params": sampling_params,
            "return_logprob": True,
        }
        if self.return_routed_experts:
            payload["return_routed_experts"] = True
        if images:
            payload["image_data"] = [self.prepare_image(image) for image in images]
        body = _dumps(payload)
        # Not held for the seconds the request takes: the garbage collector would walk these hundreds
        # of ids in every collection meanwhile (see rollout.trajectory).
        del input_ids, payload
        return await self._http.run(self._request(body))

    async def _request(self, body: bytes) -> GenerateResult:
        return parse_generate_response(await self._post_with_retries(body))

    async def _post_with_retries(self, body: bytes) -> Any:
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
    meta = {key: value for key, value in body["meta_info"].items() if key not in _NOT_KEPT}
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
        token_ids = [entry[1] for entry in entries]
    except (TypeError, ValueError, IndexError, KeyError) as exc:
        raise EngineError(f"malformed output_token_logprobs: {exc}", retriable=False) from None
    if set(map(type, token_ids)) - {int}:
        # int() would turn 3.7 into 3 and "12" into 12: a token id must arrive as an integer.
        token = next(token for token in token_ids if type(token) is not int)
        raise EngineError(f"malformed output_token_logprobs: token id {token!r} is not an integer", retriable=False)
    if body["meta_info"].get("output_token_logprobs") is not None:
        _check_output_counts(body, meta, token_ids)
    info = body["meta_info"]
    prompt_tokens = info.get("prompt_tokens")
    if prompt_tokens is not None and (isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int)):
        raise EngineError(f"meta_info.prompt_tokens must be an integer, got {prompt_tokens!r}", retriable=False)
    start_len = info.get("routed_experts_start_len") or 0
    if isinstance(start_len, bool) or not isinstance(start_len, int) or start_len < 0:
        raise EngineError(f"meta_info.routed_experts_start_len must be an integer >= 0, got {start_len!r}", retriable=False)
    return GenerateResult(
        token_ids=token_ids,
        log_probs=log_probs,
        text=str(body.get("text", "")),
        finish_reason=reason,
        matched_stop=finish.get("matched"),
        meta_info=meta,
        prompt_tokens=prompt_tokens,
        routed_experts=info.get("routed_experts"),
        routed_experts_start_len=start_len,
    )


# Not kept in GenerateResult.meta_info: the per-token list (already in token_ids / log_probs) and
# the routed experts (their own fields; megabytes a turn for a large MoE model).
_NOT_KEPT = frozenset(("output_token_logprobs", "routed_experts", "routed_experts_start_len"))

_OPEN_CLIENTS: weakref.WeakSet[SGLangClient] = weakref.WeakSet()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_OPEN_CLIENTS):
        client.close_at_exit()


def _check_output_counts(body: dict[str, Any], meta: dict[str, Any], token_ids: list[int]) -> None:
    """The per-token list must cover the whole output: ``output_ids`` and
    ``meta_info.completion_tokens`` (each checked when present) must agree with it. Otherwise the
    trajectory would lose the tail that ``text`` still holds, and the env would grade (and reward)
    words whose tokens are not in it."""
    output_ids = body.get("output_ids")
    if output_ids is not None:
        if not isinstance(output_ids, list):
            raise EngineError(f"output_ids is {type(output_ids).__name__}, not a list", retriable=False)
        if output_ids != token_ids:
            if len(output_ids) != len(token_ids):
                detail = f"{len(token_ids)} entries for {len(output_ids)} output_ids"
            else:
                at = next(i for i, (a, b) in enumerate(zip(output_ids, token_ids, strict=True)) if a != b)
                detail = f"token {token_ids[at]!r} at position {at} where output_ids has {output_ids[at]!r}"
            raise EngineError(
                f"output_token_logprobs disagrees with output_ids ({detail}); the response is refused "
                "rather than trained on with tokens that do not match its text",
                retriable=False,
            )
    completion = meta.get("completion_tokens")
    if completion is not None and completion != len(token_ids):
        raise EngineError(
            f"output_token_logprobs has {len(token_ids)} entries but meta_info.completion_tokens is "
            f"{completion!r}; the response is refused rather than trained on with tokens that do not "
            "match its text",
            retriable=False,
        )
