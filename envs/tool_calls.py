"""Tool-call parsing shared by all environments.

The model calls a tool by writing a block::

    <tool_call>{"name": "calc_score", "arguments": {"answer": "7/2"}}</tool_call>

:func:`parse_tool_call` finds such blocks, decodes the first complete one with strict JSON
(``json.loads``), and checks it against the env's :class:`ToolSpec` list. It accepts two payload
shapes: ``{"name": ..., "arguments": {...}}`` (arguments may also be a JSON-encoded string, as
OpenAI-style serializers write them) and ``{"function": {"name": ..., "arguments": ...}}``.

Which call counts: **the first complete block is the call**. If that block is malformed the turn's
call is malformed, even if a later block is fine; blocks after it are counted in
:attr:`ParseResult.ignored_blocks` so that the env can say they were ignored. One call per turn keeps
the episode simple to grade and to learn from.

Every failure is reported as a :class:`ToolCallError` with a :class:`ToolCallErrorKind` and a message
written for the model (what was wrong and what to write instead), never as an exception.

The scanner works on hostile text in linear time: it uses ``str.find`` (no regular expressions
that can backtrack), decodes only one block, caps a block's size at :data:`MAX_BLOCK_CHARS` and
counts at most :data:`MAX_BLOCKS` blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from envs.base import nearest_name

__all__ = [
    "CLOSE_TAG",
    "MAX_BLOCKS",
    "MAX_BLOCK_CHARS",
    "OPEN_TAG",
    "ParseResult",
    "ToolCall",
    "ToolCallError",
    "ToolCallErrorKind",
    "ToolSpec",
    "format_call",
    "parse_tool_call",
]

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
#: A call is a few hundred characters; anything far larger is not a call worth decoding.
MAX_BLOCK_CHARS = 65_536
#: Blocks counted per response; later ones are not even located.
MAX_BLOCKS = 64
_SNIPPET_CHARS = 24


class ToolCallErrorKind(str, Enum):
    """What was wrong with the model's tool call."""

    NO_BLOCK = "no_block"
    UNTERMINATED_BLOCK = "unterminated_block"
    BLOCK_TOO_LARGE = "block_too_large"
    INVALID_JSON = "invalid_json"
    NOT_AN_OBJECT = "not_an_object"
    NO_NAME = "no_name"
    UNKNOWN_TOOL = "unknown_tool"
    INVALID_ARGUMENTS = "invalid_arguments"
    MISSING_ARGUMENT = "missing_argument"
    EMPTY_ARGUMENT = "empty_argument"


@dataclass(frozen=True)
class ToolSpec:
    """What the parser needs to know about one tool: its name, aliases and required arguments."""

    name: str
    required: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_schema(cls, schema: dict[str, Any], aliases: Sequence[str] = ()) -> ToolSpec:
        """Build a spec from an OpenAI function schema (``{"type": "function", "function": {...}}``)."""
        function = schema.get("function", schema)
        parameters = function.get("parameters") or {}
        return cls(
            name=function["name"],
            required=tuple(parameters.get("required") or ()),
            aliases=tuple(aliases),
        )

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class ToolCall:
    """A decoded, validated call. ``name`` is the canonical tool name (aliases resolved)."""

    name: str
    arguments: dict[str, Any]
    called_as: str
    #: (start, end) offsets of the whole ``<tool_call>...</tool_call>`` block in the text.
    span: tuple[int, int]


@dataclass(frozen=True)
class ToolCallError:
    """Why the turn's call could not be run. ``message`` is meant to be shown to the model."""

    kind: ToolCallErrorKind
    message: str
    span: tuple[int, int] | None = None
    #: For INVALID_JSON: 1-based line and column inside the block, and the offset in the whole text.
    line: int | None = None
    column: int | None = None
    position: int | None = None
    #: For UNKNOWN_TOOL: the nearest known tool name, when one is close.
    suggestion: str | None = None


@dataclass(frozen=True)
class ParseResult:
    """Outcome of parsing one response: exactly one of ``call`` and ``error`` is set."""

    call: ToolCall | None = None
    error: ToolCallError | None = None
    #: Complete blocks found (at most MAX_BLOCKS).
    blocks: int = 0
    #: Complete blocks after the one that counted; they were not run.
    ignored_blocks: int = 0
    #: Opening tags with no closing tag before the next block (or the end of the text).
    stray_open_tags: int = 0
    #: True when the scan stopped at MAX_BLOCKS.
    truncated: bool = False
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.call is not None


@dataclass(frozen=True)
class _Blocks:
    spans: list[tuple[int, int, int, int]]  # (block_start, body_start, body_end, block_end)
    stray_open_tags: int
    unterminated_at: int | None
    truncated: bool


def _scan_blocks(text: str) -> _Blocks:
    spans: list[tuple[int, int, int, int]] = []
    stray = 0
    unterminated_at: int | None = None
    close = -1
    pos = 0
    while True:
        start = text.find(OPEN_TAG, pos)
        if start < 0:
            break
        if len(spans) >= MAX_BLOCKS:
            return _Blocks(spans, stray, unterminated_at, truncated=True)
        body_start = start + len(OPEN_TAG)
        # The closing tag found for an earlier stray opening tag is reused, so that many stray
        # opening tags before one closing tag cost one scan, not one scan each.
        if close < body_start:
            close = text.find(CLOSE_TAG, body_start)
        if close < 0:
            unterminated_at = start
            break
        reopened = text.find(OPEN_TAG, body_start, close)
        if reopened >= 0:
            stray += 1
            pos = reopened
            continue
        end = close + len(CLOSE_TAG)
        spans.append((start, body_start, close, end))
        pos = end
    return _Blocks(spans, stray, unterminated_at, truncated=False)


def format_call(name: str, arguments: dict[str, Any]) -> str:
    """The exact text of a well-formed call, for "write it like this" feedback."""
    payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN_TAG}{payload}{CLOSE_TAG}"


def parse_tool_call(text: str, tools: Sequence[ToolSpec] | None = None) -> ParseResult:
    """Parse the first complete ``<tool_call>`` block of ``text`` (see the module docstring).

    ``tools``: the tools the env offers; a call to another name is an UNKNOWN_TOOL error and
    required arguments are checked. ``None`` accepts any tool name and checks no arguments.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_call expects the response text as str, got {type(text).__name__}")
    scan = _scan_blocks(text)
    common = {
        "blocks": len(scan.spans),
        "stray_open_tags": scan.stray_open_tags,
        "truncated": scan.truncated,
    }
    if not scan.spans:
        if scan.unterminated_at is not None:
            return ParseResult(
                error=ToolCallError(
                    ToolCallErrorKind.UNTERMINATED_BLOCK,
                    f"the {OPEN_TAG} block is not closed: write {CLOSE_TAG} right after the JSON object",
                    span=(scan.unterminated_at, len(text)),
                ),
                **common,
            )
        return ParseResult(
            error=ToolCallError(
                ToolCallErrorKind.NO_BLOCK,
                f"no tool call found: a call is a JSON object between {OPEN_TAG} and {CLOSE_TAG}",
            ),
            **common,
        )

    ignored = len(scan.spans) - 1
    notes = []
    if ignored:
        more = " or more" if scan.truncated else ""
        notes.append(f"only the first tool call was run; {ignored}{more} later call(s) were ignored")
    block = scan.spans[0]
    call, error = _decode_block(text, block, tools)
    return ParseResult(call=call, error=error, ignored_blocks=ignored, notes=tuple(notes), **common)


def _decode_block(
    text: str, block: tuple[int, int, int, int], tools: Sequence[ToolSpec] | None
) -> tuple[ToolCall | None, ToolCallError | None]:
    start, body_start, body_end, end = block
    span = (start, end)
    if body_end - body_start > MAX_BLOCK_CHARS:
        return None, ToolCallError(
            ToolCallErrorKind.BLOCK_TOO_LARGE,
            f"the {OPEN_TAG} block is {body_end - body_start} characters long (the limit is "
            f"{MAX_BLOCK_CHARS}): a call holds one small JSON object",
            span=span,
        )
    body = text[body_start:body_end]
    if not body.strip():
        return None, ToolCallError(
            ToolCallErrorKind.INVALID_JSON,
            f'the {OPEN_TAG} block is empty: put a JSON object with "name" and "arguments" in it',
            span=span,
            line=1,
            column=1,
            position=body_start,
        )
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        near = body[max(0, exc.pos - _SNIPPET_CHARS // 2) : exc.pos + _SNIPPET_CHARS // 2]
        return None, ToolCallError(
            ToolCallErrorKind.INVALID_JSON,
            f"the tool call is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno} "
            f"(near {near!r}); use double quotes for keys and strings and no trailing commas",
            span=span,
            line=exc.lineno,
            column=exc.colno,
            position=body_start + exc.pos,
        )
    except RecursionError:
        return None, ToolCallError(
            ToolCallErrorKind.INVALID_JSON,
            "the tool call is not valid JSON: it is nested too deeply to decode",
            span=span,
        )
    return _validate_payload(payload, span, tools)


def _validate_payload(
    payload: Any, span: tuple[int, int], tools: Sequence[ToolSpec] | None
) -> tuple[ToolCall | None, ToolCallError | None]:
    if not isinstance(payload, dict):
        hint = " (one call per block, not a list)" if isinstance(payload, list) else ""
        return None, ToolCallError(
            ToolCallErrorKind.NOT_AN_OBJECT,
            f"the tool call must be a JSON object, got a JSON {_json_type(payload)}{hint}",
            span=span,
        )
    container = payload
    function = payload.get("function")
    if "name" not in payload and isinstance(function, dict):
        container = function
    name = container.get("name")
    if not isinstance(name, str) or not name.strip():
        got = 'no "name" key' if name is None else f'"name" = {json.dumps(name)[:40]}'
        return None, ToolCallError(
            ToolCallErrorKind.NO_NAME,
            f'the tool call needs a non-empty string "name"; got {got}',
            span=span,
        )
    name = name.strip()

    spec: ToolSpec | None = None
    if tools is not None:
        spec = next((t for t in tools if name in t.names), None)
        if spec is None:
            known = [n for t in tools for n in t.names]
            suggestion = nearest_name(name, known)
            hint = f" Did you mean '{suggestion}'?" if suggestion else ""
            return None, ToolCallError(
                ToolCallErrorKind.UNKNOWN_TOOL,
                f"unknown tool '{name[:80]}'.{hint} Available tools: {', '.join(known)}",
                span=span,
                suggestion=suggestion,
            )

    arguments, error = _decode_arguments(container, span)
    if error is not None:
        return None, error
    assert arguments is not None
    if spec is not None:
        for key in spec.required:
            if key not in arguments:
                hint = ' (use "arguments", not "parameters")' if "parameters" in container else ""
                return None, ToolCallError(
                    ToolCallErrorKind.MISSING_ARGUMENT,
                    f'the call to {spec.name} is missing the required argument "{key}"{hint}',
                    span=span,
                )
            value = arguments[key]
            if value is None or (isinstance(value, str) and not value.strip()):
                return None, ToolCallError(
                    ToolCallErrorKind.EMPTY_ARGUMENT,
                    f'the argument "{key}" of {spec.name} is empty',
                    span=span,
                )
    canonical = spec.name if spec is not None else name
    return ToolCall(name=canonical, arguments=arguments, called_as=name, span=span), None


def _decode_arguments(
    container: dict[str, Any], span: tuple[int, int]
) -> tuple[dict[str, Any] | None, ToolCallError | None]:
    arguments = container.get("arguments", {})
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        # OpenAI's wire format encodes the arguments object as a JSON string.
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (json.JSONDecodeError, RecursionError) as exc:
            detail = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            return None, ToolCallError(
                ToolCallErrorKind.INVALID_ARGUMENTS,
                f'"arguments" is a string that is not valid JSON ({detail}); '
                "write the arguments as a JSON object",
                span=span,
            )
    if not isinstance(arguments, dict):
        return None, ToolCallError(
            ToolCallErrorKind.INVALID_ARGUMENTS,
            f'"arguments" must be a JSON object, got a JSON {_json_type(arguments)}',
            span=span,
        )
    return arguments, None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
