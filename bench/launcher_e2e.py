"""End to end: the launcher's local backend for a few GRPO steps, with rollout and update seconds and
peak GPU memory per step.

Runs ``examples/geo3k_vlm_multi_turn/run_geo3k_vlm_multi_turn.py --backend local`` as a subprocess,
the way a user starts a run (model loading, the in-process engine, multi-turn geo3k episodes on
generated sample problems, GRPO updates, the final checkpoint and report), then reads the run's
``metrics.jsonl``: per step the trainer's ``perf/rollout_time_s`` and ``perf/update_time_s``, and on
CUDA the peak memory of the rollout and of the update (``torch.cuda.max_memory_allocated`` and
``max_memory_reserved``, reset at the start of each phase). Prints a markdown table and writes
bench/results/launcher_e2e-<host>-<date>.json.

    # GPU: random weights of Qwen2.5-VL-3B's shape (bf16), 3 steps of 4 prompts x 8 episodes,
    # CUDA memory capped at 80 GiB
    python bench/launcher_e2e.py --random-init-shape qwen2.5-vl-3b --device cuda --gpu-memory-gib 80
    # CPU smoke run on a tiny preset; launcher arguments go after --
    python bench/launcher_e2e.py --model tiny-qwen2.5-vl --device cpu --steps 1 --prompts 2 --samples 2 \\
        -- --rollout-max-response-len 32 --set max_tokens_per_turn=8

``--random-init-shape`` (a shape of bench/engine_throughput.py) first writes a checkpoint directory
into ``--work-dir``: the random-weight bf16 model with the shape's tokenizer and processor, saved
with ``save_pretrained``, so that the launcher's ``--model <dir>`` loads it as it would a downloaded
checkpoint (reused by later runs). Everything else is the launcher's defaults (response budget 4,096
tokens, micro-batch 1, activation checkpointing on for models over 1B parameters on CUDA) except
``save_optimizer=false``: the checkpoint after the last step comes after every measured number, and
a 3B model's optimizer state would add 45 GB of disk. Arguments after ``--`` go to the launcher
last, so ``-- --set save_optimizer=auto`` restores its default.

A larger card stands in for an 80 GB one: ``--gpu-memory-gib 80`` sets the trainer's
``gpu_memory_limit_gib``, which calls ``torch.cuda.set_per_process_memory_fraction`` before the
model loads, so PyTorch's allocator fails where it would on a card of that size. The card's speed
stays its own, and memory outside the allocator (the CUDA context, library workspaces) is not
capped. An "80 GB" H100 shows 79.2 GiB to PyTorch; ``--gpu-memory-gib 79.2`` is the stricter
stand-in. A run that fails (out of memory under the cap, say) still writes the steps it finished,
the launcher's exit status and the end of its log, and exits with that status.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
sys.path.insert(0, str(REPO_ROOT))  # runnable from a plain checkout

from bench.engine_throughput import SHAPES, Shape, machine, random_init_policy  # noqa: E402
from trainer.metrics import read_metrics  # noqa: E402

LAUNCHER = REPO_ROOT / "examples" / "geo3k_vlm_multi_turn" / "run_geo3k_vlm_multi_turn.py"
LOG_TAIL_LINES = 40


def write_random_init_checkpoint(shape: Shape, target: Path, device: str) -> Path:
    """A checkpoint directory of random bf16 weights of ``shape`` (built on ``device``, saved from
    there) with its preset's tokenizer and processor; an existing complete one is reused.

    The embedding has one row per token of the tokenizer, not the released checkpoint's padded
    count: the launcher's rollout cannot mask the padding rows out of a random model's samples as
    bench/engine_rollout.py does, and would fail most episodes on them (267 rows: 0.015% of the 3B
    shape's parameters)."""
    if (target / "config.json").is_file():
        return target
    staging = target.with_name(target.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    policy = random_init_policy(shape, device, torch.bfloat16, vocab_to_tokenizer=True)
    policy.model.save_pretrained(staging)
    policy.processor.save_pretrained(staging)
    policy.tokenizer.save_pretrained(staging)
    # The launcher's process needs the card; this one keeps only its CUDA context.
    del policy
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    staging.rename(target)  # config.json appears only once the whole directory is written
    return target


def write_sample_data(data_dir: Path, problems: int) -> Path:
    """Generated geo3k sample problems (the launcher's --demo data), written once per size."""
    train = data_dir / "train.parquet"
    if train.is_file():
        return train
    from envs.geo3k.dataset import write_geo3k_parquet
    from envs.geo3k.sample_data import generate_problems

    return write_geo3k_parquet(generate_problems(problems, seed=0), data_dir, split_name="train")


def launcher_command(
    model: str, data_dir: Path, run_dir: Path, args: argparse.Namespace, extra: list[str]
) -> list[str]:
    command = [
        sys.executable, str(LAUNCHER), "--backend", "local", "--model", model, "--data-dir", str(data_dir),
        "--output-dir", str(run_dir), "--num-rollout", str(args.steps),
        "--rollout-batch-size", str(args.prompts), "--n-samples-per-prompt", str(args.samples),
        "--set", f"device={args.device}", "--set", "save_optimizer=false", "--set", "progress=false",
    ]  # fmt: skip
    if args.gpu_memory_gib is not None:
        command += ["--set", f"gpu_memory_limit_gib={args.gpu_memory_gib}"]
    return command + extra


def run_launcher(command: list[str], log_path: Path) -> tuple[int, float, list[str]]:
    """Run the launcher, its output shown and kept in ``log_path``: exit status, seconds, last lines."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    lines: list[str] = []
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert process.stdout is not None
        for line in process.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            lines = [*lines[-LOG_TAIL_LINES + 1 :], line.rstrip("\n")]
        returncode = process.wait()
    return returncode, time.perf_counter() - started, lines


def step_rows(metrics: list[dict], episodes: int) -> list[dict]:
    """One row per GRPO step of the run's metrics (the SFT warm-start's records, if any, left out)."""
    rows = []
    for m in metrics:
        if m.get("phase") is not None:
            continue
        rows.append(
            {
                "step": m["step"],
                "rollout_s": round(m["perf/rollout_time_s"], 2),
                "update_s": round(m["perf/update_time_s"], 2),
                "step_s": round(m["perf/step_time_s"], 2),
                **{
                    key.removeprefix("memory/"): round(m[key], 2)
                    for key in (
                        "memory/rollout_peak_allocated_gib",
                        "memory/rollout_peak_reserved_gib",
                        "memory/update_peak_allocated_gib",
                        "memory/update_peak_reserved_gib",
                    )
                    if m.get(key) is not None
                },
                "reward_mean": round(m["rollout/reward_mean"], 4),
                "response_tokens": round(m["rollout/response_length_mean"] * episodes),
                "trained_tokens": round(m["train/trained_tokens"]),
                "turns_mean": round(m["rollout/turns_mean"], 2),
                "failed_fraction": round(m["rollout/failed_fraction"], 4),
                "rollout_tokens_per_s": round(m["perf/rollout_tokens_per_s"], 1),
            }
        )
    return rows


def _pair(row: dict, kind: str) -> str:
    rollout, update = row.get(f"rollout_peak_{kind}_gib"), row.get(f"update_peak_{kind}_gib")
    return "-" if rollout is None else f"{rollout:.1f} / {update:.1f}"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| step | rollout s | update s | peak GiB allocated (rollout / update) | "
        "peak GiB reserved (rollout / update) | reward | response tokens | trained tokens |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['step']} | {r['rollout_s']:.2f} | {r['update_s']:.2f} | {_pair(r, 'allocated')} | "
            f"{_pair(r, 'reserved')} | {r['reward_mean']:.3f} | {r['response_tokens']} | {r['trained_tokens']} |"
        )
    return "\n".join(lines)


def card(device: str, cap_gib: float | None) -> dict:
    """The card and the cap, as the report states them."""
    if not device.startswith("cuda"):
        return {"name": None, "total_gib": None, "memory_cap_gib": None}
    properties = torch.cuda.get_device_properties(torch.device(device))
    total = properties.total_memory / 2**30
    return {
        "name": properties.name,
        "total_gib": round(total, 2),
        "memory_cap_gib": cap_gib,
        "memory_cap": (
            f"{cap_gib} GiB of the card's {total:.1f} GiB (torch.cuda.set_per_process_memory_fraction "
            f"{cap_gib / total:.4f} in the launcher's process); speed is the {properties.name}'s"
            if cap_gib is not None
            else "none: the whole card"
        ),
    }


def git_commit() -> str | None:
    try:
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None  # a copy of the checkout without .git
    return found.stdout.strip() or None


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The benchmark's arguments, and the launcher's (everything after ``--``)."""
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog="Arguments after -- go to the launcher, after these."
    )
    parser.add_argument("--model", default="tiny-qwen2.5-vl", help="a preset name or a checkpoint directory")
    parser.add_argument(
        "--random-init-shape", choices=sorted(SHAPES), default=None, help="random bf16 weights of this shape"
    )
    parser.add_argument("--steps", type=int, default=3, help="GRPO steps (the launcher's --num-rollout)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--samples", type=int, default=8, help="episodes per prompt")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=None, help="cap the launcher's CUDA memory at this many GiB"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=REPO_ROOT / "runs" / "launcher_e2e",
        help="random-init checkpoints, sample data and the launcher's run directories",
    )  # fmt: skip
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(ours)
    args.work_dir = args.work_dir.resolve()  # the launcher runs in the repository root
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.gpu_memory_gib is not None and not args.device.startswith("cuda"):
        parser.error(f"--gpu-memory-gib caps CUDA memory; the device is {args.device}")
    if min(args.steps, args.prompts) < 1 or args.samples < 2:
        parser.error("--steps and --prompts must be >= 1 and --samples >= 2 (a GRPO group needs two)")
    return args, extra


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.random_init_shape:
        target = args.work_dir / "checkpoints" / f"random-init-{args.random_init_shape}-tokenizer-vocab"
        print(f"random-init {args.random_init_shape}: checkpoint {target}", flush=True)
        model = str(write_random_init_checkpoint(SHAPES[args.random_init_shape], target, args.device))
        model_name = f"random-init {args.random_init_shape}"
    else:
        model = model_name = args.model
    data_dir = write_sample_data(
        args.work_dir / "data" / f"geo3k-sample-{args.prompts * args.steps}", args.prompts * args.steps
    ).parent
    run_dir = args.work_dir / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    command = launcher_command(model, data_dir, run_dir, args, extra)
    returncode, seconds, tail = run_launcher(command, run_dir / "launcher.log")
    metrics_path = run_dir / "metrics.jsonl"
    rows = step_rows(
        read_metrics(metrics_path) if metrics_path.is_file() else [], args.prompts * args.samples
    )

    report = {
        "benchmark": "launcher_e2e",
        "date": date.today().isoformat(),
        "command": " ".join(["python", "bench/launcher_e2e.py", *argv]),
        "launcher_command": " ".join(command),
        "git_commit": git_commit(),
        "model": model_name,
        "dtype": "bfloat16" if args.device.startswith("cuda") else "float32",
        "steps": args.steps,
        "prompts_per_step": args.prompts,
        "episodes_per_prompt": args.samples,
        "card": card(args.device, args.gpu_memory_gib),
        "machine": machine(args.device),
        "launcher_returncode": returncode,
        "launcher_seconds": round(seconds, 1),
        "run_dir": str(run_dir),
        "results": rows,
    }
    if returncode:
        report["launcher_log_tail"] = tail
    print(f"\n{model_name} on {args.device}: {args.steps} GRPO steps of {args.prompts} prompts x {args.samples} "
          f"episodes, launcher exit {returncode} after {seconds:.0f} s")  # fmt: skip
    if args.gpu_memory_gib is not None:
        print(f"memory cap: {report['card']['memory_cap']}")
    print(f"\n{markdown(rows)}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"launcher_e2e-{socket.gethostname()}-{report['date']}.json"
    # One file per host and day; runs accumulate in it.
    runs = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
    out.write_text(json.dumps({"runs": [*runs, report]}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    sys.exit(main()["launcher_returncode"])
