"""A checker for env authors: ``python -m envs.check <module-or-file> [--family F | --model M] [--cases FILE]``.

It checks an env module against the contract in docs/environments.md, the parts the rollout
relies on and nothing else. It loads the module, builds envs from a small fake sample (label
``"3"``, one 112x112 image) and steps fresh envs through

- a battery of hostile model outputs: a valid call, a wrong answer, garbage, empty text, 1 MB of
  text, unicode, malformed JSON, an unterminated call, several calls, 10,000 nested braces, a final
  ``\\boxed{}`` answer and answers that are hostile to math grading;
- every tool of the module's ``TOOLS``, with arguments generated from its JSON schema: a valid call
  (schema ``examples``, else values of the right type), each required argument missing, each
  argument of the wrong type, out of its bounds or outside its ``enum``, and an unknown tool;
- the author's own cases (``--cases cases.jsonl``): one JSON object a line, ``{"name": ...,
  "text": "model output" or ["turn 1", "turn 2", ...], "expect": {"done": bool, "score": number,
  "images": int, "tool_executed": bool}}`` (``name`` and ``expect`` optional; ``expect`` is checked
  after the last text).

For each it checks: ``build_env`` returns an object with ``reset``, ``step`` and
``format_observation``; ``reset()`` returns ``(dict, dict)`` and its observation is empty (the
rollout never inserts it); ``step(text)`` returns ``(dict, bool, dict)``, never raises on model
text and returns within ``step_timeout_s``; the info keys the rollout records have the types it
expects; ``format_observation(obs)`` returns a chat message whose images are ones the rollout
loads (PIL images, file paths, data URIs) and keeps every image of the observation; with a
processor (``--family``/``--model``) every image observation goes through the real image
processor and the chat template, as the rollout will encode it, and the report lists its image
tokens; the env has a reward signal (an ``outcome`` with a numeric ``score``, or ``info["score"]``);
``close()`` does not raise.

It prints a report with the time of every step and exits with status 1 on any error. Tests call
:func:`check_env_module`, which returns the :class:`CheckReport` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import math
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from PIL import Image

from envs.grading import close_default_grader
from envs.images import ImageLoadError, load_image
from envs.loader import EnvLoadError, build_and_check_env, load_env_module
from envs.tool_calls import CALL_FORMS, call_form_for
from envs.tool_calls import format_call as _format_call
from envs.tool_env import example_arguments

__all__ = [
    "AuthorCase",
    "CheckReport",
    "FakeSample",
    "ImageRecord",
    "load_cases",
    "tool_inputs",
    "Violation",
    "StepTiming",
    "check_env_module",
    "check_message",
    "main",
    "step_inputs",
]

KNOWN_ROLES = ("system", "user", "assistant", "tool")
#: ``--family``: the tiny offline preset whose processor and chat template stand for the family.
FAMILY_PRESETS = {"qwen2.5-vl": "tiny-qwen2.5-vl", "qwen3-vl": "tiny-qwen3-vl", "qwen3.5": "tiny-qwen3.5"}


@dataclass
class FakeSample:
    """The few Sample fields an env reads, with slime's names."""

    prompt: str = "<image>Find x. Call calc_score with your answer."
    label: str = "3"
    metadata: dict[str, Any] = field(default_factory=dict)
    multimodal_inputs: dict[str, Any] | None = None
    index: int = 0
    group_index: int = 0
    tokens: list[int] = field(default_factory=list)
    response: str = ""
    response_length: int = 0


@dataclass
class Violation:
    """One problem, with every battery case that showed it."""

    #: What was being checked: "load", "build_env", "env.tools", "reset()", "step", "format_observation", "close()".
    where: str
    message: str
    cases: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.cases:
            return f"{self.where}: {self.message}"
        shown = ", ".join(self.cases[:4]) + (
            f" and {len(self.cases) - 4} more" if len(self.cases) > 4 else ""
        )
        return f"{self.where}: {self.message} [in: {shown}]"


@dataclass(frozen=True)
class StepTiming:
    case: str
    seconds: float
    #: "done=True", "done=False", "raised", "hung", "bad return" or "done=<value> (not a bool)".
    outcome: str


@dataclass(frozen=True)
class ImageRecord:
    """An image observation as the rollout would encode it: its size and, with a processor, the
    image tokens it costs (``pads``) against the episode's budget."""

    case: str
    size: tuple[int, int]
    pads: int | None = None


@dataclass
class CheckReport:
    target: str
    errors: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)
    timings: list[StepTiming] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)
    #: Where a reward came from: "outcome.score" and/or "info['score']".
    reward_sources: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, where: str, message: str, case: str | None = None) -> None:
        _add(self.errors, where, message, case)

    def warn(self, where: str, message: str, case: str | None = None) -> None:
        _add(self.warnings, where, message, case)

    def render(self) -> str:
        lines = [f"Checking env module {self.target}"]
        if self.timings:
            width = max(len(t.case) for t in self.timings)
            lines.append("  step times:")
            lines.extend(f"    {t.case:<{width}}  {t.seconds:8.3f} s  {t.outcome}" for t in self.timings)
            slowest = max(self.timings, key=lambda t: t.seconds)
            lines.append(f"  slowest step: {slowest.case} ({slowest.seconds:.3f} s)")
        if self.images:
            lines.append("  image observations (image tokens each counts against the response budget):")
            lines.extend(
                f"    {r.case}: {r.size[0]}x{r.size[1]} px, "
                + (f"{r.pads} image tokens" if r.pads is not None else "not processed (no --family/--model)")
                for r in self.images
            )
        for title, items in (("Errors", self.errors), ("Warnings", self.warnings)):
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    - {item}" for item in items)
        verdict = "PASS" if self.ok else "FAIL"
        lines.append(f"{verdict}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines)


def _add(items: list[Violation], where: str, message: str, case: str | None) -> None:
    # The same problem in many battery cases is one entry listing the cases.
    for item in items:
        if (item.where, item.message) == (where, message):
            if case is not None and case not in item.cases:
                item.cases.append(case)
            return
    items.append(Violation(where, message, [case] if case is not None else []))


def _tiny_image() -> Image.Image:
    # Large enough that an env cropping it (zoom) has something to crop.
    return Image.new("RGB", (112, 112), (255, 255, 255))


def step_inputs(
    tool: str = "calc_score", argument: str = "answer", form: str = "json"
) -> list[tuple[str, str]]:
    """The battery of model outputs every env must survive, as (case name, text); the well-formed
    calls in it are written in ``form``."""

    def format_call(name: str, arguments: dict[str, Any]) -> str:
        return _format_call(name, arguments, form)

    valid = format_call(tool, {argument: "3"})
    filler = "Let me think step by step about the angles { [ ( . "
    huge = (filler * (1_000_000 // len(filler) + 1))[: 1_000_000 - len(valid)] + valid
    return [
        ("valid call", f"<think>x = 3</think>\n{valid}"),
        ("wrong answer", format_call(tool, {argument: "4"})),
        ("garbage", "}{ ][ \x00\x1b[31m <tool_call <tool_call}> </tool_call> \\boxed{"),
        ("empty", ""),
        ("whitespace", " \n\t \n"),
        ("huge (1 MB)", huge),
        ("unicode", "答案：∠ABC = 60°，\u202e\U0001f600 " + format_call(tool, {argument: "٣ √"})),
        (
            "malformed JSON",
            f'<tool_call>{{"name": "{tool}", "arguments": {{"{argument}": "3",}}}}</tool_call>',
        ),
        ("single quotes", f"<tool_call>{{'name': '{tool}', 'arguments': {{'{argument}': '3'}}}}</tool_call>"),
        ("unterminated call", f'<tool_call>{{"name": "{tool}", "arguments": {{"{argument}": "3"}}}}'),
        ("several calls", valid + format_call(tool, {argument: "4"}) * 3),
        ("nested braces", "<tool_call>" + "{" * 10_000 + "}" * 10_000 + "</tool_call>"),
        (
            "nested arrays",
            f'<tool_call>{{"name": "{tool}", "arguments": ' + "[" * 10_000 + "]" * 10_000 + "}</tool_call>",
        ),
        ("final boxed answer", "So the answer is 3.\nAnswer: \\boxed{3}"),
        ("hostile math", format_call(tool, {argument: "\\boxed{10^{10^{10^{10}}}}"})),
        ("slow math", format_call(tool, {argument: "\\boxed{9!!!!!}"})),
    ]


def check_message(message: Any) -> tuple[list[str], list[str]]:
    """Problems with a chat message, as (errors, warnings)."""
    errors: list[str] = []
    warnings: list[str] = []
    if not isinstance(message, dict):
        return [f"returned {type(message).__name__}; expected a dict with 'role' and 'content'"], warnings
    role = message.get("role")
    if not isinstance(role, str) or not role:
        errors.append(f"'role' must be a non-empty string, got {role!r}")
    elif role not in KNOWN_ROLES:
        warnings.append(f"role {role!r} is not one of {', '.join(KNOWN_ROLES)}; chat templates may reject it")
    if "content" not in message:
        errors.append("the message has no 'content'")
        return errors, warnings
    content = message["content"]
    if isinstance(content, str):
        return errors, warnings
    if not isinstance(content, list):
        errors.append(f"'content' must be a string or a list of parts, got {type(content).__name__}")
        return errors, warnings
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            errors.append(f"content part {i} is a {type(part).__name__}; expected a dict with a 'type'")
            continue
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                errors.append(
                    f"content part {i} (text) needs 'text' as a string, got {part.get('text')!r:.60}"
                )
        elif kind == "image":
            problem = _image_problem(part.get("image"))
            if problem:
                errors.append(f"content part {i} (image) {problem}")
        else:
            errors.append(f"content part {i} has type {kind!r}; expected 'text' or 'image'")
    return errors, warnings


def _image_problem(image: Any) -> str | None:
    """Why the rollout could not load ``image`` (a PIL image, a file path or a data URI), or None."""
    if isinstance(image, Image.Image):
        return None
    if not isinstance(image, str):
        return f"needs 'image' as a PIL.Image.Image, a file path or a data URI, got {type(image).__name__}"
    try:
        load_image(image)
    except ImageLoadError as exc:
        return f"cannot be loaded: {str(exc)[:200]}"
    return None


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value)
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return f"a {type(value).__name__}"


_LIBRARY_DIRS = tuple({sysconfig.get_path(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")})


def _raised(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    # Point at the env's own code, not at the json module it called.
    own = [f for f in frames if not f.filename.startswith(_LIBRARY_DIRS) and not f.filename.startswith("<")]
    frame = (own or frames or [None])[-1]
    where = f" at {frame.filename}:{frame.lineno}" if frame is not None else ""
    return f"raised {type(exc).__name__}: {str(exc)[:300]}{where}"


def _run_with_limit(fn: Any, limit_s: float) -> tuple[str, Any, float]:
    """Run ``fn`` in a daemon thread: ("ok", value, s), ("raised", exc, s) or ("hung", None, s).

    A daemon thread, so that a step that never returns cannot keep the checker alive.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # the report shows whatever the env raised
            box["error"] = exc

    thread = threading.Thread(target=target, name="envs-check-step", daemon=True)
    start = time.perf_counter()
    thread.start()
    thread.join(limit_s)
    elapsed = time.perf_counter() - start
    if thread.is_alive():
        return "hung", None, elapsed
    if "error" in box:
        return "raised", box["error"], elapsed
    return "ok", box.get("value"), elapsed


def _call(method: Any, *args: Any) -> Any:
    if inspect.iscoroutinefunction(method):
        return asyncio.run(method(*args))
    result = method(*args)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _functions(tools: Any) -> list[dict[str, Any]]:
    """The well-formed function schemas of a ``TOOLS`` list (the malformed ones are reported by
    :func:`_check_tools`)."""
    if not isinstance(tools, list):
        return []
    return [
        t["function"]
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]


def _tool_of(tools: Any) -> tuple[str, str]:
    """The tool the hostile battery calls: the first one with a string argument (an answer-style
    tool), else the first tool; and that argument."""
    functions = _functions(tools)
    for function in functions:
        properties = (function.get("parameters") or {}).get("properties") or {}
        for name, schema in properties.items():
            if isinstance(schema, dict) and schema.get("type") == "string":
                return function["name"], name
    if functions:
        properties = (functions[0].get("parameters") or {}).get("properties") or {}
        return functions[0]["name"], next(iter(properties), "answer")
    return "calc_score", "answer"


_WRONG_TYPE = {
    "string": ["not", "a", "string"],
    "number": "many",
    "integer": 0.5,
    "boolean": "maybe",
    "array": 7,
}


def tool_inputs(tools: Any, form: str = "json", label: str = "3") -> list[tuple[str, str, bool]]:
    """Calls of every tool in ``tools`` generated from its schema, as (case name, text, valid):
    one valid call (string arguments are ``label`` unless the schema gives examples), then each
    required argument missing, each argument of the wrong type, out of its bounds or outside its
    enum, and a call of a tool that does not exist."""
    cases: list[tuple[str, str, bool]] = []
    for function in _functions(tools):
        name = function["name"]
        parameters = function.get("parameters") or {}
        properties = parameters.get("properties") or {}
        valid = example_arguments(function)
        for key, value in valid.items():
            if isinstance(value, str) and value.startswith("<your "):
                valid[key] = label
        cases.append((f"{name}: valid", _format_call(name, valid, form), True))
        for key in parameters.get("required") or ():
            cases.append(
                (
                    f"{name}: no {key}",
                    _format_call(name, {k: v for k, v in valid.items() if k != key}, form),
                    False,
                )
            )
        for key, schema in properties.items():
            if not isinstance(schema, dict):
                continue
            kind = schema.get("type")
            if isinstance(kind, str) and kind in _WRONG_TYPE:
                bad = {**valid, key: _WRONG_TYPE[kind]}
                cases.append((f"{name}: {key} of the wrong type", _format_call(name, bad, form), False))
            if isinstance(schema.get("maximum"), (int, float)):
                bad = {**valid, key: schema["maximum"] + 1}
                cases.append((f"{name}: {key} above its maximum", _format_call(name, bad, form), False))
            if isinstance(schema.get("minimum"), (int, float)):
                bad = {**valid, key: schema["minimum"] - 1}
                cases.append((f"{name}: {key} below its minimum", _format_call(name, bad, form), False))
            if isinstance(schema.get("enum"), list):
                bad = {**valid, key: "not-one-of-the-options"}
                cases.append((f"{name}: {key} not in its enum", _format_call(name, bad, form), False))
    if cases:
        cases.append(("unknown tool", _format_call("no_such_tool", {"x": "1"}, form), False))
    return cases


@dataclass
class AuthorCase:
    """One case of a ``--cases`` file: model outputs for consecutive turns, and what to expect after the last."""

    name: str
    texts: list[str]
    expect: dict[str, Any] = field(default_factory=dict)


_EXPECT_KEYS = {"done": bool, "score": (int, float), "images": int, "tool_executed": bool}


def load_cases(path: str) -> list[AuthorCase]:
    """Read a ``--cases`` JSONL file; a bad line raises ValueError naming the line and the fix."""
    cases: list[AuthorCase] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"{where}: not valid JSON ({exc.msg}); each line is one JSON object"
                ) from None
            if isinstance(item, str):
                item = {"text": item}
            if not isinstance(item, dict) or "text" not in item:
                raise ValueError(
                    f'{where}: each line needs "text" (a model output, or a list of them, one per turn)'
                )
            texts = item["text"] if isinstance(item["text"], list) else [item["text"]]
            if not texts or not all(isinstance(t, str) for t in texts):
                raise ValueError(f'{where}: "text" must be a string or a non-empty list of strings')
            unknown = set(item) - {"name", "text", "expect"}
            expect = item.get("expect") or {}
            if unknown or not isinstance(expect, dict) or set(expect) - set(_EXPECT_KEYS):
                raise ValueError(
                    f"{where}: unknown keys {sorted(unknown | (set(expect) - set(_EXPECT_KEYS)) if isinstance(expect, dict) else unknown)}; "
                    f'a case has "name", "text" and "expect" with {", ".join(_EXPECT_KEYS)}'
                )
            for key, value in expect.items():
                if isinstance(value, bool) != (_EXPECT_KEYS[key] is bool) or not isinstance(
                    value, _EXPECT_KEYS[key]
                ):
                    raise ValueError(f'{where}: "expect"."{key}" has the wrong type ({value!r})')
            cases.append(AuthorCase(str(item.get("name") or f"case line {number}"), texts, expect))
    return cases


@dataclass
class _Run:
    """What the checker needs across cases."""

    report: CheckReport
    limit_s: float
    slow_s: float
    processing: Any = None
    encoder: Any = None
    response_budget: int | None = None


def check_env_module(
    module_or_path: str | ModuleType,
    *,
    sample: Any = None,
    args: Any = None,
    env_kwargs: dict[str, Any] | None = None,
    step_timeout_s: float = 60.0,
    slow_step_s: float = 10.0,
    cases: Sequence[str] | None = None,
    processing: Any = None,
    author_cases: Sequence[AuthorCase] = (),
    call_form: str | None = None,
    response_budget: int | None = None,
) -> CheckReport:
    """Check an env module against the contract (see the module docstring); never raises.

    ``sample``/``args`` default to :class:`FakeSample` and ``Namespace(max_turns=3)``;
    ``env_kwargs`` go to ``build_env``; ``cases`` restricts the hostile battery to the named cases
    (and skips the schema-generated ones); ``processing`` (a ``rollout.processing.Processing``) runs
    image observations through the real processor and chat template; ``author_cases`` come from
    :func:`load_cases`; ``call_form`` is the tool-call form to write (default: the env's
    ``call_form``, else the form ``args.hf_checkpoint``'s template teaches, else JSON);
    ``response_budget`` (tokens, with a processor): an image observation costing at least half of
    it is a warning, one costing all of it an error.
    """
    target = module_or_path if isinstance(module_or_path, str) else module_or_path.__name__
    report = CheckReport(target)
    try:
        module = load_env_module(module_or_path)
    except EnvLoadError as exc:
        report.error("load", str(exc))
        return report
    sample = sample if sample is not None else FakeSample(multimodal_inputs={"images": [_tiny_image()]})
    args = args if args is not None else argparse.Namespace(max_turns=3)
    kwargs = dict(env_kwargs or {})
    run = _Run(report, step_timeout_s, slow_step_s, processing, response_budget=response_budget)
    if processing is not None:
        from rollout.observation import ObservationEncoder

        run.encoder = ObservationEncoder(processing)

    def build(case: str | None) -> Any:
        status, env, _ = _run_with_limit(
            lambda: build_and_check_env(module, sample, args, **kwargs), step_timeout_s
        )
        if status == "hung":
            report.error("build_env", f"did not return within {step_timeout_s:g} s", case)
            return None
        if status == "raised":
            report.error("build_env", str(env) if isinstance(env, EnvLoadError) else _raised(env), case)
            return None
        return env

    first = build(None)
    if first is None:
        return report
    tools = getattr(module, "TOOLS", None)
    _check_tools(tools, report)
    form = call_form or getattr(first, "call_form", None)
    if form not in CALL_FORMS:
        checkpoint = getattr(args, "hf_checkpoint", None)
        form = call_form_for(str(checkpoint)) if checkpoint else "json"
    tool, argument = _tool_of(tools)
    _close(first, None, report, step_timeout_s)

    label = str(getattr(sample, "label", "3"))
    battery = [(name, text, None) for name, text in step_inputs(tool, argument, form)]
    if cases is not None:
        unknown = set(cases) - {name for name, _, _ in battery}
        if unknown:
            raise ValueError(
                f"unknown check cases {sorted(unknown)}; known: {[name for name, _, _ in battery]}"
            )
        battery = [item for item in battery if item[0] in cases]
    else:
        battery += tool_inputs(tools, form, label)
    for name, text, valid in battery:
        env = build(name)
        if env is None:
            continue
        if _reset(env, name, report, step_timeout_s):
            result = _step(env, name, text, run)
            if isinstance(result, tuple):
                _check_tool_case(name, result[2], valid, report)
        _close(env, name, report, step_timeout_s)

    for case in author_cases:
        env = build(case.name)
        if env is not None:
            _author_case(env, case, run)
            _close(env, case.name, report, step_timeout_s)

    # One env, two episodes: reset must really start over.
    env = build("second episode")
    if env is not None:
        valid_text = step_inputs(tool, argument, form)[0][1]
        for episode in (1, 2):
            case = f"valid call (episode {episode})"
            if not _reset(env, case, report, step_timeout_s):
                break
            if _step(env, case, valid_text, run) is False:
                break  # a step still running in the background must not race the next one
        _close(env, "second episode", report, step_timeout_s)
    if report.timings and not report.reward_sources and not any(t.outcome == "hung" for t in report.timings):
        report.error(
            "reward",
            "no reward signal: the env has no `outcome` with a numeric `score` and no step returned "
            "info['score'], so every episode would score 0. Set env.outcome.score (subclass "
            "envs.tool_env.ToolEnv and return ToolResult(score=...)) or return info['score']",
        )
    return report


def _check_tool_case(case: str, info: Any, valid: bool | None, report: CheckReport) -> None:
    """A valid generated call should run; an invalid one must not."""
    if valid is None or not isinstance(info, dict) or "tool_executed" not in info:
        return
    if valid and not info["tool_executed"]:
        report.warn(
            "TOOLS",
            f"a call with arguments valid for the tool's schema was not run ({str(info.get('error'))[:160]}); "
            "give the schema `examples` the tool accepts",
            case,
        )
    elif valid is False and info["tool_executed"]:
        report.error(
            "step", "ran a call whose arguments break the tool's schema; check arguments before running", case
        )


def _author_case(env: Any, case: AuthorCase, run: _Run) -> None:
    report = run.report
    if not _reset(env, case.name, report, run.limit_s):
        return
    result: Any = None
    for k, text in enumerate(case.texts, 1):
        result = _step(env, case.name if len(case.texts) == 1 else f"{case.name} (turn {k})", text, run)
        if not isinstance(result, tuple):
            return
        if result[1] is True and k < len(case.texts):
            report.error("case", f"the episode ended at turn {k} of {len(case.texts)}", case.name)
            return
    obs, done, info = result
    info = info if isinstance(info, dict) else {}
    got = {
        "done": done,
        "score": _outcome_score(env) if _outcome_score(env) is not None else info.get("score"),
        "images": len(_observation_images(obs)) if isinstance(obs, dict) else 0,
        "tool_executed": info.get("tool_executed"),
    }
    for key, wanted in case.expect.items():
        if got[key] != wanted:
            report.error(
                "case", f"expected {key}={wanted!r} after the last turn, got {got[key]!r}", case.name
            )


def _outcome_score(env: Any) -> Any:
    outcome = getattr(env, "outcome", None)
    if isinstance(outcome, dict):
        return outcome.get("score")
    return getattr(outcome, "score", None) if outcome is not None else None


def _check_tools(tools: Any, report: CheckReport) -> None:
    if tools is None:
        report.warn(
            "TOOLS",
            "the module declares no TOOLS; the rollout renders the module's TOOLS into prompts "
            "(tools_in_prompt), and the checker can only guess how to call the env",
        )
        return
    if not isinstance(tools, list):
        report.error("TOOLS", f"must be a list of OpenAI function schemas, got {type(tools).__name__}")
        return
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            report.error(
                "TOOLS", f'tool {i} must look like {{"type": "function", "function": {{"name": ...}}}}'
            )
        elif not isinstance(function.get("name"), str) or not function["name"]:
            report.error("TOOLS", f"tool {i} has no function name")
        else:
            try:
                json.dumps(tool)
            except (TypeError, ValueError) as exc:
                report.error("TOOLS", f"tool {i} is not JSON-serializable: {exc}")
            parameters = function.get("parameters")
            if parameters is not None and (
                not isinstance(parameters, dict) or parameters.get("type") != "object"
            ):
                report.error(
                    "TOOLS",
                    f"tool {i} ({function['name']}): 'parameters' must be a JSON schema of type object",
                )


def _reset(env: Any, case: str, report: CheckReport, limit_s: float) -> bool:
    """Reset ``env``; False if stepping it next makes no sense (reset raised or hung)."""
    status, value, _ = _run_with_limit(lambda: _call(env.reset), limit_s)
    if status == "hung":
        report.error("reset()", f"did not return within {limit_s:g} s", case)
        return False
    if status == "raised":
        report.error("reset()", _raised(value), case)
        return False
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        report.error(
            "reset()", f"returned {_describe(value)}; expected a tuple (observation: dict, info: dict)", case
        )
        return True
    obs, info = value
    if not isinstance(obs, dict):
        report.error("reset()", f"observation is {_describe(obs)}; expected a dict", case)
    elif obs.get("obs_str") or obs.get("multi_modal_data"):
        report.warn(
            "reset()",
            "returned a non-empty observation; the rollout never inserts it: put the task in the prompt",
        )
    if not isinstance(info, dict):
        report.error("reset()", f"info is {_describe(info)}; expected a dict", case)
    return True


def _step(env: Any, case: str, text: str, run: _Run) -> tuple[Any, Any, Any] | bool:
    """Step ``env`` with ``text`` and check the result: the (obs, done, info) it returned, True if
    it returned something else or raised, False if the step is still running."""
    report, limit_s, slow_s = run.report, run.limit_s, run.slow_s
    status, value, elapsed = _run_with_limit(lambda: _call(env.step, text), limit_s)
    if status == "hung":
        report.timings.append(StepTiming(case, elapsed, "hung"))
        report.error("step", f"did not return within {limit_s:g} s; a step must bound its own work", case)
        return False
    if status == "raised":
        report.timings.append(StepTiming(case, elapsed, "raised"))
        report.error(
            "step", f"{_raised(value)}; step must turn any model text into feedback, never raise", case
        )
        return True
    if not (isinstance(value, (tuple, list)) and len(value) == 3):
        report.timings.append(StepTiming(case, elapsed, "bad return"))
        report.error(
            "step",
            f"returned {_describe(value)}; expected a tuple (observation: dict, done: bool, info: dict)",
            case,
        )
        return True
    obs, done, info = value
    outcome = f"done={done}" if isinstance(done, bool) else f"done={done!r:.20} (not a bool)"
    report.timings.append(StepTiming(case, elapsed, outcome))
    if elapsed > slow_s:
        report.warn("step", f"took more than {slow_s:g} s; every turn of the episode waits for it", case)
    if not isinstance(done, bool):
        report.error("step", f"returned done of type {type(done).__name__}; expected a bool", case)
    if not isinstance(info, dict):
        report.error("step", f"info is {_describe(info)}; expected a dict", case)
    else:
        _check_info(info, case, report)
    _note_reward(env, report)
    if not isinstance(obs, dict):
        report.error(
            "step",
            f"observation is {_describe(obs)}; expected a dict like {{'obs_str': str, 'role': 'tool'}}",
            case,
        )
        return True
    if "obs_str" in obs and not isinstance(obs["obs_str"], str):
        report.error("step", f"observation['obs_str'] is {_describe(obs['obs_str'])}; expected a str", case)
    status, message, _ = _run_with_limit(lambda: env.format_observation(obs), limit_s)
    if status != "ok":
        problem = _raised(message) if status == "raised" else f"did not return within {limit_s:g} s"
        report.error("format_observation", problem, case)
        return obs, done, info
    errors, warnings = check_message(message)
    for problem in errors:
        report.error("format_observation", problem, case)
    for problem in warnings:
        report.warn("format_observation", problem, case)
    if not errors:
        _check_images(obs, message, case, run)
    return obs, done, info


#: The step-info keys the rollout records per turn, and the types it reads them as.
INFO_TYPES: dict[str, tuple[type, ...]] = {
    "tool_executed": (bool,),
    "score": (int, float, type(None)),
    "error": (str, type(None)),
    "tool_call": (dict, type(None)),
}


def _check_info(info: dict[str, Any], case: str, report: CheckReport) -> None:
    for key, types in INFO_TYPES.items():
        if (
            key in info
            and not isinstance(info[key], types)
            or (key == "score" and isinstance(info.get(key), bool))
        ):
            wanted = " or ".join("None" if t is type(None) else t.__name__ for t in types)
            report.error(
                "step", f"info[{key!r}] is {_describe(info[key])}; the rollout records it as {wanted}", case
            )
    if isinstance(info.get("score"), (int, float)) and not isinstance(info["score"], bool):
        report.reward_sources.add("info['score']")


def _note_reward(env: Any, report: CheckReport) -> None:
    outcome = getattr(env, "outcome", None)
    if outcome is None:
        return
    score = _outcome_score(env)
    if isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score):
        report.reward_sources.add("outcome.score")
    else:
        report.error(
            "outcome",
            f"env.outcome.score is {_describe(score)}; rollout.reward reads it as the episode's reward "
            "(a finite number)",
        )


def _observation_images(obs: dict[str, Any]) -> list[Any]:
    media = obs.get("multi_modal_data") or {}
    images = media.get("image", media.get("images")) if isinstance(media, dict) else None
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _check_images(obs: dict[str, Any], message: dict[str, Any], case: str, run: _Run) -> None:
    """The message keeps the observation's images, and each goes through the processor and chat
    template as the rollout will encode it (when the run has a processor)."""
    report = run.report
    content = message.get("content")
    parts = [p["image"] for p in content if p.get("type") == "image"] if isinstance(content, list) else []
    expected = _observation_images(obs)
    if len(parts) < len(expected):
        report.error(
            "format_observation",
            f"the observation has {len(expected)} image(s) but the message keeps {len(parts)}; the model would never see them",
            case,
        )
    if not parts:
        return
    images = [load_image(p) for p in parts]
    if run.encoder is not None:
        from rollout.observation import TemplateShapeError

        try:
            run.encoder.encode_message(message)
        except TemplateShapeError as exc:
            report.error("format_observation", f"the chat template cannot encode it: {exc}", case)
    for image in images:
        pads: int | None = None
        if run.processing is not None:
            try:
                grid = run.processing.process_images([image])["image_grid_thw"]
                pads = run.processing.pads_per_image(grid)[0]
            except Exception as exc:  # the processor's own refusal, e.g. an aspect ratio over 200
                report.error(
                    "format_observation",
                    f"the image processor refuses a {image.width}x{image.height} image "
                    f"({type(exc).__name__}: {str(exc)[:160]}); every episode reaching it would fail",
                    case,
                )
        report.images.append(ImageRecord(case, image.size, pads))
        budget = run.response_budget
        if pads is not None and budget is not None and pads >= budget // 2:
            problem = (
                f"a {image.width}x{image.height} image observation is {pads} image tokens, "
                f"{'all of' if pads >= budget else 'half or more of'} the {budget}-token response budget "
                "(model and env tokens together); an observation that does not fit ends the episode TRUNCATED. "
                "Return smaller images or raise the budget"
            )
            (report.error if pads >= budget else report.warn)("budget", problem, case)


def _close(env: Any, case: str | None, report: CheckReport, limit_s: float) -> None:
    close = getattr(env, "close", None)
    if close is None:
        report.warn("close()", "the env has no close(); the rollout calls it when an episode ends")
        return
    status, value, _ = _run_with_limit(lambda: _call(close), limit_s)
    if status == "raised":
        report.error("close()", _raised(value), case)
    elif status == "hung":
        report.error("close()", f"did not return within {limit_s:g} s", case)


def _parse_kwarg(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set takes key=value, got {item!r}")
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m envs.check", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="env module: a dotted name (envs.geo3k) or a .py file")
    parser.add_argument("--label", default="3", help="the fake sample's label (default: 3)")
    parser.add_argument(
        "--max-turns", type=int, default=3, help="args.max_turns given to build_env (default: 3)"
    )
    parser.add_argument(
        "--set",
        dest="kwargs",
        action="append",
        default=[],
        type=_parse_kwarg,
        metavar="KEY=VALUE",
        help="keyword argument for build_env, value parsed as JSON when it parses (repeatable)",
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILY_PRESETS),
        help="run image observations through this model family's processor and chat template "
        "(its tiny offline preset; no download)",
    )
    parser.add_argument(
        "--model", help="a preset name (see models/README.md) or checkpoint directory, instead of --family"
    )
    parser.add_argument(
        "--cases", help="a JSONL file of your own model outputs to step through (see the module docstring)"
    )
    parser.add_argument(
        "--response-budget",
        type=int,
        default=None,
        help="the episode's response budget in tokens (max_new_tokens): with --family/--model, image "
        "observations that take half of it warn, ones that take all of it fail",
    )
    parser.add_argument(
        "--call-form", choices=CALL_FORMS, help="tool-call form to write (default: what the env reads)"
    )
    parser.add_argument("--step-timeout", type=float, default=60.0, help="hard limit per call, seconds")
    parser.add_argument(
        "--slow-step", type=float, default=10.0, help="warn about steps slower than this, seconds"
    )
    options = parser.parse_args(argv)
    if options.family and options.model:
        parser.error("pass --family or --model, not both")
    try:
        author_cases = load_cases(options.cases) if options.cases else []
    except (OSError, ValueError) as exc:
        parser.error(f"--cases: {exc}")
    sample = FakeSample(label=options.label, multimodal_inputs={"images": [_tiny_image()]})
    args = argparse.Namespace(max_turns=options.max_turns)
    processing = None
    model = options.model or (FAMILY_PRESETS[options.family] if options.family else None)
    if model:
        from models import load_processing, resolve_checkpoint
        from rollout.processing import Processing

        policy = load_processing(model)
        processing = Processing.from_tokenizer_and_processor(policy.tokenizer, policy.processor)
        args.hf_checkpoint = str(resolve_checkpoint(model))
    report = check_env_module(
        options.target,
        sample=sample,
        args=args,
        env_kwargs=dict(options.kwargs),
        step_timeout_s=options.step_timeout,
        slow_step_s=options.slow_step,
        processing=processing,
        author_cases=author_cases,
        call_form=options.call_form,
        response_budget=options.response_budget,
    )
    print(report.render())
    close_default_grader()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
