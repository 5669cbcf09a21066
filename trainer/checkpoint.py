"""Checkpoints a run can resume from, in Hugging Face format.

``<run_dir>/checkpoints/step_<N>/`` holds ``model.save_pretrained`` output plus the processor and
tokenizer (so the directory loads with ``models.load_policy`` and serves with ``rollout.server``),
``optimizer.pt`` (AdamW state and fp32 master weights) and ``trainer_state.json`` (the next rollout
id, the config, the RNG states). A checkpoint is written to a staging directory and renamed into
place, so an interrupted save never leaves a directory that looks complete. ``latest`` names the
newest one; only the newest ``keep`` are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"
LATEST = "latest"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    policy,
    optimizer,
    trainer_state: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write ``checkpoints/step_<step>``; ``trainer_state`` must be JSON-serializable."""
    root = checkpoint_root(run_dir)
    target = root / f"step_{step:06d}"
    staging = root / f".step_{step:06d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    policy.model.save_pretrained(staging)
    policy.processor.save_pretrained(staging)
    policy.tokenizer.save_pretrained(staging)
    torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
    torch.save(
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        staging / RNG_FILE,
    )
    (staging / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (root / LATEST).write_text(target.name + "\n")
    _prune(root, keep)
    return target


def _prune(root: Path, keep: int) -> None:
    checkpoints = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in checkpoints[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None."""
    root = checkpoint_root(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    return complete[-1] if complete else None


def resolve_resume(resume: str | Path, run_dir: Path) -> Path:
    """``resume`` is a checkpoint directory, a run directory, or "latest" (the newest in ``run_dir``)."""
    if str(resume) == LATEST:
        found = latest_checkpoint(run_dir)
        where = run_dir
    else:
        path = Path(resume).expanduser()
        found = path if (path / STATE_FILE).is_file() else latest_checkpoint(path)
        where = path
    if found is None:
        raise FileNotFoundError(
            f"no checkpoint to resume from in {where} (looked for checkpoints/{LATEST} and "
            f"checkpoints/step_*/{STATE_FILE}); train with save_interval set, or start without --resume"
        )
    return found


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def load_optimizer_state(checkpoint: Path, optimizer) -> None:
    state = torch.load(Path(checkpoint) / OPTIMIZER_FILE, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state)


def restore_rng_state(checkpoint: Path) -> None:
    path = Path(checkpoint) / RNG_FILE
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
