"""Runtimes are explicit: callers other than slime pass their own, and a runtime refuses a later
call whose settings it was not built with."""

from __future__ import annotations

import pytest

import rollout
from rollout.config import ConfigError
from rollout.evaluation import EvalProblem, evaluate
from rollout.runtime import RolloutRuntime
from rollout.sample import Sample
from tests.rollout.conftest import ScriptedEngine, call, diagram, make_args, make_sample

Status = Sample.Status


@pytest.fixture
def runtimes():
    made: list[RolloutRuntime] = []

    def make() -> RolloutRuntime:
        made.append(RolloutRuntime())
        return made[-1]

    yield make
    for runtime in made:
        runtime.shutdown()


async def test_a_later_call_with_other_runtime_settings_fails_loudly(qwen25_processing, runtimes):
    tok = qwen25_processing.tokenizer
    runtime = runtimes()
    out = await rollout.generate(
        make_args(ScriptedEngine(tok, [call("5")]), env_step_threads=2), make_sample(tok), {}, runtime=runtime
    )
    assert out.status == Status.COMPLETED, out.metadata["status_reason"]
    other = make_args(ScriptedEngine(tok, [call("5")]), env_step_threads=8)
    with pytest.raises(ConfigError, match=r"built with env_step_threads=2 .* asks for env_step_threads=8"):
        await rollout.generate(other, make_sample(tok), {}, runtime=runtime)
    with pytest.raises(ConfigError, match=r"gc_freeze_after_load=True .* gc_freeze_after_load=False"):
        runtime.context(make_args(other.rollout_engine, env_step_threads=2, gc_freeze_after_load=False))
    # Settings that are the episode's own (max_turns, the env, its kwargs) may differ per call.
    again = make_args(ScriptedEngine(tok, ["look<|im_end|>"]), env_step_threads=2, max_turns=1)
    assert (await rollout.generate(again, make_sample(tok), {}, runtime=runtime)).status == Status.COMPLETED


async def test_runtimes_with_their_own_settings_run_side_by_side(qwen25_processing, runtimes):
    tok = qwen25_processing.tokenizer
    for threads in (1, 3):
        runtime = runtimes()
        args = make_args(ScriptedEngine(tok, [call("4"), call("5")]), env_step_threads=threads)
        out = await rollout.generate(args, make_sample(tok), {}, runtime=runtime)
        assert out.status == Status.COMPLETED, out.metadata["status_reason"]
        assert runtime.image_cache.misses == 1  # the episode ran on this runtime


async def test_evaluation_runs_on_the_runtime_it_is_given(qwen25_processing, runtimes):
    tok = qwen25_processing.tokenizer
    runtime = runtimes()
    problem = EvalProblem(0, "<image>Find x.", "5", [diagram(96, shade=7)])
    report = await evaluate([problem], make_args(ScriptedEngine(tok, [call("5")] * 2)), n=2, runtime=runtime)
    assert (report.summary.samples, report.summary.mean_score) == (2, 1.0)
    assert runtime.image_cache.misses == 1 and runtime.image_cache.hits == 1
