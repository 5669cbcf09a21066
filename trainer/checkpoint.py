"""Checkpoints a run can resume from, in Hugging Face format.

``<run_dir>/checkpoints/step_<N>/`` holds ``model.save_pretrained`` output (weights in safetensors,
in the model's dtype) plus the processor and tokenizer (so the directory loads with
``models.load_policy`` and serves with ``rollout.server``), ``optimizer.pt`` (AdamW state and fp32
master weights) and ``trainer_state.json`` (the next rollout id, the config, the RNG states). A
checkpoint is written to a staging directory and renamed into place, so an interrupted save never
leaves a directory that looks complete. ``latest`` names the newest one; only the newest ``keep``
are kept.

The optimizer state is 12 bytes a parameter for a bf16 model (fp32 masters and two moments), six
times its bf16 weights: 45 GB of a 3B model's 52 GB. Only resuming needs it, and a run resumes
from its newest checkpoint, so ``save_optimizer="latest"`` (what "auto" picks above 1B parameters)
deletes it from a checkpoint once a newer one is complete; the older ones remain whole models.
A run resumed from a checkpoint without it starts AdamW's moments afresh, with a warning.
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
    save_optimizer: bool | str = True,
) -> Path:
    """Write ``checkpoints/step_<step>``; ``trainer_state`` must be JSON-serializable.

    ``save_optimizer``: True writes the optimizer state, False leaves it out, "latest" writes it
    and deletes it from the older checkpoints once this one is in place.
    """
    if not (isinstance(save_optimizer, bool) or save_optimizer == "latest"):
        raise ValueError(f'save_optimizer must be True, False or "latest", got {save_optimizer!r}')
    root = checkpoint_root(run_dir)
    target = root / f"step_{step:06d}"
    staging = root / f".step_{step:06d}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    policy.model.save_pretrained(staging)
    if not any(staging.glob("*.safetensors")):
        raise RuntimeError(
            f"{type(policy.model).__name__}.save_pretrained wrote no .safetensors file to {staging}; "
            "checkpoints hold their weights in safetensors only"
        )
    policy.processor.save_pretrained(staging)
    policy.tokenizer.save_pretrained(staging)
    if save_optimizer:
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
    torch.save(
        {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        staging / RNG_FILE,
    )
    (staging / STATE_FILE).write_text(json.dumps({"step": step, **trainer_state}, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    (root / LATEST).write_text(target.name + "\n")
    if save_optimizer == "latest":
        for older in root.glob("step_*"):
            if older != target:
                (older / OPTIMIZER_FILE).unlink(missing_ok=True)
    _prune(root, keep)
    return target


def resolve_save_optimizer(setting: bool | str, model) -> bool | str:
    """The ``save_optimizer`` setting with "auto" decided: every checkpoint keeps its optimizer
    state up to 1B parameters (a few GB at most), only the newest above."""
    if setting != "auto":
        return setting
    return True if sum(p.numel() for p in model.parameters()) <= 1_000_000_000 else "latest"


def checkpoint_sizes(checkpoint: Path) -> dict[str, int]:
    """Bytes on disk of a checkpoint: its weights (safetensors), its optimizer state, everything."""
    files = [f for f in Path(checkpoint).rglob("*") if f.is_file()]
    return {
        "weights": sum(f.stat().st_size for f in files if f.suffix == ".safetensors"),
        "optimizer": sum(f.stat().st_size for f in files if f.name == OPTIMIZER_FILE),
        "total": sum(f.stat().st_size for f in files),
    }


def describe_size(checkpoint: Path) -> str:
    """ "12.3 GB: weights 2.1 GB, optimizer state 10.2 GB" (decimal GB, as disks are sold)."""
    sizes = checkpoint_sizes(checkpoint)
    optimizer = f"optimizer state {_gb(sizes['optimizer'])}" if sizes["optimizer"] else "no optimizer state"
    return f"{_gb(sizes['total'])}: weights {_gb(sizes['weights'])}, {optimizer}"


def _gb(size: int) -> str:
    return f"{size / 1e9:.3g} GB" if size >= 1e7 else f"{size / 1e6:.3g} MB"


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


def load_optimizer_state(checkpoint: Path, optimizer) -> bool:
    """Restore the optimizer from ``checkpoint``; False when it holds no optimizer state (it was
    saved with ``save_optimizer`` false, or a newer checkpoint took it under "latest")."""
    path = Path(checkpoint) / OPTIMIZER_FILE
    if not path.is_file():
        return False
    state = torch.load(path, map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state)
    return True


def restore_rng_state(checkpoint: Path) -> None:
    path = Path(checkpoint) / RNG_FILE
    if not path.is_file():
        return
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
