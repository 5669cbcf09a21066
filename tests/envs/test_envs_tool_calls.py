"""Tool-call parsing: exact outcomes for a table of model outputs, and linear time on hostile text."""

from __future__ import annotations

import time

import pytest

from envs.tool_calls import (
    MAX_BLOCK_CHARS,
    MAX_BLOCKS,
    ToolCallErrorKind,
    ToolSpec,
    format_call,
    parse_tool_call,
)

TOOLS = [ToolSpec("calc_score", required=("answer",), aliases=("calc_geo3k_reward",))]
VALID = '<tool_call>{"name": "calc_score", "arguments": {"answer": "7/2"}}</tool_call>'

K = ToolCallErrorKind


@pytest.mark.parametrize(
    ("text", "name", "arguments", "called_as"),
    [
        (VALID, "calc_score", {"answer": "7/2"}, "calc_score"),
        ("<think>hmm</think>\n" + VALID + "\nDone.", "calc_score", {"answer": "7/2"}, "calc_score"),
        (
            '<tool_call>\n{"name": "calc_geo3k_reward", "arguments": {"answer": "2\\\\sqrt{3}"}}\n</tool_call>',
            "calc_score",
            {"answer": "2\\sqrt{3}"},
            "calc_geo3k_reward",
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": "{\\"answer\\": \\"60\\"}"}</tool_call>',
            "calc_score",
            {"answer": "60"},
            "calc_score",
        ),
        (
            '<tool_call>{"type": "function", "function": {"name": "calc_score", "arguments": {"answer": "5"}}}'
            "</tool_call>",
            "calc_score",
            {"answer": "5"},
            "calc_score",
        ),
        (
            '<tool_call>{"function": {"name": "calc_score", "arguments": "{\\"answer\\": \\"x = 5\\"}"}}</tool_call>',
            "calc_score",
            {"answer": "x = 5"},
            "calc_score",
        ),
        (
            '<tool_call>{"name": " calc_score ", "arguments": {"answer": 3.5}}</tool_call>',
            "calc_score",
            {"answer": 3.5},
            "calc_score",
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": {"answer": "{\\"a\\": 1} }{"}}</tool_call>',
            "calc_score",
            {"answer": '{"a": 1} }{'},
            "calc_score",
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": {"answer": "٣", "units": "cm"}}</tool_call>',
            "calc_score",
            {"answer": "٣", "units": "cm"},
            "calc_score",
        ),
    ],
)
def test_valid_calls(text: str, name: str, arguments: dict, called_as: str) -> None:
    result = parse_tool_call(text, TOOLS)
    assert result.error is None
    assert result.ok
    assert result.call is not None
    assert (result.call.name, result.call.arguments, result.call.called_as) == (name, arguments, called_as)
    assert text[result.call.span[0] : result.call.span[1]].startswith("<tool_call>")
    assert text[result.call.span[0] : result.call.span[1]].endswith("</tool_call>")


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        (
            "The answer is 5.",
            K.NO_BLOCK,
            "no tool call found: a call is a JSON object between <tool_call> and </tool_call>",
        ),
        ("", K.NO_BLOCK, "no tool call found: a call is a JSON object between <tool_call> and </tool_call>"),
        (
            "</tool_call> stray close",
            K.NO_BLOCK,
            "no tool call found: a call is a JSON object between <tool_call> and </tool_call>",
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": {"answer": "3"}}',
            K.UNTERMINATED_BLOCK,
            "the <tool_call> block is not closed: write </tool_call> right after the JSON object",
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": {"answer": "3",}}</tool_call>',
            K.INVALID_JSON,
            "the tool call is not valid JSON: Expecting property name enclosed in double quotes at line 1, "
            'column 52 (near \'nswer": "3",}}\'); use double quotes for keys and strings and no trailing commas',
        ),
        (
            "<tool_call>{'name': 'calc_score'}</tool_call>",
            K.INVALID_JSON,
            "the tool call is not valid JSON: Expecting property name enclosed in double quotes at line 1, "
            "column 2 (near \"{'name': 'cal\"); use double quotes for keys and strings and no trailing commas",
        ),
        (
            "<tool_call>  \n </tool_call>",
            K.INVALID_JSON,
            'the <tool_call> block is empty: put a JSON object with "name" and "arguments" in it',
        ),
        (
            "<tool_call>" + "[" * 10_000 + "]" * 10_000 + "</tool_call>",
            K.INVALID_JSON,
            "the tool call is not valid JSON: it is nested too deeply to decode",
        ),
        (
            '<tool_call>[{"name": "calc_score"}]</tool_call>',
            K.NOT_AN_OBJECT,
            "the tool call must be a JSON object, got a JSON array (one call per block, not a list)",
        ),
        (
            '<tool_call>"calc_score"</tool_call>',
            K.NOT_AN_OBJECT,
            "the tool call must be a JSON object, got a JSON string",
        ),
        (
            '<tool_call>{"arguments": {"answer": "3"}}</tool_call>',
            K.NO_NAME,
            'the tool call needs a non-empty string "name"; got no "name" key',
        ),
        (
            '<tool_call>{"name": 7, "arguments": {"answer": "3"}}</tool_call>',
            K.NO_NAME,
            'the tool call needs a non-empty string "name"; got "name" = 7',
        ),
        (
            '<tool_call>{"name": "calc_scroe", "arguments": {"answer": "3"}}</tool_call>',
            K.UNKNOWN_TOOL,
            "unknown tool 'calc_scroe'. Did you mean 'calc_score'? Available tools: calc_score, calc_geo3k_reward",
        ),
        (
            '<tool_call>{"name": "search", "arguments": {"q": "3"}}</tool_call>',
            K.UNKNOWN_TOOL,
            "unknown tool 'search'. Available tools: calc_score, calc_geo3k_reward",
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": ["3"]}</tool_call>',
            K.INVALID_ARGUMENTS,
            '"arguments" must be a JSON object, got a JSON array',
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": "{answer: 3}"}</tool_call>',
            K.INVALID_ARGUMENTS,
            '"arguments" is a string that is not valid JSON (Expecting property name enclosed in double quotes); '
            "write the arguments as a JSON object",
        ),
        (
            '<tool_call>{"name": "calc_score"}</tool_call>',
            K.MISSING_ARGUMENT,
            'the call to calc_score is missing the required argument "answer"',
        ),
        (
            '<tool_call>{"name": "calc_score", "parameters": {"answer": "3"}}</tool_call>',
            K.MISSING_ARGUMENT,
            'the call to calc_score is missing the required argument "answer" (use "arguments", not "parameters")',
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": {"answer": "  "}}</tool_call>',
            K.EMPTY_ARGUMENT,
            'the argument "answer" of calc_score is empty',
        ),
        (
            '<tool_call>{"name": "calc_score", "arguments": {"answer": null}}</tool_call>',
            K.EMPTY_ARGUMENT,
            'the argument "answer" of calc_score is empty',
        ),
    ],
)
def test_errors_name_what_was_wrong(text: str, kind: ToolCallErrorKind, message: str) -> None:
    result = parse_tool_call(text, TOOLS)
    assert result.call is None
    assert not result.ok
    assert result.error is not None
    assert result.error.kind is kind
    assert result.error.message == message


def test_invalid_json_reports_line_column_and_absolute_position() -> None:
    prefix = "Let me check.\n"
    text = prefix + '<tool_call>{\n  "name": "calc_score",\n  "arguments": {"answer": 3,\n}}</tool_call>'
    error = parse_tool_call(text, TOOLS).error
    assert error is not None
    assert (error.kind, error.line, error.column) == (K.INVALID_JSON, 4, 1)
    assert text[error.position] == "}"
    assert error.span == (len(prefix), len(text))


def test_unknown_tool_carries_the_suggestion() -> None:
    error = parse_tool_call('<tool_call>{"name": "calc_geo3k_rewards"}</tool_call>', TOOLS).error
    assert error is not None
    assert error.suggestion == "calc_geo3k_reward"


def test_first_complete_block_counts_and_later_ones_are_reported() -> None:
    second = '<tool_call>{"name": "calc_score", "arguments": {"answer": "9"}}</tool_call>'
    result = parse_tool_call(VALID + " then " + second + second, TOOLS)
    assert result.call is not None
    assert result.call.arguments == {"answer": "7/2"}
    assert (result.blocks, result.ignored_blocks) == (3, 2)
    assert result.notes == ("only the first tool call was run; 2 later call(s) were ignored",)


def test_a_malformed_first_block_is_the_error_even_if_a_later_block_is_valid() -> None:
    result = parse_tool_call("<tool_call>{oops}</tool_call>" + VALID, TOOLS)
    assert result.error is not None
    assert result.error.kind is K.INVALID_JSON
    assert result.ignored_blocks == 1


def test_stray_opening_tags_are_skipped_and_counted() -> None:
    result = parse_tool_call("<tool_call> I will call <tool_call>" + VALID[len("<tool_call>") :], TOOLS)
    assert result.call is not None
    assert result.call.arguments == {"answer": "7/2"}
    assert result.stray_open_tags == 1
    assert result.blocks == 1


def test_without_tool_specs_any_name_is_accepted() -> None:
    result = parse_tool_call('<tool_call>{"name": "search", "arguments": {}}</tool_call>')
    assert result.call is not None
    assert (result.call.name, result.call.arguments) == ("search", {})


def test_format_call_round_trips() -> None:
    text = format_call("calc_score", {"answer": "2\\sqrt{3}"})
    assert text == '<tool_call>{"name": "calc_score", "arguments": {"answer": "2\\\\sqrt{3}"}}</tool_call>'
    call = parse_tool_call(text, TOOLS).call
    assert call is not None
    assert call.arguments == {"answer": "2\\sqrt{3}"}


def test_spec_from_openai_schema() -> None:
    schema = {
        "type": "function",
        "function": {"name": "zoom", "parameters": {"type": "object", "required": ["x", "y"]}},
    }
    assert ToolSpec.from_schema(schema, aliases=["crop"]) == ToolSpec("zoom", ("x", "y"), ("crop",))


def test_non_string_input_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="expects the response text as str, got bytes"):
        parse_tool_call(b"<tool_call>{}</tool_call>", TOOLS)  # type: ignore[arg-type]


def test_oversized_block_is_rejected_without_decoding() -> None:
    body = '{"name": "calc_score", "arguments": {"answer": "' + "1" * MAX_BLOCK_CHARS + '"}}'
    error = parse_tool_call(f"<tool_call>{body}</tool_call>", TOOLS).error
    assert error is not None
    assert error.kind is K.BLOCK_TOO_LARGE
    assert error.message == (
        f"the <tool_call> block is {len(body)} characters long (the limit is {MAX_BLOCK_CHARS}): "
        "a call holds one small JSON object"
    )


def test_block_count_is_capped() -> None:
    result = parse_tool_call(VALID * (MAX_BLOCKS + 36), TOOLS)
    assert (result.blocks, result.ignored_blocks, result.truncated) == (MAX_BLOCKS, MAX_BLOCKS - 1, True)
    assert result.notes == (
        f"only the first tool call was run; {MAX_BLOCKS - 1} or more later call(s) were ignored",
    )


HOSTILE = {
    "1 MB of prose": "the angle is sixty degrees " * 40_000,
    "1 MB then a call": "x" * 1_000_000 + VALID,
    "10,000 nested braces": "<tool_call>" + "{" * 10_000 + "}" * 10_000 + "</tool_call>",
    "1 MB of open braces": "<tool_call>" + "{" * 1_000_000 + "</tool_call>",
    "500 blocks": VALID * 500,
    "100,000 stray opening tags then a close": "<tool_call>" * 100_000 + "</tool_call>",
    "100,000 opening tags, no close": "<tool_call>" * 100_000,
    "100,000 closing tags": "</tool_call>" * 100_000,
    "alternating unterminated blocks": ("<tool_call>{" + "a" * 50) * 10_000,
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_parsed_in_linear_time(name: str) -> None:
    text = HOSTILE[name]
    start = time.perf_counter()
    parse_tool_call(text, TOOLS)
    elapsed = time.perf_counter() - start
    # Linear scans take milliseconds here; quadratic ones take minutes (the bound leaves room for a busy machine).
    assert elapsed < 2.0, f"{name}: {elapsed:.3f} s"
