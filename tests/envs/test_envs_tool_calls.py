"""Tool-call parsing: exact outcomes for a table of model outputs, and linear time on hostile text."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.tool_calls import (
    CLOSE_TAG,
    MAX_BLOCK_CHARS,
    MAX_BLOCKS,
    OPEN_TAG,
    ToolCallErrorKind,
    ToolSpec,
    call_form_for,
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


# A hang guard, not a timing assertion: linear scans of these inputs take milliseconds, quadratic
# ones hours, so the 60 s limit cannot be hit by a busy machine, only by a quadratic scan.
@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_input_is_parsed_in_linear_time(name: str) -> None:
    result = parse_tool_call(HOSTILE[name], TOOLS)
    assert (result.call is None) != (result.error is None)


# -- Qwen3.5's XML form --------------------------------------------------------------------------

XML_VALID = "<tool_call>\n<function=calc_score>\n<parameter=answer>\n7/2\n</parameter>\n</function>\n</tool_call>"


def xml(body: str) -> str:
    return f"<tool_call>{body}</tool_call>"


@pytest.mark.parametrize(
    ("text", "name", "arguments", "called_as"),
    [
        (XML_VALID, "calc_score", {"answer": "7/2"}, "calc_score"),
        ("<think>\nhmm\n</think>\n\nLet me check.\n\n" + XML_VALID, "calc_score", {"answer": "7/2"}, "calc_score"),
        # Compact spacing, alias name, a value spanning lines and holding markup-like text.
        (
            xml("<function=calc_geo3k_reward><parameter=answer>2\\sqrt{3}</parameter></function>"),
            "calc_score",
            {"answer": "2\\sqrt{3}"},
            "calc_geo3k_reward",
        ),
        (
            xml("\n<function=calc_score>\n<parameter=answer>\nx = 5\nso 5 < 7 > 3\n</parameter>\n"
                "<parameter=units>\ncm\n</parameter>\n</function>\n"),
            "calc_score",
            {"answer": "x = 5\nso 5 < 7 > 3", "units": "cm"},
            "calc_score",
        ),
        # Values stay strings (the template writes them with `| string`); only one newline is cut.
        (xml("<function=calc_score>\n<parameter=answer>\n\n3.5\n\n</parameter>\n</function>"),
         "calc_score", {"answer": "\n3.5\n"}, "calc_score"),
        (xml("<function= calc_score >\n<parameter=answer>\n٣\n</parameter>\n</function>"),
         "calc_score", {"answer": "٣"}, "calc_score"),
    ],
)  # fmt: skip
def test_valid_xml_calls(text: str, name: str, arguments: dict, called_as: str) -> None:
    result = parse_tool_call(text, TOOLS, form="xml")
    assert result.error is None
    assert result.call is not None
    assert (result.call.name, result.call.arguments, result.call.called_as) == (name, arguments, called_as)
    assert text[result.call.span[0] : result.call.span[1]].startswith("<tool_call>")


_XML_HINT = "a call is <function=NAME> holding <parameter=KEY>VALUE</parameter> elements"


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        ("The answer is 5.", K.NO_BLOCK,
         "no tool call found: a call is a <function=NAME> element between <tool_call> and </tool_call>"),
        ("<tool_call>\n<function=calc_score>\n<parameter=answer>\n3\n</parameter>\n</function>",
         K.UNTERMINATED_BLOCK, "the <tool_call> block is not closed: write </tool_call> right after </function>"),
        (xml("  \n "), K.INVALID_XML, f"the <tool_call> block is empty: {_XML_HINT}"),
        (VALID, K.INVALID_XML, f"the tool call must start with <function=NAME>, got a JSON object: {_XML_HINT}"),
        (xml("call calc_score(3)"), K.INVALID_XML,
         f"the tool call must start with <function=NAME>, got 'call calc_score(3)': {_XML_HINT}"),
        (xml("<function=>\n</function>"), K.NO_NAME,
         f"the <function=...> tag needs a name, e.g. <function=calc_score> ({_XML_HINT})"),
        (xml("<function=calc_score\n<parameter=answer>3</parameter></function>"), K.INVALID_XML,
         f"the <function=...> tag is not closed with '>' on its line ({_XML_HINT})"),
        (xml("<function=calc_score>\n<parameter=>3</parameter>\n</function>"), K.INVALID_XML,
         f"the <parameter=...> tag needs a name, e.g. <parameter=answer> ({_XML_HINT})"),
        (xml("<function=calc_score>\n<parameter=answer>\n3\n</function>"), K.INVALID_XML,
         "the parameter 'answer' is not closed: write </parameter> after its value"),
        (xml("<function=calc_score>\n<parameter=answer>\n3\n</parameter>\n"), K.INVALID_XML,
         "the function 'calc_score' is not closed: write </function> after its parameters"),
        (xml("<function=calc_score>\nanswer: 3\n</function>"), K.INVALID_XML,
         "unexpected text 'answer: 3\\n</function>' inside <function=calc_score>: only "
         "<parameter=KEY>...</parameter> elements may stand there"),
        (xml("<function=calc_score><parameter=answer>3</parameter></function>\n<function=calc_score>"),
         K.INVALID_XML, "text after </function> inside the <tool_call> block: '<function=calc_score>'; "
         "one call per block"),
        (xml("<function=calc_scroe>\n<parameter=answer>\n3\n</parameter>\n</function>"), K.UNKNOWN_TOOL,
         "unknown tool 'calc_scroe'. Did you mean 'calc_score'? Available tools: calc_score, calc_geo3k_reward"),
        (xml("<function=calc_score>\n<parameter=answer>\n3\n</parameter>\n<parameter=answer>\n4\n</parameter>\n"
             "</function>"), K.INVALID_ARGUMENTS, "the parameter 'answer' is given twice; give each parameter once"),
        (xml("<function=calc_score>\n</function>"), K.MISSING_ARGUMENT,
         'the call to calc_score is missing the required argument "answer"'),
        (xml("<function=calc_score>\n<parameter=answer>\n \n</parameter>\n</function>"), K.EMPTY_ARGUMENT,
         'the argument "answer" of calc_score is empty'),
    ],
)  # fmt: skip
def test_xml_errors_name_what_was_wrong(text: str, kind: ToolCallErrorKind, message: str) -> None:
    result = parse_tool_call(text, TOOLS, form="xml")
    assert result.call is None
    assert result.error is not None
    assert (result.error.kind, result.error.message) == (kind, message)


def test_each_form_refuses_the_other() -> None:
    assert parse_tool_call(XML_VALID, TOOLS).error.kind is K.INVALID_JSON
    assert parse_tool_call(VALID, TOOLS, form="xml").error.kind is K.INVALID_XML
    with pytest.raises(ValueError, match="unknown tool call form 'yaml'; choose one of json, xml"):
        parse_tool_call(VALID, TOOLS, form="yaml")


def test_xml_error_position_points_into_the_text() -> None:
    prefix = "Let me check.\n"
    text = prefix + xml("<function=calc_score>\n<parameter=answer>3</parameter>\noops</function>")
    error = parse_tool_call(text, TOOLS, form="xml").error
    assert error is not None and error.kind is K.INVALID_XML
    assert text[error.position :].startswith("oops")
    assert error.span == (len(prefix), len(text))


def test_xml_first_block_counts_and_later_ones_are_reported() -> None:
    second = format_call("calc_score", {"answer": "9"}, "xml")
    result = parse_tool_call(XML_VALID + "\n" + second, TOOLS, form="xml")
    assert result.call is not None and result.call.arguments == {"answer": "7/2"}
    assert (result.blocks, result.ignored_blocks) == (2, 1)


def test_format_call_xml_is_what_the_qwen35_template_renders() -> None:
    assert format_call("calc_score", {"answer": "2\\sqrt{3}", "n": 3}, "xml") == (
        "<tool_call>\n<function=calc_score>\n<parameter=answer>\n2\\sqrt{3}\n</parameter>\n"
        "<parameter=n>\n3\n</parameter>\n</function>\n</tool_call>"
    )


def test_xml_oversized_block_is_rejected_without_decoding() -> None:
    body = "<function=calc_score>\n<parameter=answer>\n" + "1" * MAX_BLOCK_CHARS + "\n</parameter>\n</function>"
    error = parse_tool_call(xml(body), TOOLS, form="xml").error
    assert error is not None and error.kind is K.BLOCK_TOO_LARGE
    assert error.message.endswith("a call holds one short <function=NAME> element")


_NAMES = st.text(st.characters(blacklist_characters="<>\n\r", blacklist_categories=("Cs",)), min_size=1,
                 max_size=12).filter(lambda s: s.strip() == s and s)
# A value cannot hold the closing tag of its element nor the block's tags: the scanner reads a
# block by its tags (an opening tag before the close makes the earlier one stray).
_VALUES = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40).filter(
    lambda s: not any(tag in s for tag in ("</parameter>", OPEN_TAG, CLOSE_TAG))
)  # fmt: skip


def test_a_value_holding_the_opening_tag_makes_the_first_tag_stray() -> None:
    result = parse_tool_call(format_call("calc_score", {"answer": OPEN_TAG}, "xml"), TOOLS, form="xml")
    assert result.call is None and result.error is not None
    assert result.error.kind is K.INVALID_XML and result.stray_open_tags == 1


@settings(max_examples=200, deadline=None)
@given(name=_NAMES, arguments=st.dictionaries(_NAMES, _VALUES, max_size=4), prose=st.text(max_size=30))
def test_xml_format_then_parse_round_trips(name: str, arguments: dict, prose: str) -> None:
    text = prose.replace("<tool_call>", "") + format_call(name, arguments, "xml")
    result = parse_tool_call(text, form="xml")
    assert result.error is None, result.error
    assert result.call is not None
    assert (result.call.name, result.call.arguments) == (name, arguments)


_XML_FRAGMENTS = st.sampled_from(
    ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", ">", "<",
     "calc_score", "answer", "\n", " ", "3", "=", "{", "}"]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(st.one_of(_XML_FRAGMENTS, st.text(max_size=3)), max_size=40))
def test_xml_parser_never_raises_and_returns_one_outcome(pieces: list[str]) -> None:
    text = "".join(pieces)
    result = parse_tool_call(text, TOOLS, form="xml")
    assert (result.call is None) != (result.error is None)
    if result.call is not None:
        assert result.call.name == "calc_score" and result.call.arguments["answer"].strip()
        # A call that parsed re-formats into one that parses the same way.
        again = parse_tool_call(format_call(result.call.called_as, result.call.arguments, "xml"), TOOLS, form="xml")
        assert again.call is not None and again.call.arguments == result.call.arguments


XML_HOSTILE = {
    "40,000 parameters": xml(
        "<function=calc_score>" + "".join(f"<parameter=a{i}>1</parameter>" for i in range(40_000)) + "</function>"
    ),
    "unclosed parameter tags": xml("<function=calc_score>" + "<parameter=" * 100_000),
    "parameter names without '>'": xml("<function=calc_score>\n<parameter=" + "a" * 1_000_000),
    "1 MB of function tags": xml("<function=" * 100_000),
    "1 MB value without a close": xml("<function=calc_score><parameter=answer>" + "<" * 1_000_000),
    "100,000 calls in a row": format_call("calc_score", {"answer": "3"}, "xml") * 100_000,
}


@pytest.mark.timeout(60)  # a hang guard, as for the JSON form above
@pytest.mark.parametrize("name", list(XML_HOSTILE))
def test_hostile_xml_is_parsed_in_linear_time(name: str) -> None:
    result = parse_tool_call(XML_HOSTILE[name], TOOLS, form="xml")
    assert (result.call is None) != (result.error is None)


def test_call_form_follows_the_chat_template(tmp_path) -> None:
    assert call_form_for("tiny-qwen3.5") == call_form_for("tiny-qwen3.5-moe") == "xml"
    assert call_form_for("tiny-qwen2.5-vl") == call_form_for("tiny-qwen3-vl") == "json"
    assert call_form_for(None) == "json"
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "qwen3_5_moe"}))
    assert call_form_for(str(checkpoint)) == "xml"  # no template: the model type decides
    (checkpoint / "chat_template.jinja").write_text("{{ '<tool_call>' }}{{ tool | tojson }}")
    call_form_for.cache_clear()
    assert call_form_for(str(checkpoint)) == "json"  # a template that teaches JSON wins
    (checkpoint / "chat_template.jinja").write_text("{{ '<tool_call>\\n<function=' + name + '>' }}")
    call_form_for.cache_clear()
    assert call_form_for(str(checkpoint)) == "xml"
