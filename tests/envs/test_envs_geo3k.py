"""Geo3kEnv: exact feedback and outcomes per turn, settings validation, no reward leak, bounded steps."""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.base import EnvConfigError, call_step
from envs.geo3k import TOOL_SCHEMA, TOOLS, Geo3kEnv, Geo3kOutcome, Geo3kSettings, build_env
from envs.grading import Grader, GradeStatus
from envs.tool_calls import format_call

LABEL = "2\\sqrt{3}"
EXPECTED_FORMAT = '<tool_call>{"name": "calc_score", "arguments": {"answer": "<your answer>"}}</tool_call>'
WRONG = (
    'calc_score: your answer "{}" is incorrect. Check your reasoning and try a different approach instead of '
    "repeating the same answer."
)
LAST_CHANCE = (
    "This is your last chance: do not call the tool again. Reply with your final answer in the form "
    "Answer: \\boxed{...}"
)
# Grading timeout in these tests, and the slack allowed on top of it (a replacement worker may be
# starting after a hostile answer killed one).
TIMEOUT_S = 1.0


@dataclass
class FakeSample:
    label: Any = LABEL
    prompt: str = "<image>Find x."
    metadata: dict[str, Any] = field(default_factory=dict)


def call(answer: Any, name: str = "calc_score") -> str:
    return format_call(name, {"answer": answer})


@pytest.fixture
def make_env(grader: Grader):
    def make(label: Any = LABEL, max_turns: int | None = 3, **kwargs: Any) -> Geo3kEnv:
        env = build_env(FakeSample(label), argparse.Namespace(max_turns=max_turns), grader=grader, **kwargs)
        assert env.reset() == (
            {},
            {"max_turns": env.settings.max_turns, "tools": ["calc_score", "calc_geo3k_reward"]},
        )
        return env

    return make


def _info(turn: int = 1, **values: Any) -> dict[str, Any]:
    info = {
        "turn": turn,
        "tool_executed": False,
        "answer": None,
        "score": None,
        "grade_status": None,
        "error": None,
        "error_kind": None,
        "ignored_tool_calls": 0,
        "tool_call": None,
    }
    info.update(values)
    if info["tool_executed"]:
        # What the rollout records per turn: the call as run (a number given for the answer reads as text).
        info["tool_call"] = {"name": "calc_score", "arguments": {"answer": info["answer"]}}
    return info


FIRST_TURN_CASES = {
    "correct call": (
        call(LABEL),
        'calc_score: your answer "2\\sqrt{3}" is correct.',
        True,
        _info(tool_executed=True, answer=LABEL, score=1.0, grade_status="correct", done_reason="correct"),
    ),
    "equivalent answer, alias name, numbers as JSON": (
        "<think>AB = sqrt(12)</think>\n" + call("\\sqrt{12}", name="calc_geo3k_reward"),
        'calc_score: your answer "\\sqrt{12}" is correct.',
        True,
        _info(
            tool_executed=True, answer="\\sqrt{12}", score=1.0, grade_status="correct", done_reason="correct"
        ),
    ),
    "wrong answer": (
        call("3"),
        WRONG.format("3") + " You have 2 turns left.",
        False,
        _info(tool_executed=True, answer="3", score=0.0, grade_status="incorrect"),
    ),
    "number instead of string": (
        call(3.5),
        WRONG.format("3.5") + " You have 2 turns left.",
        False,
        _info(tool_executed=True, answer="3.5", score=0.0, grade_status="incorrect"),
    ),
    "several calls": (
        call("4") + call(LABEL),
        WRONG.format("4")
        + " Only your first tool call was run; 1 later call(s) were ignored. You have 2 turns left.",
        False,
        _info(tool_executed=True, answer="4", score=0.0, grade_status="incorrect", ignored_tool_calls=1),
    ),
    "answer that is not math": (
        call("@@"),
        "calc_score could not grade your answer \"@@\" ('@@' could not be read as a math expression). Give the "
        "answer as a single number or expression, such as 7/2, 2\\sqrt{3} or 60. You have 2 turns left.",
        False,
        _info(
            tool_executed=True,
            answer="@@",
            score=0.0,
            grade_status="not graded: parse error",
            error="'@@' could not be read as a math expression",
        ),
    ),
    "malformed JSON": (
        '<tool_call>{"name": "calc_score", "arguments": {"answer": "3",}}</tool_call>',
        "Your tool call was not run: the tool call is not valid JSON: Expecting property name enclosed in double "
        'quotes at line 1, column 52 (near \'nswer": "3",}}\'); use double quotes for keys and strings and no '
        f"trailing commas. The expected format is:\n{EXPECTED_FORMAT}\nYou have 2 turns left.",
        False,
        _info(
            error="the tool call is not valid JSON: Expecting property name enclosed in double quotes at line 1, "
            'column 52 (near \'nswer": "3",}}\'); use double quotes for keys and strings and no trailing commas',
            error_kind="invalid_json",
        ),
    ),
    "unknown tool": (
        call("3", name="calc_scores"),
        "Your tool call was not run: unknown tool 'calc_scores'. Did you mean 'calc_score'? Available tools: "
        f"calc_score, calc_geo3k_reward. The expected format is:\n{EXPECTED_FORMAT}\nYou have 2 turns left.",
        False,
        _info(
            error="unknown tool 'calc_scores'. Did you mean 'calc_score'? Available tools: calc_score, "
            "calc_geo3k_reward",
            error_kind="unknown_tool",
        ),
    ),
    "answer is a list": (
        call(["3"]),
        'Your tool call was not run: the argument "answer" must be a string such as "7/2", got a JSON array. '
        f"The expected format is:\n{EXPECTED_FORMAT}\nYou have 2 turns left.",
        False,
        _info(
            error='the argument "answer" must be a string such as "7/2", got a JSON array',
            error_kind="invalid_arguments",
        ),
    ),
    "unterminated call": (
        '<tool_call>{"name": "calc_score", "arguments": {"answer": "3"}}',
        "Your tool call was not run: the <tool_call> block is not closed: write </tool_call> right after the "
        f"JSON object. The expected format is:\n{EXPECTED_FORMAT}\nYou have 2 turns left.",
        False,
        _info(
            error="the <tool_call> block is not closed: write </tool_call> right after the JSON object",
            error_kind="unterminated_block",
        ),
    ),
    "no call, correct boxed answer": (
        "So AB = 2\\sqrt{3}.\nAnswer: \\boxed{2\\sqrt{3}}",
        'No tool call found; the episode is over. Final answer "2\\sqrt{3}": correct.',
        True,
        _info(answer=LABEL, score=1.0, grade_status="correct", done_reason="no_tool_call"),
    ),
    "no call, wrong boxed answer": (
        "Answer: \\boxed{\\frac{7}{2}}",
        'No tool call found; the episode is over. Final answer "\\frac{7}{2}": incorrect.',
        True,
        _info(answer="\\frac{7}{2}", score=0.0, grade_status="incorrect", done_reason="no_tool_call"),
    ),
    "no call, no answer": (
        "I am not sure.",
        "No tool call found; the episode is over.",
        True,
        _info(done_reason="no_tool_call"),
    ),
    "empty response": (
        "",
        "No tool call found; the episode is over.",
        True,
        _info(done_reason="no_tool_call"),
    ),
}


@pytest.mark.parametrize("case", list(FIRST_TURN_CASES))
def test_first_turn(make_env, case: str) -> None:
    text, feedback, done, info = FIRST_TURN_CASES[case]
    env = make_env()
    assert env.step(text) == ({"obs_str": feedback, "role": "tool"}, done, info)


def test_wrong_wrong_then_correct_final_answer(make_env) -> None:
    env = make_env()
    obs, done, _ = env.step(call("3"))
    assert (obs["obs_str"], done) == (WRONG.format("3") + " You have 2 turns left.", False)
    obs, done, _ = env.step(call("4"))
    assert (obs["obs_str"], done) == (WRONG.format("4") + " " + LAST_CHANCE, False)
    obs, done, info = env.step("Then AB = \\sqrt{12}.\nAnswer: \\boxed{\\sqrt{12}}")
    assert (obs["obs_str"], done, info["done_reason"]) == (
        'No tool call found; the episode is over. Final answer "\\sqrt{12}": correct.',
        True,
        "no_tool_call",
    )
    assert env.outcome == Geo3kOutcome(
        score=1.0,
        attempts=3,
        solved_at_turn=3,
        valid_tool_calls=2,
        invalid_tool_calls=0,
        turns=3,
        last_answer="\\sqrt{12}",
        grade_statuses=["incorrect", "incorrect", "correct"],
        done_reason="no_tool_call",
    )


def test_all_turns_wrong_ends_at_max_turns(make_env) -> None:
    env = make_env()
    assert env.step(call("1"))[1] is False
    assert env.step("<tool_call>{oops}</tool_call>")[0]["obs_str"].endswith("\n" + LAST_CHANCE)
    obs, done, info = env.step(call("3"))
    assert (obs["obs_str"], done, info["done_reason"]) == (WRONG.format("3"), True, "max_turns")
    assert env.outcome == Geo3kOutcome(
        score=0.0,
        attempts=2,
        solved_at_turn=None,
        valid_tool_calls=2,
        invalid_tool_calls=1,
        turns=3,
        last_answer="3",
        grade_statuses=["incorrect", "incorrect"],
        done_reason="max_turns",
    )


@pytest.mark.parametrize(
    ("max_turns", "feedback", "done"),
    [
        (1, WRONG.format("3"), True),
        (2, WRONG.format("3") + " " + LAST_CHANCE, False),
        (4, WRONG.format("3") + " You have 3 turns left.", False),
    ],
)
def test_turn_budget_shapes_the_first_feedback(make_env, max_turns: int, feedback: str, done: bool) -> None:
    obs, got_done, _ = make_env(max_turns=max_turns).step(call("3"))
    assert (obs["obs_str"], got_done) == (feedback, done)


def test_end_on_correct_false_keeps_the_episode_going(make_env) -> None:
    env = make_env(end_on_correct=False)
    obs, done, _ = env.step(call(LABEL))
    assert (obs["obs_str"], done) == (
        'calc_score: your answer "2\\sqrt{3}" is correct. You may now state your final answer. You have 2 turns left.',
        False,
    )
    obs, done, _ = env.step("Answer: \\boxed{5}")
    assert done is True
    # The score records that the problem was solved; a later wrong answer does not undo it.
    assert (env.outcome.score, env.outcome.solved_at_turn, env.outcome.attempts) == (1.0, 1, 2)


def test_final_answer_grading_can_be_turned_off(make_env) -> None:
    env = make_env(grade_final_answer=False)
    obs, done, info = env.step("Answer: \\boxed{2\\sqrt{3}}")
    assert (obs["obs_str"], done) == (
        "No tool call found; the episode is over (final answers are not graded).",
        True,
    )
    assert (info["answer"], info["score"], env.outcome.score, env.outcome.attempts) == (LABEL, None, 0.0, 0)


def test_feedback_role_user(make_env) -> None:
    env = make_env(feedback_role="user")
    obs, _, _ = env.step(call("3"))
    assert obs["role"] == "user"
    assert env.format_observation(obs) == {"role": "user", "content": obs["obs_str"]}


def test_reset_starts_a_fresh_episode(make_env) -> None:
    env = make_env()
    env.step(call(LABEL))
    assert env.outcome.score == 1.0
    env.reset()
    assert (env.outcome, env.turn, env.done) == (Geo3kOutcome(), 0, False)
    assert env.step(call("3"))[2]["turn"] == 1


def test_step_after_the_end_is_a_programming_error(make_env) -> None:
    env = make_env()
    env.step("no call")
    with pytest.raises(
        RuntimeError, match=r"Geo3kEnv.step called after the episode ended; call reset\(\) first"
    ):
        env.step(call("3"))
    with pytest.raises(TypeError, match="Geo3kEnv.step takes the model's text as str, got NoneType"):
        make_env().step(None)  # type: ignore[arg-type]


def test_hostile_answer_step_stays_within_the_grading_timeout(make_env) -> None:
    env = make_env(grading_timeout_s=TIMEOUT_S)
    start = time.monotonic()
    obs, done, info = env.step(call("\\boxed{9!!!!!}"))
    # The step waited for the grading timeout (a lower bound the code guarantees); the result below
    # says the worker gave up on the answer rather than grading it.
    assert time.monotonic() - start >= TIMEOUT_S
    assert (done, info["grade_status"], info["score"], info["error"]) == (
        False,
        "not graded: timeout",
        0.0,
        "grading took longer than 1 s",
    )
    assert obs["obs_str"] == (
        'calc_score could not grade your answer "\\boxed{9!!!!!}" (grading took longer than 1 s). '
        "Give the answer as a single number or expression, such as 7/2, 2\\sqrt{3} or 60. You have 2 turns left."
    )
    assert env.outcome.grade_statuses == ["not graded: timeout"]


def test_a_power_tower_is_refused_at_once_with_feedback(make_env) -> None:
    env = make_env(grading_timeout_s=TIMEOUT_S)
    obs, done, info = env.step(call("\\boxed{10^{10^{10^{10}}}}"))
    assert (done, info["grade_status"], info["score"]) == (False, "not graded: too large to evaluate", 0.0)
    assert obs["obs_str"] == (
        'calc_score could not grade your answer "\\boxed{10^{10^{10^{10}}}}" (the answer is a number with more '
        "than 10^300 digits (at most 100,000 are evaluated)). Give the answer as a single number or expression, "
        "such as 7/2, 2\\sqrt{3} or 60. You have 2 turns left."
    )
    assert env.outcome.grade_statuses == ["not graded: too large to evaluate"]


def test_a_closed_grader_is_recorded_as_unavailable() -> None:
    grader = Grader(workers=1)
    env = build_env(FakeSample(), None, grader=grader)
    grader.close()
    _, done, info = env.step(call(LABEL))
    assert (done, info["grade_status"], info["error"]) == (
        False,
        GradeStatus.UNAVAILABLE.value,
        "the grader is closed",
    )
    assert (env.outcome.score, env.outcome.grader_unavailable) == (0.0, True)


def test_long_answers_are_shortened_in_feedback(make_env) -> None:
    answer = "1+" * 100 + "1"
    obs, _, info = make_env().step(call(answer))
    assert info["answer"] == answer
    assert f'"{answer[:120]}..."' in obs["obs_str"]


async def test_call_step_runs_the_sync_step(make_env) -> None:
    env = make_env()
    obs, done, info = await call_step(env, call(LABEL))
    assert (done, info["score"], env.outcome.solved_at_turn) == (True, 1.0, 1)


def test_feedback_never_contains_the_label(make_env) -> None:
    label = "\\frac{17}{4}"
    env = make_env(label=label, max_turns=10)
    texts = [
        call("4"),
        call("17/5"),
        "<tool_call>{bad}</tool_call>",
        call("4", name="calc"),
        call("@@"),
        call(""),
        call("\\frac{1}{4}") + call(label),
    ]
    for text in texts:
        obs, done, _ = env.step(text)
        assert label not in obs["obs_str"] and "17}{4" not in obs["obs_str"] and "4.25" not in obs["obs_str"]
        assert done is False


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"max_turn": 3},
            "unknown Geo3kEnv setting 'max_turn'. Did you mean 'max_turns'? Valid settings: max_turns, "
            "end_on_correct, grade_final_answer, grading_timeout_s, feedback_role, tool_call_format, grader",
        ),
        (
            {"timeout": 3},
            "unknown Geo3kEnv setting 'timeout'. Valid settings: max_turns, end_on_correct, grade_final_answer, "
            "grading_timeout_s, feedback_role, tool_call_format, grader",
        ),
        (
            {"max_turns": 0},
            "Geo3kEnv setting 'max_turns' must be an integer >= 1, got 0; set max_turns in the rollout config "
            "or pass max_turns=N to build_env",
        ),
        (
            {"max_turns": True},
            "Geo3kEnv setting 'max_turns' must be an integer >= 1, got True; set max_turns in the rollout config "
            "or pass max_turns=N to build_env",
        ),
        ({"end_on_correct": "yes"}, "Geo3kEnv setting 'end_on_correct' must be true or false, got 'yes'"),
        ({"grade_final_answer": 1}, "Geo3kEnv setting 'grade_final_answer' must be true or false, got 1"),
        (
            {"grading_timeout_s": 0},
            "Geo3kEnv setting 'grading_timeout_s' must be a positive number of seconds, got 0",
        ),
        (
            {"feedback_role": "assistant"},
            "Geo3kEnv setting 'feedback_role' must be one of tool, user, got 'assistant'",
        ),
    ],
)
def test_invalid_settings_name_the_key(grader: Grader, kwargs: dict, message: str) -> None:
    with pytest.raises(EnvConfigError) as info:
        build_env(FakeSample(), None, grader=grader, **kwargs)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("args", "kwargs", "max_turns"),
    [
        (None, {}, 3),
        (argparse.Namespace(), {}, 3),
        (argparse.Namespace(max_turns=None), {}, 3),
        (argparse.Namespace(max_turns=5), {}, 5),
        (argparse.Namespace(max_turns=5), {"max_turns": 2}, 2),
    ],
)
def test_max_turns_comes_from_args_then_kwargs(
    grader: Grader, args: Any, kwargs: dict, max_turns: int
) -> None:
    env = build_env(FakeSample(), args, grader=grader, **kwargs)
    assert env.settings == Geo3kSettings(max_turns=max_turns)


@pytest.mark.parametrize(
    ("sample", "message"),
    [
        (None, "Geo3kEnv needs a sample with the reference answer in sample.label; got sample=None"),
        (
            FakeSample(label=None),
            "Geo3kEnv needs the reference answer in sample.label, got None; check the dataset's label key "
            "(the geo3k parquet column is 'answer', slime's --label-key answer)",
        ),
        (
            FakeSample(label="  "),
            "Geo3kEnv needs the reference answer in sample.label, got '  '; check the dataset's label key "
            "(the geo3k parquet column is 'answer', slime's --label-key answer)",
        ),
    ],
)
def test_missing_label_is_a_config_error(grader: Grader, sample: Any, message: str) -> None:
    with pytest.raises(EnvConfigError) as info:
        build_env(sample, None, grader=grader)
    assert str(info.value) == message


def test_numeric_label_is_graded_as_text(make_env) -> None:
    env = make_env(label=60)
    assert env.label == "60"
    assert env.step(call("60^\\circ"))[2]["grade_status"] == "correct"


def test_tool_schema(make_env) -> None:
    assert TOOL_SCHEMA["type"] == "function"
    function = TOOL_SCHEMA["function"]
    assert function["name"] == "calc_score"
    assert function["parameters"] == {
        "type": "object",
        "properties": {
            "answer": {
                "type": "string",
                "description": "The answer: a number or closed-form expression, without units.",
            }
        },
        "required": ["answer"],
    }
    env = make_env()
    assert env.tools == TOOLS == [TOOL_SCHEMA]
    before = copy.deepcopy(TOOL_SCHEMA)
    env.tools[0]["function"]["name"] = "changed"
    assert before == TOOL_SCHEMA


_FRAGMENTS = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "{",
        "}",
        "[",
        "]",
        '"name"',
        '"calc_score"',
        '"arguments"',
        '"answer"',
        '"function"',
        ":",
        ",",
        '"',
        "\\",
        "\\boxed{",
        "\\frac{1}{2}",
        "2\\sqrt{3}",
        "null",
        "3",
        "\n",
    ]
)
_TEXTS = st.one_of(
    st.text(max_size=200),
    st.lists(st.one_of(_FRAGMENTS, st.text(max_size=4)), max_size=40).map("".join),
    st.text(max_size=40).map(call),
    st.text(max_size=40).map(lambda s: f"Answer: \\boxed{{{s}}}"),
)


_XML_TEXTS = st.one_of(
    _TEXTS,
    st.text(max_size=40).map(lambda s: format_call("calc_score", {"answer": s}, "xml")),
    st.lists(
        st.one_of(
            st.sampled_from(
                ["<function=", "</function>", "<parameter=", "answer>", "</parameter>", "calc_score>"]
            ),
            _FRAGMENTS,
            st.text(max_size=4),
        ),
        max_size=40,
    ).map("".join),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_XML_TEXTS, min_size=1, max_size=3), form=st.sampled_from(["json", "xml"]))
def test_step_never_raises_and_stays_bounded(grader: Grader, texts: list[str], form: str) -> None:
    label = "\\frac{17}{4}"
    env = build_env(
        FakeSample(label),
        argparse.Namespace(max_turns=3),
        grader=grader,
        grading_timeout_s=TIMEOUT_S,
        tool_call_format=form,
    )
    env.reset()
    for turn, text in enumerate(texts, start=1):
        obs, done, info = env.step(text)
        assert isinstance(obs["obs_str"], str) and obs["role"] == "tool"
        assert isinstance(done, bool) and info["turn"] == turn
        if label not in text and label not in (info["answer"] or ""):
            assert label not in obs["obs_str"]
        if done:
            break
    outcome = env.outcome
    assert outcome.score in (0.0, 1.0)
    assert outcome.attempts == len(outcome.grade_statuses) <= outcome.turns
    assert outcome.valid_tool_calls + outcome.invalid_tool_calls <= outcome.turns


EXPECTED_XML_FORMAT = (
    "<tool_call>\n<function=calc_score>\n<parameter=answer>\n<your answer>\n</parameter>\n</function>\n"
    "</tool_call>"
)


def test_qwen35_checkpoint_reads_and_teaches_the_xml_form(grader: Grader) -> None:
    args = argparse.Namespace(max_turns=3, hf_checkpoint="tiny-qwen3.5")
    env = build_env(FakeSample(), args, grader=grader)
    assert (env.settings.tool_call_format, env.call_form) == ("xml", "xml")
    env.reset()
    obs, done, info = env.step("Legs 3 and 4.\n</think>\n\n" + call("3"))
    assert not done and info["error_kind"] == "invalid_xml"
    assert obs["obs_str"] == (
        "Your tool call was not run: the tool call must start with <function=NAME>, got a JSON object: a call is "
        "<function=NAME> holding <parameter=KEY>VALUE</parameter> elements. The expected format is:\n"
        f"{EXPECTED_XML_FORMAT}\nYou have 2 turns left."
    )
    obs, done, info = env.step(format_call("calc_score", {"answer": "\\sqrt{12}"}, "xml"))
    assert done and info["score"] == 1.0 and info["answer"] == "\\sqrt{12}"
    assert obs["obs_str"] == 'calc_score: your answer "\\sqrt{12}" is correct.'


@pytest.mark.parametrize(
    ("checkpoint", "setting", "form"),
    [
        ("tiny-qwen2.5-vl", "auto", "json"),
        ("tiny-qwen3-vl", "auto", "json"),
        ("tiny-qwen3.5-moe", "auto", "xml"),
        (None, "auto", "json"),
        ("tiny-qwen3.5", "json", "json"),
        ("tiny-qwen2.5-vl", "xml", "xml"),
    ],
)
def test_tool_call_format_setting(grader: Grader, checkpoint, setting: str, form: str) -> None:
    args = argparse.Namespace(max_turns=3, hf_checkpoint=checkpoint)
    env = build_env(FakeSample(), args, grader=grader, tool_call_format=setting)
    assert env.call_form == form
    env.reset()
    _, done, info = env.step(format_call("calc_score", {"answer": "3"}, form))
    assert info["tool_executed"] and info["grade_status"] == "incorrect" and not done


def test_bad_tool_call_format_names_the_choices(grader: Grader) -> None:
    with pytest.raises(EnvConfigError, match="'tool_call_format' must be one of auto, json, xml, got 'yaml'"):
        build_env(FakeSample(), argparse.Namespace(max_turns=3), grader=grader, tool_call_format="yaml")


def test_auto_follows_the_form_the_prompt_teaches(grader: Grader) -> None:
    """The Geometry3K instructions spell out the JSON call: a Qwen3.5 policy that follows its prompt
    must not have its calls refused for using the form the prompt showed it."""
    from envs.geo3k.sample_data import INSTRUCTION_BLOCK

    args = argparse.Namespace(max_turns=3, hf_checkpoint="tiny-qwen3.5")
    taught_json = FakeSample(prompt=f"<|im_start|>user\n{INSTRUCTION_BLOCK}\n\n<image>Find x.<|im_end|>\n")
    env = build_env(taught_json, args, grader=grader)
    assert env.call_form == "json"
    env.reset()
    _, done, info = env.step(call("3"))
    assert info["tool_executed"] and info["grade_status"] == "incorrect" and not done
    # Messages (slime without --apply-chat-template) teach the same way.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION_BLOCK}]}]
    assert build_env(FakeSample(prompt=messages), args, grader=grader).call_form == "json"
    # A prompt that shows no call, or both forms, leaves the choice to the chat template.
    assert build_env(FakeSample(prompt="Find x."), args, grader=grader).call_form == "xml"
    both = INSTRUCTION_BLOCK + format_call("calc_score", {"answer": "1"}, "xml")
    assert build_env(FakeSample(prompt=both), args, grader=grader).call_form == "xml"
    # An explicit setting wins over the prompt.
    assert build_env(taught_json, args, grader=grader, tool_call_format="xml").call_form == "xml"


@pytest.mark.parametrize(
    ("prompt", "form"),
    [
        ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', "json"),
        ('<tool_call>\n  {"name": "f"}', "json"),
        ("<tool_call>\n<function=f>\n</function>\n</tool_call>", "xml"),
        ("no example here", None),
        ([{"role": "user", "content": "<tool_call>\n<function=f>"}], "xml"),
        ([{"role": "user", "content": [{"type": "image"}]}], None),
    ],
)
def test_call_form_taught(prompt, form) -> None:
    from envs.tool_calls import call_form_taught

    assert call_form_taught(prompt) == form
