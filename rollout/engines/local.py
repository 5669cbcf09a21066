"""The in-process engine: SGLang's generate semantics over a transformers Qwen-VL model.

``LocalEngine`` serves the Engine protocol for the local backend, for tests and, through
``rollout.server``, as an SGLang-compatible HTTP server. It owns:

- **request preparation**: images (data URIs, paths, PIL) processed by the policy's own processor,
  exactly as the trainer will see them; image pad runs given either as one ``<|image_pad|>`` per
  image or as the processor's expanded run (single pads are expanded before generating);
- **two decode loops** (``decode=``), with the same results:
  - ``"static"`` (``rollout.engines.static_decode``): every request holds a slot of a preallocated
    KV cache (``max_batch_size`` slots of ``max_seq_len`` tokens); one step samples, checks finishes
    and runs the decoder layers for all slots, as a CUDA graph on a GPU; the host syncs every
    ``steps_per_sync`` steps. Batching is continuous: waiting requests are prefilled into free slots
    between steps, and a finished request leaves at once. A request that does not fit a slot runs
    in the eager loop (with a warning);
  - ``"eager"``: requests wait in a queue until ``max_batch_size`` are waiting, or ``batch_wait_ms``
    has passed since the first one and no other request is still having its images processed;
    then they run as one left-padded batch, one ``model(...)`` call per token, to its longest row;
  - ``"auto"`` (default): static on CUDA for softmax-attention models, else eager (Qwen3.5's
    linear-attention layers, and CPUs, where the eager loop is as fast).
  Both run in a worker thread, so the event loop stays free. Every row carries its own sampling
  parameters and its own seed; its n-th draw is a hash of (seed, n) (``rollout.engines.sampling``),
  so one batch mixes temperatures, top-k/top-p, stops and lengths, and a request samples the same
  tokens whether it ran alone or beside 63 others, in either loop. Multimodal RoPE positions are
  computed here (``get_rope_index`` for the prompt, then ``last position + 1`` per step) and passed
  explicitly, so the loops never rely on the ``rope_deltas`` the model caches between calls (a
  trainer's forward pass overwrites them);
- **SGLang's finishing rules**: the length budget is checked first, then stop token ids and EOS
  (unless ``ignore_eos``), then stop strings on the decoded tail; a stop string ends generation at
  the token that completed it; ``no_stop_trim`` only changes the returned text.

The model's ``generation_config`` plays no part in sampling (only its EOS ids are read), so
defaults such as ``top_k=50`` in a config never filter the distribution behind the caller's back.
Returned log-probs are ``log_softmax`` of the processed scores the token was sampled from
(temperature, then top-k, then top-p). With top-k disabled and top-p 1 they are the policy's
log-probs at that temperature, i.e. what a teacher-forced forward pass gives. Greedy decoding
(temperature 0) reports log-probs at temperature 1.

Weights: generation always uses ``policy.model`` as it is at that moment. The single-machine
trainer updates that same module in place between rollouts and then bumps ``engine.weight_version``,
which every response reports in ``meta_info``. Both loops run in eval mode (the previous mode is
restored afterwards) because gradient checkpointing in train mode disables the KV cache. The static
loop's CUDA graphs read the parameters where they were captured: in-place updates keep them valid,
and parameters that moved make it recapture. ``release_memory()`` frees its KV cache between uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from difflib import get_close_matches
from typing import Any

import numpy as np
import torch

from envs.images import ImageLoadError, load_image
from models.logprobs import mm_token_type_ids
from rollout.engines.base import (
    FINISH_ABORT,
    FINISH_LENGTH,
    FINISH_STOP,
    EngineError,
    GenerateResult,
    ImageInput,
)
from rollout.engines.sampling import counter_uniforms, processed_log_probs, sample_tokens
from rollout.engines.static_decode import (
    FINISHED_LENGTH,
    FINISHED_NONFINITE,
    FINISHED_STOP_ID,
    SlotDecoder,
    SlotRequest,
    unsupported_reason,
)
from rollout.seeds import derive_seed

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default when a request gives none
DEFAULT_SLOT_LEN = 8192  # static decoding: tokens (prompt + generated) one request may hold

# Sampling parameters SGLang accepts that this engine implements.
_SUPPORTED_PARAMS = (
    "temperature",
    "top_p",
    "top_k",
    "max_new_tokens",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "skip_special_tokens",
    "no_stop_trim",
    "spaces_between_special_tokens",
    "sampling_seed",
    "custom_params",
)


class SamplingParamsError(ValueError):
    """A sampling parameter has a bad name or value; the message names it and the valid range."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingParams:
    """SGLang's sampling parameters (their names and defaults) that this engine honours.

    ``spaces_between_special_tokens`` is accepted for compatibility and has no effect (fast
    tokenizers ignore it). ``custom_params`` is accepted and ignored: slime sends
    ``{"return_top_p_token_ids": True}`` for its patched SGLang, which this engine does not replay.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # <= 0: no top-k (SGLang uses -1, some clients send 0)
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    spaces_between_special_tokens: bool = True
    sampling_seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | None) -> SamplingParams:
        """Validate a request's ``sampling_params``; raises SamplingParamsError naming the bad key."""
        if params is None:
            return cls()
        if not isinstance(params, Mapping):
            raise SamplingParamsError(f"sampling_params must be an object, got {type(params).__name__}")
        for key in params:
            if key not in _SUPPORTED_PARAMS:
                hint = get_close_matches(str(key), _SUPPORTED_PARAMS, n=1)
                suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
                raise SamplingParamsError(
                    f"unknown sampling param {key!r}.{suggestion} Supported: {', '.join(_SUPPORTED_PARAMS)}"
                )
        values: dict[str, Any] = {}

        def present(key: str) -> bool:
            return params.get(key) is not None

        if present("temperature"):
            temperature = params["temperature"]
            if not _is_number(temperature) or temperature < 0:
                raise SamplingParamsError(
                    f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}"
                )
            values["temperature"] = float(temperature)
        if present("top_p"):
            top_p = params["top_p"]
            if not _is_number(top_p) or not 0 < top_p <= 1:
                raise SamplingParamsError(f"top_p must be a number in (0, 1], got {top_p!r}")
            values["top_p"] = float(top_p)
        if present("top_k"):
            top_k = params["top_k"]
            if not _is_int(top_k):
                raise SamplingParamsError(f"top_k must be an integer (<= 0 disables top-k), got {top_k!r}")
            values["top_k"] = top_k
        if present("max_new_tokens"):
            max_new = params["max_new_tokens"]
            if not _is_int(max_new) or max_new < 0:
                raise SamplingParamsError(f"max_new_tokens must be an integer >= 0 or null, got {max_new!r}")
            values["max_new_tokens"] = max_new
        if present("stop"):
            stop = params["stop"]
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                raise SamplingParamsError(f"stop must be a non-empty string or a list of them, got {stop!r}")
            values["stop"] = tuple(stops)
        if present("stop_token_ids"):
            ids = params["stop_token_ids"]
            if not isinstance(ids, list) or not all(_is_int(i) and i >= 0 for i in ids):
                raise SamplingParamsError(
                    f"stop_token_ids must be a list of token ids (ints >= 0), got {ids!r}"
                )
            values["stop_token_ids"] = tuple(ids)
        for key in ("ignore_eos", "skip_special_tokens", "no_stop_trim", "spaces_between_special_tokens"):
            if present(key):
                if not isinstance(params[key], bool):
                    raise SamplingParamsError(f"{key} must be true or false, got {params[key]!r}")
                values[key] = params[key]
        if present("sampling_seed"):
            seed = params["sampling_seed"]
            if not _is_int(seed):
                raise SamplingParamsError(f"sampling_seed must be an integer, got {seed!r}")
            values["sampling_seed"] = seed
        if present("custom_params") and not isinstance(params["custom_params"], Mapping):
            raise SamplingParamsError(f"custom_params must be an object, got {params['custom_params']!r}")
        return cls(**values)


@dataclass(frozen=True)
class Finish:
    """Why a row stopped; ``to_json`` is SGLang's ``meta_info.finish_reason``."""

    reason: str  # FINISH_STOP | FINISH_LENGTH | FINISH_ABORT
    matched: int | str | None = None
    length: int | None = None
    message: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.reason == FINISH_STOP:
            return {"type": FINISH_STOP, "matched": self.matched}
        if self.reason == FINISH_LENGTH:
            return {"type": FINISH_LENGTH, "length": self.length}
        return {"type": FINISH_ABORT, "message": self.message or "aborted"}


@dataclass(eq=False)  # identity semantics: requests live in a set
class _Request:
    input_ids: list[int]  # image pad runs expanded
    pixel_values: torch.Tensor | None
    image_grid_thw: torch.Tensor | None
    params: SamplingParams
    max_new_tokens: int  # after the default and the context-length cap
    seed: int
    rid: str | None
    submitted: float
    future: asyncio.Future | None = None
    abort_message: str | None = None  # set (from the event loop) to stop this request early


@dataclass
class _Row:
    request: _Request
    tokens: list[int] = field(default_factory=list)
    log_probs: list[float] = field(default_factory=list)
    finish: Finish | None = None
    prompt_len: int = 0  # static decoding: the prompt's tokens in the row's cache slot


def _pad_runs(ids: Sequence[int], pad_id: int) -> list[tuple[int, int]]:
    """(start, length) of every maximal run of ``pad_id``, in order."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, token in enumerate(ids):
        if token == pad_id and start is None:
            start = i
        elif token != pad_id and start is not None:
            runs.append((start, i - start))
            start = None
    if start is not None:
        runs.append((start, len(ids) - start))
    return runs


class LocalEngine:
    """The Engine protocol over ``policy.model`` with SGLang's request semantics (see module doc).

    ``seed`` fixes sampling: request number n (counted in the order ``generate`` is called) samples
    with a generator seeded from (seed, n), or from ``sampling_params["sampling_seed"]`` when the
    caller gives one. Either way the tokens do not depend on which other requests share its batch.
    """

    def __init__(
        self,
        policy,
        *,
        max_batch_size: int = 32,
        batch_wait_ms: float = 5.0,
        seed: int = 0,
        device: str | torch.device | None = None,
        default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        decode: str = "auto",
        max_seq_len: int | None = None,
        cuda_graphs: bool | None = None,
        prefill_tokens: int = 32768,
        steps_per_sync: int = 4,
    ) -> None:
        if policy.model is None:
            raise ValueError("LocalEngine needs a policy with a model; load it with models.load_policy(...)")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        self.policy = policy
        self.model = policy.model
        self.tokenizer = policy.tokenizer
        self.processor = policy.processor
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000.0
        self.seed = seed
        self.default_max_new_tokens = default_max_new_tokens
        self.device = torch.device(device) if device is not None else next(self.model.parameters()).device
        self.weight_version: Any = 0  # the trainer bumps it after every in-place weight update

        config = self.model.config
        text_config = getattr(config, "text_config", config)
        self.vocab_size: int = self.model.get_input_embeddings().num_embeddings
        self.max_context: int = text_config.max_position_embeddings
        self.image_token_id: int = config.image_token_id
        self.video_token_id: int | None = getattr(config, "video_token_id", None)
        self.merge_size: int = self.processor.image_processor.merge_size
        self.pad_token_id: int = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        self.eos_token_ids: frozenset[int] = self._eos_ids()

        self._counter = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-engine")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: deque[_Request] = deque()
        self._arrived: asyncio.Event | None = None
        self._scheduler: asyncio.Task | None = None
        self._pending: set[_Request] = set()
        self._preparing = 0  # requests whose images are being processed, not yet queued
        self._closed = False
        self.stats = {
            "batches": 0,
            "requests": 0,
            "max_batch_rows": 0,
            "decode_steps": 0,
            "prefills": 0,
            "prefill_seconds": 0.0,
            "decode_seconds": 0.0,
            "eager_fallbacks": 0,
        }
        self.decode = self._resolve_decode(decode)
        self.max_seq_len = min(max_seq_len or min(self.max_context, DEFAULT_SLOT_LEN), self.max_context)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {max_seq_len}")
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise ValueError("cuda_graphs=True needs the model on a CUDA device")
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1, got {prefill_tokens}")
        self.prefill_tokens = prefill_tokens
        if steps_per_sync < 1:
            raise ValueError(f"steps_per_sync must be >= 1, got {steps_per_sync}")
        self.steps_per_sync = steps_per_sync
        self._abort_epoch = self._seen_abort_epoch = 0
        self._decoder: SlotDecoder | None = None
        self._fallback_warned = False

    def _resolve_decode(self, decode: str) -> str:
        if decode not in ("auto", "eager", "static"):
            raise ValueError(f"decode must be 'auto', 'eager' or 'static', got {decode!r}")
        reason = unsupported_reason(self.model)
        if decode == "static" and reason is not None:
            raise ValueError(f"decode='static' is not available for this model: {reason}; use decode='eager'")
        if decode == "auto":
            # The static decoder pays off where kernel launches dominate (a GPU); on a CPU the eager
            # loop is as fast and is the path the fidelity tests pin down.
            return "static" if reason is None and self.device.type == "cuda" else "eager"
        return decode

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        generation_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(generation_eos, int):
            ids.add(generation_eos)
        elif generation_eos is not None:
            ids.update(int(i) for i in generation_eos)
        return frozenset(ids)

    # ----------------------------------------------------------------------------------------
    # Public API

    async def generate(
        self,
        input_ids: list[int],
        images: list[ImageInput],
        sampling_params: dict[str, Any],
        *,
        rid: str | None = None,
    ) -> GenerateResult:
        """Continue ``input_ids`` (see the module docstring for the semantics).

        Raises EngineError(retriable=False, status=400) for a bad request: bad token ids, an image
        that cannot be loaded, image count or pad-run length not matching the images, bad
        sampling params, a prompt that fills the context. Internal failures during generation are
        not raised: the result then has finish reason "abort" and the tokens produced so far.
        """
        if self._closed:
            raise EngineError("the local engine is closed", retriable=False, status=503)
        # The request number is taken before the first await so that the order of calls, not the
        # order in which preparation finishes, decides each request's seed.
        number = self._counter
        self._counter += 1
        try:
            params = SamplingParams.from_dict(sampling_params)
        except SamplingParamsError as exc:
            raise EngineError(str(exc), retriable=False, status=400) from exc
        seed = (
            derive_seed("sampling_seed", params.sampling_seed)
            if params.sampling_seed is not None
            else derive_seed("engine", self.seed, number)
        )
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self._ensure_scheduler(loop)
        self._preparing += 1
        try:
            request = await asyncio.to_thread(self._prepare, input_ids, list(images or []), params, seed, rid)
        finally:
            self._preparing -= 1
            self._arrived.set()  # the scheduler may be waiting for this preparation to end
        request.submitted = started
        if request.max_new_tokens == 0:
            return self._result(_Row(request, finish=Finish(FINISH_LENGTH, length=0)))
        request.future = loop.create_future()
        self._pending.add(request)
        request.future.add_done_callback(lambda fut, req=request: self._on_done(fut, req))
        self._waiting.append(request)
        self._arrived.set()
        return await request.future

    def abort(self, rid: str | None = None, message: str = "aborted by request") -> int:
        """Stop the waiting and running requests with this ``rid`` (all of them when None). They
        finish with reason "abort" and the tokens sampled so far. Returns how many were aborted."""
        count = 0
        for request in list(self._pending):
            if rid is None or request.rid == rid:
                request.abort_message = message
                count += 1
        self._abort_epoch += 1
        return count

    def release_memory(self) -> None:
        """Free the static decoder's KV cache and CUDA graphs (rebuilt by the next request). Call it
        while no request is in flight, e.g. between a rollout and the update that follows it."""
        if self._pending:
            raise RuntimeError("release_memory() while requests are in flight")
        self._decoder = None

    async def aclose(self) -> None:
        """Abort everything in flight, stop the scheduler and the worker thread."""
        if self._closed:
            return
        self._closed = True
        self.abort(message="the engine is shutting down")
        scheduler = self._scheduler
        # A scheduler started on another (finished) event loop died with that loop.
        if scheduler is not None and not scheduler.done() and self._loop is asyncio.get_running_loop():
            # The scheduler may be waiting on a running batch; the abort above ends it at its next step.
            scheduler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scheduler
        running = asyncio.get_running_loop()
        for request in list(self._pending):
            future = request.future
            if future is not None and not future.done() and future.get_loop() is running:
                future.set_result(
                    self._result(
                        _Row(request, finish=Finish(FINISH_ABORT, message="the engine is shutting down"))
                    )
                )
        await asyncio.to_thread(self._executor.shutdown, wait=True)

    async def __aenter__(self) -> LocalEngine:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # ----------------------------------------------------------------------------------------
    # Request preparation (runs in a worker thread: image decoding and processing are CPU-heavy)

    def _bad(self, message: str) -> EngineError:
        return EngineError(message, retriable=False, status=400)

    def _prepare(
        self, input_ids: Any, images: list[ImageInput], params: SamplingParams, seed: int, rid: str | None
    ) -> _Request:
        if not isinstance(input_ids, list | tuple) or not input_ids:
            raise self._bad("input_ids must be a non-empty list of token ids")
        for position, token in enumerate(input_ids):
            if not _is_int(token) or not 0 <= token < self.vocab_size:
                raise self._bad(
                    f"input_ids[{position}] = {token!r} is not a token id of this model "
                    f"(integers in [0, {self.vocab_size}))"
                )
        for token in params.stop_token_ids:
            if token >= self.vocab_size:
                raise self._bad(
                    f"stop_token_ids contains {token}, outside this model's vocabulary of {self.vocab_size}"
                )
        if self.video_token_id is not None and self.video_token_id in input_ids:
            raise self._bad("input_ids contain <|video_pad|> tokens; this engine serves images only")

        ids = list(input_ids)
        runs = _pad_runs(ids, self.image_token_id)
        if len(runs) != len(images):
            raise self._bad(
                f"input_ids contain {len(runs)} image pad run(s) but {len(images)} image(s) were sent; "
                "send exactly one image per <|vision_start|><|image_pad|>...<|vision_end|> block, in order"
            )
        pixel_values = image_grid_thw = None
        if images:
            pil_images = []
            for index, item in enumerate(images):
                try:
                    pil_images.append(load_image(item))
                except ImageLoadError as exc:
                    raise self._bad(f"image {index}: {exc}") from exc
            processed = self.processor.image_processor(images=pil_images, return_tensors="pt")
            pixel_values, image_grid_thw = processed["pixel_values"], processed["image_grid_thw"]
            counts = (image_grid_thw.prod(-1) // self.merge_size**2).tolist()
            expanded: list[int] = []
            cursor = 0
            for index, ((start, length), count) in enumerate(zip(runs, counts, strict=True)):
                if length not in (1, count):
                    size = pil_images[index].size
                    raise self._bad(
                        f"image {index} ({size[0]}x{size[1]}) needs {count} <|image_pad|> tokens but its pad run "
                        f"has {length}; send one pad per image (expanded here) or the processor's full run"
                    )
                expanded += ids[cursor:start] + [self.image_token_id] * count
                cursor = start + length
            ids = expanded + ids[cursor:]

        if len(ids) >= self.max_context:
            raise self._bad(
                f"the prompt has {len(ids)} tokens (image pads expanded); the model's context is "
                f"{self.max_context}, leaving no room to generate"
            )
        max_new = params.max_new_tokens if params.max_new_tokens is not None else self.default_max_new_tokens
        max_new = min(max_new, self.max_context - len(ids))
        return _Request(
            input_ids=ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            params=params,
            max_new_tokens=max_new,
            seed=seed,
            rid=rid,
            submitted=time.perf_counter(),
        )

    # ----------------------------------------------------------------------------------------
    # Scheduling (event loop side)

    def _ensure_scheduler(self, loop: asyncio.AbstractEventLoop) -> None:
        # One scheduler per event loop: tests and tools may drive the engine from several loops
        # over its lifetime (never concurrently), and asyncio primitives belong to one loop.
        if self._loop is loop and self._scheduler is not None and not self._scheduler.done():
            return
        self._loop = loop
        self._waiting = deque()
        self._arrived = asyncio.Event()
        self._scheduler = loop.create_task(self._schedule(self._waiting, self._arrived), name="local-engine")

    def _on_done(self, future: asyncio.Future, request: _Request) -> None:
        self._pending.discard(request)
        if future.cancelled() and request.abort_message is None:
            request.abort_message = "the caller cancelled the request"
            self._abort_epoch += 1

    async def _schedule(self, waiting: deque[_Request], arrived: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not waiting:
                arrived.clear()
                await arrived.wait()
            # Requests still decoding their images are about to arrive: waiting for them keeps a
            # burst of concurrent requests in one batch instead of splitting it at batch_wait_ms.
            deadline = loop.time() + self.batch_wait_s
            while len(waiting) < self.max_batch_size:
                remaining = deadline - loop.time()
                if remaining <= 0 and self._preparing == 0:
                    break
                arrived.clear()
                try:
                    await asyncio.wait_for(arrived.wait(), remaining if remaining > 0 else None)
                except TimeoutError:
                    continue
            if self.decode == "static":
                # Serves until no request is running or waiting; requests that arrive meanwhile
                # join the running batch between steps.
                await loop.run_in_executor(self._executor, self._serve_static, waiting)
                continue
            batch = [waiting.popleft() for _ in range(min(self.max_batch_size, len(waiting)))]
            live = [r for r in batch if r.future is not None and not r.future.done()]
            if not live:
                continue
            results = await loop.run_in_executor(self._executor, self._run_batch, live)
            for request, result in zip(live, results, strict=True):
                if request.future is not None and not request.future.done():
                    request.future.set_result(result)

    # ----------------------------------------------------------------------------------------
    # Generation (worker thread)

    def _run_batch(self, requests: list[_Request]) -> list[GenerateResult]:
        rows = [_Row(request) for request in requests]
        self.stats["batches"] += 1
        self.stats["requests"] += len(rows)
        self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(rows))
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                self._decode(rows)
        except Exception as exc:
            logger.exception("local engine: generation failed for a batch of %d request(s)", len(rows))
            for row in rows:
                if row.finish is None:
                    row.finish = Finish(FINISH_ABORT, message=f"engine error: {type(exc).__name__}: {exc}")
        finally:
            if was_training:
                self.model.train()
        return [self._result(row) for row in rows]

    # ----------------------------------------------------------------------------------------
    # Static decoding with continuous batching (worker thread)

    def _serve_static(self, waiting: deque[_Request]) -> None:
        if self._decoder is None:
            with torch.no_grad():
                self._decoder = SlotDecoder(
                    self.model,
                    slots=self.max_batch_size,
                    slot_len=self.max_seq_len,
                    use_graphs=self.cuda_graphs,
                )
            logger.info(
                "local engine: static decoding with %d slots of %d tokens (KV cache %.2f GiB), CUDA graphs %s",
                self.max_batch_size,
                self.max_seq_len,
                self._decoder.kv_bytes() / 2**30,
                "on" if self.cuda_graphs else "off",
            )
        decoder = self._decoder
        decoder.refresh_if_weights_moved()
        slots: list[_Row | None] = [None] * decoder.slots
        prompt_lens = np.zeros(decoder.slots, dtype=np.int64)
        counts = np.zeros(decoder.slots, dtype=np.int64)
        # Rows with stop strings: their tokens are read back at each sync.
        watched = np.zeros(decoder.slots, dtype=bool)
        steps = self.steps_per_sync

        def deliver(row: _Row) -> None:
            self._settle(row.request, self._result(row))

        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                while True:
                    for slot, row in self._admit(waiting, slots, deliver):
                        slots[slot] = row
                        prompt_lens[slot], counts[slot] = row.prompt_len, 0
                        watched[slot] = bool(row.request.params.stop)
                    occupied = np.flatnonzero([row is not None for row in slots])
                    if not len(occupied):
                        return
                    rows = next(b for b in decoder.batch_buckets if b > occupied[-1])
                    # Every write of the next `steps` steps must land inside the bucket.
                    needed = int((prompt_lens + counts)[occupied].max()) + steps
                    length = next(n for n in decoder.length_buckets if n >= min(needed, decoder.slot_len))
                    filtering = any(
                        row is not None and (row.request.params.top_k > 0 or row.request.params.top_p < 1)
                        for row in slots[:rows]
                    )
                    started = time.perf_counter()
                    for _ in range(steps):
                        decoder.step(rows, length, filtering)
                    state = decoder.state(rows, steps).numpy()
                    self._add_time("decode_seconds", started)
                    self.stats["graphs"] = decoder.graph_count()
                    self.stats["graph_capture_seconds"] = decoder.capture_seconds
                    self.stats["decode_steps"] += steps
                    self.stats["max_batch_rows"] = max(self.stats["max_batch_rows"], len(occupied))
                    done, new_counts, codes, recent = state[:, 0], state[:, 1], state[:, 2], state[:, 3:]
                    aborted = self._abort_epoch != self._seen_abort_epoch
                    self._seen_abort_epoch = self._abort_epoch
                    finished: list[tuple[int, Finish, int]] = []
                    for i in occupied:
                        if not (done[i] or watched[i] or aborted):
                            continue
                        row = slots[i]
                        grew = int(new_counts[i] - counts[i])
                        if watched[i] and grew:
                            row.tokens.extend(recent[i, steps - grew :].tolist())
                        finish, length_at = self._slot_finish(
                            row, bool(done[i]), int(codes[i]), int(new_counts[i]), grew
                        )
                        if finish is not None:
                            finished.append((i, finish, length_at))
                    counts[:rows] = new_counts
                    if finished:
                        outputs = decoder.outputs([i for i, _, _ in finished], [n for _, _, n in finished])
                        for (i, finish, _), (tokens, log_probs) in zip(finished, outputs, strict=True):
                            if not done[i]:
                                decoder.mark_done(i)
                            if finish.reason == FINISH_STOP and finish.matched is None:
                                finish = Finish(FINISH_STOP, matched=tokens[-1])
                            row = slots[i]
                            row.tokens, row.log_probs, row.finish = tokens, log_probs, finish
                            deliver(row)
                            slots[i] = None
                            watched[i] = False
        except Exception as exc:
            logger.exception("local engine: static decoding failed")
            live = [i for i, row in enumerate(slots) if row is not None]
            outputs = [([], [])] * len(live)
            with contextlib.suppress(Exception):  # keep the tokens sampled so far, if they can be read
                outputs = decoder.outputs(live, decoder.count[live].tolist())
            self._decoder = None  # rebuilt on the next call, in case its state is what failed
            for i, (tokens, log_probs) in zip(live, outputs, strict=True):
                row = slots[i]
                row.tokens, row.log_probs = tokens, log_probs
                row.finish = Finish(FINISH_ABORT, message=f"engine error: {type(exc).__name__}: {exc}")
                deliver(row)
        finally:
            if was_training:
                self.model.train()

    @staticmethod
    def _settle(request: _Request, result: GenerateResult) -> None:
        """Answer ``request`` from the worker thread (unless its caller gave up on it)."""
        future = request.future
        future.get_loop().call_soon_threadsafe(lambda: future.done() or future.set_result(result))

    def _slot_finish(
        self, row: _Row, done: bool, code: int, count: int, grew: int
    ) -> tuple[Finish | None, int]:
        """How a slot finished, if it did, and its token count then.

        The device decides length, stop ids, EOS and non-finite log-probs at the token they happen;
        stop strings are checked here, token by token over what the last steps added (the device
        may have run a slot a few tokens past a stop string: those tokens are dropped, and they
        changed nothing for other slots). SGLang's order holds for each token: length, then stop
        ids, then stop strings."""
        params = row.request.params
        if params.stop and grew:
            first = len(row.tokens) - grew
            for end in range(first + 1, len(row.tokens) + 1):
                if done and end == count and code in (FINISHED_LENGTH, FINISHED_STOP_ID):
                    break  # the device's reason comes first for this token
                finish = self._stop_string_finish(row, end)
                if finish is not None:
                    del row.tokens[end:]
                    return finish, end
        if done:
            if code == FINISHED_LENGTH:
                return Finish(FINISH_LENGTH, length=row.request.max_new_tokens), count
            if code == FINISHED_STOP_ID:
                return Finish(FINISH_STOP), count  # the matched id is the last token, read back with the rest
            if code == FINISHED_NONFINITE:
                return Finish(FINISH_ABORT, message="the model produced non-finite logits"), count
            return Finish(FINISH_ABORT, message="the slot ended without a reason"), count  # a bug if seen
        if row.request.abort_message is not None:
            return Finish(FINISH_ABORT, message=row.request.abort_message), count
        return None, count

    def _admit(self, waiting: deque[_Request], slots: list[_Row | None], deliver) -> list[tuple[int, _Row]]:
        """Prefill waiting requests into free slots; requests a slot cannot hold run eagerly."""
        free = [i for i, row in enumerate(slots) if row is None]
        admitted: list[_Request] = []
        oversized: list[_Request] = []
        while waiting and len(admitted) < len(free):
            request = waiting.popleft()
            if request.future is None or request.future.done():
                continue
            if request.abort_message is not None:
                deliver(_Row(request, finish=Finish(FINISH_ABORT, message=request.abort_message)))
                continue
            if self._decoder.fits(
                len(request.input_ids), request.max_new_tokens, len(self._stop_ids(request))
            ):
                admitted.append(request)
            else:
                oversized.append(request)
        placed: list[tuple[int, _Row]] = []
        chunks: list[list[_Request]] = []
        for request in admitted:
            chunk = chunks[-1] if chunks else []
            width = max([len(request.input_ids)] + [len(r.input_ids) for r in chunk])
            if not chunk or width * (len(chunk) + 1) > self.prefill_tokens:
                chunks.append([request])
            else:
                chunk.append(request)
        for chunk in chunks:
            try:
                placed += self._prefill_into_slots(chunk, free)
            except Exception as exc:  # these requests fail; the running slots are untouched
                logger.exception("local engine: prefill failed for %d request(s)", len(chunk))
                for request in chunk:
                    message = f"engine error: {type(exc).__name__}: {exc}"
                    deliver(_Row(request, finish=Finish(FINISH_ABORT, message=message)))
        if oversized:
            if not self._fallback_warned:
                self._fallback_warned = True
                logger.warning(
                    "local engine: a request needs more than a static slot's %d tokens (prompt + max_new_tokens + 1) "
                    "or has too many stop ids; it runs in the eager loop (raise max_seq_len to avoid this)",
                    self._decoder.slot_len,
                )
            self.stats["eager_fallbacks"] += len(oversized)
            for request, result in zip(oversized, self._run_batch(oversized), strict=True):
                self._settle(request, result)
        return placed

    def _prefill_into_slots(self, requests: list[_Request], free: list[int]) -> list[tuple[int, _Row]]:
        started = time.perf_counter()
        logits, cache, _, lengths, next_position = self._prefill(requests)
        targets = [free.pop(0) for _ in requests]
        positions = next_position.tolist()
        self._decoder.load(
            targets,
            [
                SlotRequest(
                    next_position=positions[j],
                    temperature=request.params.temperature,
                    top_k=request.params.top_k,
                    top_p=request.params.top_p,
                    seed=request.seed,
                    max_new_tokens=request.max_new_tokens,
                    stop_ids=self._stop_ids(request),
                )
                for j, request in enumerate(requests)
            ],
            logits,
            cache,
            lengths,
        )
        self._synchronize()
        self.stats["batches"] += 1
        self.stats["prefills"] += 1
        self.stats["requests"] += len(requests)
        self._add_time("prefill_seconds", started)
        placed = []
        for slot, request, length in zip(targets, requests, lengths, strict=True):
            row = _Row(request)
            row.prompt_len = length
            placed.append((slot, row))
        return placed

    def _synchronize(self) -> None:
        # Timings split prefill from decode; without this, queued GPU work lands in the next timer.
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _stop_ids(self, request: _Request) -> tuple[int, ...]:
        # As in SGLang (and the eager loop), ignore_eos also disables stop_token_ids.
        if request.params.ignore_eos:
            return ()
        return tuple(dict.fromkeys([*request.params.stop_token_ids, *sorted(self.eos_token_ids)]))

    def _prefill(self, requests: list[_Request]):
        """The prompts as one left-padded batch: (last logits, cache, prompt lengths, next positions).

        Multimodal RoPE positions come from the model's own rule (3 x batch x width); each row's
        next text position is its largest prompt position + 1, and grows by one per token.
        """
        device = self.device
        batch = len(requests)
        lengths = [len(request.input_ids) for request in requests]
        width = max(lengths)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((batch, width), dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, width - lengths[i] :] = torch.tensor(request.input_ids)
            attention[i, width - lengths[i] :] = 1
        pixel_values = [r.pixel_values for r in requests if r.pixel_values is not None]
        grids = [r.image_grid_thw for r in requests if r.image_grid_thw is not None]
        pixel_values_t = torch.cat(pixel_values).to(device) if pixel_values else None
        grid_t = torch.cat(grids).to(device) if grids else None
        input_ids, attention = input_ids.to(device), attention.to(device)
        token_types = mm_token_type_ids(input_ids, self.model.config) * attention
        positions, deltas = self.model.model.get_rope_index(
            input_ids, mm_token_type_ids=token_types, image_grid_thw=grid_t, attention_mask=attention
        )
        next_position = deltas.view(-1).to(device) + torch.tensor(lengths, device=device)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            pixel_values=pixel_values_t,
            image_grid_thw=grid_t,
            mm_token_type_ids=token_types,
            use_cache=True,
            logits_to_keep=1,
        )
        return outputs.logits[:, -1, :], outputs.past_key_values, attention, lengths, next_position

    def _decode(self, rows: list[_Row]) -> None:
        """The eager loop: one ``model(...)`` call per generated token for the whole batch."""
        device = self.device
        batch = len(rows)
        started = time.perf_counter()
        logits, cache, attention, _, next_position = self._prefill([row.request for row in rows])
        self._add_time("prefill_seconds", started)
        started = time.perf_counter()
        temperatures = torch.tensor([r.request.params.temperature for r in rows], device=device)
        greedy = temperatures == 0
        temperatures = torch.where(greedy, torch.ones_like(temperatures), temperatures)
        top_k = torch.tensor([r.request.params.top_k for r in rows], device=device)
        top_p = torch.tensor([r.request.params.top_p for r in rows], device=device)
        filtering = bool(((top_k > 0) | (top_p < 1)).any())
        seeds = torch.tensor([r.request.seed for r in rows], dtype=torch.long, device=device)
        counts = torch.zeros(batch, dtype=torch.long, device=device)
        steps = max(row.request.max_new_tokens for row in rows)
        for step in range(steps):
            log_probs = processed_log_probs(logits.float(), temperatures, top_k, top_p, filtering)
            next_tokens = sample_tokens(log_probs, counter_uniforms(seeds, counts), greedy)
            chosen = log_probs.gather(-1, next_tokens.unsqueeze(-1)).squeeze(-1)
            finite = torch.isfinite(chosen)
            token_list, logp_list, finite_list = next_tokens.tolist(), chosen.tolist(), finite.tolist()
            for i, row in enumerate(rows):
                if row.finish is not None:
                    continue
                if row.request.abort_message is not None:
                    row.finish = Finish(FINISH_ABORT, message=row.request.abort_message)
                    continue
                if not finite_list[i]:
                    row.finish = Finish(FINISH_ABORT, message="the model produced non-finite logits")
                    continue
                row.tokens.append(token_list[i])
                row.log_probs.append(logp_list[i])
                row.finish = self._check_finished(row)
            counts = torch.tensor([len(row.tokens) for row in rows], dtype=torch.long, device=device)
            self.stats["decode_steps"] += 1
            if all(row.finish is not None for row in rows) or step == steps - 1:
                break
            attention = torch.cat([attention, attention.new_ones((batch, 1))], dim=1)
            step_positions = (next_position + step).view(1, batch, 1).expand(3, batch, 1)
            outputs = self.model(
                input_ids=next_tokens.unsqueeze(-1),
                attention_mask=attention,
                position_ids=step_positions,
                past_key_values=cache,
                use_cache=True,
            )
            cache = outputs.past_key_values
            logits = outputs.logits[:, -1, :]
        self._add_time("decode_seconds", started)
        for row in rows:
            if row.finish is None:
                # Only reachable if a row's budget was larger than the loop ran, which would be a bug.
                row.finish = Finish(FINISH_LENGTH, length=len(row.tokens))

    def _add_time(self, key: str, started: float) -> None:
        self.stats[key] += time.perf_counter() - started

    def _check_finished(self, row: _Row) -> Finish | None:
        params = row.request.params
        if len(row.tokens) >= row.request.max_new_tokens:
            return Finish(FINISH_LENGTH, length=row.request.max_new_tokens)
        last = row.tokens[-1]
        if not params.ignore_eos and (last in params.stop_token_ids or last in self.eos_token_ids):
            return Finish(FINISH_STOP, matched=last)
        if params.stop:
            return self._stop_string_finish(row)
        return None

    def _stop_string_finish(self, row: _Row, end: int | None = None) -> Finish | None:
        """A stop string in the tokens up to ``end`` (all of them by default)."""
        # Decode only a tail long enough to hold any stop string (a character can take up to
        # four byte-level tokens), with special tokens kept so that stops can name them.
        stops = row.request.params.stop
        end = len(row.tokens) if end is None else end
        window = 4 * max(len(s) for s in stops) + 1
        tail = self.tokenizer.decode(row.tokens[max(0, end - window) : end], skip_special_tokens=False)
        for stop in stops:
            if stop in tail:
                return Finish(FINISH_STOP, matched=stop)
        return None

    def _result(self, row: _Row) -> GenerateResult:
        request, finish = row.request, row.finish
        assert finish is not None
        params = request.params
        decode_ids = row.tokens
        if finish.reason == FINISH_STOP and isinstance(finish.matched, int) and not params.no_stop_trim:
            decode_ids = row.tokens[:-1]
        text = self.tokenizer.decode(decode_ids, skip_special_tokens=params.skip_special_tokens)
        if finish.reason == FINISH_STOP and isinstance(finish.matched, str) and not params.no_stop_trim:
            cut = text.find(finish.matched)
            if cut >= 0:
                text = text[:cut]
        meta_info = {
            "id": request.rid,
            "finish_reason": finish.to_json(),
            "prompt_tokens": len(request.input_ids),
            "completion_tokens": len(row.tokens),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": time.perf_counter() - request.submitted,
        }
        return GenerateResult(
            token_ids=list(row.tokens),
            log_probs=list(row.log_probs),
            text=text,
            finish_reason=finish.reason,
            matched_stop=finish.matched if finish.reason == FINISH_STOP else None,
            meta_info=meta_info,
        )
