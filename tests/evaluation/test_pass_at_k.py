"""The pass@k estimator against hand-computed values, and aggregation of hand-built results."""

from __future__ import annotations

import json
from math import comb

import pytest

from rollout.evaluation import (
    EvalReport,
    ProblemResult,
    SampleResult,
    TurnAccuracy,
    check_ks,
    default_ks,
    format_table,
    pass_at_k,
    summarize,
)


def test_hand_computed_values():
    assert pass_at_k(5, 2, 2) == 0.7  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(10, 3, 4) == 1 - 35 / 210  # 1 - C(7,4)/C(10,4)
    assert pass_at_k(4, 2, 3) == 1.0  # fewer wrong samples than k: some draw is right
    assert pass_at_k(8, 3, 1) == 0.375  # k=1 is c/n
    assert [pass_at_k(5, 0, k) for k in range(1, 6)] == [0.0] * 5
    assert [pass_at_k(5, 5, k) for k in range(1, 6)] == [1.0] * 5


def test_large_n_is_exact():
    # C(999, 500) / C(1000, 500) = 500/1000: both numbers have ~300 digits, no float overflows.
    assert pass_at_k(1000, 1, 500) == 0.5
    product = 1.0
    for i in range(2000 - 10 + 1, 2001):
        product *= 1 - 1000 / i  # the product form of Chen et al.
    assert pass_at_k(2000, 10, 1000) == pytest.approx(1 - product, rel=1e-12)
    assert pass_at_k(2000, 10, 1000) == 1 - comb(1990, 1000) / comb(2000, 1000)


@pytest.mark.parametrize(
    ("n", "c", "k", "message"),
    [
        (0, 0, 1, r"^pass@k needs n >= 1 and 0 <= c <= n, got n=0, c=0$"),
        (4, 5, 1, r"^pass@k needs n >= 1 and 0 <= c <= n, got n=4, c=5$"),
        (4, 1, 5, r"^pass@k needs 1 <= k <= n, got k=5 with n=4; sample at least k per problem$"),
        (4, 1, 0, r"^pass@k needs 1 <= k <= n, got k=0 with n=4"),
    ],
)
def test_bad_arguments(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_ks():
    assert default_ks(1) == [1]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(6) == [1, 2, 4, 6]
    assert check_ks(None, 4) == [1, 2, 4]
    assert check_ks([4, 2, 2], 8) == [1, 2, 4]
    with pytest.raises(ValueError, match=r"^ks \[16\] are outside 1\.\.n=8; "):
        check_ks([1, 16], 8)


def result(sample, correct, *, status="COMPLETED", turns=1, solved=None, valid=0, invalid=0, tokens=10):
    return SampleResult(
        sample=sample,
        score=1.0 if correct else 0.0,
        correct=correct,
        status=status,
        status_reason="",
        turns=turns,
        solved_at_turn=solved,
        final_answer=None,
        model_tokens=tokens,
        env_tokens=2 * max(turns - 1, 0),
        response_tokens=tokens + 2 * max(turns - 1, 0),
        valid_tool_calls=valid,
        invalid_tool_calls=invalid,
    )


def hand_built() -> list[ProblemResult]:
    first = [
        result(0, True, solved=1, valid=1),
        result(1, True, turns=2, solved=2, valid=2, tokens=20),
        result(2, False, turns=3, valid=1, invalid=1, tokens=30),
        result(3, False, status="TRUNCATED", tokens=40),
        result(4, False, status="ABORTED", tokens=0),
    ]
    second = [result(j, False, status="FAILED", turns=0, tokens=0) for j in range(5)]
    return [ProblemResult(7, "5", 5, 2, first), ProblemResult(9, "12", 5, 0, second, error="broken")]


def test_summarize_hand_built_results():
    summary = summarize(hand_built(), ks=[2, 5], max_turns=3, elapsed_s=2.0)
    assert (summary.problems, summary.samples, summary.n, summary.ks) == (2, 10, 5, [1, 2, 5])
    assert summary.pass_at_k == {1: 0.2, 2: 0.35, 5: 0.5}  # means of (0.4, 0), (0.7, 0), (1, 0)
    assert summary.pass_at_1 == 0.2
    assert summary.mean_score == 0.2
    assert summary.accuracy_by_turn == [
        TurnAccuracy(1, 0.1, 0.1),
        TurnAccuracy(2, 0.1, 0.2),
        TurnAccuracy(3, 0.0, 0.2),
    ]
    assert (summary.valid_tool_calls, summary.invalid_tool_calls, summary.tool_call_validity) == (4, 1, 0.8)
    assert summary.mean_turns == 0.8
    assert summary.mean_model_tokens == 10.0
    assert summary.mean_env_tokens == 0.6  # 2 + 4 over 10 episodes
    assert summary.mean_response_tokens == 10.6
    assert summary.status_counts == {"COMPLETED": 3, "TRUNCATED": 1, "ABORTED": 1, "FAILED": 5}
    assert summary.problems_with_errors == 1


def test_table_and_json():
    summary = summarize(hand_built(), ks=[2], max_turns=2, elapsed_s=2.0)
    assert format_table(summary).splitlines() == [
        "metric                value",
        "episodes              2 problems x 5 samples = 10",
        "pass@1                0.2000",
        "pass@2                0.3500",
        "mean score            0.2000",
        "tool-call validity    0.8000 (4 valid, 1 invalid)",
        "mean turns            0.80",
        "mean model tokens     10.0",
        "mean env tokens       0.6",
        "mean response tokens  10.6",
        "status                COMPLETED 3, TRUNCATED 1, ABORTED 1, FAILED 5",
        "problems not run      1",
        "elapsed               2.0 s (5.00 episodes/s)",
        "",
        "turn  solved at  solved by",
        "   1     0.1000     0.1000",
        "   2     0.1000     0.2000",
    ]
    report = EvalReport(summary, hand_built(), {"n": 5})
    data = json.loads(json.dumps(report.to_dict()))
    assert data["summary"]["pass_at_k"] == {"pass@1": 0.2, "pass@2": 0.35}
    assert data["problems"][0]["samples"][1]["solved_at_turn"] == 2
    assert data["problems"][1]["error"] == "broken"
    assert data["settings"] == {"n": 5}


def test_no_tool_calls_and_no_problems():
    summary = summarize([ProblemResult(0, "1", 1, 0, [result(0, False)])])
    assert summary.tool_call_validity is None
    assert "tool-call validity    -" in format_table(summary)
    with pytest.raises(ValueError, match="^nothing to summarize"):
        summarize([])
