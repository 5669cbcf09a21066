"""One multi-turn episode: tokens in, tokens out, against any Engine and any env module.

    prompt (chat-templated text + images) -> ids with expanded image pads, pixel_values, grids
    for turn in 1..max_turns:
        engine.generate(all ids so far, all images so far)   -> model tokens (mask 1, engine log-probs)
        stop on abort / length / spent budget
        env.step(model text) in a worker thread               -> observation, done, info
        stop when done or at max_turns
        observation as a chat-template continuation           -> inserted tokens (mask 0, log-prob 0.0)

Never decodes and re-tokenizes earlier turns. Statuses: COMPLETED (env done or max_turns reached),
TRUNCATED (length or budget), ABORTED (the engine aborted: slime's own over-sampling uses it),
FAILED (our side gave up: engine error after retries, env exception, grader down, unusable input;
also ``remove_sample=True`` and reward 0 so that no fault of ours becomes a training signal).

Budget: ``rollout_max_context_len`` caps the whole sequence when set; otherwise ``max_new_tokens``
(or ``rollout_max_response_len``) caps the response, model plus env tokens. The prompt is never
subtracted from a response budget (slime #2140: a large-image prompt then leaves no room at all).
``max_tokens_per_turn`` optionally caps each generation; a turn cut by it (with budget left) is
handed to the env like any other turn. An observation that does not fit ends the
episode TRUNCATED; it is never inserted partially, so an image's pad run is never cut.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
import traceback
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import torch

from envs.base import call_off_loop
from envs.images import load_image
from rollout.config import RolloutConfig
from rollout.engines.base import FINISH_ABORT, FINISH_LENGTH, Engine, EngineError, output_problem
from rollout.image_cache import ProcessedImage, ProcessedImageCache
from rollout.observation import ObservationEncoder
from rollout.processing import ImagePadMismatch, Processing
from rollout.prompts import prompt_messages
from rollout.trajectory import Segment, Trajectory


@dataclass
class TurnRecord:
    turn: int
    text: str = ""
    finish_reason: str | None = None
    matched_stop: int | str | None = None
    model_tokens: int = 0
    env_tokens: int = 0
    tool_call: dict[str, Any] | None = None
    tool_executed: bool = False
    score: float | None = None
    error: str | None = None
    done: bool = False
    observation_text: str | None = None
    observation_images: int = 0
    engine_s: float = 0.0
    env_s: float = 0.0


@dataclass
class EpisodeContext:
    """Everything an episode needs besides the sample: shared by all episodes of a run."""

    config: RolloutConfig
    engine: Engine
    processing: Processing
    encoder: ObservationEncoder
    env_module: Any
    # Env calls, and each episode's set-up (prompt encoding, env build and reset) in one trip.
    env_executor: Executor
    # The finished sample's training tensors (milliseconds): never on the event loop. Image
    # processing itself runs on the image cache's own thread.
    prep_executor: Executor
    image_cache: ProcessedImageCache
    # slime's --apply-chat-template-kwargs (rollout.prompts.chat_template_kwargs): every template
    # rendering of the episode uses them, as slime's rendering of the first prompt did.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


class _EpisodeEnded(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class _State:
    trajectory: Trajectory = field(default_factory=Trajectory)
    request_ids: list[int] = field(default_factory=list)  # what the next request sends
    images: list[Any] = field(default_factory=list)  # PIL, token order
    payloads: list[Any] = field(default_factory=list)  # what the engine is sent for each image
    entries: list[ProcessedImage] = field(default_factory=list)  # their tensors, possibly still on the way
    turns: list[TurnRecord] = field(default_factory=list)
    # The engine's routed experts (flat int32) for positions [0, routed_rows) of the sequence.
    routed_experts: torch.Tensor | None = None
    routed_rows: int = 0


async def run_episode(ctx: EpisodeContext, args: Any, sample: Any, sampling_params: dict[str, Any]) -> Any:
    status_enum = type(sample).Status if hasattr(type(sample), "Status") else sample.Status
    state: _State | None = None
    env = None
    status, reason = "COMPLETED", "max_turns reached"
    loop = asyncio.get_running_loop()
    try:
        state, env, env_error = await _call_env(ctx, _set_up, ctx, sample, args)
        try:
            if env_error is not None:
                raise env_error
            if inspect.iscoroutinefunction(env.reset):
                await env.reset()
        except Exception as exc:  # a bad row (say, no label) is a failed sample, not a crashed batch
            raise _EpisodeEnded("FAILED", f"the env could not be built or reset: {type(exc).__name__}: {exc}") from None
        status, reason = await _turn_loop(ctx, args, sample, sampling_params, state, env)
    except _EpisodeEnded as ended:
        status, reason = ended.status, ended.reason
    finally:
        if env is not None:
            try:
                await _call_env(ctx, env.close)
            except Exception as exc:  # a failing close must not lose the episode
                reason += f" (env.close failed: {exc!r})"
    if state is None:
        state = _State()
    try:
        await _tensors_ready(state.entries)
    except Exception as exc:
        # Without its pixel_values a trajectory holding image pads cannot go through a forward pass.
        status, reason = "FAILED", f"image processing failed: {type(exc).__name__}: {exc}"
        state = _State()
    train_inputs = await loop.run_in_executor(ctx.prep_executor, _train_inputs, state)
    status, reason = _attach_routed_experts(args, state, status, reason)
    _finish(ctx, args, sample, state, env, status_enum, status, reason, train_inputs)
    return sample


async def _tensors_ready(entries: list[ProcessedImage]) -> None:
    """Wait for the images' background processing; raises its error, if any."""
    await asyncio.gather(*(asyncio.wrap_future(entry.tensors) for entry in entries))


def _encode_prompt(ctx: EpisodeContext, sample: Any, args: Any = None) -> _State:
    processing = ctx.processing
    prompt = sample.prompt
    if isinstance(prompt, str) and getattr(args, "apply_chat_template", None) is False:
        # slime without --apply-chat-template hands over the row's text: the prompt is built from
        # messages (the env module's prompt hook) and rendered below, with the env's TOOLS.
        try:
            raw = list((getattr(sample, "multimodal_inputs", None) or {}).get("images") or [])
            prompt = prompt_messages(prompt, raw, ctx.env_module)
        except (TypeError, ValueError) as exc:
            raise _EpisodeEnded("FAILED", f"prompt: {exc}") from None
    if not isinstance(prompt, str):
        tools = getattr(ctx.env_module, "TOOLS", None) if ctx.config.tools_in_prompt else None
        prompt = processing.tokenizer.apply_chat_template(
            prompt, tools=tools, tokenize=False, add_generation_prompt=True, **ctx.chat_template_kwargs
        )
    try:
        raw_images = list((getattr(sample, "multimodal_inputs", None) or {}).get("images") or [])
        images = [load_image(image) for image in raw_images]
    except Exception as exc:
        raise _EpisodeEnded("FAILED", f"prompt image could not be loaded: {exc}") from None
    rendered = ids = processing.encode_prompt(prompt)
    state = _State()
    try:
        if images:
            _add_images(ctx, state, images)
            ids = processing.expand_image_pads(rendered, [entry.pad_count for entry in state.entries])
        elif processing.count_image_pads(ids):
            raise ImagePadMismatch("the prompt has image placeholders but the sample has no images")
    except ImagePadMismatch as exc:
        raise _EpisodeEnded("FAILED", f"prompt: {exc}") from None
    except Exception as exc:  # e.g. an aspect ratio the processor refuses
        raise _EpisodeEnded("FAILED", f"prompt image could not be processed: {type(exc).__name__}: {exc}") from None
    state.trajectory.prompt_ids = ids
    # One pad per image, expanded by the engine (see rollout.config). Compressing the rendered
    # prompt (a pad or two) gives what compressing the expansion would.
    state.request_ids = processing.compress_image_pads(rendered)
    return state


def _add_images(ctx: EpisodeContext, state: _State, images: list[Any]) -> None:
    """Look up or start processing each image (once per distinct image, see ProcessedImageCache)
    and keep what the engine is sent for it (e.g. a PNG data URI for SGLang), reused by every later
    turn's request."""
    _add_entries(ctx, state, [ctx.image_cache.get(ctx.processing, image) for image in images])


def _add_entries(ctx: EpisodeContext, state: _State, entries: list[ProcessedImage]) -> None:
    for entry in entries:
        state.images.append(entry.image)
        state.payloads.append(ctx.image_cache.payload(entry, ctx.engine))
        state.entries.append(entry)


def _budget_left(args: Any, sampling_params: dict[str, Any], trajectory: Trajectory) -> int | None:
    context_cap = getattr(args, "rollout_max_context_len", None)
    if context_cap:
        return int(context_cap) - trajectory.length
    response_cap = sampling_params.get("max_new_tokens") or getattr(args, "rollout_max_response_len", None)
    if response_cap:
        return int(response_cap) - trajectory.response_length
    return None


async def _turn_loop(ctx, args, sample, sampling_params, state: _State, env) -> tuple[str, str]:
    config = ctx.config
    for turn in range(1, config.max_turns + 1):
        record = TurnRecord(turn=turn)
        state.turns.append(record)
        left = _budget_left(args, sampling_params, state.trajectory)
        if left is not None and left <= 0:
            return "TRUNCATED", f"token budget spent before turn {turn}"
        params = dict(sampling_params)
        caps = [c for c in (left, config.max_tokens_per_turn) if c is not None]
        if caps:
            params["max_new_tokens"] = min(caps)

        text = await _model_turn(ctx, state, record, params, left)
        tokens, text, entries, request_tail = await _env_turn(ctx, state, record, env, text)
        left = _budget_left(args, sampling_params, state.trajectory)
        if left is not None and len(tokens) > left:
            return "TRUNCATED", f"the observation after turn {turn} ({len(tokens)} tokens) does not fit ({left} left)"
        state.trajectory.append(Segment(tokens, False, text))
        state.request_ids.extend(request_tail)
        _add_entries(ctx, state, entries)
        record.env_tokens = len(tokens)
        record.observation_text = text
        record.observation_images = len(entries)
    return "COMPLETED", "max_turns reached"


async def _env_turn(ctx: EpisodeContext, state: _State, record: TurnRecord, env: Any, text: str):
    """``env.step`` on the model's text, then the observation it returns, formatted and encoded for
    the next turn (in an env thread: tokenizer and image work stay off the event loop): (trajectory
    tokens, text, image entries, request tail). Raises _EpisodeEnded when the episode ends here
    (done, max_turns, an env error)."""
    started = time.perf_counter()
    try:
        observation, done, info = _step_result(await _call_env(ctx, env.step, text))
    except _BadStepResult as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        raise _EpisodeEnded("FAILED", f"env.step at turn {record.turn} {exc}") from None
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        raise _EpisodeEnded("FAILED", f"env.step raised at turn {record.turn}: {traceback.format_exc(limit=5)}") from None
    finally:
        record.env_s = time.perf_counter() - started
    _record_step_info(record, info, done)
    if done:
        raise _EpisodeEnded("COMPLETED", "env done")
    if record.turn == ctx.config.max_turns:
        raise _EpisodeEnded("COMPLETED", "max_turns reached")
    started = time.perf_counter()
    last_id = state.request_ids[-1] if state.request_ids else None
    try:
        message = await _call_env(ctx, env.format_observation, observation)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(ctx.env_executor, _encode_and_insert, ctx, message, last_id)
    except Exception as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        raise _EpisodeEnded("FAILED", f"observation at turn {record.turn} could not be encoded: {exc}") from None
    finally:
        record.env_s += time.perf_counter() - started


def _encode_and_insert(ctx: EpisodeContext, message: dict[str, Any], last_id: int | None):
    return _observation_insert(ctx, *_encode_observation(ctx, message, last_id))


class _BadStepResult(TypeError):
    """env.step returned something other than ``(observation, done, info)``."""


def _step_result(result: Any) -> tuple[Any, Any, Any]:
    if isinstance(result, (tuple, list)) and len(result) == 3:
        observation, done, info = result
        return observation, done, info
    shape = f"a {len(result)}-tuple" if isinstance(result, (tuple, list)) else f"a {type(result).__name__}"
    hint = (
        " (gymnasium's (observation, reward, terminated, truncated, info)? return the reward in info)"
        if isinstance(result, (tuple, list)) and len(result) in (4, 5)
        else ""
    )
    raise _BadStepResult(
        f"returned {shape}: {_short_repr(result)}; it must return (observation, done, info){hint}"
    )


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def _model_turn(ctx: EpisodeContext, state: _State, record: TurnRecord, params: dict[str, Any], left: int | None) -> str:
    """One generation: the engine's tokens go onto the trajectory and the next request; returns the
    text for the env. Raises _EpisodeEnded on an engine error, an abort or a cut generation."""
    processing = ctx.processing
    started = time.perf_counter()
    try:
        result = await ctx.engine.generate(list(state.request_ids), state.payloads, params)
    except EngineError as exc:
        record.error = str(exc)
        raise _EpisodeEnded("FAILED", f"engine: {exc}") from None
    finally:
        record.engine_s = time.perf_counter() - started
    _check_prompt_tokens(state, record, result.prompt_tokens)
    # Checked before any of it joins the trajectory: a removed sample still goes through slime's
    # forward pass, where a bad id or a NaN log-prob would break the whole step.
    problem = output_problem(result, len(processing.tokenizer))
    if problem is not None:
        record.error = problem
        raise _EpisodeEnded("FAILED", f"engine output refused at turn {record.turn}: {problem}")
    record.text = result.text
    record.finish_reason = result.finish_reason
    record.matched_stop = result.matched_stop
    record.model_tokens = len(result.token_ids)
    if left is not None and len(result.token_ids) > left:
        raise _EpisodeEnded("FAILED", f"engine returned {len(result.token_ids)} tokens, more than the {left} requested")
    vision = _first_vision_token(processing, result.token_ids)
    if vision is not None:
        # Keep only what precedes it: even a removed sample goes through the trainer's forward
        # pass, which would look for image features that do not exist.
        kept = result.token_ids[:vision]
        record.model_tokens = len(kept)
        text = processing.tokenizer.decode(kept, skip_special_tokens=False)
        state.trajectory.append(Segment(kept, True, text, log_probs=result.log_probs[:vision]))
        raise _EpisodeEnded("FAILED", "the model generated vision placeholder tokens")
    segment = Segment(result.token_ids, True, result.text, log_probs=result.log_probs, meta_info=result.meta_info)
    state.trajectory.append(segment)
    if result.routed_experts is not None:
        _take_routed_experts(state, record, result.routed_experts, result.routed_experts_start_len)
    state.request_ids.extend(segment.tokens)
    if result.finish_reason == FINISH_ABORT:
        raise _EpisodeEnded("ABORTED", "the engine aborted the request")
    if result.finish_reason == FINISH_LENGTH and not _hit_turn_cap_only(ctx.config, left, result.token_ids):
        raise _EpisodeEnded("TRUNCATED", f"turn {record.turn} hit the generation limit")
    return result.text


def _check_prompt_tokens(state: _State, record: TurnRecord, prompt_tokens: int | None) -> None:
    """docs/pitfalls.md#the-engine-resizes-images-its-own-way: the engine expands each image's single pad with its own image processor. Its
    prompt length must be the training sequence's, or the policy saw other image tokens than the
    trainer will feed it (and nothing else would notice). Engines that do not report it skip this."""
    expected = state.trajectory.length
    if prompt_tokens is None or prompt_tokens == expected:
        return
    record.error = f"engine prompt_tokens {prompt_tokens} != {expected}"
    raise _EpisodeEnded(
        "FAILED",
        f"turn {record.turn}: the engine expanded the request to {prompt_tokens} prompt tokens but the "
        f"training sequence holds {expected}: the engine's image processor resized an image differently "
        "(a different pad count). Give SGLang the trainer's image processor settings (min_pixels / "
        "max_pixels of hf_checkpoint's preprocessor_config.json, the same on both sides)",
    )


def _take_routed_experts(state: _State, record: TurnRecord, data: Any, start_len: int) -> None:
    """Keep the engine's routed experts for the sequence so far (docs/pitfalls.md#routing-replay-across-turns). SGLang reports one
    row per position but the last, from ``start_len`` on; rows before it are the earlier turns'."""
    try:
        experts = _int32_array(data)
    except Exception as exc:
        raise _EpisodeEnded("FAILED", f"turn {record.turn}: unreadable routed_experts: {exc}") from None
    rows = state.trajectory.length - 1 - start_len
    width = experts.numel() // rows if rows > 0 else 0
    kept_width = state.routed_experts.numel() // state.routed_rows if state.routed_rows else width
    if rows <= 0 or width == 0 or experts.numel() != rows * width or width != kept_width:
        raise _EpisodeEnded(
            "FAILED",
            f"turn {record.turn}: the engine returned {experts.numel()} routed expert ids for "
            f"{max(rows, 0)} positions (routed_experts_start_len {start_len}, sequence "
            f"{state.trajectory.length}), not a whole number of rows of {kept_width or 'equal'} ids",
        )
    if start_len:
        if state.routed_rows < start_len:
            raise _EpisodeEnded(
                "FAILED",
                f"turn {record.turn}: routed_experts_start_len {start_len} but only {state.routed_rows} "
                "earlier rows are known",
            )
        experts = torch.cat([state.routed_experts[: start_len * width], experts])
    state.routed_experts, state.routed_rows = experts, start_len + rows


def _int32_array(data: Any) -> torch.Tensor:
    """SGLang's routed_experts: base64 of little-endian int32 (its JSON form), or a list of ids."""
    if isinstance(data, str):
        import base64

        return torch.frombuffer(bytearray(base64.b64decode(data, validate=True)), dtype=torch.int32)
    return torch.as_tensor(data, dtype=torch.int32).reshape(-1)


def _attach_routed_experts(args: Any, state: _State, status: str, reason: str) -> tuple[str, str]:
    """With routing replay, hand the whole sequence's routed experts to the Sample through the last
    segment's meta_info, as slime's Sample reads them (rows = len(tokens) - 1). A sequence the
    engine's experts do not cover fails the sample: slime's trainer would replay wrong routing."""
    replay = bool(getattr(args, "use_rollout_routing_replay", False))
    segments = state.trajectory.segments
    if not segments:
        return status, reason
    needed = state.trajectory.length - 1
    if state.routed_rows < needed:
        if not replay:
            return status, reason
        if status not in ("COMPLETED", "TRUNCATED"):  # failed or aborted for its own reason: kept
            return status, f"{reason} (the engine's routed experts cover {state.routed_rows} of {needed} positions)"
        return "FAILED", (
            f"use_rollout_routing_replay is on but the engine's routed experts cover {state.routed_rows} of the "
            f"sequence's {needed} positions (was SGLang started with --enable-return-routed-experts?)"
        )
    experts = state.routed_experts
    width = experts.numel() // state.routed_rows
    layers, topk = getattr(args, "num_layers", None), getattr(args, "moe_router_topk", None)
    if isinstance(layers, int) and isinstance(topk, int) and width != layers * topk:
        return "FAILED", (
            f"the engine's routed experts have {width} ids per position, but num_layers x moe_router_topk "
            f"is {layers} x {topk}"
        )
    last = segments[-1]
    # A sequence cut after the engine's answer (vision tokens dropped) keeps the rows it still has.
    last.meta_info = {**(last.meta_info or {}), "routed_experts": experts[: needed * width]}
    return status, reason


def _hit_turn_cap_only(config: RolloutConfig, left: int | None, token_ids: list[int]) -> bool:
    """A turn cut by ``max_tokens_per_turn`` while the episode budget has room ends that turn, not
    the episode: the env sees the partial text (usually a malformed or missing tool call)."""
    cap = config.max_tokens_per_turn
    return cap is not None and len(token_ids) >= cap and (left is None or len(token_ids) < left)


def _first_vision_token(processing: Processing, token_ids: list[int]) -> int | None:
    vision = processing.vision_token_ids
    return next((i for i, token in enumerate(token_ids) if token in vision), None)


def _encode_observation(ctx: EpisodeContext, message: dict[str, Any], last_id: int | None):
    """The observation message through the chat template: (encoded message, its token ids, its
    text), both led by the end-of-turn token the model did not produce, if any (``last_id`` is the
    last token so far)."""
    processing = ctx.processing
    tools = getattr(ctx.env_module, "TOOLS", None) if ctx.config.tools_in_prompt else None
    encoded = ctx.encoder.encode_message(message, tools, ctx.chat_template_kwargs)
    # A model that stopped on a stop string (e.g. "</tool_call>") never produced its end-of-turn
    # token; the template has one there, so insert it (masked), exactly once.
    end_of_turn = [] if last_id == processing.eos_token_id else [processing.eos_token_id]
    text = (processing.eos_token if end_of_turn else "") + encoded.text
    return encoded, end_of_turn + encoded.token_ids, text


def _observation_insert(ctx: EpisodeContext, encoded: Any, ids: list[int], text: str):
    """What an encoded observation adds: (trajectory tokens with image pads expanded, its text, its
    images' cache entries, the tokens the next request gets)."""
    processing = ctx.processing
    entries = [ctx.image_cache.get(processing, load_image(image)) for image in encoded.images]
    for entry in entries:
        ctx.image_cache.payload(entry, ctx.engine)  # encoded now, while off the event loop
    expanded = ids
    if entries:
        expanded = processing.expand_image_pads(ids, [entry.pad_count for entry in entries])
    elif processing.count_image_pads(ids):
        raise ImagePadMismatch("the observation text holds image placeholders but no images")
    return expanded, text, entries, ids


def _record_step_info(record: TurnRecord, info: Any, done: bool) -> None:
    record.done = bool(done)
    if not isinstance(info, dict):
        return
    record.tool_executed = bool(info.get("tool_executed", False))
    score = info.get("score")
    record.score = float(score) if isinstance(score, (int, float)) else None
    error = info.get("error")
    record.error = str(error) if error else None
    call = info.get("tool_call")
    if isinstance(call, dict):
        record.tool_call = call
    elif info.get("answer") is not None:
        record.tool_call = {"answer": info.get("answer")}


def _set_up(ctx: EpisodeContext, sample: Any, args: Any) -> tuple[_State, Any, Exception | None]:
    """Encode the prompt, then build and reset the env, in one trip to the env threads: with
    hundreds of episodes starting at once, every extra hand-off back to the event loop queues
    behind everyone else's and delays the episode's first request."""
    state = _encode_prompt(ctx, sample, args)
    try:
        return state, _build_and_reset(ctx, sample, args), None
    except Exception as exc:
        return state, None, exc


def _build_and_reset(ctx: EpisodeContext, sample: Any, args: Any) -> Any:
    """Both calls in one thread trip (a sync reset runs right after the build)."""
    env = ctx.env_module.build_env(sample=sample, args=args, **ctx.config.env_kwargs)
    if not inspect.iscoroutinefunction(env.reset):
        try:
            env.reset()
        except Exception:
            env.close()
            raise
    return env


async def _call_env(ctx: EpisodeContext, method, *args):
    """Await an async env method on the loop; run a sync one in the env threads (never on the loop)."""
    return await call_off_loop(method, *args, executor=ctx.env_executor)


def outcome_of(env: Any, turns: list[TurnRecord]) -> dict[str, Any]:
    """The env's outcome as a plain dict; envs without one (slime's example) get it from step infos."""
    outcome = getattr(env, "outcome", None)
    if dataclasses.is_dataclass(outcome) and not isinstance(outcome, type):
        values = dataclasses.asdict(outcome)
        for name in ("grader_unavailable",):
            if hasattr(outcome, name):
                values[name] = bool(getattr(outcome, name))
        return values
    if isinstance(outcome, dict):
        return dict(outcome)
    scores = [t.score for t in turns if t.score is not None]
    return {"score": max(scores) if scores else 0.0, "attempts": len(scores)}


def _train_inputs(state: _State) -> dict[str, torch.Tensor] | None:
    """``multimodal_train_inputs``: every image's tensors in token order (one image: shared, uncopied)."""
    tensors = [entry.tensors.result() for entry in state.entries]
    if not tensors:
        return None
    if len(tensors) == 1:
        return {"pixel_values": tensors[0].pixel_values, "image_grid_thw": tensors[0].image_grid_thw}
    return {
        "pixel_values": torch.cat([t.pixel_values for t in tensors]),
        "image_grid_thw": torch.cat([t.image_grid_thw for t in tensors]),
    }


def _finish(ctx, args, sample, state: _State, env, status_enum, status: str, reason: str, train_inputs) -> None:
    outcome = outcome_of(env, state.turns) if env is not None else {"score": 0.0}
    if status == "COMPLETED" and outcome.get("grader_unavailable"):
        status, reason = "FAILED", "the answer grader was unavailable; the score says nothing about the model"
    state.trajectory.write_to(sample, args)
    sample.multimodal_train_inputs = train_inputs
    if train_inputs is not None:
        pads = ctx.processing.count_image_pads(sample.tokens)
        expected = sum(ctx.processing.pads_per_image(sample.multimodal_train_inputs["image_grid_thw"]))
        if pads != expected:
            raise ImagePadMismatch(f"trajectory holds {pads} image pads but its images need {expected}")
    sample.status = getattr(status_enum, status)
    metadata = sample.metadata if isinstance(getattr(sample, "metadata", None), dict) else {}
    metadata["turns"] = [dataclasses.asdict(t) for t in state.turns]
    metadata["outcome"] = outcome
    metadata["status_reason"] = reason
    metadata["num_turns"] = sum(1 for t in state.turns if t.model_tokens or t.finish_reason)
    prompt_images = len((getattr(sample, "multimodal_inputs", None) or {}).get("images") or [])
    metadata["observation_images"] = state.images[prompt_images:]
    sample.metadata = metadata
    if status == "FAILED":
        sample.remove_sample = True
        sample.reward = 0.0
