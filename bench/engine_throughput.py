"""Generation throughput of the local engine: generated tokens per second at several batch sizes.

Every request carries its own 448x448 image (one pad in the prompt, expanded by the engine) and
samples exactly ``--new-tokens`` tokens (temperature 1, EOS ignored). A batch of B requests is sent
concurrently with ``max_batch_size=B``, so it runs as one engine batch; the time is end to end per
batch (image decoding and processing, prefill, decode), the median of ``--repeats`` runs after a
warm-up batch of the same size and length, with images of its own (``--baseline-generate``: the
same for ``model.generate``).

    # CPU, tiny offline models
    python bench/engine_throughput.py --model tiny-qwen2.5-vl --batch-sizes 1,8,32 --new-tokens 64
    # GPU: a random-weight model of Qwen2.5-VL-3B's shape in bf16 (tiny preset's tokenizer/processor)
    python bench/engine_throughput.py --random-init-shape qwen2.5-vl-3b --device cuda --dtype bfloat16 \\
        --batch-sizes 1,8,32 --new-tokens 256
    # the same for Qwen3.5-4B's shape (hybrid: Gated DeltaNet + gated full attention)
    python bench/engine_throughput.py --random-init-shape qwen3.5-4b --device cuda --dtype bfloat16

``--decode {eager,static,auto}`` selects the engine's decode path (passed to ``LocalEngine`` only
when given). Each row also reports the decode alone against the memory-bandwidth roofline: the
prefill is timed separately (the same batch with one new token, or the engine's own
``prefill_seconds``/``decode_seconds`` when its stats have them), and

    bytes per decode step = the text model's weights a step reads (decoder layers, final norm, the
                            output projection once even when tied, B embedding rows; no vision tower)
                          + the KV cache it reads (attention layers x 2 x KV heads x head dim
                            x dtype bytes x the rows' summed context, at the mean context of the
                            decode: prompt tokens with image pads expanded + new tokens / 2)
                          + linear-attention state (hybrid models: recurrent and conv state per row)
    roofline tok/s = B x bandwidth / bytes per step

with the bandwidth from ``--bandwidth-gbs`` or, on CUDA, measured once with a large
device-to-device copy (none on CPU: no roofline there). ``--profile`` adds one batch (at most
33 new tokens) under torch.profiler after the timed runs: per decode step the wall time, the GPU's kernel time (memory
copies included), the kernels run and the launch calls made, and the GPU busy share (kernel time /
wall); a one-token run of the same batch under the profiler is subtracted so the prefill is left
out. On CPU only the wall time.

    python bench/engine_throughput.py --random-init-shape qwen2.5-vl-3b --device cuda --dtype bfloat16 \\
        --batch-sizes 16,64 --new-tokens 256 --repeats 3 --decode static --profile

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
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
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
from models.vision_attention import use_default_vision_attention  # noqa: E402
from rollout.engines.local import LocalEngine  # noqa: E402

IMAGE_SIZE = 448
# The profiled batch generates at most this many tokens: a step's cost does not depend on it, and
# the profiler records every kernel (an eager 3B step launches ~1,600), which makes long runs slow.
PROFILED_TOKENS = 33


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


def add_policy_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine benchmarks' model and engine arguments, read by ``policy_from_args`` and
    ``engine_options``: --model, --random-init-shape, --device, --dtype, --decode."""
    parser.add_argument("--model", default="tiny-qwen2.5-vl", help="a preset name or a checkpoint directory")
    parser.add_argument(
        "--random-init-shape", choices=sorted(SHAPES), default=None, help="random weights of this shape"
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument(
        "--decode",
        choices=["eager", "static", "auto"],
        default=None,
        help="the engine's decode path (default: its own)",
    )


def policy_from_args(args) -> tuple[Policy, str, str, torch.dtype]:
    """``bench_policy`` for a benchmark's ``--model``, ``--random-init-shape``, ``--device`` and
    ``--dtype``: the policy, its name, the device and the dtype it was built with."""
    from models.loader import default_dtype

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    policy, name = bench_policy(args.model, args.random_init_shape, device, dtype)
    return policy, name, device, dtype


def random_init_policy(
    shape: Shape, device: str, dtype: torch.dtype, *, vocab_to_tokenizer: bool = False
) -> Policy:
    """A policy with random weights of ``shape``, built directly on ``device`` (no fp32 CPU copy).

    ``vocab_to_tokenizer`` trims the embedding to the tokenizer's length. The released checkpoints
    pad it (Qwen2.5-VL: 151,936 rows for 151,669 tokens); a trained model never samples the padding
    rows, but a random one samples one about every 570 tokens, and the rollout rightly fails an
    episode that writes an id without a token."""
    processing = load_processing(shape.processing_preset)
    if vocab_to_tokenizer:
        shape = replace(shape, vocab_size=len(processing.tokenizer))
    config = random_init_config(shape, processing.tokenizer)
    torch.manual_seed(0)
    with torch.device(device):
        model = MODEL_CLASSES[shape.family]._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    use_default_vision_attention(model)  # as load_policy does
    processing.model = model.eval()
    return processing


def diagram(seed: int) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    draw = ImageDraw.Draw(image)
    draw.polygon([(40, 400), (400, 400), (400, 60 + seed % 50)], outline="black", width=3)
    draw.text((60 + seed % 100, 60), f"x = {seed}", fill="black")
    return image


# Keys of ``engine.stats`` that time a batch's phases, when the engine keeps them (cumulative seconds).
ENGINE_TIMING_KEYS = ("prefill_seconds", "decode_seconds")
# CUDA runtime and driver calls that launch work on the GPU (one graph launch runs many kernels).
LAUNCH_CALLS = frozenset({
    "cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
    "cudaLaunchCooperativeKernel", "cudaGraphLaunch", "cuGraphLaunch",
})  # fmt: skip


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
    decode: str | None = None  # ``--decode`` as given; None: the engine's default
    engine_stats: dict | None = None
    # The decode alone: the batch's time less its prefill (image processing, vision tower, prefill,
    # first token), over the tokens sampled after the first; medians over the runs.
    prefill_seconds: float | None = None
    decode_seconds: float | None = None
    decode_tokens_per_s: float | None = None
    # What one decode step reads (see StepBytes), and the roofline it sets at the bandwidth.
    mean_context_tokens: float | None = None
    weight_bytes: int | None = None
    kv_bytes: int | None = None
    state_bytes: int | None = None
    bytes_per_step: int | None = None
    bytes_formula: str | None = None
    bandwidth_gbs: float | None = None
    roofline_tokens_per_s: float | None = None
    roofline_percent: float | None = None
    # ``--profile``: per decode step (see profile_decode).
    profile: dict | None = None


def engine_options(decode: str | None) -> dict:
    """``LocalEngine`` keywords for ``--decode``: none unless it was given, so the script also runs
    engines that have no decode option."""
    return {} if decode is None else {"decode": decode}


def git_commit(root: Path = HERE.parent) -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside git."""

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], cwd=root, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if changed else "")


# --- the memory-bandwidth roofline of a decode step ---------------------------------------------


@dataclass(frozen=True)
class StepBytes:
    """The bytes one decode step of a batch reads from device memory."""

    weights: int  # decoder layers, final norm, output projection, the batch's embedding rows
    kv: int  # the attention layers' KV cache at the rows' context
    state: int  # linear-attention layers' recurrent and conv state (hybrid models; 0 otherwise)
    kv_formula: str  # the KV term with its numbers

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.state


def language_model(model):
    """The text decoder of a Qwen-VL model (Qwen2.5-VL, Qwen3-VL and Qwen3.5 keep it here)."""
    return model.model.language_model


def decode_weight_bytes(model) -> int:
    """Bytes of the weights every decode step reads, whatever the batch: each parameter of the
    language model but the token embedding (a step looks up only its batch's rows), plus the output
    projection's matrix, counted once when it is tied to the embedding. The vision tower runs at
    prefill only."""
    embedding = model.get_input_embeddings().weight
    read = {id(p): p for p in language_model(model).parameters() if p is not embedding}
    read.update((id(p), p) for p in model.get_output_embeddings().parameters())
    return sum(p.numel() * p.element_size() for p in read.values())


def decode_step_bytes(model, batch: int, mean_context: float) -> StepBytes:
    """What one decode step of ``batch`` rows reads, each row at ``mean_context`` tokens of context.
    KV cache and conv state are in the model's dtype; transformers keeps the linear-attention
    recurrent state in fp32."""
    text = getattr(model.config, "text_config", model.config)
    element = next(language_model(model).parameters()).element_size()
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    attention_layers = sum(kind != "linear_attention" for kind in layer_types)
    linear_layers = len(layer_types) - attention_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = text.num_key_value_heads
    kv = round(attention_layers * 2 * kv_heads * head_dim * element * batch * mean_context)
    state = 0
    if linear_layers:
        keys, values = text.linear_key_head_dim, text.linear_value_head_dim
        recurrent = text.linear_num_value_heads * keys * values * 4
        conv_channels = 2 * text.linear_num_key_heads * keys + text.linear_num_value_heads * values
        conv = conv_channels * text.linear_conv_kernel_dim * element
        state = linear_layers * batch * (recurrent + conv)
    return StepBytes(
        weights=decode_weight_bytes(model) + batch * text.hidden_size * element,
        kv=kv,
        state=state,
        kv_formula=(
            f"{attention_layers} layers x 2 x {kv_heads} KV heads x {head_dim} x {element} B x {batch} rows "
            f"x {mean_context:,.0f} tokens"
        ),
    )


def measure_bandwidth_gbs(device: str, gib: float = 2.0, runs: int = 10) -> float:
    """The device's memory bandwidth in GB/s: a device-to-device copy of ``gib`` GiB, bytes read
    plus bytes written over its time (CUDA events), the median of ``runs`` copies after a warm-up."""
    size = int(gib * 2**30)
    with torch.cuda.device(torch.device(device)):
        source = torch.empty(size, dtype=torch.uint8, device=device)
        target = torch.empty_like(source)
        target.copy_(source)
        seconds = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        del source, target
        torch.cuda.empty_cache()
    return 2 * size / statistics.median(seconds) / 1e9


# --- runs ----------------------------------------------------------------------------------------


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
    """One batch, each request exactly ``new_tokens`` long: results, wall seconds, and the engine's
    own phase timings over it (when its stats keep them)."""
    params = {"temperature": 1.0, "max_new_tokens": new_tokens, "ignore_eos": True}
    before = dict(engine.stats)
    started = time.perf_counter()
    results = await asyncio.gather(*(engine.generate(prompt_ids, [image], params) for image in images))
    seconds = time.perf_counter() - started
    if any(r.finish_reason != "length" for r in results):
        reasons = sorted({str(r.meta_info["finish_reason"]) for r in results})
        raise RuntimeError(f"a benchmark request did not run to its length: {reasons}")
    timing = {key: engine.stats[key] - before[key] for key in ENGINE_TIMING_KEYS if key in before}
    return results, seconds, timing


async def _decode_timing(engine, prompt_ids, runs, batch: int, repeats: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of a batch, medians: the engine's own timings when it
    keeps them, else the timed runs' wall time less that of as many runs with one new token each
    (the same batch with new images: image processing, vision tower, prefill, the first token)."""
    timings = [timing for _, _, timing in runs]
    if all(set(ENGINE_TIMING_KEYS) <= timing.keys() for timing in timings):
        return tuple(statistics.median(t[key] for t in timings) for key in ENGINE_TIMING_KEYS)
    prefill = []
    for repeat in range(repeats):
        images = [diagram(30_000 + repeat * batch + i) for i in range(batch)]
        prefill.append((await _one_batch(engine, prompt_ids, images, 1))[1])
    prefill_seconds = statistics.median(prefill)
    return prefill_seconds, statistics.median(seconds for _, seconds, _ in runs) - prefill_seconds


async def _profiled_batch(engine, prompt_ids, images, new_tokens: int, cuda: bool) -> dict:
    """One batch under torch.profiler: wall seconds and, on CUDA, the GPU's kernel time (self
    device time of every device event, memory copies included), its kernels and the launch calls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities) as prof:
        _, seconds, _ = await _one_batch(engine, prompt_ids, images, new_tokens)
    totals = {"wall_ms": seconds * 1e3, "kernel_ms": 0.0, "kernels": 0, "launch_calls": 0}
    if cuda:
        for event in prof.key_averages():
            if event.device_type == DeviceType.CUDA:
                totals["kernel_ms"] += event.self_device_time_total / 1e3
                totals["kernels"] += event.count
            elif event.key in LAUNCH_CALLS:
                totals["launch_calls"] += event.count
    return totals


async def profile_decode(
    engine, prompt_ids, batch: int, new_tokens: int, cuda: bool, prefill_runs: int = 3
) -> dict:
    """Per decode step of one profiled batch: wall ms, GPU kernel ms, kernels, launch calls and the
    GPU busy share (kernel time / wall). The same batch with one new token, also profiled, is
    subtracted, which leaves the ``new_tokens - 1`` decode steps: the fastest of ``prefill_runs``
    such runs, since interference only ever adds time. On CPU the wall time only; None where the
    noise exceeded the decode (a tiny model on a busy machine)."""
    images = [diagram(40_000 + i) for i in range(batch)]
    full = await _profiled_batch(engine, prompt_ids, images, new_tokens, cuda)
    prefills = []
    for run in range(prefill_runs):
        images = [diagram(45_000 + run * batch + i) for i in range(batch)]
        prefills.append(await _profiled_batch(engine, prompt_ids, images, 1, cuda))
    prefill = min(prefills, key=lambda totals: totals["wall_ms"])
    steps = new_tokens - 1
    per_step = {key: (full[key] - prefill[key]) / steps for key in full}
    wall = per_step["wall_ms"] if per_step["wall_ms"] > 0 else None
    result = {"decode_steps": steps, "wall_ms_per_step": None if wall is None else round(wall, 3)}
    result.update(
        kernel_ms_per_step=None, kernels_per_step=None, launch_calls_per_step=None, gpu_busy_share=None
    )
    if cuda:
        result.update(
            kernel_ms_per_step=round(per_step["kernel_ms"], 3),
            kernels_per_step=round(per_step["kernels"], 1),
            launch_calls_per_step=round(per_step["launch_calls"], 1),
            gpu_busy_share=None if wall is None else round(per_step["kernel_ms"] / wall, 3),
        )
    return result


def _roofline_fields(
    model, batch: int, new_tokens: int, prompt_tokens: int, decode_tokens_per_s, bandwidth_gbs
):
    mean_context = prompt_tokens + new_tokens / 2
    step = decode_step_bytes(model, batch, mean_context)
    roofline = batch * bandwidth_gbs * 1e9 / step.total if bandwidth_gbs else None
    return dict(
        mean_context_tokens=mean_context,
        weight_bytes=step.weights,
        kv_bytes=step.kv,
        state_bytes=step.state,
        bytes_per_step=step.total,
        bytes_formula=step.kv_formula,
        bandwidth_gbs=round(bandwidth_gbs, 1) if bandwidth_gbs else None,
        roofline_tokens_per_s=round(roofline, 1) if roofline else None,
        roofline_percent=round(100 * decode_tokens_per_s / roofline, 2)
        if roofline and decode_tokens_per_s
        else None,
    )


def progress(batch: int, started: float, what: str) -> None:
    print(f"batch {batch}: {what} ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)


async def run_benchmark(
    policy: Policy,
    batch_sizes: list[int],
    new_tokens: int,
    repeats: int,
    baseline: bool = False,
    *,
    decode: str | None = None,
    bandwidth_gbs: float | None = None,
    profile: bool = False,
) -> list[Row]:
    """Each batch size: a warm-up, then ``repeats`` timed batches, the median reported (every run is
    in ``seconds_per_run``), then the prefill timing and, with ``profile``, the profiled batch. With
    ``baseline``, ``model.generate`` gets the same: its own warm-up, as many timed runs, the median,
    and new images for every run on both sides (drawn before the timer; image processing inside it
    on both sides)."""
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "Find x. Reason step by step."}],
        }
    ]
    text = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = policy.tokenizer(text)["input_ids"]
    cuda = next(policy.model.parameters()).device.type == "cuda"
    rows = []
    for batch in batch_sizes:
        runs = []
        options = engine_options(decode)
        started = time.perf_counter()
        async with LocalEngine(policy, max_batch_size=batch, batch_wait_ms=1000.0, **options) as engine:
            progress(batch, started, "engine ready")
            # Warm-up: a batch of the same size and length, so that the static loop's compiles and
            # CUDA graph captures (one per batch and cache-length bucket) stay out of the timed runs.
            await _one_batch(engine, prompt_ids, [diagram(10_000 + i) for i in range(batch)], new_tokens)
            progress(batch, started, "warmed up")
            for repeat in range(repeats):
                images = [diagram(repeat * batch + i) for i in range(batch)]
                runs.append(await _one_batch(engine, prompt_ids, images, new_tokens))
                progress(batch, started, f"timed run {repeat + 1} of {repeats}: {runs[-1][1]:.2f} s")
            assert engine.stats["max_batch_rows"] == batch, engine.stats
            prefill_seconds = decode_seconds = None
            if new_tokens > 1:
                prefill_seconds, decode_seconds = await _decode_timing(
                    engine, prompt_ids, runs, batch, repeats
                )
            profiled = None
            if profile and new_tokens > 1:
                profiled = await profile_decode(
                    engine, prompt_ids, batch, min(new_tokens, PROFILED_TOKENS), cuda
                )
                progress(batch, started, "profiled")
            engine_stats = dict(engine.stats)
        seconds_per_run = [seconds for _, seconds, _ in runs]
        results = runs[0][0]
        generated = sum(len(r.token_ids) for r in results)
        seconds = statistics.median(seconds_per_run)
        decode_tokens_per_s = (
            batch * (new_tokens - 1) / decode_seconds
            if decode_seconds is not None and decode_seconds > 0
            else None
        )
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
        prompt_tokens = results[0].meta_info["prompt_tokens"]
        rows.append(
            Row(
                batch_size=batch,
                new_tokens_per_request=new_tokens,
                prompt_tokens_per_request=prompt_tokens,
                generated_tokens=generated,
                seconds=round(seconds, 3),
                tokens_per_s=round(generated / seconds, 1),
                generate_tokens_per_s=generate_tokens_per_s,
                seconds_per_run=[round(x, 3) for x in seconds_per_run],
                generate_seconds_per_run=generate_seconds_per_run,
                decode=decode,
                engine_stats=engine_stats,
                prefill_seconds=round(prefill_seconds, 4) if prefill_seconds is not None else None,
                decode_seconds=round(decode_seconds, 4) if decode_seconds is not None else None,
                decode_tokens_per_s=round(decode_tokens_per_s, 1) if decode_tokens_per_s else None,
                **_roofline_fields(
                    policy.model, batch, new_tokens, prompt_tokens, decode_tokens_per_s, bandwidth_gbs
                ),
                profile=profiled,
            )
        )
        print(
            f"batch {batch}: {generated} tokens in {seconds:.2f} s (median of {repeats})",
            file=sys.stderr,
            flush=True,
        )
    return rows


# --- report --------------------------------------------------------------------------------------


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(rows: list[Row]) -> str:
    baseline = any(r.generate_tokens_per_s is not None for r in rows)
    lines = [
        "| batch | prompt tokens / request | new tokens / request | wall s | generated tok/s |"
        " decode tok/s | roofline tok/s | % of roofline |" + (" model.generate tok/s |" if baseline else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if baseline else ""),
    ]
    for r in rows:
        lines.append(
            f"| {r.batch_size} | {r.prompt_tokens_per_request} | {r.new_tokens_per_request} | "
            f"{r.seconds:.2f} | {r.tokens_per_s:.1f} | {_number(r.decode_tokens_per_s)} | "
            f"{_number(r.roofline_tokens_per_s, 0)} | {_number(r.roofline_percent, 2)} |"
            + (f" {r.generate_tokens_per_s:.1f} |" if baseline else "")
        )
    lines.append("")
    lines.extend(roofline_line(r) for r in rows)
    if any(r.profile for r in rows):
        lines += [
            "",
            "| batch | wall ms / decode step | GPU kernel ms / step | kernels / step | launch calls / step | GPU busy |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            if r.profile:
                p = r.profile
                busy = "-" if p["gpu_busy_share"] is None else f"{100 * p['gpu_busy_share']:.1f}%"
                lines.append(
                    f"| {r.batch_size} | {_number(p['wall_ms_per_step'], 2)} | {_number(p['kernel_ms_per_step'], 2)} | "
                    f"{_number(p['kernels_per_step'])} | {_number(p['launch_calls_per_step'])} | {busy} |"
                )
    return "\n".join(lines)


def _size(count: int) -> str:
    return f"{count / 1e9:.2f} GB" if count >= 1e7 else f"{count / 1e6:.3f} MB"


def roofline_line(r: Row) -> str:
    """The roofline of one row with its numbers, e.g. "batch 64: bytes/step = 6.18 GB weights +
    0.97 GB KV (36 layers x ...) = 7.15 GB; roofline at 4.30 TB/s = 38,480 tok/s; decode 3,000 tok/s
    = 7.80% of it"."""
    state = f" + {_size(r.state_bytes)} linear-attention state" if r.state_bytes else ""
    line = (
        f"batch {r.batch_size}: bytes/step = {_size(r.weight_bytes)} weights + {_size(r.kv_bytes)} KV "
        f"({r.bytes_formula}){state} = {_size(r.bytes_per_step)}; "
    )
    if r.roofline_tokens_per_s is None:
        return line + "no roofline (no bandwidth: pass --bandwidth-gbs; measured on CUDA only)"
    line += f"roofline at {r.bandwidth_gbs / 1e3:.2f} TB/s = {r.roofline_tokens_per_s:,.0f} tok/s"
    if r.roofline_percent is not None:
        line += f"; decode {r.decode_tokens_per_s:,.0f} tok/s = {r.roofline_percent:.2f}% of it"
    return line


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
    add_policy_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--baseline-generate", action="store_true", help="also time transformers' model.generate per batch"
    )
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="memory bandwidth for the roofline (default: measured on CUDA)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one more batch: kernel vs wall time per step"
    )
    parser.add_argument("--output-dir", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        parser.error(f"--batch-sizes must be positive integers, got {args.batch_sizes}")
    return args


def write_report(output_dir: Path, benchmark: str, report: dict) -> Path:
    """Append ``report`` to the day's file of this benchmark and host (runs accumulate in it)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    out = output_dir / f"{benchmark}-{socket.gethostname()}-{report['date']}.json"
    runs = json.loads(out.read_text()).get("runs", []) if out.is_file() else []
    out.write_text(json.dumps({"runs": [*runs, report]}, indent=2, default=str) + "\n")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    policy, model_name, device, dtype = policy_from_args(args)
    parameters = sum(p.numel() for p in policy.model.parameters())
    bandwidth_gbs, bandwidth_source = args.bandwidth_gbs, "given"
    if bandwidth_gbs is None and device.startswith("cuda"):
        bandwidth_gbs, bandwidth_source = measure_bandwidth_gbs(device), "measured (device-to-device copy)"
    rows = asyncio.run(
        run_benchmark(
            policy,
            args.batch_sizes,
            args.new_tokens,
            args.repeats,
            baseline=args.baseline_generate,
            decode=args.decode,
            bandwidth_gbs=bandwidth_gbs,
            profile=args.profile,
        )
    )
    report = {
        "benchmark": "engine_throughput",
        "date": date.today().isoformat(),
        "command": " ".join(
            ["python", "bench/engine_throughput.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "git_commit": git_commit(),
        "model": model_name,
        "parameters": parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "image_size": IMAGE_SIZE,
        "decode": args.decode,
        "bandwidth_gbs": round(bandwidth_gbs, 1) if bandwidth_gbs else None,
        "bandwidth_source": bandwidth_source if bandwidth_gbs else None,
        "machine": machine(device),
        "results": [asdict(r) for r in rows],
    }
    decode = f", decode {args.decode}" if args.decode else ""
    print(f"\n{model_name} ({parameters / 1e6:.1f} M parameters, {report['dtype']}{decode}) on {device}\n")
    print(markdown(rows))
    # One file per host and day; runs with different models or devices accumulate in it.
    out = write_report(args.output_dir, "engine_throughput", report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
