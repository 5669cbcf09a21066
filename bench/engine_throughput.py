"""Generation throughput of the local engine: generated tokens per second at several batch sizes.

Every request carries its own 448x448 image (one pad in the prompt, expanded by the engine) and
samples exactly ``--new-tokens`` tokens (temperature 1, EOS ignored). A batch of B requests is sent
concurrently with ``max_batch_size=B``, so it runs as one engine batch; the time is end to end per
batch (image decoding and processing, prefill, decode), the median of ``--repeats`` runs after a
warm-up (``--baseline-generate``: the same for ``model.generate``).

    # CPU, tiny offline models
    python bench/engine_throughput.py --model tiny-qwen2.5-vl --batch-sizes 1,8,32 --new-tokens 64
    # GPU: a random-weight model of Qwen2.5-VL-3B's shape in bf16 (tiny preset's tokenizer/processor)
    python bench/engine_throughput.py --random-init-shape qwen2.5-vl-3b --device cuda --dtype bfloat16 \\
        --batch-sizes 1,8,32 --new-tokens 256
    # the same for Qwen3.5-4B's shape (hybrid: Gated DeltaNet + gated full attention)
    python bench/engine_throughput.py --random-init-shape qwen3.5-4b --device cuda --dtype bfloat16

Prints a markdown table and writes bench/results/engine_throughput-<host>-<date>.json. On a
machine without network, the tiny preset's tokenizer is built from Qwen's BPE ranks cached at
``.cache/vlm-multiturn/qwen.tiktoken`` (Qwen3.5: ``qwen3_5.tiktoken``; copy it along with the
checkout).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
# Runnable from a plain checkout (e.g. a GPU machine where the package is not installed).
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from models import Policy, load_processing  # noqa: E402
from models.tiny import MODEL_CLASSES  # noqa: E402
from rollout.engines.local import LocalEngine  # noqa: E402

IMAGE_SIZE = 448


@dataclass(frozen=True)
class Shape:
    """The architecture of a released Qwen-VL checkpoint, for random-weight benchmarks."""

    family: str
    processing_preset: str  # tokenizer and processor come from this preset (real vocabulary)
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]
    rope_theta: float
    tie_word_embeddings: bool
    vision_depth: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_num_heads: int
    vision_fullatt_block_indexes: tuple[int, ...] = ()
    # Qwen3.5 only: full-attention head size, rotating fraction of it, linear-attention heads.
    head_dim: int = 0
    partial_rotary_factor: float = 1.0
    full_attention_interval: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_head_dim: int = 0
    vision_num_position_embeddings: int = 0


# From Qwen/Qwen2.5-VL-3B-Instruct's config.json.
SHAPES = {
    "qwen2.5-vl-3b": Shape(
        family="qwen2.5-vl",
        processing_preset="tiny-qwen2.5-vl",
        vocab_size=151_936,
        hidden_size=2048,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        intermediate_size=11_008,
        mrope_section=(16, 24, 24),
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        vision_depth=32,
        vision_hidden_size=1280,
        vision_intermediate_size=3420,
        vision_num_heads=16,
        vision_fullatt_block_indexes=(7, 15, 23, 31),
    ),
    # Text: Qwen3.5-4B as slime's Megatron recipe states it (scripts/models/qwen3.5-4B.sh: 32 layers,
    # hidden 2560, FFN 9216, 16 heads / 4 KV groups of 256, a quarter of each head rotating, vocab
    # 248,320, tied embeddings). Linear-attention heads and the vision tower: transformers'
    # Qwen3_5Config defaults (16 key / 32 value heads of 128; 27-layer, 1152-wide vision tower).
    "qwen3.5-4b": Shape(
        family="qwen3.5",
        processing_preset="tiny-qwen3.5",
        vocab_size=248_320,
        hidden_size=2560,
        num_hidden_layers=32,
        num_attention_heads=16,
        num_key_value_heads=4,
        intermediate_size=9216,
        mrope_section=(11, 11, 10),
        rope_theta=10_000_000.0,
        tie_word_embeddings=True,
        vision_depth=27,
        vision_hidden_size=1152,
        vision_intermediate_size=4304,
        vision_num_heads=16,
        head_dim=256,
        partial_rotary_factor=0.25,
        full_attention_interval=4,
        linear_num_key_heads=16,
        linear_num_value_heads=32,
        linear_head_dim=128,
        vision_num_position_embeddings=2304,
    ),
}


def _qwen3_5_config(shape: Shape, tokenizer):
    from transformers import Qwen3_5Config

    token = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        full_attention_interval=shape.full_attention_interval,
        linear_num_key_heads=shape.linear_num_key_heads,
        linear_num_value_heads=shape.linear_num_value_heads,
        linear_key_head_dim=shape.linear_head_dim,
        linear_value_head_dim=shape.linear_head_dim,
        max_position_embeddings=262_144,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": shape.rope_theta,
            "partial_rotary_factor": shape.partial_rotary_factor,
            "mrope_section": list(shape.mrope_section),
            "mrope_interleaved": True,
        },
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=token("<|endoftext|>"),
        eos_token_id=token("<|im_end|>"),
        pad_token_id=token("<|endoftext|>"),
    )
    vision = dict(
        depth=shape.vision_depth,
        hidden_size=shape.vision_hidden_size,
        intermediate_size=shape.vision_intermediate_size,
        num_heads=shape.vision_num_heads,
        out_hidden_size=shape.hidden_size,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=shape.vision_num_position_embeddings,
    )
    return Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=shape.tie_word_embeddings,
    )


def random_init_config(shape: Shape, tokenizer):
    from transformers import Qwen2_5_VLConfig

    if shape.family == "qwen3.5":
        return _qwen3_5_config(shape, tokenizer)
    if shape.family != "qwen2.5-vl":
        raise ValueError(f"random-init shapes exist for qwen2.5-vl and qwen3.5, got {shape.family!r}")
    token = tokenizer.convert_tokens_to_ids
    text = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=128_000,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": shape.rope_theta,
            "mrope_section": list(shape.mrope_section),
        },
        tie_word_embeddings=shape.tie_word_embeddings,
        bos_token_id=token("<|endoftext|>"),
        eos_token_id=token("<|im_end|>"),
        pad_token_id=token("<|endoftext|>"),
    )
    vision = dict(
        depth=shape.vision_depth,
        hidden_size=shape.vision_hidden_size,
        intermediate_size=shape.vision_intermediate_size,
        num_heads=shape.vision_num_heads,
        out_hidden_size=shape.hidden_size,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=list(shape.vision_fullatt_block_indexes),
        tokens_per_second=2,
    )
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=shape.tie_word_embeddings,
    )


def bench_policy(
    model: str, random_init_shape: str | None, device: str, dtype: torch.dtype
) -> tuple[Policy, str]:
    """The policy a benchmark runs and its name in the tables: a preset or checkpoint, or random
    weights of a real model's shape (``--random-init-shape``)."""
    from models.loader import load_policy

    if random_init_shape:
        return random_init_policy(
            SHAPES[random_init_shape], device, dtype
        ), f"random-init {random_init_shape}"
    return load_policy(model, device=device, dtype=dtype), model


def random_init_policy(shape: Shape, device: str, dtype: torch.dtype) -> Policy:
    """A policy with random weights of ``shape``, built directly on ``device`` (no fp32 CPU copy)."""
    processing = load_processing(shape.processing_preset)
    config = random_init_config(shape, processing.tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = MODEL_CLASSES[shape.family]._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    processing.model = model.eval()
    return processing


def diagram(seed: int) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    draw.polygon([(40, 400), (400, 400), (400, 60 + seed % 50)], outline="black", width=3)
    draw.text((60 + seed % 100, 60), f"x = {seed}", fill="black")
    return image


@dataclass
class Row:
    batch_size: int
    new_tokens_per_request: int
    prompt_tokens_per_request: int
    generated_tokens: int
    seconds: float
    tokens_per_s: float
    # transformers' own `model.generate` on the same batch, for reference (``--baseline-generate``).
    generate_tokens_per_s: float | None = None
    seconds_per_run: list[float] | None = None
    generate_seconds_per_run: list[float] | None = None


def plain_generate_seconds(
    policy: Policy, text: str, images: list[Image.Image], new_tokens: int
) -> tuple[int, float]:
    """Generated tokens and seconds of ``model.generate`` (sampling, top-k off, exactly
    ``new_tokens`` each) on one prompt per image. The timer holds what the engine's does: image
    processing, prefill and decode."""
    policy.processor.tokenizer.padding_side = "left"
    kwargs = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new_tokens,
                  min_new_tokens=new_tokens)  # fmt: skip
    with torch.no_grad():
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        inputs = policy.processor(text=[text] * len(images), images=images, return_tensors="pt", padding=True)
        inputs = inputs.to(policy.model.device)
        out = policy.model.generate(**inputs, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return (out.shape[1] - inputs["input_ids"].shape[1]) * len(images), seconds


async def _one_batch(engine: LocalEngine, prompt_ids: list[int], images: list[Image.Image], new_tokens: int):
    params = {"temperature": 1.0, "max_new_tokens": new_tokens, "ignore_eos": True}
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(prompt_ids, [image], params) for image in images))
    seconds = time.perf_counter() - started
    if any(r.finish_reason != "length" for r in results):
        reasons = sorted({str(r.meta_info["finish_reason"]) for r in results})
        raise RuntimeError(f"a benchmark request did not run to its length: {reasons}")
    return results, seconds


async def run_benchmark(
    policy: Policy, batch_sizes: list[int], new_tokens: int, repeats: int, baseline: bool = False
) -> list[Row]:
    """Each batch size: a warm-up, then ``repeats`` timed batches, the median reported (every run is
    in ``seconds_per_run``). With ``baseline``, ``model.generate`` gets the same: its own warm-up,
    as many timed runs, the median, and new images for every run on both sides (drawn before the
    timer; image processing inside it on both sides)."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Find x. Reason step by step."}],
        }
    ]
    text = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = policy.tokenizer(text)["input_ids"]
    rows = []
    for batch in batch_sizes:
        runs = []
        async with LocalEngine(policy, max_batch_size=batch, batch_wait_ms=1000.0) as engine:
            await _one_batch(engine, prompt_ids, [diagram(10_000)], 2)  # warm-up
            for repeat in range(repeats):
                images = [diagram(repeat * batch + i) for i in range(batch)]
                runs.append(await _one_batch(engine, prompt_ids, images, new_tokens))
            assert engine.stats["max_batch_rows"] == batch, engine.stats
        seconds_per_run = [seconds for _, seconds in runs]
        results = runs[0][0]
        generated = sum(len(r.token_ids) for r in results)
        seconds = statistics.median(seconds_per_run)
        generate_tokens_per_s = generate_seconds_per_run = None
        if baseline:
            plain_generate_seconds(policy, text, [diagram(20_000)], 2)  # warm-up
            plain = [
                plain_generate_seconds(
                    policy, text, [diagram(50_000 + repeat * batch + i) for i in range(batch)], new_tokens
                )
                for repeat in range(repeats)
            ]
            generate_tokens_per_s = round(plain[0][0] / statistics.median(s for _, s in plain), 1)
            generate_seconds_per_run = [round(s, 3) for _, s in plain]
        rows.append(
            Row(
                batch_size=batch,
                new_tokens_per_request=new_tokens,
                prompt_tokens_per_request=results[0].meta_info["prompt_tokens"],
                generated_tokens=generated,
                seconds=round(seconds, 3),
                tokens_per_s=round(generated / seconds, 1),
                generate_tokens_per_s=generate_tokens_per_s,
                seconds_per_run=[round(x, 3) for x in seconds_per_run],
                generate_seconds_per_run=generate_seconds_per_run,
            )
        )
        print(
            f"batch {batch}: {generated} tokens in {seconds:.2f} s (median of {repeats})",
            file=sys.stderr,
            flush=True,
        )
    return rows


def markdown(rows: list[Row]) -> str:
    baseline = any(r.generate_tokens_per_s is not None for r in rows)
    lines = [
        "| batch | prompt tokens / request | new tokens / request | wall s | generated tok/s |"
        + (" model.generate tok/s |" if baseline else ""),
        "|---:|---:|---:|---:|---:|" + ("---:|" if baseline else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r.batch_size} | {r.prompt_tokens_per_request} | {r.new_tokens_per_request} | "
            f"{r.seconds:.2f} | {r.tokens_per_s:.1f} |"
            + (f" {r.generate_tokens_per_s:.1f} |" if baseline else "")
        )
    return "\n".join(lines)


def machine(device: str) -> dict:
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny-qwen2.5-vl", help="a preset name or a checkpoint directory")
    parser.add_argument(
        "--random-init-shape", choices=sorted(SHAPES), default=None, help="random weights of this shape"
    )
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--baseline-generate", action="store_true", help="also time transformers' model.generate per batch"
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    return args


def main(argv: list[str] | None = None) -> dict:
    from models.loader import default_dtype

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    policy, model_name = bench_policy(args.model, args.random_init_shape, device, dtype)
    parameters = sum(p.numel() for p in policy.model.parameters())
    rows = asyncio.run(
        run_benchmark(
            policy, args.batch_sizes, args.new_tokens, args.repeats, baseline=args.baseline_generate
        )
    )
    report = {
        "benchmark": "engine_throughput",
        "date": date.today().isoformat(),
        "command": " ".join(
            ["python", "bench/engine_throughput.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "model": model_name,
        "parameters": parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": IMAGE_SIZE,
        "machine": machine(device),
        "results": [asdict(r) for r in rows],
    }
    print(f"\n{model_name} ({parameters / 1e6:.1f} M parameters, {report['dtype']}) on {device}\n")
    print(markdown(rows))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    out = args.output_dir / f"engine_throughput-{socket.gethostname()}-{report['date']}.json"
    # One file per host and day; runs with different models or devices accumulate in it.
    runs = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
    out.write_text(json.dumps({"runs": [*runs, report]}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
