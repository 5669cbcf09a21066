"""evaluate() end to end: scripted outcomes aggregate to exact numbers; the tiny model gives a complete
report in-process, over SGLang's HTTP API and from the command line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from envs.geo3k.dataset import Geo3kRow, read_geo3k_parquet, write_geo3k_parquet
from envs.geo3k.sample_data import generate_problems
from rollout.evaluation import EvalProblem, TurnAccuracy, evaluate, evaluate_sync
from rollout.prompts import build_sample
from tests.rollout.conftest import call, make_args

from .conftest import ProblemScriptedEngine, picture

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "examples" / "geo3k_vlm_multi_turn" / "eval_geo3k.py"
END = "<|im_end|>"

# Problem A: solved at turn 1; solved at turn 2; wrong, an invalid call, wrong final answer; truncated.
# Problem B: every episode answers correctly without the tool. Problem C: the engine aborts.
SCRIPTS = {
    "Problem A": [
        [call("5") + END],
        [call("4") + END, call("5") + END],
        [call("4") + END, "<tool_call>{not json</tool_call>" + END, "Answer: \\boxed{3}" + END],
        [("Let me think about this for a long time", "length")],
    ],
    "Problem B": [["Answer: \\boxed{12}" + END]] * 4,
    "Problem C": [[("partial", "abort")]] * 4,
}


def problems() -> list[EvalProblem]:
    return [
        EvalProblem(10, "Problem A: <image>Find x.", "5", [picture(0)]),
        EvalProblem(11, "Problem B: <image>Find y.", "12", [picture(80)]),
        EvalProblem(12, "Problem C: <image>Find z.", "7", [picture(160)]),
    ]


def broken_row(tmp_path) -> Geo3kRow:
    return Geo3kRow(13, "Problem D: <image>Find w.", "2", [str(tmp_path / "missing.png")])


def count_tokens(tokenizer, texts) -> int:
    return sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)


async def test_scripted_outcomes_aggregate_exactly(qwen25_processing, tmp_path):
    tok = qwen25_processing.tokenizer
    engine = ProblemScriptedEngine(tok, SCRIPTS)
    report = await evaluate(
        [*problems(), broken_row(tmp_path)], make_args(engine), n=4, ks=[2, 4], temperature=0.7, concurrency=5
    )
    summary = report.summary

    a, b, c, d = report.problems
    assert [(p.index, p.label, p.n, p.correct) for p in report.problems] == [
        (10, "5", 4, 2),
        (11, "12", 4, 4),
        (12, "7", 4, 0),
        (13, "2", 4, 0),
    ]
    assert sorted((s.status, s.turns, s.solved_at_turn, s.final_answer) for s in a.samples) == [
        ("COMPLETED", 1, 1, "5"),
        ("COMPLETED", 2, 2, "5"),
        ("COMPLETED", 3, None, "3"),
        ("TRUNCATED", 1, None, None),
    ]
    assert [(s.score, s.solved_at_turn, s.final_answer) for s in b.samples] == [(1.0, 1, "12")] * 4
    assert {s.status for s in c.samples} == {"ABORTED"}
    assert d.error.startswith("RowImageError: row 13 image 0: image file ")
    assert [(s.status, s.score, s.turns) for s in d.samples] == [("FAILED", 0.0, 0)] * 4

    assert (summary.problems, summary.samples, summary.n, summary.ks) == (4, 16, 4, [1, 2, 4])
    assert summary.pass_at_k == {1: 0.375, 2: (5 / 6 + 1) / 4, 4: 0.5}
    assert summary.mean_score == 0.375
    assert summary.accuracy_by_turn == [
        TurnAccuracy(1, 5 / 16, 5 / 16),
        TurnAccuracy(2, 1 / 16, 6 / 16),
        TurnAccuracy(3, 0.0, 6 / 16),
    ]
    assert (summary.valid_tool_calls, summary.invalid_tool_calls, summary.tool_call_validity) == (4, 1, 0.8)
    assert summary.status_counts == {"COMPLETED": 7, "TRUNCATED": 1, "ABORTED": 4, "FAILED": 4}
    assert summary.problems_with_errors == 1
    assert summary.mean_turns == 15 / 16

    a_texts = [
        "[script 0] " + call("5") + END,
        "[script 1] " + call("4") + END,
        call("5") + END,
        "[script 2] " + call("4") + END,
        "<tool_call>{not json</tool_call>" + END,
        "Answer: \\boxed{3}" + END,
        "[script 3] Let me think about this for a long time",
    ]
    model_tokens = (
        count_tokens(tok, a_texts)
        + count_tokens(tok, [f"[script {k}] Answer: \\boxed{{12}}{END}" for k in range(4)])
        + count_tokens(tok, [f"[script {k}] partial" for k in range(4)])
    )
    assert summary.mean_model_tokens == model_tokens / 16
    env_tokens = sum(s.env_tokens for p in report.problems for s in p.samples)
    assert summary.mean_env_tokens == env_tokens / 16 and env_tokens > 0
    assert summary.mean_response_tokens == (model_tokens + env_tokens) / 16
    assert {r["params"]["temperature"] for r in engine.requests} == {0.7}
    assert report.settings["ks"] == [1, 2, 4]


async def test_seeds_differ_per_episode_and_turn(qwen25_processing):
    tok = qwen25_processing.tokenizer
    engine = ProblemScriptedEngine(tok, SCRIPTS)
    await evaluate(problems()[:1], make_args(engine), n=4, seed=3, concurrency=1)
    seeds = [r["params"]["sampling_seed"] for r in engine.requests]
    assert len(seeds) == 1 + 2 + 3 + 1 and len(set(seeds)) == len(seeds)


async def test_prebuilt_samples_are_copied_not_consumed(qwen25_processing):
    tok = qwen25_processing.tokenizer
    sample = build_sample("Problem B: <image>Find y.", [picture(80)], "12", tok, metadata={"source": "x"})
    report = await evaluate([sample], make_args(ProblemScriptedEngine(tok, SCRIPTS)), n=3)
    assert report.problems[0].correct == 3
    assert (sample.tokens, sample.response_length, sample.metadata) == ([], 0, {"source": "x"})
    assert sample.status.name == "PENDING"


def test_sync_entry_point(qwen25_processing):
    engine = ProblemScriptedEngine(qwen25_processing.tokenizer, SCRIPTS)
    report = evaluate_sync(problems()[1:2], make_args(engine), n=2)
    assert (report.summary.pass_at_1, report.summary.samples) == (1.0, 2)


async def test_sync_entry_point_refuses_a_running_loop(qwen25_processing):
    with pytest.raises(RuntimeError, match="^evaluate_sync was called inside a running event loop"):
        evaluate_sync(problems(), make_args(None), n=1)


async def test_bad_arguments(qwen25_processing):
    args = make_args(ProblemScriptedEngine(qwen25_processing.tokenizer, SCRIPTS))
    with pytest.raises(ValueError, match=r"^ks \[8\] are outside 1\.\.n=4"):
        await evaluate(problems(), args, n=4, ks=[8])
    with pytest.raises(ValueError, match=r"^n must be a positive number of samples per problem, got 0$"):
        await evaluate(problems(), args, n=0)
    with pytest.raises(ValueError, match=r"^samples_or_rows is empty"):
        await evaluate([], args, n=1)


# ---------------------------------------------------------------------------------------------------------
# The tiny model


def assert_complete(report, problems: int, n: int, max_new_tokens: int) -> None:
    summary = report.summary
    assert (summary.problems, summary.samples, summary.n) == (problems, problems * n, n)
    assert len(report.problems) == problems
    assert all(len(p.samples) == n and p.error is None for p in report.problems)
    samples = [s for p in report.problems for s in p.samples]
    assert sum(summary.status_counts.values()) == len(samples)
    assert set(summary.status_counts) == {"COMPLETED", "TRUNCATED", "ABORTED", "FAILED"}
    assert [p.correct for p in report.problems] == [
        sum(s.correct for s in p.samples) for p in report.problems
    ]
    assert summary.pass_at_1 == sum(p.correct / n for p in report.problems) / problems
    assert [t.turn for t in summary.accuracy_by_turn] == [1, 2, 3]
    assert summary.accuracy_by_turn[-1].solved_by == sum(s.correct for s in samples) / len(samples)
    assert all(s.response_tokens <= max_new_tokens and s.model_tokens <= max_new_tokens for s in samples)
    # A FAILED episode may keep fewer tokens than the model generated (it is cut before vision tokens).
    kept = [s for s in samples if s.status != "FAILED"]
    assert all(s.model_tokens + s.env_tokens == s.response_tokens for s in kept)
    assert all(s.turns >= 1 and s.status in summary.status_counts for s in samples)
    assert summary.mean_model_tokens == sum(s.model_tokens for s in samples) / len(samples)


@pytest.fixture(scope="module")
def sample_problems():
    return generate_problems(3, 11, image_size=160)


async def test_tiny_model_report_is_complete(qwen25_small_policy, sample_problems, tmp_path):
    from rollout.engines.local import LocalEngine

    async with LocalEngine(qwen25_small_policy, seed=0) as engine:
        args = make_args(engine, checkpoint="tiny-qwen2.5-vl-small-vocab", rollout_max_response_len=48)
        report = await evaluate(sample_problems, args, n=2, max_new_tokens=48, seed=0)
    assert_complete(report, 3, 2, 48)
    assert [p.label for p in report.problems] == [p.answer for p in sample_problems]
    data = json.loads(report.write_json(tmp_path / "eval.json").read_text())
    assert set(data) == {"settings", "summary", "problems"}
    assert data["summary"]["samples"] == 6
    assert set(data["problems"][0]["samples"][0]) == {
        "sample",
        "score",
        "correct",
        "status",
        "status_reason",
        "turns",
        "solved_at_turn",
        "final_answer",
        "model_tokens",
        "env_tokens",
        "response_tokens",
        "valid_tool_calls",
        "invalid_tool_calls",
        "observation_images",
    }


async def test_sglang_server_gives_the_in_process_results(qwen25_small_policy, sample_problems):
    """The same seeded evaluation through rollout.server's /generate and the project's SGLang client."""
    from rollout.engines.local import LocalEngine
    from rollout.engines.sglang_client import SGLangClient
    from rollout.server import start_server

    def episodes(report):
        return [
            (s.status, s.status_reason, s.turns, s.model_tokens, s.response_tokens, s.final_answer)
            for p in report.problems
            for s in p.samples
        ]

    common = dict(n=2, max_new_tokens=32, seed=5)
    async with LocalEngine(qwen25_small_policy, seed=0) as engine:
        local = await evaluate(
            sample_problems[:2], make_args(engine, "tiny-qwen2.5-vl-small-vocab"), **common
        )
        server = await start_server(engine, "127.0.0.1", 0, model_path="tiny-qwen2.5-vl-small-vocab")
        client = SGLangClient(server.url, timeout_s=60.0)
        try:
            remote = await evaluate(
                sample_problems[:2], make_args(client, "tiny-qwen2.5-vl-small-vocab"), **common
            )
        finally:
            await client.close()
            await server.close()
    assert episodes(remote) == episodes(local)
    assert remote.summary.status_counts == local.summary.status_counts


def load_script():
    spec = importlib.util.spec_from_file_location("eval_geo3k", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_line(sample_problems, tmp_path, capsys):
    write_geo3k_parquet(sample_problems, tmp_path, split_name="test")
    out = tmp_path / "report.json"
    argv = [
        "--data",
        str(tmp_path / "test.parquet"),
        "--model",
        "tiny-qwen2.5-vl-small-vocab",
        "-n",
        "2",
        "--ks",
        "2",
        "--max-new-tokens",
        "48",
        "--device",
        "cpu",
        "--limit",
        "2",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert load_script().main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path / 'test.parquet'}: local tiny-qwen2.5-vl-small-vocab"
    assert lines[1] == "metric                value"
    assert lines[2] == "episodes              2 problems x 2 samples = 4"
    assert [line.split()[0] for line in lines[3:5]] == ["pass@1", "pass@2"]
    assert lines[-1] == f"wrote {out}"
    data = json.loads(out.read_text())
    assert data["settings"]["engine"] == "local tiny-qwen2.5-vl-small-vocab"
    assert data["settings"]["max_turns"] == 3
    assert [p["label"] for p in data["problems"]] == [
        r.answer for r in read_geo3k_parquet(tmp_path / "test.parquet")[:2]
    ]


def test_command_line_needs_a_tokenizer_for_sglang(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script().parse_args(["--data", "x.parquet", "--sglang-url", "http://127.0.0.1:1"])
    assert exit_info.value.code == 2
    assert "--sglang-url needs --hf-checkpoint" in capsys.readouterr().err


def test_command_line_rejects_a_yaml_typo_and_a_wrong_env_before_loading_a_model(
    sample_problems, tmp_path, capsys
):
    write_geo3k_parquet(sample_problems[:1], tmp_path, split_name="test")
    common = ["--data", str(tmp_path / "test.parquet"), "--model", "/nonexistent/model", "--no-progress"]
    typo = tmp_path / "typo.yaml"
    typo.write_text("max_turn: 3\n")
    assert load_script().main([*common, "--config", str(typo)]) == 2
    assert capsys.readouterr().err.startswith(
        f"error: {typo}: unknown plugin setting 'max_turn'. Did you mean 'max_turns'?"
    )
    wrong_env = tmp_path / "env.yaml"
    wrong_env.write_text("rollout_interaction_env_path: envs.geo3kk\n")
    assert load_script().main([*common, "--config", str(wrong_env)]) == 2
    assert capsys.readouterr().err.startswith("error: env module 'envs.geo3kk' not found")


def test_command_line_prints_why_episodes_failed(sample_problems, tmp_path, capsys):
    """An env_kwargs typo fails every episode: the table alone would show only a score of 0."""
    write_geo3k_parquet(sample_problems[:2], tmp_path, split_name="test")
    plugin = tmp_path / "plugin.yaml"
    plugin.write_text("rollout_interaction_env_path: envs.geo3k\nenv_kwargs:\n  end_on_corect: true\n")
    argv = ["--data", str(tmp_path / "test.parquet"), "--model", "tiny-qwen2.5-vl-small-vocab", "-n", "2"]
    argv += ["--max-new-tokens", "16", "--device", "cpu", "--no-progress", "--config", str(plugin)]
    assert load_script().main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    start = lines.index("failures (4 of 4 episodes, or problems that could not run):")
    assert lines[start + 1].startswith("  4x the env could not be built or reset: EnvConfigError: ")
    assert "end_on_corect" in lines[start + 1]
