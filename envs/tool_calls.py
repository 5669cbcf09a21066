"""Tool-call parsing shared by all environments.

The model calls a tool by writing a block, in one of two forms (``form``), the one its chat
template teaches. ``"json"`` (Qwen2.5-VL, Qwen3-VL)::

    <tool_call>{"name": "calc_score", "arguments": {"answer": "7/2"}}</tool_call>

``"xml"`` (Qwen3.5; what SGLang's ``qwen3_coder`` detector reads)::

    <tool_call>
    <function=calc_score>
    <parameter=answer>
    7/2
    </parameter>
    </function>
    </tool_call>

:func:`parse_tool_call` finds such blocks, decodes the first complete one and checks it against the
env's :class:`ToolSpec` list. JSON is decoded strictly (``json.loads``) in two payload shapes:
``{"name": ..., "arguments": {...}}`` (arguments may also be a JSON-encoded string, as OpenAI-style
serializers write them) and ``{"function": {"name": ..., "arguments": ...}}``. XML is one
``<function=NAME>`` element holding zero or more ``<parameter=KEY>VALUE</parameter>`` elements and
nothing else but whitespace; a value is the text between its tags less one leading and one trailing
newline (the template writes ``\\n`` + value + ``\\n``), always a string. :func:`call_form_for`
tells which form a checkpoint's chat template teaches.

Which call counts: **the first complete block is the call**. If that block is malformed the turn's
call is malformed, even if a later block is fine; blocks after it are counted in
:attr:`ParseResult.ignored_blocks` so that the env can say they were ignored. One call per turn keeps
the episode simple to grade and to learn from.

Every failure is reported as a :class:`ToolCallError` with a :class:`ToolCallErrorKind` and a message
written for the model (what was wrong and what to write instead), never as an exception. Both forms
share the kinds; only a malformed payload differs: INVALID_JSON for the JSON form, INVALID_XML for
the XML form.

The scanner works on hostile text in linear time: it uses ``str.find`` (no regular expressions
that can backtrack), decodes only one block, caps a block's size at :data:`MAX_BLOCK_CHARS` and
counts at most :data:`MAX_BLOCKS` blocks. The XML decoder only ever searches forward from where it
stands.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any

from envs.base import nearest_name

__all__ = [
    "CALL_FORMS",
    "CLOSE_TAG",
    "MAX_BLOCKS",
    "MAX_BLOCK_CHARS",
    "OPEN_TAG",
    "ParseResult",
    "ToolCall",
    "ToolCallError",
    "ToolCallErrorKind",
    "ToolSpec",
    "call_form_for",
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
#: The call forms :func:`parse_tool_call` reads (see the module docstring).
CALL_FORMS = ("json", "xml")
_FUNCTION_OPEN = "<function="
_FUNCTION_CLOSE = "</function>"
_PARAMETER_OPEN = "<parameter="
_PARAMETER_CLOSE = "</parameter>"


class ToolCallErrorKind(str, Enum):
    """What was wrong with the model's tool call."""

    NO_BLOCK = "no_block"
    UNTERMINATED_BLOCK = "unterminated_block"
    BLOCK_TOO_LARGE = "block_too_large"
    INVALID_JSON = "invalid_json"
    INVALID_XML = "invalid_xml"
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


def _check_form(form: str) -> None:
    if form not in CALL_FORMS:
        raise ValueError(f"unknown tool call form {form!r}; choose one of {', '.join(CALL_FORMS)}")


def format_call(name: str, arguments: dict[str, Any], form: str = "json") -> str:
    """The exact text of a well-formed call in ``form``, for "write it like this" feedback. In the
    XML form a non-string value is written as JSON, as Qwen3.5's chat template writes it."""
    _check_form(form)
    if form == "json":
        payload = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"{OPEN_TAG}{payload}{CLOSE_TAG}"
    lines = [OPEN_TAG, f"{_FUNCTION_OPEN}{name}>"]
    for key, value in arguments.items():
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines += [f"{_PARAMETER_OPEN}{key}>", shown, _PARAMETER_CLOSE]
    lines += [_FUNCTION_CLOSE, CLOSE_TAG]
    return "\n".join(lines)


def _payload_words(form: str) -> str:
    return "a JSON object" if form == "json" else "a <function=NAME> element"


def parse_tool_call(text: str, tools: Sequence[ToolSpec] | None = None, *, form: str = "json") -> ParseResult:
    """Parse the first complete ``<tool_call>`` block of ``text`` (see the module docstring).

    ``tools``: the tools the env offers; a call to another name is an UNKNOWN_TOOL error and
    required arguments are checked. ``None`` accepts any tool name and checks no arguments.
    ``form``: "json" or "xml", the call form the model was taught (:func:`call_form_for`).
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_tool_call expects the response text as str, got {type(text).__name__}")
    _check_form(form)
    payload = _payload_words(form)
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
                    f"the {OPEN_TAG} block is not closed: write {CLOSE_TAG} right after "
                    + ("the JSON object" if form == "json" else _FUNCTION_CLOSE),
                    span=(scan.unterminated_at, len(text)),
                ),
                **common,
            )
        return ParseResult(
            error=ToolCallError(
                ToolCallErrorKind.NO_BLOCK,
                f"no tool call found: a call is {payload} between {OPEN_TAG} and {CLOSE_TAG}",
            ),
            **common,
        )

    ignored = len(scan.spans) - 1
    notes = []
    if ignored:
        more = " or more" if scan.truncated else ""
        notes.append(f"only the first tool call was run; {ignored}{more} later call(s) were ignored")
    block = scan.spans[0]
    call, error = _decode_block(text, block, tools, form)
    return ParseResult(call=call, error=error, ignored_blocks=ignored, notes=tuple(notes), **common)


def _decode_block(
    text: str, block: tuple[int, int, int, int], tools: Sequence[ToolSpec] | None, form: str
) -> tuple[ToolCall | None, ToolCallError | None]:
    start, body_start, body_end, end = block
    span = (start, end)
    if body_end - body_start > MAX_BLOCK_CHARS:
        small = "one small JSON object" if form == "json" else "one short <function=NAME> element"
        return None, ToolCallError(
            ToolCallErrorKind.BLOCK_TOO_LARGE,
            f"the {OPEN_TAG} block is {body_end - body_start} characters long (the limit is "
            f"{MAX_BLOCK_CHARS}): a call holds {small}",
            span=span,
        )
    body = text[body_start:body_end]
    if form == "xml":
        return _decode_xml(body, body_start, span, tools)
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
    arguments, error = _decode_arguments(container, span)
    if error is not None:
        return None, error
    assert arguments is not None
    hint = ' (use "arguments", not "parameters")' if "parameters" in container else ""
    return _check_call(name.strip(), arguments, span, tools, missing_hint=hint)


def _check_call(
    name: str,
    arguments: dict[str, Any],
    span: tuple[int, int],
    tools: Sequence[ToolSpec] | None,
    missing_hint: str = "",
) -> tuple[ToolCall | None, ToolCallError | None]:
    """The checks both forms share once name and arguments are decoded: a known tool, its
    required arguments present and not empty."""
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

    if spec is not None:
        for key in spec.required:
            if key not in arguments:
                return None, ToolCallError(
                    ToolCallErrorKind.MISSING_ARGUMENT,
                    f'the call to {spec.name} is missing the required argument "{key}"{missing_hint}',
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


def _xml_error(message: str, span: tuple[int, int], body_start: int, at: int) -> ToolCallError:
    return ToolCallError(ToolCallErrorKind.INVALID_XML, message, span=span, position=body_start + at)


def _xml_name(body: str, start: int, what: str) -> tuple[str | None, int, str | None]:
    """The name in ``<function=NAME>`` / ``<parameter=NAME>`` whose ``=`` ends at ``start``:
    (name, index after '>', None) or (None, index, why not)."""
    close = body.find(">", start)
    newline = body.find("\n", start, close if close >= 0 else len(body))
    if close < 0 or newline >= 0:
        return None, start, f"the <{what}=...> tag is not closed with '>' on its line"
    name = body[start:close].strip()
    if not name or "<" in name:
        return None, start, f"the <{what}=...> tag needs a name, e.g. <{what}={'answer' if what == 'parameter' else 'calc_score'}>"
    return name, close + 1, None


def _skip_space(body: str, at: int) -> int:
    while at < len(body) and body[at].isspace():
        at += 1
    return at


def _decode_xml(
    body: str, body_start: int, span: tuple[int, int], tools: Sequence[ToolSpec] | None
) -> tuple[ToolCall | None, ToolCallError | None]:
    expected = f"a call is {_FUNCTION_OPEN}NAME> holding {_PARAMETER_OPEN}KEY>VALUE{_PARAMETER_CLOSE} elements"
    at = _skip_space(body, 0)
    if at == len(body):
        return None, _xml_error(f"the {OPEN_TAG} block is empty: {expected}", span, body_start, 0)
    if not body.startswith(_FUNCTION_OPEN, at):
        got = "a JSON object" if body[at] == "{" else repr(body[at : at + _SNIPPET_CHARS])
        return None, _xml_error(
            f"the tool call must start with {_FUNCTION_OPEN}NAME>, got {got}: {expected}", span, body_start, at
        )
    name, at, why = _xml_name(body, at + len(_FUNCTION_OPEN), "function")
    if name is None:
        kind = ToolCallErrorKind.NO_NAME if why and "needs a name" in why else ToolCallErrorKind.INVALID_XML
        return None, ToolCallError(kind, f"{why} ({expected})", span=span, position=body_start + at)
    arguments: dict[str, Any] = {}
    while True:
        at = _skip_space(body, at)
        if body.startswith(_PARAMETER_OPEN, at):
            key, at, why = _xml_name(body, at + len(_PARAMETER_OPEN), "parameter")
            if key is None:
                return None, _xml_error(f"{why} ({expected})", span, body_start, at)
            value_end = body.find(_PARAMETER_CLOSE, at)
            if value_end < 0:
                return None, _xml_error(
                    f"the parameter {key!r} is not closed: write {_PARAMETER_CLOSE} after its value",
                    span, body_start, at,
                )  # fmt: skip
            if key in arguments:
                return None, ToolCallError(
                    ToolCallErrorKind.INVALID_ARGUMENTS,
                    f"the parameter {key!r} is given twice; give each parameter once",
                    span=span,
                )
            value = body[at:value_end]
            value = value[1:] if value.startswith("\n") else value
            arguments[key] = value[:-1] if value.endswith("\n") else value
            at = value_end + len(_PARAMETER_CLOSE)
        elif body.startswith(_FUNCTION_CLOSE, at):
            rest = _skip_space(body, at + len(_FUNCTION_CLOSE))
            if rest != len(body):
                return None, _xml_error(
                    f"text after {_FUNCTION_CLOSE} inside the {OPEN_TAG} block: "
                    f"{body[rest : rest + _SNIPPET_CHARS]!r}; one call per block",
                    span, body_start, rest,
                )  # fmt: skip
            return _check_call(name, arguments, span, tools)
        elif at == len(body):
            return None, _xml_error(
                f"the function {name!r} is not closed: write {_FUNCTION_CLOSE} after its parameters",
                span, body_start, at,
            )  # fmt: skip
        else:
            return None, _xml_error(
                f"unexpected text {body[at : at + _SNIPPET_CHARS]!r} inside <function={name}>: only "
                f"{_PARAMETER_OPEN}KEY>...{_PARAMETER_CLOSE} elements may stand there",
                span, body_start, at,
            )  # fmt: skip


_JSON_EXAMPLE = re.compile(r"<tool_call>\s*\{")


def call_form_taught(prompt: Any) -> str | None:
    """The tool-call form a prompt shows by example, or None when it shows neither form or both.

    A dataset's instruction text can teach a form the chat template does not: the Geometry3K
    problems spell out ``<tool_call>{"name": ...}</tool_call>`` whatever the model. ``prompt`` is
    the rendered text or a list of chat messages (content as text or as typed parts)."""
    text = _prompt_text(prompt)
    shows_json = _JSON_EXAMPLE.search(text) is not None
    shows_xml = _FUNCTION_OPEN in text
    if shows_json == shows_xml:
        return None
    return "json" if shows_json else "xml"


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    parts: list[str] = []
    for message in prompt if isinstance(prompt, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return "\n".join(parts)


@lru_cache(maxsize=64)
def call_form_for(checkpoint: str | None) -> str:
    """The tool-call form the chat template of ``checkpoint`` (a models preset name or a checkpoint
    directory) teaches: "xml" if it writes calls as ``<function=...>``, else "json". Without a
    checkpoint, or without a template, it falls back to the model type (Qwen3.5 is "xml")."""
    if not checkpoint:
        return "json"
    template = _chat_template_text(str(checkpoint))
    if template is not None:
        return "xml" if _FUNCTION_OPEN in template else "json"
    config = Path(str(checkpoint)).expanduser() / "config.json"
    try:
        model_type = json.loads(config.read_text()).get("model_type", "")
    except (OSError, ValueError):
        return "json"
    return "xml" if str(model_type).startswith("qwen3_5") else "json"


def _chat_template_text(checkpoint: str) -> str | None:
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        from models.loader import PRESETS  # only for preset names: it loads torch

        if checkpoint not in PRESETS:
            return None
        from models.chat_templates import chat_template

        return chat_template(PRESETS[checkpoint].template)
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            template = json.loads((path / name).read_text()).get("chat_template")
        except (OSError, ValueError):
            continue
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            return "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return None
