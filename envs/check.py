"""A checker for env authors: ``python -m envs.check <module-or-file>``.

It loads the env module, builds an env from a small fake sample (label ``"3"``), and steps fresh
envs through a battery of model outputs: a valid call, a wrong answer, garbage, empty text, 1 MB of
text, unicode, malformed JSON, an unterminated call, several calls, 10,000 nested braces, a final
``\\boxed{}`` answer and an answer that is hostile to math grading. For each it checks what the rest
of the project relies on:

- ``build_env`` returns an object with ``reset``, ``step`` and ``format_observation``;
- ``reset()`` returns ``(dict, dict)`` and ``step(text)`` returns ``(dict, bool, dict)``;
- ``step`` never raises on model text, and returns within ``step_timeout_s``;
- ``format_observation(obs)`` returns a chat message: ``role`` a string, ``content`` a string or a
  list of ``{"type": "text", "text": str}`` / ``{"type": "image", "image": PIL.Image}`` parts;
- ``close()`` does not raise.

It prints a report with the time of every step and exits with status 1 on any error. Tests call
:func:`check_env_module`, which returns the :class:`CheckReport` instead.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
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
from envs.loader import EnvLoadError, build_and_check_env, load_env_module
from envs.tool_calls import format_call

__all__ = [
    "CheckReport",
    "FakeSample",
    "Violation",
    "StepTiming",
    "check_env_module",
    "check_message",
    "main",
    "step_inputs",
]

KNOWN_ROLES = ("system", "user", "assistant", "tool")


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


@dataclass
class CheckReport:
    target: str
    errors: list[Violation] = field(default_factory=list)
    warnings: list[Violation] = field(default_factory=list)
    timings: list[StepTiming] = field(default_factory=list)

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
    return Image.new("RGB", (28, 28), (255, 255, 255))


def step_inputs(tool: str = "calc_score", argument: str = "answer") -> list[tuple[str, str]]:
    """The battery of model outputs every env must survive, as (case name, text)."""
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
            if not isinstance(part.get("image"), Image.Image):
                got = type(part.get("image")).__name__
                errors.append(f"content part {i} (image) needs 'image' as a PIL.Image.Image, got {got}")
        else:
            errors.append(f"content part {i} has type {kind!r}; expected 'text' or 'image'")
    return errors, warnings


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


def _tool_of(env: Any) -> tuple[str, str]:
    """The first tool the env declares in ``env.tools`` (OpenAI format) and its first argument."""
    tools = getattr(env, "tools", None)
    try:
        function = tools[0]["function"]
        params = function.get("parameters") or {}
        names = list(params.get("required") or params.get("properties") or ["answer"])
        return str(function["name"]), str(names[0])
    except (TypeError, KeyError, IndexError, AttributeError):
        return "calc_score", "answer"


def check_env_module(
    module_or_path: str | ModuleType,
    *,
    sample: Any = None,
    args: Any = None,
    env_kwargs: dict[str, Any] | None = None,
    step_timeout_s: float = 60.0,
    slow_step_s: float = 10.0,
    cases: Sequence[str] | None = None,
) -> CheckReport:
    """Check an env module against the protocol (see the module docstring); never raises.

    ``sample``/``args`` default to :class:`FakeSample` and ``Namespace(max_turns=3)``;
    ``env_kwargs`` go to ``build_env``; ``cases`` restricts the battery to the named cases.
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
    _check_tools(first, report)
    tool, argument = _tool_of(first)
    _close(first, None, report, step_timeout_s)

    battery = step_inputs(tool, argument)
    if cases is not None:
        unknown = set(cases) - {name for name, _ in battery}
        if unknown:
            raise ValueError(f"unknown check cases {sorted(unknown)}; known: {[name for name, _ in battery]}")
        battery = [(name, text) for name, text in battery if name in cases]
    for name, text in battery:
        env = build(name)
        if env is None:
            continue
        if _reset(env, name, report, step_timeout_s):
            _step(env, name, text, report, step_timeout_s, slow_step_s)
        _close(env, name, report, step_timeout_s)

    # One env, two episodes: reset must really start over.
    env = build("second episode")
    if env is not None:
        valid = step_inputs(tool, argument)[0][1]
        for episode in (1, 2):
            case = f"valid call (episode {episode})"
            if not _reset(env, case, report, step_timeout_s):
                break
            if not _step(env, case, valid, report, step_timeout_s, slow_step_s):
                break  # a step still running in the background must not race the next one
        _close(env, "second episode", report, step_timeout_s)
    return report


def _check_tools(env: Any, report: CheckReport) -> None:
    tools = getattr(env, "tools", None)
    if tools is None:
        report.warn(
            "env.tools", "the env declares no tools; chat templates render tools=env.tools into the prompt"
        )
        return
    if not isinstance(tools, list):
        report.error("env.tools", f"must be a list of OpenAI function schemas, got {type(tools).__name__}")
        return
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            report.error(
                "env.tools", f'tool {i} must look like {{"type": "function", "function": {{"name": ...}}}}'
            )
        elif not isinstance(function.get("name"), str) or not function["name"]:
            report.error("env.tools", f"tool {i} has no function name")
        else:
            try:
                json.dumps(tool)
            except (TypeError, ValueError) as exc:
                report.error("env.tools", f"tool {i} is not JSON-serializable: {exc}")


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
    if not isinstance(info, dict):
        report.error("reset()", f"info is {_describe(info)}; expected a dict", case)
    return True


def _step(env: Any, case: str, text: str, report: CheckReport, limit_s: float, slow_s: float) -> bool:
    """Step ``env`` with ``text`` and check the result; False if the step is still running."""
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
        return True
    errors, warnings = check_message(message)
    for problem in errors:
        report.error("format_observation", problem, case)
    for problem in warnings:
        report.warn("format_observation", problem, case)
    return True


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
    parser.add_argument("--step-timeout", type=float, default=60.0, help="hard limit per call, seconds")
    parser.add_argument(
        "--slow-step", type=float, default=10.0, help="warn about steps slower than this, seconds"
    )
    options = parser.parse_args(argv)
    sample = FakeSample(label=options.label, multimodal_inputs={"images": [_tiny_image()]})
    report = check_env_module(
        options.target,
        sample=sample,
        args=argparse.Namespace(max_turns=options.max_turns),
        env_kwargs=dict(options.kwargs),
        step_timeout_s=options.step_timeout,
        slow_step_s=options.slow_step,
    )
    print(report.render())
    close_default_grader()
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
