"""Evaluating a policy on a held-out split: n multi-turn episodes per problem, pass@k and how they went.

This module owns evaluation as data: it builds ``n`` fresh samples per problem, runs them through
``rollout.generate`` (the very episode slime and the local trainer run) with at most ``concurrency``
episodes in flight, scores them with ``rollout.reward``, and aggregates:

- **pass@k** with the unbiased estimator of Chen et al. 2021 (HumanEval): per problem with ``n``
  samples of which ``c`` are correct, ``1 - C(n - c, k) / C(n, k)``, averaged over problems. It is
  computed in exact rational arithmetic, so it neither overflows nor loses precision for large n;
- **accuracy by turn**: the fraction of episodes first solved at turn t, and solved by turn t;
- **tool-call validity** ``valid / (valid + invalid)``, mean turns, mean tokens (the model's own,
  the env's, and the whole response), and the count of each episode status.

An episode is correct when its reward reaches ``correct_at`` (1.0: the env's outcome says solved).
A problem whose row cannot be turned into a prompt (an image that does not load, a placeholder
count that does not match) is reported with ``error`` and counts as n failed, incorrect episodes;
it never stops the run.

``evaluate`` is a coroutine; ``evaluate_sync`` runs it for callers without an event loop (the local
trainer calls it between steps, like its rollouts). The engine is whatever ``args`` names, as for
``rollout.generate``: ``args.rollout_engine`` (the in-process engine, an SGLang client) or slime's
``sglang_router_ip``/``sglang_router_port``. Nothing here imports the trainer.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from math import comb
from pathlib import Path
from typing import Any

from PIL import Image

from envs.images import ImageLoadError, load_image
from rollout.seeds import TurnSeededEngine, derive_seed

STATUSES: tuple[str, ...] = ("COMPLETED", "TRUNCATED", "ABORTED", "FAILED")


# ---------------------------------------------------------------------------------------------------------
# pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n (c correct) is
    correct: ``1 - C(n - c, k) / C(n, k)``, exact before the final rounding to float."""
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k} with n={n}; sample at least k per problem")
    return float(1 - Fraction(comb(n - c, k), comb(n, k)))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def check_ks(ks: Sequence[int] | None, n: int) -> list[int]:
    """Sorted distinct ks with 1 always included; each must be between 1 and n."""
    if ks is None:
        return default_ks(n)
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n]
    if bad:
        raise ValueError(
            f"ks {bad} are outside 1..n={n}; pass@k needs at least k samples per problem, so raise n "
            "or leave those k out"
        )
    return sorted({1, *ks})


# ---------------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class EvalProblem:
    """One problem to evaluate: the prompt text (with ``<image>`` placeholders), its images, its label."""

    index: int
    problem: str
    label: str
    images: Sequence[Image.Image] = ()


@dataclass
class SampleResult:
    """One episode's outcome."""

    sample: int  # 0..n-1 within its problem
    score: float
    correct: bool
    status: str  # COMPLETED | TRUNCATED | ABORTED | FAILED
    status_reason: str
    turns: int
    solved_at_turn: int | None  # the turn of the first correct answer, None unless correct
    final_answer: str | None
    model_tokens: int
    env_tokens: int
    response_tokens: int
    valid_tool_calls: int
    invalid_tool_calls: int
    #: Images each turn's observation inserted (an env whose tools return images, e.g. zoom).
    observation_images: list[int] = field(default_factory=list)


@dataclass
class ProblemResult:
    index: int
    label: str
    n: int
    correct: int
    samples: list[SampleResult] = field(default_factory=list)
    error: str | None = None  # why the problem could not be run at all

    @property
    def scores(self) -> list[float]:
        return [sample.score for sample in self.samples]


@dataclass
class TurnAccuracy:
    turn: int
    solved_at: float  # fraction of episodes first solved at this turn
    solved_by: float  # fraction solved at this turn or earlier


@dataclass
class EvalSummary:
    problems: int
    samples: int
    n: int
    ks: list[int]
    pass_at_k: dict[int, float]
    mean_score: float
    accuracy_by_turn: list[TurnAccuracy]
    valid_tool_calls: int
    invalid_tool_calls: int
    tool_call_validity: float | None  # None when no tool call was made
    mean_turns: float
    mean_model_tokens: float
    mean_env_tokens: float
    mean_response_tokens: float
    status_counts: dict[str, int]
    problems_with_errors: int
    elapsed_s: float = 0.0

    @property
    def pass_at_1(self) -> float:
        return self.pass_at_k[1]


@dataclass
class EvalReport:
    summary: EvalSummary
    problems: list[ProblemResult]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        summary = asdict(self.summary)
        summary["pass_at_k"] = {f"pass@{k}": value for k, value in self.summary.pass_at_k.items()}
        return {"settings": self.settings, "summary": summary, "problems": [asdict(p) for p in self.problems]}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    def format_table(self) -> str:
        return format_table(self.summary)


# ---------------------------------------------------------------------------------------------------------
# Aggregation


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def summarize(
    problems: Sequence[ProblemResult],
    *,
    ks: Sequence[int] | None = None,
    max_turns: int = 1,
    elapsed_s: float = 0.0,
) -> EvalSummary:
    """Aggregate per-problem results. ``ks`` default to powers of two up to the smallest n."""
    if not problems:
        raise ValueError("nothing to summarize: no problems were evaluated")
    n = min(problem.n for problem in problems)
    ks = check_ks(ks, n)
    samples = [sample for problem in problems for sample in problem.samples]
    last_turn = max([max_turns, *(s.solved_at_turn or 0 for s in samples)])
    solved_at = Counter(s.solved_at_turn for s in samples if s.solved_at_turn is not None)
    by_turn, cumulative = [], 0
    for turn in range(1, last_turn + 1):
        cumulative += solved_at[turn]
        by_turn.append(TurnAccuracy(turn, solved_at[turn] / len(samples), cumulative / len(samples)))
    valid = sum(s.valid_tool_calls for s in samples)
    invalid = sum(s.invalid_tool_calls for s in samples)
    statuses = Counter(s.status for s in samples)
    return EvalSummary(
        problems=len(problems),
        samples=len(samples),
        n=n,
        ks=ks,
        pass_at_k={k: _mean([pass_at_k(p.n, p.correct, k) for p in problems]) for k in ks},
        mean_score=_mean([s.score for s in samples]),
        accuracy_by_turn=by_turn,
        valid_tool_calls=valid,
        invalid_tool_calls=invalid,
        tool_call_validity=valid / (valid + invalid) if valid + invalid else None,
        mean_turns=_mean([s.turns for s in samples]),
        mean_model_tokens=_mean([s.model_tokens for s in samples]),
        mean_env_tokens=_mean([s.env_tokens for s in samples]),
        mean_response_tokens=_mean([s.response_tokens for s in samples]),
        status_counts={
            name: statuses.get(name, 0) for name in (*STATUSES, *sorted(set(statuses) - set(STATUSES)))
        },
        problems_with_errors=sum(1 for p in problems if p.error is not None),
        elapsed_s=elapsed_s,
    )


def format_table(summary: EvalSummary) -> str:
    """The summary as an aligned two-column table, then accuracy by turn."""
    validity = (
        "-"
        if summary.tool_call_validity is None
        else f"{summary.tool_call_validity:.4f} ({summary.valid_tool_calls} valid, "
        f"{summary.invalid_tool_calls} invalid)"
    )
    rate = summary.samples / summary.elapsed_s if summary.elapsed_s > 0 else 0.0
    rows: list[tuple[str, str]] = [
        ("episodes", f"{summary.problems} problems x {summary.n} samples = {summary.samples}"),
        *((f"pass@{k}", f"{value:.4f}") for k, value in summary.pass_at_k.items()),
        ("mean score", f"{summary.mean_score:.4f}"),
        ("tool-call validity", validity),
        ("mean turns", f"{summary.mean_turns:.2f}"),
        ("mean model tokens", f"{summary.mean_model_tokens:.1f}"),
        ("mean env tokens", f"{summary.mean_env_tokens:.1f}"),
        ("mean response tokens", f"{summary.mean_response_tokens:.1f}"),
        ("status", ", ".join(f"{name} {count}" for name, count in summary.status_counts.items())),
        ("problems not run", str(summary.problems_with_errors)),
        ("elapsed", f"{summary.elapsed_s:.1f} s ({rate:.2f} episodes/s)"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric':<{width}}  value", *(f"{name:<{width}}  {value}" for name, value in rows), ""]
    lines.append("turn  solved at  solved by")
    lines.extend(f"{t.turn:>4}  {t.solved_at:>9.4f}  {t.solved_by:>9.4f}" for t in summary.accuracy_by_turn)
    return "\n".join(lines)


def sample_result(sample: Any, position: int, score: float, *, correct_at: float = 1.0) -> SampleResult:
    """What one finished episode contributes, read from the sample and its metadata."""
    metadata = getattr(sample, "metadata", None) or {}
    outcome = metadata.get("outcome") or {}
    turns = metadata.get("turns") or []
    status = getattr(getattr(sample, "status", None), "name", str(getattr(sample, "status", "")))
    correct = score >= correct_at
    solved = outcome.get("solved_at_turn") if correct else None
    num_turns = int(metadata.get("num_turns", len(turns)))
    if correct and solved is None:
        solved = max(num_turns, 1)  # an env that does not record the turn: the episode's last one
    if "valid_tool_calls" in outcome:
        valid, invalid = int(outcome["valid_tool_calls"]), int(outcome.get("invalid_tool_calls", 0))
    else:
        valid, invalid = sum(1 for turn in turns if turn.get("tool_executed")), 0
    return SampleResult(
        sample=position,
        score=float(score),
        correct=correct,
        status=status,
        status_reason=str(metadata.get("status_reason", "")),
        turns=num_turns,
        solved_at_turn=solved,
        final_answer=_final_answer(outcome, turns),
        model_tokens=sum(int(turn.get("model_tokens", 0)) for turn in turns),
        env_tokens=sum(int(turn.get("env_tokens", 0)) for turn in turns),
        response_tokens=int(getattr(sample, "response_length", 0) or 0),
        valid_tool_calls=valid,
        invalid_tool_calls=invalid,
        observation_images=[int(turn.get("observation_images") or 0) for turn in turns],
    )


def _final_answer(outcome: dict[str, Any], turns: list[dict[str, Any]]) -> str | None:
    """The last answer the env graded; else the last ``\\boxed{}`` the model wrote."""
    if outcome.get("last_answer") is not None:
        return str(outcome["last_answer"])
    from envs.grading import extract_boxed

    for turn in reversed(turns):
        boxed = extract_boxed(turn.get("text") or "")
        if boxed is not None:
            return boxed
    return None


def _failed_problem(index: int, label: str, n: int, error: str) -> ProblemResult:
    samples = [SampleResult(j, 0.0, False, "FAILED", error, 0, None, None, 0, 0, 0, 0, 0) for j in range(n)]
    return ProblemResult(index, label, n, 0, samples, error)


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _problem_fields(item: Any, position: int) -> tuple[int, str]:
    """The index to report a problem under, and its label (``label``, or a dataset row's ``answer``)."""
    index = getattr(item, "index", None)
    if index is None:
        index = getattr(item, "row", None)  # the trainer's Prompt
    label = getattr(item, "label", None)
    if label is None:
        label = getattr(item, "answer", None)
    return (position if index is None else int(index)), ("" if label is None else str(label))


def _fresh_copy(sample: Any, index: int, group_index: int) -> Any:
    """An unrun copy of a sample: the episode assigns most fields, but mutates ``metadata``."""
    clone = copy.copy(sample)
    resets = {
        "index": index,
        "group_index": group_index,
        "tokens": [],
        "response": "",
        "response_length": 0,
        "loss_mask": None,
        "rollout_log_probs": None,
        "reward": None,
        "multimodal_train_inputs": None,
        "remove_sample": False,
        "metadata": dict(getattr(sample, "metadata", None) or {}),
    }
    for name, value in resets.items():
        if hasattr(clone, name):
            setattr(clone, name, value)
    status = getattr(type(sample), "Status", None)
    if status is not None:
        clone.status = status.PENDING
    return clone


class RowImageError(ImageLoadError):
    """An image of an input row that cannot be loaded; the message names the row and the image."""


def _item_images(item: Any, index: int) -> list[Any]:
    """The item's images decoded: PIL images as they are, references (paths, data URIs) loaded."""
    images = []
    for k, ref in enumerate(getattr(item, "images", ()) or ()):
        if isinstance(ref, Image.Image):
            images.append(ref)
            continue
        try:
            images.append(load_image(ref))
        except ImageLoadError as error:
            raise RowImageError(f"row {index} image {k}: {error}") from error
    return images


def _build_samples(
    item: Any,
    n: int,
    group: int,
    tokenizer: Any,
    template_kwargs: dict[str, Any],
    tools: list[dict[str, Any]] | None = None,
    env_module: Any = None,
) -> list[Any]:
    """``n`` fresh samples for one input item, prompts built from messages (the env module's prompt
    hook, its ``tools``) and rendered with ``template_kwargs`` (slime's --apply-chat-template-kwargs);
    raises ValueError (RowImageError) for unusable input."""
    from rollout.prompts import build_sample

    if hasattr(item, "prompt") and not hasattr(item, "problem"):
        return [_fresh_copy(item, group * n + j, group) for j in range(n)]
    index, label = _problem_fields(item, group)
    images = _item_images(item, index)
    return [
        build_sample(
            item.problem, images, label, tokenizer,
            index=group * n + j, group_index=group, template_kwargs=template_kwargs,
            tools=tools, env_module=env_module,
        )  # fmt: skip
        for j in range(n)
    ]


# ---------------------------------------------------------------------------------------------------------
# Running


async def evaluate(
    samples_or_rows: Sequence[Any],
    args: Any,
    *,
    n: int = 1,
    ks: Sequence[int] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = -1,
    max_new_tokens: int | None = None,
    stop: Sequence[str] | None = None,
    sampling_params: dict[str, Any] | None = None,
    seed: int | None = None,
    concurrency: int = 64,
    correct_at: float = 1.0,
    tokenizer: Any = None,
    progress: bool = False,
    runtime: Any = None,
) -> EvalReport:
    """Run ``n`` episodes of every problem and aggregate them (see the module docstring).

    ``samples_or_rows``: ``Geo3kRow``s (``read_geo3k_parquet``), problems with ``problem``,
    ``label`` (or ``answer``) and PIL ``images`` (``EvalProblem``, the trainer's prompts, generated
    sample problems), or unrun Samples (each is copied n times). ``args`` is what
    ``rollout.generate`` takes (``hf_checkpoint``, the engine, ``max_turns``, ...).
    ``sampling_params`` are added to (and override) the ones built from the keyword arguments.
    With ``seed``, every episode gets a ``sampling_seed`` derived from (seed, problem, sample), and,
    when ``args.rollout_engine`` is an engine object, every turn one derived from that.
    ``runtime``: the RolloutRuntime the episodes run on; by default one of this call's own, shut
    down when it returns (never the process-wide one of slime's entry points).
    """
    import rollout
    from rollout.config import RolloutConfig
    from rollout.prompts import chat_template_kwargs, prompt_context
    from rollout.runtime import RolloutRuntime

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of samples per problem, got {n!r}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    ks = check_ks(ks, n)
    config = RolloutConfig.from_args(args)
    template_kwargs = chat_template_kwargs(args)
    env_module, tools = prompt_context(args)
    own_runtime = runtime is None
    if own_runtime:
        runtime = RolloutRuntime()
    if tokenizer is None:
        tokenizer = runtime.processing.get(args.hf_checkpoint).tokenizer
    if seed is not None and getattr(args, "rollout_engine", None) is not None:
        args = copy.copy(args)
        args.rollout_engine = TurnSeededEngine(args.rollout_engine)
    base_params: dict[str, Any] = {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "spaces_between_special_tokens": False,
    }
    if max_new_tokens is not None:
        base_params["max_new_tokens"] = max_new_tokens
    if stop:
        base_params["stop"] = list(stop)
    base_params.update(sampling_params or {})

    started = time.perf_counter()
    results: list[ProblemResult] = []
    episodes: list[tuple[ProblemResult, int, Any, dict[str, Any]]] = []
    for group, item in enumerate(samples_or_rows):
        index, label = _problem_fields(item, group)
        try:
            samples = _build_samples(item, n, group, tokenizer, template_kwargs, tools, env_module)
        except (ValueError, OSError) as exc:  # RowImageError is a ValueError
            results.append(_failed_problem(index, label, n, f"{type(exc).__name__}: {exc}"))
            continue
        result = ProblemResult(index, label, n, 0, [None] * n)  # type: ignore[list-item]
        results.append(result)
        for j, sample in enumerate(samples):
            params = dict(base_params)
            if seed is not None:
                params["sampling_seed"] = derive_seed(seed, index, j)
            episodes.append((result, j, sample, params))
    if not results:
        raise ValueError("samples_or_rows is empty: there is nothing to evaluate")

    slots = asyncio.Semaphore(concurrency)
    from tqdm import tqdm

    bar = tqdm(total=len(episodes), desc="episodes", unit="ep", disable=not progress)

    async def run(result: ProblemResult, j: int, sample: Any, params: dict[str, Any]) -> None:
        async with slots:
            finished = await rollout.generate(args, sample, params, evaluation=True, runtime=runtime)
        score = float(await rollout.reward(args, finished))
        result.samples[j] = sample_result(finished, j, score, correct_at=correct_at)
        bar.update(1)

    tasks = [asyncio.ensure_future(run(*episode)) for episode in episodes]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        bar.close()
        if own_runtime:
            await runtime.aclose()
            runtime.shutdown()
    for result in results:
        result.correct = sum(1 for sample in result.samples if sample.correct)
    summary = summarize(results, ks=ks, max_turns=config.max_turns, elapsed_s=time.perf_counter() - started)
    settings = {
        "n": n,
        "ks": ks,
        "sampling_params": base_params,
        "seed": seed,
        "max_turns": config.max_turns,
        "env": config.rollout_interaction_env_path,
        "correct_at": correct_at,
    }
    return EvalReport(summary, results, settings)


def evaluate_sync(samples_or_rows: Sequence[Any], args: Any, **kwargs: Any) -> EvalReport:
    """``evaluate`` for callers without a running event loop (the same keyword arguments)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(evaluate(samples_or_rows, args, **kwargs))
    raise RuntimeError(
        "evaluate_sync was called inside a running event loop; use `await evaluate(...)` there"
    )
