"""A base for tool-calling envs: parse the call, check it against the tool's schema, run it, give feedback.

A tool env declares its tools as OpenAI function schemas in ``TOOLS`` and implements each one as a
method ``tool_<name>(self, **arguments)``. Everything around the tool is here, the same for every
env (see docs/environments.md for a walk-through)::

    class MyEnv(ToolEnv):
        TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {...}}}]

        def tool_lookup(self, key: str) -> ToolResult:
            return ToolResult(f"{key} = {self.table[key]}", score=1.0 if ... else 0.0, done=...)

Per turn, :meth:`ToolEnv.step`

- finds the first tool call in the model's text, in the form the chat template teaches (JSON, or
  Qwen3.5's XML; ``call_form``), through :func:`envs.tool_calls.parse_tool_call`;
- checks its arguments against the tool's JSON schema (types, ``enum``, bounds, required
  arguments, ``additionalProperties: false``); a malformed call, an unknown tool or a bad argument
  is not run: the feedback says what was wrong and shows a correct call of that tool;
- runs the tool's method; :class:`ToolResult` carries the feedback text, images (shown to the
  model as an image observation), a score and whether the episode is over. A method that raises
  :class:`ToolInputError` gets that message back as feedback; any other exception is a bug in the
  env and propagates (the rollout marks the episode FAILED, ``python -m envs.check`` reports it);
- with no tool call at all, :meth:`ToolEnv.no_tool_call` decides (default: the episode ends);
- tells the model how many turns are left, and on the turn before the last, that it is its last
  chance (``LAST_CHANCE``).

The reward is :attr:`ToolEnv.outcome` (a :class:`ToolOutcome`): ``score`` is the best score any tool
result (or a graded final answer) reported. The step info carries the keys the rollout records per
turn: ``tool_executed``, ``tool_call`` (``{"name", "arguments"}``), ``score``, ``answer``, ``error``.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from envs.base import BaseInteractionEnv
from envs.tool_calls import (
    CALL_FORMS,
    ParseResult,
    ToolCall,
    ToolCallError,
    ToolCallErrorKind,
    ToolSpec,
    format_call,
    parse_tool_call,
)

__all__ = [
    "ToolEnv",
    "ToolInputError",
    "ToolOutcome",
    "ToolResult",
    "example_arguments",
    "validate_arguments",
]


class ToolInputError(ValueError):
    """Raised by a tool method for arguments its schema cannot express as wrong (an empty crop box,
    a key that does not exist): the message is shown to the model, and the call counts as invalid."""


@dataclass
class ToolResult:
    """What one tool call produced."""

    #: Feedback shown to the model.
    text: str
    #: Images shown to the model with the text (PIL images, file paths or data URIs).
    images: list[Any] = field(default_factory=list)
    #: A graded result in [0, 1]; the outcome's score is the best one of the episode.
    score: float | None = None
    #: True ends the episode (say, a correct answer); ``done_reason`` says why.
    done: bool = False
    done_reason: str | None = None
    #: Extra keys for this turn's step info.
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class ToolOutcome:
    """What the episode achieved; ``rollout.reward`` reads ``score``, never the feedback text."""

    score: float = 0.0
    turns: int = 0
    valid_tool_calls: int = 0
    invalid_tool_calls: int = 0
    #: "no_tool_call", "max_turns" or a tool result's ``done_reason`` once the episode is over.
    done_reason: str | None = None

    @property
    def grader_unavailable(self) -> bool:
        """True when a score is missing because of our side (a grader down), not the model: the
        rollout then fails the episode instead of training on a score of 0."""
        return False


class ToolEnv(BaseInteractionEnv):
    """Tool dispatch, schema checks, feedback and the outcome; subclasses add ``TOOLS`` and
    ``tool_<name>`` methods (see the module docstring)."""

    #: The tools, OpenAI function format; build_env's module exposes the same list as ``TOOLS``.
    TOOLS: ClassVar[list[dict[str, Any]]] = []
    #: Other names a tool answers to: {"canonical": ("alias", ...)}.
    TOOL_ALIASES: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: Examples quoted when an argument has the wrong type: {"answer": "7/2"}.
    ARGUMENT_EXAMPLES: ClassVar[dict[str, Any]] = {}
    LAST_CHANCE: ClassVar[str] = "This is your last turn: do not call a tool again; give your final answer."
    outcome_class: ClassVar[type[ToolOutcome]] = ToolOutcome

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for schema in cls.TOOLS:
            name = schema.get("function", schema).get("name")
            if not callable(getattr(cls, f"tool_{name}", None)):
                raise TypeError(
                    f"{cls.__name__} declares the tool {name!r} in TOOLS but has no method tool_{name}"
                )

    def __init__(self, *, max_turns: int = 3, call_form: str = "json", role: str = "tool") -> None:
        if call_form not in CALL_FORMS:
            raise ValueError(f"call_form must be one of {', '.join(CALL_FORMS)}, got {call_form!r}")
        self.max_turns = max_turns
        self.call_form = call_form
        self.role = role
        self._specs = tuple(
            ToolSpec.from_schema(t, aliases=self.TOOL_ALIASES.get(t.get("function", t)["name"], ()))
            for t in self.TOOLS
        )
        self._schemas = {t.get("function", t)["name"]: t.get("function", t) for t in self.TOOLS}
        self.outcome = self.outcome_class()
        self.turn = 0
        self.done = False

    @property
    def tools(self) -> list[dict[str, Any]]:
        """A copy of ``TOOLS``: a caller may edit it without touching any other env's."""
        return copy.deepcopy(self.TOOLS)

    @property
    def tool_names(self) -> list[str]:
        return [name for spec in self._specs for name in spec.names]

    # -- protocol --------------------------------------------------------------------------------

    def reset(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self.outcome = self.outcome_class()
        self.turn = 0
        self.done = False
        # The task and its images are in the prompt: the rollout never inserts a reset observation.
        return {}, {"max_turns": self.max_turns, "tools": self.tool_names}

    def step(self, response_text: str) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        if not isinstance(response_text, str):
            raise TypeError(
                f"{type(self).__name__}.step takes the model's text as str, got {type(response_text).__name__}"
            )
        if self.done:
            raise RuntimeError(
                f"{type(self).__name__}.step called after the episode ended; call reset() first"
            )
        self.turn += 1
        self.outcome.turns = self.turn
        info = self.new_info()
        parsed = parse_tool_call(response_text, self._specs, form=self.call_form)
        info["ignored_tool_calls"] = parsed.ignored_blocks
        if parsed.error is not None and parsed.error.kind is ToolCallErrorKind.NO_BLOCK:
            return self._finish(ToolResult(self.no_tool_call(response_text, info)), "no_tool_call", info)
        result = self._run(parsed, info)
        if result.done:
            return self._finish(result, result.done_reason or "done", info)
        text = result.text
        if parsed.ignored_blocks:
            text = _sentence(
                text,
                f"Only your first tool call was run; {parsed.ignored_blocks} later call(s) were ignored.",
            )
        if self.turn >= self.max_turns:
            return self._finish(ToolResult(text, result.images), "max_turns", info)
        if self.turn == self.max_turns - 1:
            text = _sentence(text, self.LAST_CHANCE)
        else:
            text = _sentence(text, f"You have {self.max_turns - self.turn} turns left.")
        return self.observation(text, result.images), False, info

    # -- hooks -----------------------------------------------------------------------------------

    def new_info(self) -> dict[str, Any]:
        """This turn's step info before anything ran (subclasses add their own keys)."""
        return {
            "turn": self.turn,
            "tool_executed": False,
            "tool_call": None,
            "answer": None,
            "score": None,
            "error": None,
            "error_kind": None,
            "ignored_tool_calls": 0,
        }

    def no_tool_call(self, response_text: str, info: dict[str, Any]) -> str:
        """Feedback for a turn without a tool call, which ends the episode (grade a final answer here)."""
        return "No tool call found; the episode is over."

    def expected_call(self, tool: str | None = None) -> str:
        """A correct call of ``tool`` (the first tool when None), shown after a bad call."""
        name = tool if tool in self._schemas else next(iter(self._schemas))
        return format_call(name, example_arguments(self._schemas[name]), self.call_form)

    def record_score(self, score: float) -> None:
        """A graded result: the outcome keeps the best one."""
        self.outcome.score = max(self.outcome.score, float(score))

    def observation(self, text: str, images: list[Any] | None = None) -> dict[str, Any]:
        obs: dict[str, Any] = {"obs_str": text, "role": self.role}
        if images:
            obs["multi_modal_data"] = {"image": list(images)}
        return obs

    # -- helpers ---------------------------------------------------------------------------------

    def _run(self, parsed: ParseResult, info: dict[str, Any]) -> ToolResult:
        call = parsed.call
        error = parsed.error
        arguments: dict[str, Any] | None = None
        if call is not None:
            arguments, error = validate_arguments(
                self._schemas[call.name], call.arguments, self.ARGUMENT_EXAMPLES
            )
        if error is None and call is not None and arguments is not None:
            try:
                result = getattr(self, f"tool_{call.name}")(**arguments)
            except ToolInputError as exc:
                error = ToolCallError(ToolCallErrorKind.INVALID_ARGUMENTS, str(exc))
            else:
                return self._executed(call, arguments, result, info)
        assert error is not None  # a ParseResult has exactly one of call and error
        self.outcome.invalid_tool_calls += 1
        info.update(error=error.message, error_kind=error.kind.value)
        tool = call.name if call is not None else error.suggestion
        return ToolResult(
            f"Your tool call was not run: {error.message}. The expected format is:\n{self.expected_call(tool)}\n"
        )

    def _executed(
        self, call: ToolCall, arguments: dict[str, Any], result: Any, info: dict[str, Any]
    ) -> ToolResult:
        if isinstance(result, str):
            result = ToolResult(result)
        if not isinstance(result, ToolResult):
            raise TypeError(
                f"{type(self).__name__}.tool_{call.name} returned {type(result).__name__}; return a ToolResult or a str"
            )
        self.outcome.valid_tool_calls += 1
        info.update(tool_executed=True, tool_call={"name": call.name, "arguments": arguments})
        if result.score is not None:
            self.record_score(result.score)
            info["score"] = result.score
        info.update(result.info)
        return result

    def _finish(
        self, result: ToolResult, reason: str, info: dict[str, Any]
    ) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        self.done = True
        self.outcome.done_reason = reason
        info["done_reason"] = reason
        # The rollout inserts no observation once the episode is over; it is returned for logs.
        return self.observation(result.text, result.images), True, info


def _sentence(text: str, sentence: str) -> str:
    return f"{text}{sentence}" if text.endswith("\n") else f"{text} {sentence}"


# -- schemas ---------------------------------------------------------------------------------------

_TYPE_NAMES = {
    "string": "a string",
    "number": "a number",
    "integer": "an integer",
    "boolean": "true or false",
    "array": "an array",
    "object": "an object",
}


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, float) and not math.isfinite(value):
        return "non-finite number"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if value is None:
        return "null"
    return "object"


def _matches(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return isinstance(value, list)
    if kind == "object":
        return isinstance(value, dict)
    return kind == "null" and value is None


def _coerce(value: Any, kinds: list[str]) -> Any:
    """What a model commonly writes for a typed argument, read the way it was meant: a number for a
    string (``{"answer": 3.5}``), and a string holding JSON for anything else (Qwen3.5's XML form
    carries every value as text)."""
    if "string" in kinds and _matches(value, "number"):
        return json.dumps(value)
    if isinstance(value, str) and "string" not in kinds:
        try:
            decoded = json.loads(value)
        except (ValueError, RecursionError):
            return value
        if (
            isinstance(decoded, float)
            and float(decoded).is_integer()
            and "integer" in kinds
            and "number" not in kinds
        ):
            return value
        return decoded
    return value


def validate_arguments(
    function: dict[str, Any], arguments: dict[str, Any], examples: dict[str, Any] | None = None
) -> tuple[dict[str, Any] | None, ToolCallError | None]:
    """Arguments checked against ``function["parameters"]`` (a JSON-schema subset: ``type``,
    ``enum``, ``minimum``/``maximum``, ``minItems``/``maxItems``, ``required``,
    ``additionalProperties: false``): (coerced arguments, None) or (None, the error for the model).
    Arguments the schema does not name are dropped, or refused with ``additionalProperties: false``."""
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    name = function.get("name", "the tool")
    out: dict[str, Any] = {}
    for key, value in arguments.items():
        schema = properties.get(key)
        if schema is None:
            if parameters.get("additionalProperties") is False:
                known = ", ".join(f'"{k}"' for k in properties) or "none"
                return None, _invalid(f'{name} has no argument "{key[:60]}" (its arguments: {known})')
            # Dropped, not passed on: the tool method's signature has no place for it.
            continue
        problem, value = _check_value(key, value, schema, (examples or {}).get(key, _first_example(schema)))
        if problem:
            return None, _invalid(problem)
        out[key] = value
    for key in parameters.get("required") or ():
        if key not in out:
            return None, ToolCallError(
                ToolCallErrorKind.MISSING_ARGUMENT,
                f'the call to {name} is missing the required argument "{key}"',
            )
    return out, None


def _check_value(key: str, value: Any, schema: dict[str, Any], example: Any) -> tuple[str | None, Any]:
    declared = schema.get("type")
    kinds = [declared] if isinstance(declared, str) else list(declared or [])
    if kinds:
        value = _coerce(value, kinds)
        if not any(_matches(value, kind) for kind in kinds):
            wanted = " or ".join(_TYPE_NAMES.get(kind, kind) for kind in kinds)
            such_as = f" such as {json.dumps(example, ensure_ascii=False)}" if example is not None else ""
            return f'the argument "{key}" must be {wanted}{such_as}, got a JSON {_json_kind(value)}', value
    if "enum" in schema and value not in schema["enum"]:
        options = ", ".join(json.dumps(option, ensure_ascii=False) for option in schema["enum"])
        return (
            f'the argument "{key}" must be one of {options}, got {json.dumps(value, ensure_ascii=False)[:60]}',
            value,
        )
    if _matches(value, "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = (
                f"between {low} and {high}"
                if low is not None and high is not None
                else (f"at least {low}" if low is not None else f"at most {high}")
            )
            return f'the argument "{key}" must be {bounds}, got {value}', value
    if isinstance(value, list):
        low, high = schema.get("minItems"), schema.get("maxItems")
        if (low is not None and len(value) < low) or (high is not None and len(value) > high):
            return (
                f'the argument "{key}" must have {low if low == high else f"{low}..{high}"} items, got {len(value)}',
                value,
            )
    return None, value


def _first_example(schema: dict[str, Any]) -> Any:
    examples = schema.get("examples")
    return examples[0] if isinstance(examples, list) and examples else None


def _invalid(message: str) -> ToolCallError:
    return ToolCallError(ToolCallErrorKind.INVALID_ARGUMENTS, message)


def example_arguments(function: dict[str, Any]) -> dict[str, Any]:
    """Arguments for a correct call of ``function``, for feedback: each required argument's first
    schema example, else its first ``enum`` value, else a placeholder of its type."""
    parameters = function.get("parameters") or {}
    properties = parameters.get("properties") or {}
    out: dict[str, Any] = {}
    for key in parameters.get("required") or list(properties):
        schema = properties.get(key) or {}
        example = _first_example(schema)
        if example is None and schema.get("enum"):
            example = schema["enum"][0]
        if example is None:
            kind = schema.get("type")
            kind = kind[0] if isinstance(kind, list) and kind else kind
            example = {
                "number": schema.get("minimum", 0),
                "integer": schema.get("minimum", 0),
                "boolean": True,
                "array": [],
                "object": {},
            }.get(kind, f"<your {key}>")
        out[key] = example
    return out
