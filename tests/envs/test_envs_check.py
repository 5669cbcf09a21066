"""The env checker: it passes envs.geo3k and good envs, and pins the messages for broken ones."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from envs.check import Violation, check_env_module, check_message, load_cases, main, step_inputs, tool_inputs
from envs.grading import Grader
from envs.tool_calls import format_call

CASES = [name for name, _ in step_inputs()]
EPISODES = ["valid call (episode 1)", "valid call (episode 2)"]
ALL_STEPS = [*CASES, *EPISODES]
#: What the checker generates from geo3k's calc_score schema.
CALC_SCORE_CASES = [
    "calc_score: valid",
    "calc_score: no answer",
    "calc_score: answer of the wrong type",
    "unknown tool",
]
RAISE_ADVICE = "step must turn any model text into feedback, never raise"


def _errors(report) -> list[tuple[str, str, list[str]]]:
    return [(v.where, v.message, v.cases) for v in report.errors]


#: Grading timeout for the geo3k check: the factorial tower runs into it; ordinary answers, which
#: take milliseconds, must stay far below it even on a loaded machine.
GEO3K_GRADING_TIMEOUT_S = 3.0


def test_geo3k_passes(grader: Grader) -> None:
    report = check_env_module(
        "envs.geo3k", env_kwargs={"grader": grader, "grading_timeout_s": GEO3K_GRADING_TIMEOUT_S}
    )
    assert report.errors == []
    assert report.warnings == []
    assert report.ok
    assert [t.case for t in report.timings] == [*CASES, *CALC_SCORE_CASES, *EPISODES]
    assert report.reward_sources == {"outcome.score", "info['score']"}
    outcomes = {t.case: t.outcome for t in report.timings}
    assert [outcomes[c] for c in CALC_SCORE_CASES] == ["done=True", "done=False", "done=False", "done=False"]
    # label "3": a correct call and a correct final answer end the episode; a wrong one does not.
    assert (outcomes["valid call"], outcomes["wrong answer"], outcomes["final boxed answer"]) == (
        "done=True",
        "done=False",
        "done=True",
    )
    # The factorial tower's step lasts at least the grading timeout it runs into. (That the power
    # tower is refused before it reaches a grading worker is pinned in test_envs_grading.py.)
    assert {t.case: t.seconds for t in report.timings}["slow math"] >= GEO3K_GRADING_TIMEOUT_S
    assert report.render().endswith("PASS: 0 error(s), 0 warning(s)")


def test_battery_covers_the_hostile_inputs() -> None:
    texts = dict(step_inputs())
    assert len(texts["huge (1 MB)"]) == 1_000_000
    assert texts["empty"] == ""
    assert texts["nested braces"].count("{") == 10_000
    assert texts["several calls"].count("<tool_call>") == 4
    assert CASES == [
        "valid call",
        "wrong answer",
        "garbage",
        "empty",
        "whitespace",
        "huge (1 MB)",
        "unicode",
        "malformed JSON",
        "single quotes",
        "unterminated call",
        "several calls",
        "nested braces",
        "nested arrays",
        "final boxed answer",
        "hostile math",
        "slow math",
    ]


NO_TOOLS_WARNING = (
    "TOOLS: the module declares no TOOLS; the rollout renders the module's TOOLS into prompts "
    "(tools_in_prompt), and the checker can only guess how to call the env"
)


def test_slime_style_env_passes_with_a_warning_about_tools(fixtures_dir: Path) -> None:
    report = check_env_module(str(fixtures_dir / "good_sync_env.py"))
    assert report.ok
    assert [str(w) for w in report.warnings] == [NO_TOOLS_WARNING]
    assert report.reward_sources == {"info['score']"}


def test_async_env_with_images_passes(fixtures_dir: Path) -> None:
    report = check_env_module(str(fixtures_dir / "good_async_env.py"))
    assert (report.errors, report.warnings) == ([], [])
    assert {t.case: t.outcome for t in report.timings}["empty"] == "done=False"


def test_env_that_raises_on_model_text(fixtures_dir: Path) -> None:
    path = fixtures_dir / "raising_env.py"
    report = check_env_module(str(path))
    assert not report.ok
    assert _errors(report) == [
        (
            "step",
            f"raised IndexError: list index out of range at {path}:20; {RAISE_ADVICE}",
            ["garbage", "empty", "whitespace", "final boxed answer"],
        ),
        (
            "step",
            "raised JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 52 "
            f"(char 51) at {path}:21; {RAISE_ADVICE}",
            ["malformed JSON"],
        ),
        (
            "step",
            "raised JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 "
            f"(char 1) at {path}:21; {RAISE_ADVICE}",
            ["single quotes", "nested braces"],
        ),
        (
            "step",
            "raised RecursionError: maximum recursion depth exceeded while decoding a JSON array from a unicode "
            f"string at {path}:21; {RAISE_ADVICE}",
            ["nested arrays"],
        ),
        # Generated from its TOOLS: the call without its required argument.
        (
            "step",
            f"raised KeyError: 'answer' at {path}:21; {RAISE_ADVICE}",
            ["calc_score: no answer", "unknown tool"],
        ),
    ]


def test_env_with_wrong_shapes_and_a_bad_message(fixtures_dir: Path) -> None:
    report = check_env_module(str(fixtures_dir / "bad_shapes_env.py"))
    text_cases = ["garbage", "whitespace", "final boxed answer"]
    steps = [*CASES, "calc_score: valid", "unknown tool", *EPISODES]
    call_cases = [c for c in steps if c not in (*text_cases, "empty")]
    assert _errors(report) == [
        ("reset()", "returned a dict; expected a tuple (observation: dict, info: dict)", steps),
        ("step", "returned done of type int; expected a bool", call_cases),
        ("step", "info is a NoneType; expected a dict", call_cases),
        (
            "format_observation",
            "content part 0 has type 'img'; expected 'text' or 'image'",
            [c for c in steps if c != "empty"],
        ),
        (
            "format_observation",
            "content part 1 (image) cannot be loaded: image file y.png does not exist",
            [c for c in steps if c != "empty"],
        ),
        ("step", "observation['obs_str'] is a list of 3 (str, str, str); expected a str", text_cases),
        (
            "step",
            "returned a tuple of 2 (dict, bool); expected a tuple (observation: dict, done: bool, info: dict)",
            ["empty"],
        ),
    ]
    assert {t.case: t.outcome for t in report.timings}["valid call"] == "done=1 (not a bool)"


def test_env_missing_format_observation(fixtures_dir: Path) -> None:
    path = fixtures_dir / "missing_method_env.py"
    report = check_env_module(str(path))
    assert [str(e) for e in report.errors] == [
        f"build_env: build_env of '{path}' returned NoFormat, which has no callable format_observation. The "
        "module defines format_observation as a function; make it a method of the env. Fix: define `def "
        "build_env(sample=None, args=None, **kwargs)` returning an env with reset(), step(text) and "
        "format_observation(obs) (subclass envs.base.BaseInteractionEnv)"
    ]
    assert report.timings == []


def test_env_whose_step_hangs(fixtures_dir: Path) -> None:
    report = check_env_module(str(fixtures_dir / "slow_env.py"), step_timeout_s=0.2, cases=["empty"])
    assert [str(e) for e in report.errors] == [
        "step: did not return within 0.2 s; a step must bound its own work [in: empty, valid call (episode 1)]"
    ]
    assert [t.outcome for t in report.timings] == ["hung", "hung"]


@pytest.mark.parametrize(
    ("name", "start"),
    [
        ("import_error_env.py", "load: importing env file '{path}' failed with KeyError: 'max_turn'\n"),
        ("no_build_env.py", "load: env module '{path}' has no callable build_env (build_env is missing)."),
    ],
)
def test_modules_that_do_not_load(fixtures_dir: Path, name: str, start: str) -> None:
    path = fixtures_dir / name
    report = check_env_module(str(path))
    assert len(report.errors) == 1
    assert str(report.errors[0]).startswith(start.format(path=path))


def test_geo3k_rejects_unknown_build_kwargs(grader: Grader) -> None:
    report = check_env_module("envs.geo3k", env_kwargs={"grader": grader, "max_turn": 2})
    assert [str(e) for e in report.errors] == [
        "build_env: raised EnvConfigError: unknown Geo3kEnv setting 'max_turn'. Did you mean 'max_turns'? Valid "
        "settings: max_turns, end_on_correct, grade_final_answer, grading_timeout_s, feedback_role, tool_call_format, grader at "
        f"{Path(__file__).resolve().parents[2] / 'envs' / 'geo3k' / 'env.py'}:{_line_of_reject_unknown()}"
    ]


def _line_of_reject_unknown() -> int:
    import inspect

    from envs.geo3k import env

    source, first = inspect.getsourcelines(env._reject_unknown)
    return first + next(i for i, line in enumerate(source) if "raise EnvConfigError" in line)


@pytest.mark.parametrize(
    ("message", "errors", "warnings"),
    [
        ({"role": "tool", "content": "ok"}, [], []),
        (
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": Image.new("RGB", (2, 2))},
                    {"type": "text", "text": "t"},
                ],
            },
            [],
            [],
        ),
        ("text", ["returned str; expected a dict with 'role' and 'content'"], []),
        ({"content": "x"}, ["'role' must be a non-empty string, got None"], []),
        ({"role": "tool"}, ["the message has no 'content'"], []),
        (
            {"role": "observer", "content": "x"},
            [],
            ["role 'observer' is not one of system, user, assistant, tool; chat templates may reject it"],
        ),
        ({"role": "tool", "content": 3}, ["'content' must be a string or a list of parts, got int"], []),
        ({"role": "tool", "content": ["x"]}, ["content part 0 is a str; expected a dict with a 'type'"], []),
        (
            {"role": "tool", "content": [{"type": "text", "text": None}]},
            ["content part 0 (text) needs 'text' as a string, got None"],
            [],
        ),
    ],
)
def test_check_message(message, errors: list[str], warnings: list[str]) -> None:
    assert check_message(message) == (errors, warnings)


def test_violation_lists_at_most_four_cases() -> None:
    v = Violation("step", "boom", ["a", "b", "c", "d", "e", "f"])
    assert str(v) == "step: boom [in: a, b, c, d and 2 more]"


def test_cli_exit_status_and_report(fixtures_dir: Path, capsys) -> None:
    assert main([str(fixtures_dir / "good_sync_env.py")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Checking env module {fixtures_dir / 'good_sync_env.py'}\n  step times:\n")
    assert out.rstrip().endswith("PASS: 0 error(s), 1 warning(s)")
    assert main([str(fixtures_dir / "raising_env.py")]) == 1
    assert capsys.readouterr().out.rstrip().endswith("FAIL: 5 error(s), 0 warning(s)")


def test_cli_passes_kwargs_to_build_env(capsys) -> None:
    assert main(["envs.geo3k", "--set", "max_turns=0"]) == 1
    assert "Geo3kEnv setting 'max_turns' must be an integer >= 1, got 0" in capsys.readouterr().out


def test_a_tool_that_raises_on_valid_arguments_fails(grader: Grader, fixtures_dir: Path) -> None:
    path = fixtures_dir / "zoom_raising_env.py"
    report = check_env_module(str(path), env_kwargs={"grader": grader, "grading_timeout_s": GEO3K_GRADING_TIMEOUT_S})
    assert [(e.where, e.cases) for e in report.errors] == [("step", ["zoom: valid"])]
    assert report.errors[0].message.startswith("raised KeyError: 'crp' at ")


def test_image_observations_go_through_the_real_processor(fixtures_dir: Path, qwen25_processing) -> None:
    path = str(fixtures_dir / "thin_image_env.py")
    # Without a processor nothing shows; every episode reaching the image would fail.
    assert check_env_module(path).ok
    report = check_env_module(path, processing=qwen25_processing)
    assert [e.where for e in report.errors] == ["format_observation"]
    assert "zoom: valid" in report.errors[0].cases
    assert report.errors[0].message.startswith(
        "the image processor refuses a 600x2 image (ValueError: absolute aspect ratio must be smaller than 200"
    )


def test_an_env_with_no_reward_signal_fails(fixtures_dir: Path) -> None:
    report = check_env_module(str(fixtures_dir / "no_reward_env.py"))
    assert [str(e) for e in report.errors] == [
        "reward: no reward signal: the env has no `outcome` with a numeric `score` and no step returned "
        "info['score'], so every episode would score 0. Set env.outcome.score (subclass envs.tool_env.ToolEnv "
        "and return ToolResult(score=...)) or return info['score']"
    ]


def test_every_image_form_the_rollout_loads_passes(fixtures_dir: Path, qwen25_processing) -> None:
    report = check_env_module(str(fixtures_dir / "image_forms_env.py"), processing=qwen25_processing, cases=["empty"])
    assert (report.errors, report.warnings) == ([], [])
    # A PIL image, a PNG file, a data URI; each costs what the processor makes of it.
    assert [r.size for r in report.images][:3] == [(28, 56), (56, 28), (56, 28)]
    for record in report.images[:3]:
        grid = qwen25_processing.process_images([Image.new("RGB", record.size)])["image_grid_thw"]
        assert record.pads == qwen25_processing.pads_per_image(grid)[0]


def test_a_message_that_drops_the_observations_images_fails(fixtures_dir: Path, tmp_path: Path) -> None:
    source = (fixtures_dir / "image_forms_env.py").read_text()
    dropping = tmp_path / "dropping_env.py"
    dropping.write_text(
        source
        + "\n\ndef _text_only(self, observation):\n    return {'role': 'tool', 'content': observation['obs_str']}\n\n\n"
        "ImageFormsEnv.format_observation = _text_only\n"
    )
    report = check_env_module(str(dropping), cases=["empty"])
    assert [str(e) for e in report.errors] == [
        "format_observation: the observation has 3 image(s) but the message keeps 0; the model would never see "
        "them [in: empty, valid call (episode 1), valid call (episode 2)]"
    ]


def test_author_cases(grader: Grader, tmp_path: Path) -> None:
    zoom = format_call("zoom", {"left": 0.25, "top": 0.25, "right": 0.75, "bottom": 0.75})
    answer = format_call("calc_score", {"answer": "3"})
    lines = [
        {"name": "zoom then answer", "text": [zoom, answer], "expect": {"done": True, "score": 1.0}},
        {"name": "zoom shows a crop", "text": zoom, "expect": {"images": 1, "tool_executed": True, "done": False}},
        {"name": "wrong expectation", "text": zoom, "expect": {"images": 2}},
        {"name": "too many turns", "text": [answer, answer]},
    ]
    path = tmp_path / "cases.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    report = check_env_module(
        "envs.geo3k_zoom",
        env_kwargs={"grader": grader, "grading_timeout_s": GEO3K_GRADING_TIMEOUT_S},
        cases=["empty"],
        author_cases=load_cases(str(path)),
    )
    assert [str(e) for e in report.errors] == [
        "case: expected images=2 after the last turn, got 1 [in: wrong expectation]",
        "case: the episode ended at turn 1 of 2 [in: too many turns]",
    ]
    assert "zoom then answer (turn 2)" in [t.case for t in report.timings]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "not valid JSON"),
        ('{"name": "x"}', 'each line needs "text"'),
        ('{"text": [1]}', '"text" must be a string or a non-empty list of strings'),
        ('{"text": "a", "expect": {"reward": 1}}', "unknown keys ['reward']"),
        ('{"text": "a", "expect": {"done": 1}}', '"expect"."done" has the wrong type (1)'),
    ],
)
def test_bad_case_files_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "cases.jsonl"
    path.write_text('"a plain string is one case"\n' + line + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ")) as caught:
        load_cases(str(path))
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("data:image/png;base64,not-base64!", "cannot be loaded"),
        ("/no/such/file.png", "cannot be loaded: image file /no/such/file.png does not exist"),
        (3, "needs 'image' as a PIL.Image.Image, a file path or a data URI, got int"),
    ],
)
def test_check_message_image_forms(image, problem: str) -> None:
    errors, _ = check_message({"role": "tool", "content": [{"type": "image", "image": image}]})
    assert len(errors) == 1 and errors[0].startswith("content part 0 (image) ") and problem in errors[0]


def test_generated_tool_inputs() -> None:
    from envs.geo3k_zoom import TOOLS

    cases = {name: (text, valid) for name, text, valid in tool_inputs(TOOLS, "xml", label="7")}
    assert cases["calc_score: valid"] == (format_call("calc_score", {"answer": "7"}, "xml"), True)
    assert cases["zoom: no left"][1] is False and "<parameter=left>" not in cases["zoom: no left"][0]
    assert list(cases)[-1] == "unknown tool"


def test_image_observations_against_the_response_budget(grader: Grader, qwen25_processing) -> None:
    from envs.check import AuthorCase

    zoom = AuthorCase("zoom", [format_call("zoom", {"left": 0.25, "top": 0.25, "right": 0.75, "bottom": 0.75})])

    def check(budget: int):
        return check_env_module(
            "envs.geo3k_zoom",
            env_kwargs={"grader": grader, "grading_timeout_s": GEO3K_GRADING_TIMEOUT_S},
            processing=qwen25_processing,
            response_budget=budget,
            cases=["empty"],
            author_cases=[zoom],
        )

    # zoom's 224 px crop is 64 image tokens: all of a 64-token budget, half of 128, little of 4096.
    counts = {}
    for budget in (64, 128, 4096):
        report = check(budget)
        counts[budget] = (
            sum(e.where == "budget" for e in report.errors),
            sum(w.where == "budget" for w in report.warnings),
        )
    assert counts == {64: (1, 0), 128: (0, 1), 4096: (0, 0)}
    assert [str(e) for e in check(64).errors] == [
        "budget: a 224x224 image observation is 64 image tokens, all of the 64-token response budget (model "
        "and env tokens together); an observation that does not fit ends the episode TRUNCATED. Return smaller "
        "images or raise the budget [in: zoom]"
    ]
