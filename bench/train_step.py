"""Time and memory of one GRPO policy update (forward, backward, AdamW with fp32 master weights).

Builds a policy with random weights of a real shape (or loads a preset), fabricates one rollout of
``--samples`` episodes (a 448x448 image prompt and ``--response-tokens`` response tokens each, a
third of them env tokens with loss mask 0), and runs ``trainer.update.policy_update`` on it, the
same function the local trainer calls. Prints a markdown table and writes
bench/results/train_step-<host>-<date>.json. Peak memory is ``torch.cuda.max_memory_allocated``
over the last timed update (the optimizer state exists by then); reserved memory is reported too.

    python bench/train_step.py --random-init-shape qwen2.5-vl-3b --device cuda --samples 8 \\
        --response-tokens 1024 --micro-batch-size 1

``--gradient-checkpointing`` is the trainer's setting: auto (the default: on for models over 1B
parameters on CUDA), on or off. ``--checkpoint-dir DIR`` also writes one trainer checkpoint after
the updates and reports its size and the seconds it took (``--checkpoint-optimizer`` includes the
optimizer state, 12 bytes a parameter).

``--grpo-steps N`` runs N whole GRPO steps of the local backend instead (the trainer's own pieces:
the in-process engine, geo3k episodes over generated sample problems, group advantages,
``policy_update``) and reports the engine-vs-trainer log-prob mismatch: for every model token,
|trainer's log-prob before the update - engine's log-prob|, as max, mean, p99 and the share above
0.1. The loop is ``trainer.loop.train`` without its parquet reader and checkpoint writes (a
random-weight model has no checkpoint to load; writing 90 GB of optimizer state is not the point):

    python bench/train_step.py --random-init-shape qwen3.5-4b --device cuda --grpo-steps 2
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from datetime import date
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # runnable from a plain checkout

from bench.engine_throughput import SHAPES, bench_policy, diagram, machine  # noqa: E402
from models.loader import default_dtype  # noqa: E402
from trainer.batch import TrainSample  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from trainer.optim import MasterWeightAdamW  # noqa: E402
from trainer.update import policy_update, prepare_for_training  # noqa: E402

_CHECKPOINTING = {"auto": "auto", "on": True, "off": False}


def fabricate_rollout(policy, samples: int, response_tokens: int, seed: int = 0) -> list[TrainSample]:
    text = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    # Response tokens from the regular vocabulary only (below the first added token, <|endoftext|>).
    regular_vocab = policy.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    items = []
    for position in range(samples):
        prompt = policy.processor(text=[text], images=[diagram(position)], return_tensors="pt")
        response = torch.randint(0, regular_vocab, (response_tokens,), generator=generator)
        mask = torch.ones(response_tokens)
        mask[response_tokens // 3 : 2 * response_tokens // 3] = 0  # an env observation in the middle
        items.append(
            TrainSample(
                position=position,
                input_ids=torch.cat([prompt["input_ids"][0], response]),
                response_length=response_tokens,
                loss_mask=mask,
                rollout_log_probs=torch.full((response_tokens,), -11.0) * mask,
                advantage=1.0 if position % 2 else -1.0,
                pixel_values=prompt["pixel_values"],
                image_grid_thw=prompt["image_grid_thw"],
            )
        )
    return items


def grpo_mismatch(policy, name: str, args, device: str) -> dict:
    """``args.grpo_steps`` GRPO steps of the local backend; the per-token mismatch distribution."""
    import asyncio

    import trainer.update
    from envs.geo3k.sample_data import format_problem, generate_problems
    from rollout.engines.local import LocalEngine
    from rollout.seeds import TurnSeededEngine
    from trainer.batch import to_train_sample
    from trainer.data import Prompt
    from trainer.grpo import group_advantages
    from trainer.rollouts import build_group_samples, rollout_args, run_rollout

    extra = {}
    if args.env == "image-feedback":
        # The test suite's env that answers every turn with an image: every episode runs max_turns
        # turns with image observations, whatever a random model writes (geo3k ends at the first
        # turn without a tool call).
        import tempfile

        plugin = Path(tempfile.mkdtemp()) / "image_feedback.yaml"
        env_file = HERE.parent / "tests" / "rollout" / "envs_for_tests.py"
        plugin.write_text(
            f"max_turns: 3\nrollout_interaction_env_path: {env_file}\nenv_kwargs: {{kind: image}}\n"
        )
        extra["custom_config_path"] = str(plugin)
    cfg = TrainConfig.from_dict(
        dict(**extra, rollout_batch_size=args.prompts, n_samples_per_prompt=args.samples,
             rollout_max_response_len=args.response_tokens, max_tokens_per_turn=args.tokens_per_turn,
             micro_batch_size=args.micro_batch_size, gradient_checkpointing=_CHECKPOINTING[args.gradient_checkpointing],
             freeze_vision=args.freeze_vision, lr=1e-6, progress=False, device=device,
             engine_max_batch_size=args.prompts * args.samples)
    )  # fmt: skip
    diffs: list[torch.Tensor] = []
    record = trainer.update._Mismatch.add

    def add(self, train, rollout, mask):  # the trainer's own comparison, every token kept
        record(self, train, rollout, mask)
        diffs.append((train.detach().float().cpu() - rollout).abs()[mask > 0])

    trainer.update._Mismatch.add = add
    prepare_for_training(policy.model, cfg)
    optimizer = MasterWeightAdamW(policy.model, cfg)
    engine = LocalEngine(policy, max_batch_size=cfg.engine_max_batch_size, seed=cfg.seed)
    rollout_settings = rollout_args(cfg, TurnSeededEngine(engine), str(policy.path))
    problems = generate_problems(args.prompts * args.grpo_steps, seed=0)
    pad = policy.tokenizer.pad_token_id
    steps = []
    for step in range(args.grpo_steps):
        started = time.perf_counter()
        batch = [
            Prompt(row=i, problem=format_problem(p.question), label=p.answer, images=[p.image])
            for i, p in enumerate(problems[step * args.prompts : (step + 1) * args.prompts])
        ]
        samples = build_group_samples(batch, cfg, policy.tokenizer, step)
        asyncio.run(run_rollout(rollout_settings, samples, cfg, step))
        rollout_s = time.perf_counter() - started
        advantages = group_advantages([float(s.reward) for s in samples], cfg.n_samples_per_prompt,
                                      cfg.rollout_batch_size, std_normalization=cfg.grpo_std_normalization)  # fmt: skip
        items = [
            to_train_sample(s, i, float(a), policy.model.config)
            for i, (s, a) in enumerate(zip(samples, advantages.tolist(), strict=True))
        ]
        before = len(diffs)
        update_started = time.perf_counter()
        stats = trainer.update.policy_update(policy.model, optimizer, items, cfg, pad_token_id=pad)
        engine.weight_version = step + 1
        step_diffs = torch.cat(diffs[before:]) if len(diffs) > before else torch.zeros(0)
        steps.append({
            "step": step, "rollout_s": round(rollout_s, 1),
            "update_s": round(time.perf_counter() - update_started, 1),
            "statuses": sorted({str(s.status) for s in samples}),
            "excluded": sum(item.excluded is not None for item in items),
            "response_tokens_mean": round(sum(s.response_length for s in samples) / len(samples), 1),
            "turns_mean": round(sum(len(s.metadata.get("turns", [])) for s in samples) / len(samples), 2),
            "grad_norm": round(stats.grad_norm, 4), **_distribution(step_diffs),
        })  # fmt: skip
        print(steps[-1], flush=True)
    trainer.update._Mismatch.add = record
    row = {"model": name, "env": args.env, "parameters": sum(p.numel() for p in policy.model.parameters()),
           "dtype": str(next(policy.model.parameters()).dtype).removeprefix("torch."),
           "episodes_per_step": args.prompts * args.samples, "steps": steps,
           "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.startswith("cuda") else None,
           **_distribution(torch.cat(diffs) if diffs else torch.zeros(0))}  # fmt: skip
    print("| model | tokens | max | mean | p99 | share > 0.1 |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| {name} ({row['dtype']}) | {row['tokens']} | {row['max']:.4f} | {row['mean']:.4f} | {row['p99']:.4f} | "
          f"{row['share_above_0.1']:.4f} |")  # fmt: skip
    return row


def _distribution(diffs: torch.Tensor) -> dict:
    if diffs.numel() == 0:
        return {"tokens": 0, "max": 0.0, "mean": 0.0, "p99": 0.0, "share_above_0.1": 0.0}
    diffs = diffs.double()
    return {
        "tokens": int(diffs.numel()),
        "max": round(float(diffs.max()), 5),
        "mean": round(float(diffs.mean()), 5),
        "p99": round(float(torch.quantile(diffs, 0.99)), 5),
        "share_above_0.1": round(float((diffs > 0.1).double().mean()), 5),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    parser.add_argument("--random-init-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument(
        "--gradient-checkpointing", nargs="?", const="on", default="auto", choices=sorted(_CHECKPOINTING)
    )
    parser.add_argument("--freeze-vision", action="store_true", help="train the language model only")
    parser.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="write one checkpoint here, report size"
    )
    parser.add_argument("--checkpoint-optimizer", action="store_true", help="with the optimizer state")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    parser.add_argument("--grpo-steps", type=int, default=0, help="run GRPO steps and report the mismatch")
    parser.add_argument("--prompts", type=int, default=4, help="--grpo-steps: prompts per step")
    parser.add_argument(
        "--tokens-per-turn", type=int, default=64, help="--grpo-steps: generation cap per turn"
    )
    parser.add_argument(
        "--env", choices=["geo3k", "image-feedback"], default="geo3k", help="--grpo-steps: the env"
    )
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device)
    policy, name = bench_policy(args.model, args.random_init_shape, device, dtype)
    if args.grpo_steps:
        # --samples is per prompt here and --response-tokens the episode's budget over all turns.
        return _write(args, argv, device, "grpo_mismatch", grpo_mismatch(policy, name, args, device))
    cfg = TrainConfig.from_dict(
        dict(rollout_batch_size=1, n_samples_per_prompt=args.samples, micro_batch_size=args.micro_batch_size,
             gradient_checkpointing=_CHECKPOINTING[args.gradient_checkpointing],
             freeze_vision=args.freeze_vision, lr=1e-6, progress=False)
    )  # fmt: skip
    checkpointing = prepare_for_training(policy.model, cfg)
    optimizer = MasterWeightAdamW(policy.model, cfg)
    items = fabricate_rollout(policy, args.samples, args.response_tokens)
    pad = policy.tokenizer.pad_token_id
    timings = []
    for repeat in range(args.repeats + 1):  # the first update is a warm-up (allocations, autotuning)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        stats = policy_update(policy.model, optimizer, items, cfg, pad_token_id=pad)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if repeat:
            timings.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    reserved = torch.cuda.max_memory_reserved() / 2**30 if device.startswith("cuda") else None
    state = optimizer.inner.state.values()
    optimizer_bytes = sum(t.numel() * t.element_size() for s in state for t in s.values() if t.dim()) + sum(
        m.numel() * m.element_size()
        for p, m in zip(optimizer.params, optimizer.masters, strict=True)
        if m is not p
    )
    tokens = sum(int(item.input_ids.numel()) for item in items)
    row = {
        "model": name,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "samples": args.samples,
        "tokens_per_sample": tokens // args.samples,
        "micro_batch_size": args.micro_batch_size,
        "gradient_checkpointing": checkpointing,
        "freeze_vision": args.freeze_vision,
        "trainable_parameters": sum(p.numel() for p in optimizer.params),
        "fused_adamw": bool(optimizer.inner.defaults["fused"]),
        "seconds_per_update": round(min(timings), 3),
        "tokens_per_s": round(tokens / min(timings), 1),
        "peak_gib": round(peak, 1) if peak is not None else None,
        "peak_reserved_gib": round(reserved, 1) if reserved is not None else None,
        "optimizer_state_gib": round(optimizer_bytes / 2**30, 1),
        "grad_norm": round(stats.grad_norm, 4),
    }
    if args.checkpoint_dir is not None:
        row.update(_time_checkpoint(policy, optimizer, args))
    print("| model | samples x tokens | micro-batch | checkpointing | s / update | tok/s | peak GiB |")
    print("|---|---:|---:|---|---:|---:|---:|")
    print(
        f"| {name} ({row['dtype']}) | {args.samples} x {row['tokens_per_sample']} | {args.micro_batch_size} | "
        f"{checkpointing} | {row['seconds_per_update']:.2f} | {row['tokens_per_s']:.0f} | "
        f"{row['peak_gib'] if peak is not None else '-'} |"
    )
    return _write(args, argv, device, "train_step", row)


def _time_checkpoint(policy, optimizer, args) -> dict:
    """One trainer checkpoint of the benchmarked model: seconds to write it and its size."""
    from trainer.checkpoint import checkpoint_sizes, save_checkpoint

    started = time.perf_counter()
    path = save_checkpoint(
        args.checkpoint_dir, 1, policy, optimizer, {}, keep=1, save_optimizer=args.checkpoint_optimizer
    )
    seconds = time.perf_counter() - started
    sizes = checkpoint_sizes(path)
    print(f"checkpoint {path}: {sizes['total'] / 1e9:.2f} GB in {seconds:.1f} s", flush=True)
    return {
        "checkpoint_s": round(seconds, 1),
        "checkpoint_gb": round(sizes["total"] / 1e9, 2),
        "checkpoint_weights_gb": round(sizes["weights"] / 1e9, 2),
        "checkpoint_optimizer_gb": round(sizes["optimizer"] / 1e9, 2),
    }


def _write(args, argv, device: str, benchmark: str, row: dict) -> dict:
    report = {"benchmark": benchmark, "date": date.today().isoformat(), "command": " ".join(
        ["python", "bench/train_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(device), "result": row}  # fmt: skip
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"{benchmark}-{socket.gethostname()}-{date.today()}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    path.write_text(json.dumps({"runs": [*runs, report]}, indent=2))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
