"""Supervised warm-start (SFT) on scripted tool-call transcripts, before GRPO.

A policy that never writes a tool call gets reward 0 in every episode, so GRPO has nothing to
compare. A short supervised phase on correct transcripts teaches the call format and the
multi-turn pattern first: call the env's answer tool (``calc_score`` for Geometry3K), read the
env's verdict, answer again after an "incorrect". The answer tool is the one tool of the env
module's ``TOOLS`` with an ``answer`` argument (:func:`answer_tool`). The transcripts come from any
parquet in the env's prompt-data format (``trainer.data.prompt_dataset``): per row, the model's
turns are calls of that tool; in a fraction of them (``sft_wrong_first``) the first call names
another row's answer, the env says it is wrong and the second call names the right one.

Tokenization is the rollout's own: each transcript is played through ``rollout.generate`` with the
real env and a :class:`ScriptedEngine` that answers each turn's request with the transcript's next
turn. The sequence (prompt, image pads, model turns, the env's feedback as a chat-template
continuation) is therefore exactly what a rollout of the same turns would produce, and its loss
mask is the rollout's: 1 on the model's tokens, 0 on the prompt, the env's tokens and the template
markers the env inserted. A transcript whose episode does not go as scripted (the env did not
accept the call, or did not grade the last answer correct) is left out and counted.

The loss is the mean negative log-likelihood over the trained tokens of a step's batch; metrics
(``sft/loss``, ``sft/token_accuracy``: the fraction of trained tokens that are the model's argmax)
go to the run's ``metrics.jsonl`` with steps ``-sft_steps .. -1``, before GRPO's step 0.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from envs.dataset import DEFAULT_DATASET, ParquetDataset, dataset_of
from envs.loader import load_env_module
from models.logprobs import mm_token_type_ids
from rollout.engines.base import FINISH_STOP, GenerateResult
from trainer.batch import TrainSample, collate, micro_batches, to_train_sample
from trainer.config import TrainConfig, plugin_config
from trainer.metrics import MetricsLogger
from trainer.optim import MasterWeightAdamW


@dataclass(frozen=True)
class Transcript:
    """The model's turns for one prompt row; the env's replies come from the env itself."""

    row: int
    problem: str
    label: str
    images: tuple[Any, ...]
    turns: tuple[str, ...]

    @property
    def wrong_first(self) -> bool:
        return len(self.turns) > 1


class TranscriptError(ValueError):
    """No usable transcript: the data or the settings cannot give SFT anything to train on."""


def answer_tool(env_module: Any) -> str:
    """The name of the tool the transcripts call: the one tool in the env module's ``TOOLS`` whose
    parameters include ``answer`` (the argument a transcript fills with the row's label). A module
    without ``TOOLS`` (an env written for slime's geo3k example, which parses calls from the text
    its own way) gets the default env's answer tool; each transcript is then checked for having
    played as scripted, like any other."""
    if not getattr(env_module, "TOOLS", None):
        return _default_answer_tool()
    return _declared_answer_tool(env_module)


def _declared_answer_tool(env_module: Any) -> str:
    functions = [tool.get("function", tool) for tool in env_module.TOOLS if isinstance(tool, dict)]
    names = [
        str(function.get("name"))
        for function in functions
        if "answer" in ((function.get("parameters") or {}).get("properties") or {})
    ]
    if len(names) != 1:
        declared = ", ".join(str(function.get("name")) for function in functions)
        raise TranscriptError(
            f"the SFT warm-start calls the env's answer tool, the one tool in TOOLS with an 'answer' "
            f"argument; {env_module.__name__} has {len(names)} such tool(s) (its TOOLS: {declared}). "
            "Declare exactly one, or train without SFT (sft_steps: 0)"
        )
    return names[0]


def _default_answer_tool() -> str:
    """The answer tool of the env that a plugin YAML without ``rollout_interaction_env_path`` gets."""
    from rollout.config import RolloutConfig

    return _declared_answer_tool(load_env_module(RolloutConfig().rollout_interaction_env_path))


def tool_call_turn(answer: str, form: str = "json", tool: str | None = None) -> str:
    """One model turn calling ``tool`` (default: the default env's answer tool) with ``answer``."""
    from envs.tool_calls import format_call

    return format_call(tool or _default_answer_tool(), {"answer": answer}, form)


def build_transcripts(
    rows: list[Any],
    *,
    per_row: int,
    wrong_first: float,
    max_turns: int,
    seed: int,
    form: str = "json",
    tool: str | None = None,
    dataset: ParquetDataset = DEFAULT_DATASET,
) -> list[Transcript]:
    """``per_row`` transcripts per prompt row (``envs.dataset.DatasetRow``), each a series of calls
    of ``tool`` (:func:`answer_tool` of the run's env; default: that of the plugin's default env),
    with the row's images loaded by ``dataset``. A transcript is wrong-first with probability
    ``wrong_first`` when another answer exists and ``max_turns`` leaves room for a second call: its
    first call names another row's answer (drawn from the data's answers, so the wrong answers look
    like real ones)."""
    tool = tool or _default_answer_tool()
    if per_row < 1:
        raise TranscriptError(f"sft transcripts per row must be >= 1, got {per_row}")
    rng = random.Random(f"sft-transcripts:{seed}")
    answers = sorted({str(row.answer).strip() for row in rows})
    transcripts = []
    for row in rows:
        label = str(row.answer).strip()
        images = tuple(dataset.load_images(row))
        others = [a for a in answers if a != label]
        for _ in range(per_row):
            turns = [tool_call_turn(label, form, tool)]
            if others and max_turns >= 2 and rng.random() < wrong_first:
                turns.insert(0, tool_call_turn(rng.choice(others), form, tool))
            transcripts.append(
                Transcript(
                    row=row.index,
                    problem=row.problem,
                    label=label,
                    images=images,
                    turns=tuple(turns),
                )
            )
    return transcripts


class ScriptedEngine:
    """An engine that replays transcripts: the request of an episode's k-th turn gets the k-th
    model turn of its transcript, tokenized alone and ended with the end-of-turn token, as a model
    that stops on EOS ends its turn. The episode is identified by its ``sampling_seed`` (the
    transcript's position), which the episode loop passes through unchanged."""

    def __init__(self, tokenizer: Any, transcripts: list[Transcript]) -> None:
        self.tokenizer = tokenizer
        self.transcripts = transcripts
        self.calls: dict[int, int] = {}
        self.weight_version = 0
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    async def generate(self, input_ids: list[int], images: list[Any], sampling_params: dict[str, Any]):
        key = int(sampling_params["sampling_seed"])
        turn = self.calls.get(key, 0)
        self.calls[key] = turn + 1
        turns = self.transcripts[key].turns
        if turn >= len(turns):
            # The env wants another turn the transcript does not have: an empty turn ends it
            # (no tool call), and the check after the episode leaves the transcript out.
            ids: list[int] = [self.eos_id]
        else:
            ids = list(self.tokenizer.encode(turns[turn], add_special_tokens=False)) + [self.eos_id]
        return GenerateResult(
            token_ids=ids,
            log_probs=[0.0] * len(ids),
            text=self.tokenizer.decode(ids, skip_special_tokens=False),
            finish_reason=FINISH_STOP,
            matched_stop=self.eos_id,
        )


def _scripted_params(key: int, cfg: TrainConfig) -> dict[str, Any]:
    return {
        "temperature": 1.0,
        "max_new_tokens": cfg.rollout_max_response_len,
        "skip_special_tokens": False,
        "no_stop_trim": True,
        "sampling_seed": key,
    }


def _played_as_scripted(sample: Any, transcript: Transcript) -> str | None:
    """Why the episode did not go as the transcript says, or None."""
    status = getattr(sample.status, "name", str(sample.status))
    metadata = sample.metadata or {}
    if status != "COMPLETED":
        return f"status {status}: {metadata.get('status_reason')}"
    outcome = metadata.get("outcome") or {}
    if float(outcome.get("score") or 0.0) < 1.0:
        return f"the env did not grade the answer {transcript.label!r} correct"
    if outcome.get("solved_at_turn") != len(transcript.turns):
        return f"solved at turn {outcome.get('solved_at_turn')}, not at turn {len(transcript.turns)}"
    return None


def tokenize_transcripts(
    transcripts: list[Transcript], cfg: TrainConfig, tokenizer: Any, hf_checkpoint: str, model_config: Any
) -> tuple[list[TrainSample], list[str]]:
    """Play every transcript through the rollout with the real env; returns the trainable samples
    and, for each transcript left out, why."""
    import rollout
    from rollout.prompts import build_sample
    from rollout.runtime import RolloutRuntime
    from trainer.rollouts import rollout_args

    engine = ScriptedEngine(tokenizer, transcripts)
    args = rollout_args(cfg, engine, hf_checkpoint)
    samples = [
        build_sample(t.problem, list(t.images), t.label, tokenizer, index=i, group_index=i)
        for i, t in enumerate(transcripts)
    ]

    runtime = RolloutRuntime()

    async def play() -> None:
        await asyncio.gather(
            *(
                rollout.generate(args, s, _scripted_params(i, cfg), runtime=runtime)
                for i, s in enumerate(samples)
            )
        )

    try:
        asyncio.run(play())
    finally:
        runtime.shutdown()
    items, problems = [], []
    for i, (sample, transcript) in enumerate(zip(samples, transcripts, strict=True)):
        problem = _played_as_scripted(sample, transcript)
        if problem is None:
            item = to_train_sample(sample, i, 1.0, model_config)
            problem = item.excluded
            if problem is None and item.num_trained_tokens == 0:
                problem = "no trained token"
        if problem is None:
            items.append(item)
        else:
            problems.append(f"row {transcript.row}: {problem}")
    return items, problems


def sft_forward(model, items: list[TrainSample], pad_token_id: int) -> tuple[torch.Tensor, int, int]:
    """(sum of the negative log-likelihoods of the trained tokens, their count, how many of them
    are the model's argmax) over ``items`` in one left-padded forward pass."""
    batch = collate(items, pad_token_id)
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    pixel_values = batch.pixel_values
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=device, dtype=model.dtype)
    grid = batch.image_grid_thw.to(device) if batch.image_grid_thw is not None else None
    outputs = model(
        input_ids=input_ids,
        attention_mask=batch.attention_mask.to(device),
        pixel_values=pixel_values,
        image_grid_thw=grid,
        mm_token_type_ids=mm_token_type_ids(input_ids, model.config),
        logits_to_keep=batch.num_scored + 1,
        use_cache=False,
    )
    log_probs = torch.log_softmax(outputs.logits[:, :-1, :].float(), dim=-1)
    targets = input_ids[:, -batch.num_scored :]
    mask = batch.loss_mask.to(device)
    target_log_probs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    correct = (log_probs.argmax(-1) == targets).float() * mask
    return -(target_log_probs * mask).sum(), int(mask.sum()), int(correct.sum())


def sft_data_rows(cfg: TrainConfig) -> list[Any]:
    """The rows the transcripts are built from: ``sft_data`` (a parquet file or a directory with
    train.parquet), or the run's own ``prompt_data``; every row validated as for GRPO, in the
    prompt-data format of the run's env."""
    from trainer.data import PromptSource, prompt_dataset

    path = Path(cfg.sft_data or cfg.prompt_data).expanduser()
    if path.is_dir():
        path = path / "train.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"sft_data {path} does not exist; pass a parquet in the env's prompt-data format "
            "(by default the columns problem, answer, images) or a directory with train.parquet"
        )
    return PromptSource(
        path, seed=cfg.seed, shuffle=False, drop_bad_rows=cfg.drop_bad_rows, dataset=prompt_dataset(cfg)
    ).rows


def rollout_before_sft(policy: Any, cfg: TrainConfig, prompts: Any) -> dict[str, float]:
    """The rollout metrics of GRPO's first batch under the policy as it was before the warm-start
    (no update): the baseline that the run's later rewards are compared with."""
    from rollout.runtime import RolloutRuntime
    from rollout.seeds import TurnSeededEngine
    from trainer.metrics import rollout_metrics
    from trainer.rollouts import (
        build_group_samples,
        local_engine,
        rollout_args,
        run_rollout,
    )

    engine = local_engine(policy, cfg)
    args = rollout_args(cfg, TurnSeededEngine(engine), str(policy.path))
    samples = build_group_samples(prompts.batch(0, cfg.rollout_batch_size), cfg, policy.tokenizer, 0)
    runtime = RolloutRuntime()
    try:
        asyncio.run(run_rollout(args, samples, cfg, 0, runtime))
    finally:
        runtime.shutdown()
    return rollout_metrics(samples)


def run_sft(
    policy: Any, cfg: TrainConfig, run_dir: Path, *, prompts: Any = None, write=print
) -> list[dict[str, float]]:
    """``cfg.sft_steps`` supervised steps of ``cfg.sft_batch_size`` transcripts on ``policy`` (in
    place), with an AdamW of its own at ``sft_lr`` (GRPO then starts with fresh moments). With
    ``prompts`` (the run's PromptSource), GRPO's first batch is rolled out once before the
    warm-start and logged as step ``-sft_steps - 1`` (phase "before_sft")."""
    from envs.tool_calls import call_form_for

    started = time.perf_counter()
    if prompts is not None:
        baseline = rollout_before_sft(policy, cfg, prompts)
        out = MetricsLogger(run_dir, total_steps=1, progress=False)
        out.log(-cfg.sft_steps - 1, {"phase": "before_sft", **baseline})
        out.close()
        write(
            f"before SFT: mean reward {baseline['rollout/reward_mean']:.3f}, "
            f"{baseline['rollout/tool_calls_per_episode']:.2f} tool calls and "
            f"{baseline['rollout/turns_mean']:.2f} turns per episode"
        )
    plugin = plugin_config(cfg)
    env_module = load_env_module(plugin.rollout_interaction_env_path)
    form = call_form_for(str(policy.path))
    rows = sft_data_rows(cfg)
    transcripts = build_transcripts(
        rows,
        per_row=cfg.sft_transcripts_per_row,
        wrong_first=cfg.sft_wrong_first,
        max_turns=plugin.max_turns,
        seed=cfg.seed,
        form=form,
        tool=answer_tool(env_module),
        dataset=dataset_of(env_module),
    )
    items, problems = tokenize_transcripts(
        transcripts, cfg, policy.tokenizer, str(policy.path), policy.model.config
    )
    if problems:
        shown = "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else "")
        write(f"SFT: {len(problems)} of {len(transcripts)} transcripts left out: {shown}")
    if not items:
        raise TranscriptError(
            f"none of the {len(transcripts)} SFT transcripts played as scripted (first: {problems[0]}); "
            "check that the env grades the data's answers and that max_turns allows the calls"
        )
    wrong_first = sum(transcripts[item.position].wrong_first for item in items)
    write(
        f"SFT: {cfg.sft_steps} steps of {cfg.sft_batch_size} on {len(items)} transcripts "
        f"({wrong_first} wrong first, then right after the env's feedback), tokenized in "
        f"{time.perf_counter() - started:.1f} s"
    )
    pad_id = policy.tokenizer.pad_token_id if policy.tokenizer.pad_token_id is not None else 0
    optimizer = MasterWeightAdamW(policy.model, cfg.replace(lr=cfg.sft_lr or cfg.lr))
    order_rng = random.Random(f"sft-order:{cfg.seed}")
    order: list[int] = []
    logger = MetricsLogger(run_dir, total_steps=cfg.sft_steps, progress=cfg.progress, desc="SFT")
    history = []
    model = policy.model
    model.train()
    try:
        for step in range(cfg.sft_steps):
            step_started = time.perf_counter()
            batch = []
            while len(batch) < cfg.sft_batch_size:
                if not order:
                    order = list(range(len(items)))
                    order_rng.shuffle(order)
                batch.append(items[order.pop()])
            tokens = sum(item.num_trained_tokens for item in batch)
            optimizer.zero_grad()
            nll_total, correct_total = 0.0, 0
            for group in micro_batches(batch, cfg.micro_batch_size):
                nll, _, correct = sft_forward(model, group, pad_id)
                (nll / tokens).backward()
                nll_total += float(nll.detach())
                correct_total += correct
            grad_norm = optimizer.step()
            metrics = {
                "sft/loss": nll_total / tokens,
                "sft/token_accuracy": correct_total / tokens,
                "sft/grad_norm": grad_norm,
                "sft/trained_tokens": float(tokens),
                "sft/lr": optimizer.lr,
                "perf/step_time_s": time.perf_counter() - step_started,
            }
            logger.log(step - cfg.sft_steps, {"phase": "sft", **metrics})
            history.append(metrics)
    finally:
        model.eval()
        logger.close()
    return history
