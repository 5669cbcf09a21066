"""Per-step metrics: what one rollout says about the policy, and where the numbers go.

:func:`rollout_metrics` summarizes finished episodes (reward, pass rate, turns, tool-call validity,
lengths, statuses) from the fields ``rollout.generate`` fills. :class:`MetricsLogger` appends one
JSON object per step to ``metrics.jsonl`` (the record the plot and the report are drawn from),
drives the tqdm progress bar, and forwards to TensorBoard or Weights & Biases when asked for and
installed (both are optional and imported lazily). On CUDA, :func:`peak_memory_metrics` adds the
peak GPU memory of a step's rollout and update.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

PASS_THRESHOLD = 1.0
#: ``sample.metadata`` key where the trainer writes why it refused a sample the rollout kept
#: (trainer.batch.to_train_sample): ids outside the embedding, non-finite log-probs.
REFUSED_KEY = "trainer_refused"


def _mean(values: list[float]) -> float:
    return float(statistics.fmean(values)) if values else 0.0


def rollout_metrics(samples: list[Any]) -> dict[str, float]:
    """Summary of one rollout's episodes. Rewards must already be set on the samples, and the
    samples must have been through trainer.batch.to_train_sample for ``train/refused_samples``."""
    rewards = [float(s.reward) for s in samples]
    turns, valid, invalid, model_tokens, solved_turns = [], 0, 0, [], []
    for s in samples:
        metadata = s.metadata or {}
        turns.append(len(metadata.get("turns") or []))
        outcome = metadata.get("outcome") or {}
        valid += int(outcome.get("valid_tool_calls") or 0)
        invalid += int(outcome.get("invalid_tool_calls") or 0)
        if outcome.get("solved_at_turn") is not None:
            solved_turns.append(float(outcome["solved_at_turn"]))
        model_tokens.append(float(sum(s.loss_mask or [])))
    statuses = Counter(getattr(s.status, "name", str(s.status)).lower() for s in samples)
    n = len(samples)
    metrics = {
        "rollout/reward_mean": _mean(rewards),
        "rollout/reward_std": float(statistics.pstdev(rewards)) if n > 1 else 0.0,
        "rollout/pass_rate": sum(r >= PASS_THRESHOLD for r in rewards) / n if n else 0.0,
        "rollout/turns_mean": _mean(turns),
        "rollout/tool_calls_per_episode": (valid + invalid) / n if n else 0.0,
        # No call at all is not an invalid call: validity is over the calls that were made.
        "rollout/tool_call_validity": valid / (valid + invalid) if valid + invalid else math.nan,
        "rollout/response_length_mean": _mean([float(s.response_length) for s in samples]),
        "rollout/response_length_max": float(max((s.response_length for s in samples), default=0)),
        "rollout/model_tokens_mean": _mean(model_tokens),
        "rollout/solved_at_turn_mean": _mean(solved_turns) if solved_turns else math.nan,
        "rollout/removed_fraction": sum(bool(s.remove_sample) for s in samples) / n if n else 0.0,
        # Defence in depth: the rollout should fail every such sample itself, so anything but 0
        # here points at a rollout check that let bad engine output through.
        "train/refused_samples": float(sum(REFUSED_KEY in (s.metadata or {}) for s in samples)),
    }
    for status in ("completed", "truncated", "aborted", "failed"):
        metrics[f"rollout/{status}_fraction"] = statuses.get(status, 0) / n if n else 0.0
    return metrics


def _on_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_peak_memory(device: str | torch.device) -> None:
    """Start a new peak for :func:`peak_memory_metrics` at what is allocated now (CUDA only)."""
    if _on_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_metrics(device: str | torch.device, phase: str) -> dict[str, float]:
    """GiB the process held at most since the last :func:`reset_peak_memory`: tensors allocated and
    memory reserved by PyTorch's caching allocator (what the card sees); empty off CUDA."""
    if not _on_cuda(device):
        return {}
    return {
        f"memory/{phase}_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        f"memory/{phase}_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30,
    }


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null reads as "not defined this step"
    return value


class MetricsLogger:
    """Writes ``metrics.jsonl`` and the progress bar; TensorBoard/W&B when enabled."""

    def __init__(
        self,
        run_dir: Path,
        *,
        total_steps: int,
        start_step: int = 0,
        progress: bool = True,
        use_tensorboard: bool = False,
        use_wandb: bool = False,
        wandb_project: str = "vlm-multiturn",
        wandb_group: str | None = None,
        config: dict[str, Any] | None = None,
        desc: str = "GRPO",
    ) -> None:
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the whole run
        self._bar = tqdm(
            total=total_steps, initial=start_step, desc=desc, unit="step", disable=not progress
        )
        self._tensorboard = None
        self._wandb = None
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "use_tensorboard needs the tensorboard package: pip install tensorboard"
                ) from exc
            self._tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if use_wandb:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("use_wandb needs the wandb package: pip install wandb") from exc
            self._wandb = wandb.init(
                project=wandb_project, group=wandb_group, config=config, dir=str(run_dir)
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{key: _json_safe(value) for key, value in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        finite = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tensorboard is not None:
            for key, value in finite.items():
                self._tensorboard.add_scalar(key, value, step)
            self._tensorboard.flush()
        if self._wandb is not None:
            self._wandb.log(finite, step=step)
        if "sft/loss" in metrics:
            self._bar.set_postfix(
                loss=f"{metrics['sft/loss']:.3f}", acc=f"{metrics.get('sft/token_accuracy', 0.0):.2f}", refresh=False
            )
        else:
            self._bar.set_postfix(
                reward=f"{metrics.get('rollout/reward_mean', 0.0):.3f}",
                pass_=f"{metrics.get('rollout/pass_rate', 0.0):.2f}",
                len=f"{metrics.get('rollout/response_length_mean', 0.0):.0f}",
                refresh=False,
            )
        self._bar.update(1)

    def write(self, message: str) -> None:
        """Print a line without breaking the progress bar."""
        self._bar.write(message)

    def close(self) -> None:
        self._bar.close()
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; for a resumed run, the last record of each step wins."""
    by_step: dict[int, dict[str, Any]] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                record = json.loads(line)
                by_step[int(record["step"])] = record
    return [by_step[step] for step in sorted(by_step)]


# ---------------------------------------------------------------------------------------------------------
# Why episodes failed


def failure_cause(reason: str) -> str:
    """A FAILED episode's ``status_reason`` as one line that episodes failing the same way share:
    a traceback is cut to its last line (the exception), the turn number is left out."""
    head, marker, trace = reason.partition("Traceback (most recent call last):")
    if marker:
        lines = [line.strip() for line in trace.splitlines() if line.strip()]
        reason = f"{head.strip()} {lines[-1] if lines else ''}".strip()
    line = re.sub(r" at turn \d+", "", reason.strip().splitlines()[0] if reason.strip() else "no reason given")
    return line if len(line) <= 300 else line[:297] + "..."


def failure_causes(samples: list[Any]) -> Counter[str]:
    """How many of ``samples`` FAILED for each cause (``failure_cause``), most common first."""
    return Counter(
        failure_cause(str((s.metadata or {}).get("status_reason", "")))
        for s in samples
        if getattr(s.status, "name", str(s.status)).lower() == "failed"
    )


def format_failures(causes: Counter[str], total: int, *, top: int = 3) -> str:
    """``"5/8 episodes failed (62%): 4x cause; 1x cause"``, the ``top`` most common causes."""
    failed = sum(causes.values())
    shown = "; ".join(f"{count}x {cause}" for cause, count in causes.most_common(top))
    more = f"; {len(causes) - top} more cause(s)" if len(causes) > top else ""
    return f"{failed}/{total} episodes failed ({failed / total:.0%}): {shown}{more}"
