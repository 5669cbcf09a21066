"""Time and memory of one GRPO policy update (forward, backward, AdamW with fp32 master weights).

Builds a policy with random weights of a real shape (or loads a preset), fabricates one rollout of
``--samples`` episodes (a 448x448 image prompt and ``--response-tokens`` response tokens each, a
third of them env tokens with loss mask 0), and runs ``trainer.update.policy_update`` on it, the
same function the local trainer calls. Prints a markdown table and writes
bench/results/train_step-<host>-<date>.json.

    python bench/train_step.py --random-init-shape qwen2.5-vl-3b --device cuda --samples 8 \\
        --response-tokens 1024 --micro-batch-size 1 --gradient-checkpointing
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
from trainer.update import policy_update  # noqa: E402


def fabricate_rollout(policy, samples: int, response_tokens: int, seed: int = 0) -> list[TrainSample]:
    text = policy.tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x."}]}],
        tokenize=False, add_generation_prompt=True,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    regular_vocab = len(policy.tokenizer) - 26  # response tokens from the regular vocabulary only
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-qwen2.5-vl")
    parser.add_argument("--random-init-shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--response-tokens", type=int, default=1024)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device)
    policy, name = bench_policy(args.model, args.random_init_shape, device, dtype)
    cfg = TrainConfig.from_dict(
        dict(rollout_batch_size=1, n_samples_per_prompt=args.samples, micro_batch_size=args.micro_batch_size,
             gradient_checkpointing=args.gradient_checkpointing, lr=1e-6, progress=False)
    )  # fmt: skip
    if args.gradient_checkpointing:
        policy.model.gradient_checkpointing_enable()
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
    tokens = sum(int(item.input_ids.numel()) for item in items)
    row = {
        "model": name,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "dtype": str(dtype).removeprefix("torch."),
        "samples": args.samples,
        "tokens_per_sample": tokens // args.samples,
        "micro_batch_size": args.micro_batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
        "seconds_per_update": round(min(timings), 3),
        "tokens_per_s": round(tokens / min(timings), 1),
        "peak_gib": round(peak, 1) if peak is not None else None,
        "grad_norm": round(stats.grad_norm, 4),
    }
    print("| model | samples x tokens | micro-batch | checkpointing | s / update | tok/s | peak GiB |")
    print("|---|---:|---:|---|---:|---:|---:|")
    print(
        f"| {name} ({row['dtype']}) | {args.samples} x {row['tokens_per_sample']} | {args.micro_batch_size} | "
        f"{args.gradient_checkpointing} | {row['seconds_per_update']:.2f} | {row['tokens_per_s']:.0f} | "
        f"{row['peak_gib'] if peak is not None else '-'} |"
    )
    report = {"benchmark": "train_step", "date": date.today().isoformat(), "command": " ".join(
        ["python", "bench/train_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": machine(device), "result": row}  # fmt: skip
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"train_step-{socket.gethostname()}-{date.today()}.json"
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    path.write_text(json.dumps({"runs": [*runs, report]}, indent=2))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
