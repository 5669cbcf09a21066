"""envs.tool_env: schema-checked dispatch, feedback on bad calls, the last chance, the outcome; the
docs' walk-through env is the fixture these tests step."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
from PIL import Image

from envs.tool_calls import ToolCallErrorKind, format_call
from envs.tool_env import ToolEnv, ToolInputError, ToolResult, example_arguments, validate_arguments
from tests.envs.fixtures import color_env

DOC = Path(__file__).resolve().parents[2] / "docs" / "environments.md"
PIXEL = color_env.TOOLS[0]["function"]


def _env(label: str = "red", max_turns: int = 3, **kwargs) -> color_env.ColorEnv:
    image = Image.new("RGB", (10, 10), (200, 10, 10))
    env = color_env.ColorEnv(label, image, max_turns)
    for key, value in kwargs.items():
        setattr(env, key, value)
    env.reset()
    return env


def test_a_tool_call_runs_and_the_outcome_keeps_the_score() -> None:
    env = _env()
    obs, done, info = env.step(format_call("pixel", {"x": 0.5, "y": 0.5}))
    assert (obs, done) == ({"obs_str": "pixel (0.5, 0.5) is RGB (200, 10, 10) You have 2 turns left.", "role": "tool"}, False)
    assert info["tool_executed"] and info["tool_call"] == {"name": "pixel", "arguments": {"x": 0.5, "y": 0.5}}
    obs, done, info = env.step(format_call("answer", {"color": "red"}))
    assert (obs["obs_str"], done, info["score"], info["done_reason"]) == ("red is correct.", True, 1.0, "correct")
    assert (env.outcome.score, env.outcome.valid_tool_calls, env.outcome.turns) == (1.0, 2, 2)
    with pytest.raises(RuntimeError, match="called after the episode ended"):
        env.step("again")


def test_xml_calls_read_values_as_their_schema_types() -> None:
    env = _env(call_form="xml")
    obs, _, info = env.step(format_call("pixel", {"x": 0.5, "y": 0.5}, "xml"))
    assert info["tool_call"]["arguments"] == {"x": 0.5, "y": 0.5}


def test_turns_left_then_last_chance_then_max_turns() -> None:
    env = _env(max_turns=3)
    texts = [env.step(format_call("pixel", {"x": 0, "y": 0}))[0]["obs_str"] for _ in range(2)]
    assert texts[0].endswith("You have 2 turns left.")
    assert texts[1].endswith(ToolEnv.LAST_CHANCE)
    obs, done, info = env.step(format_call("pixel", {"x": 0, "y": 0}))
    assert (done, info["done_reason"], env.outcome.score) == (True, "max_turns", 0.0)


def test_bad_calls_are_feedback_with_a_correct_call_of_that_tool() -> None:
    env = _env()
    obs, done, info = env.step(format_call("answer", {"color": "purple"}))
    assert (done, info["tool_executed"], info["error_kind"]) == (False, False, "invalid_arguments")
    assert obs["obs_str"] == (
        'Your tool call was not run: the argument "color" must be one of "red", "green", "blue", got "purple". '
        'The expected format is:\n<tool_call>{"name": "answer", "arguments": {"color": "red"}}</tool_call>\n'
        "You have 2 turns left."
    )
    assert env.outcome.invalid_tool_calls == 1


def test_no_tool_call_ends_the_episode() -> None:
    env = _env()
    obs, done, info = env.step("It is red.")
    assert (obs["obs_str"], done, info["done_reason"]) == ("No tool call found; the episode is over.", True, "no_tool_call")


@pytest.mark.parametrize(
    ("arguments", "kind", "message"),
    [
        ({"x": "left", "y": 0}, "invalid_arguments", 'the argument "x" must be a number such as 0.5, got a JSON string'),
        ({"x": True, "y": 0}, "invalid_arguments", 'the argument "x" must be a number such as 0.5, got a JSON boolean'),
        ({"x": 2, "y": 0}, "invalid_arguments", 'the argument "x" must be between 0 and 1, got 2'),
        ({"y": 0}, "missing_argument", 'the call to pixel is missing the required argument "x"'),
    ],
)
def test_validate_arguments_errors(arguments, kind: str, message: str) -> None:
    values, error = validate_arguments(PIXEL, arguments)
    assert values is None and (error.kind.value, error.message) == (kind, message)


def test_validate_arguments_reads_what_models_commonly_write() -> None:
    string = {"name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "string"}}}}
    assert validate_arguments(string, {"a": 3.5}) == ({"a": "3.5"}, None)
    assert validate_arguments(PIXEL, {"x": "0.25", "y": "1"}) == ({"x": 0.25, "y": 1}, None)
    closed = {"name": "f", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}
    assert validate_arguments(closed, {"b": 1})[1].message == 'f has no argument "b" (its arguments: none)'
    assert example_arguments(PIXEL) == {"x": 0.5, "y": 0.5}


def test_tool_input_error_is_feedback_other_exceptions_are_bugs() -> None:
    class Env(ToolEnv):
        TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]

        def tool_f(self) -> ToolResult:
            if self.turn == 1:
                raise ToolInputError("nothing to see here")
            raise KeyError("bug")

    env = Env()
    env.reset()
    _, _, info = env.step(format_call("f", {}))
    assert (info["error"], info["error_kind"]) == ("nothing to see here", ToolCallErrorKind.INVALID_ARGUMENTS.value)
    with pytest.raises(KeyError):
        env.step(format_call("f", {}))


def test_a_tool_without_its_method_is_an_error_at_class_definition() -> None:
    with pytest.raises(TypeError, match="declares the tool 'g' in TOOLS but has no method tool_g"):

        class Env(ToolEnv):
            TOOLS = [{"type": "function", "function": {"name": "g"}}]


def test_the_docs_walk_through_is_this_env_and_is_short() -> None:
    source = (Path(color_env.__file__)).read_text()
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert source in blocks
    assert len(source.splitlines()) < 80
    sample = argparse.Namespace(label="red", multimodal_inputs={"images": [Image.new("RGB", (4, 4), (255, 0, 0))]})
    env = color_env.build_env(sample, argparse.Namespace(max_turns=2))
    env.reset()
    _, done, _ = env.step(format_call("answer", {"color": "red"}))
    assert done and env.outcome.score == 1.0
