"""Geometry3K interaction environment: the ``calc_score`` tool tells the model whether its answer is right.

One episode, up to ``max_turns`` model turns. Each turn the model either

- calls ``calc_score`` (alias ``calc_geo3k_reward``) with one argument, ``answer``: the answer is
  graded against ``sample.label`` and the feedback names the answer and says whether it matched.
  A correct answer ends the episode (``end_on_correct``). A wrong one continues; the feedback on
  turn ``max_turns - 1`` says this is the last chance and asks for ``Answer: \\boxed{...}``;
- writes a malformed call: the feedback says what was wrong and gives the exact expected syntax
  (in the call form the model's chat template teaches: JSON, or Qwen3.5's XML; see
  ``Geo3kSettings.tool_call_format``); the turn is used up;
- writes no tool call: the episode ends, and the response's last ``\\boxed{}`` answer, if any, is
  graded (``grade_final_answer``).

The reward is :attr:`Geo3kEnv.outcome` (``outcome.score`` is 1.0 once any graded answer was
correct), never text parsed from the conversation: feedback strings never contain the label.

``step`` is synchronous (run it with :func:`envs.base.call_step` from asyncio), never raises on
model text, and returns within the grading timeout plus the wait for a free grading worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from envs.base import EnvConfigError, did_you_mean
from envs.grading import Grader, GradeResult, GradeStatus, extract_boxed, get_default_grader
from envs.tool_calls import CALL_FORMS, call_form_for, call_form_taught
from envs.tool_env import ToolEnv, ToolOutcome, ToolResult

__all__ = [
    "TOOL_ALIASES",
    "TOOL_NAME",
    "TOOL_SCHEMA",
    "TOOLS",
    "Geo3kEnv",
    "Geo3kOutcome",
    "Geo3kSettings",
    "build_env",
]

TOOL_NAME = "calc_score"
#: verl's name for the same tool; the dataset's instructions say calc_score.
TOOL_ALIASES = ("calc_geo3k_reward",)

#: The tool in OpenAI function format, as chat templates take it (``tools=TOOLS``).
TOOL_SCHEMA: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": TOOL_NAME,
        "description": (
            "Check an answer to the geometry problem. Returns whether the answer is correct. "
            'Give the final value only, e.g. "7/2", "2\\\\sqrt{3}", "60".'
        ),
        "parameters": {
            "type": "object",
            "properties": {
                "answer": {
                    "type": "string",
                    "description": "The answer: a number or closed-form expression, without units.",
                }
            },
            "required": ["answer"],
        },
    },
}
TOOLS: list[dict[str, Any]] = [TOOL_SCHEMA]

_CALL_FORM_SETTINGS = ("auto", *CALL_FORMS)
#: Longest answer quoted back in feedback; longer ones are cut with "...".
_QUOTE_CHARS = 120
_FEEDBACK_ROLES = ("tool", "user")


@dataclass(frozen=True)
class Geo3kSettings:
    """Validated settings; see :meth:`from_args` for where each value comes from."""

    max_turns: int = 3
    end_on_correct: bool = True
    grade_final_answer: bool = True
    grading_timeout_s: float = 5.0
    #: Role of feedback messages: "tool" (rendered as a tool response) or "user".
    feedback_role: str = "tool"
    #: The tool-call form read and shown in feedback: "json", "xml" (Qwen3.5), or "auto": the form
    #: the chat template of ``args.hf_checkpoint`` teaches (JSON when there is none).
    tool_call_format: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.max_turns, bool) or not isinstance(self.max_turns, int) or self.max_turns < 1:
            raise EnvConfigError(
                f"Geo3kEnv setting 'max_turns' must be an integer >= 1, got {self.max_turns!r}; "
                "set max_turns in the rollout config or pass max_turns=N to build_env"
            )
        for key in ("end_on_correct", "grade_final_answer"):
            value = getattr(self, key)
            if not isinstance(value, bool):
                raise EnvConfigError(f"Geo3kEnv setting '{key}' must be true or false, got {value!r}")
        timeout = self.grading_timeout_s
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, (int, float))
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise EnvConfigError(
                f"Geo3kEnv setting 'grading_timeout_s' must be a positive number of seconds, got {timeout!r}"
            )
        if self.tool_call_format not in _CALL_FORM_SETTINGS:
            raise EnvConfigError(
                f"Geo3kEnv setting 'tool_call_format' must be one of {', '.join(_CALL_FORM_SETTINGS)}, "
                f"got {self.tool_call_format!r}"
            )
        if self.feedback_role not in _FEEDBACK_ROLES:
            raise EnvConfigError(
                f"Geo3kEnv setting 'feedback_role' must be one of {', '.join(_FEEDBACK_ROLES)}, "
                f"got {self.feedback_role!r}"
            )

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_args(cls, args: Any = None, prompt: Any = None, **overrides: Any) -> Geo3kSettings:
        """Defaults, then ``args.max_turns`` (slime's config, when set), then ``overrides``; a
        ``tool_call_format`` of "auto" becomes the form the episode's ``prompt`` shows by example
        (the Geometry3K instructions spell out the JSON form), else the form ``args.hf_checkpoint``'s
        chat template teaches (Qwen3.5: XML), else JSON."""
        values: dict[str, Any] = {}
        max_turns = getattr(args, "max_turns", None) if args is not None else None
        if max_turns is not None:
            values["max_turns"] = max_turns
        values.update(overrides)
        _reject_unknown(values, cls.names())
        settings = cls(**values)
        if settings.tool_call_format == "auto":
            checkpoint = getattr(args, "hf_checkpoint", None) if args is not None else None
            taught = call_form_taught(prompt) if prompt is not None else None
            form = taught or (call_form_for(str(checkpoint)) if checkpoint else None)
            if form is not None:
                settings = replace(settings, tool_call_format=form)
        return settings


def _reject_unknown(values: dict[str, Any], valid: list[str]) -> None:
    for key in values:
        if key not in valid:
            raise EnvConfigError(
                f"unknown Geo3kEnv setting '{key}'.{did_you_mean(key, valid)} Valid settings: {', '.join(valid)}"
            )


@dataclass
class Geo3kOutcome(ToolOutcome):
    """What the episode achieved; the reward function reads ``score``, never the feedback text.

    ``score`` is 1.0 once any graded answer (tool call or final answer) was correct, else 0.0."""

    #: Answers submitted for grading: executed tool calls plus a graded final answer.
    attempts: int = 0
    #: 1-based turn of the first correct answer, or None.
    solved_at_turn: int | None = None
    #: The last answer submitted for grading, as the model wrote it.
    last_answer: str | None = None
    #: GradeStatus value of every attempt, in order ("correct", "not graded: timeout", ...).
    grade_statuses: list[str] = field(default_factory=list)

    @property
    def grader_unavailable(self) -> bool:
        """True if an answer went ungraded because of the grader, not the answer."""
        return GradeStatus.UNAVAILABLE.value in self.grade_statuses


class Geo3kEnv(ToolEnv):
    """The calc_score environment for one Geometry3K problem (see the module docstring).

    Tool dispatch, argument checks, bad-call feedback, turn counting and the last-chance message come
    from :class:`envs.tool_env.ToolEnv`; this class grades answers."""

    TOOLS = TOOLS
    TOOL_ALIASES = {TOOL_NAME: TOOL_ALIASES}
    ARGUMENT_EXAMPLES = {"answer": "7/2"}
    LAST_CHANCE = (
        "This is your last chance: do not call the tool again. Reply with your final answer "
        "in the form Answer: \\boxed{...}"
    )
    outcome_class = Geo3kOutcome
    outcome: Geo3kOutcome

    def __init__(
        self, label: str, settings: Geo3kSettings | None = None, *, grader: Grader | None = None
    ) -> None:
        if not isinstance(label, str) or not label.strip():
            raise EnvConfigError(f"Geo3kEnv needs the reference answer as a non-empty string, got {label!r}")
        self.label = label
        self.settings = settings or Geo3kSettings()
        form = self.settings.tool_call_format
        super().__init__(
            max_turns=self.settings.max_turns,
            call_form="json" if form == "auto" else form,
            role=self.settings.feedback_role,
        )
        self._grader = grader if grader is not None else get_default_grader()
        # Workers start now, while the model generates its first turn.
        self._grader.start()

    def new_info(self) -> dict[str, Any]:
        return {**super().new_info(), "grade_status": None}

    # -- the tool --------------------------------------------------------------------------------

    def tool_calc_score(self, answer: str) -> ToolResult:
        answer = answer.strip()
        info: dict[str, Any] = {}
        result = self._grade(answer, info)
        if result.correct:
            text = f"{TOOL_NAME}: your answer {_quote(answer)} is correct."
            if not self.settings.end_on_correct:
                text += " You may now state your final answer."
            return ToolResult(text, info=info, done=self.settings.end_on_correct, done_reason="correct")
        if result.status is GradeStatus.INCORRECT:
            return ToolResult(
                f"{TOOL_NAME}: your answer {_quote(answer)} is incorrect. Check your reasoning and try "
                "a different approach instead of repeating the same answer.",
                info=info,
            )
        info["error"] = result.detail
        return ToolResult(
            f"{TOOL_NAME} could not grade your answer {_quote(answer)} ({result.detail}). "
            "Give the answer as a single number or expression, such as 7/2, 2\\sqrt{3} or 60.",
            info=info,
        )

    def no_tool_call(self, response_text: str, info: dict[str, Any]) -> str:
        answer = extract_boxed(response_text)
        if answer is None or not answer.strip():
            return "No tool call found; the episode is over."
        if not self.settings.grade_final_answer:
            info["answer"] = answer
            return "No tool call found; the episode is over (final answers are not graded)."
        result = self._grade(answer, info)
        verdict = (
            "correct" if result.correct else "incorrect" if result.status.graded else result.status.value
        )
        return f"No tool call found; the episode is over. Final answer {_quote(answer)}: {verdict}."

    def _grade(self, answer: str, info: dict[str, Any]) -> GradeResult:
        result = self._grader.grade(answer, self.label, timeout_s=self.settings.grading_timeout_s)
        self.outcome.attempts += 1
        self.outcome.last_answer = answer
        self.outcome.grade_statuses.append(result.status.value)
        if result.correct and self.outcome.solved_at_turn is None:
            self.outcome.solved_at_turn = self.turn
            self.record_score(1.0)
        info.update(answer=answer, score=result.score, grade_status=result.status.value)
        return result


def _quote(answer: str) -> str:
    # Quoted as written (no JSON escaping): the model should see its own LaTeX unchanged.
    if len(answer) > _QUOTE_CHARS:
        answer = answer[:_QUOTE_CHARS] + "..."
    return f'"{answer}"'


def _label_of(sample: Any) -> str:
    if sample is None:
        raise EnvConfigError(
            "Geo3kEnv needs a sample with the reference answer in sample.label; got sample=None"
        )
    label = getattr(sample, "label", None)
    if label is None or not str(label).strip():
        raise EnvConfigError(
            f"Geo3kEnv needs the reference answer in sample.label, got {label!r}; check the dataset's "
            "label key (the geo3k parquet column is 'answer', slime's --label-key answer)"
        )
    return str(label)


def build_env(sample: Any = None, args: Any = None, **kwargs: Any) -> Geo3kEnv:
    """Build the env for one episode: the label from ``sample.label``, ``max_turns`` from
    ``args.max_turns``; keyword arguments override settings (see :class:`Geo3kSettings`) and may pass
    ``grader=`` (a :class:`envs.grading.Grader`; the process-wide default otherwise)."""
    grader = kwargs.pop("grader", None)
    valid = [*Geo3kSettings.names(), "grader"]
    _reject_unknown(kwargs, valid)
    settings = Geo3kSettings.from_args(args, getattr(sample, "prompt", None), **kwargs)
    return Geo3kEnv(_label_of(sample), settings, grader=grader)
