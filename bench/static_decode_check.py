"""The static decoder on a GPU: end-to-end and decode-only speed per batch, graph replay time per
step, a kernel-vs-wall profile of the replayed step, and the trainer-vs-engine log-prob mismatch of
both decode loops.

    python bench/static_decode_check.py --random-init-shape qwen2.5-vl-3b   # CUDA only

1. ``decode="static"``, 64 slots of 2,048 tokens: for batch 1, 16 and 64, a warm-up batch of the
   same size and length (compiles and captures every step it needs), then a timed batch of new
   448x448 diagrams, 256 tokens each at temperature 1 (EOS ignored): wall time, and the engine's own
   prefill and decode seconds (``engine.stats``; the decode time includes each step's host sync).
2. The captured step alone: 50 replays at (rows, cache length) = (1, 384), (16, 384), (64, 384),
   (64, 512), timed with CUDA events, and 20 replays at (64, 384) under torch.profiler: wall and
   kernel milliseconds per step, kernels per step, the most expensive kernels.
3. 16 requests of 128 tokens with the same sampling seeds through each loop; every generated
   token's log-prob is compared with the trainer's teacher-forced one (``token_log_probs`` on the
   bf16 model): max, mean, p99 and the share above 0.1. The two loops sample different tokens once
   their bf16 logits differ, so each is compared with the trainer, not with the other.

4. The prefill of 64 new images (one new token each, twice) and the vision tower alone on 64 new
   images (three times), with transformers' SDPA vision attention and with
   ``models.vision_attention.segmented_sdpa`` (what ``load_policy`` uses on CUDA, and steps 1-3
   too); with the former also step 1's batches of 16 and 64.

Prints JSON lines and writes ``$OUT/static_decode_check.json`` (``--output-dir``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from bench.engine_throughput import SHAPES, diagram, random_init_policy  # noqa: E402
from models.logprobs import token_log_probs  # noqa: E402
from rollout.engines.local import LocalEngine  # noqa: E402


async def _batch(engine, ids, n, new, seed0):
    params = {"max_new_tokens": new, "ignore_eos": True, "temperature": 1.0}
    images = [diagram(seed0 + i) for i in range(n)]
    torch.cuda.synchronize()
    started = time.perf_counter()
    before = dict(engine.stats)
    results = await asyncio.gather(
        *[engine.generate(ids, [im], {**params, "sampling_seed": seed0 + i}) for i, im in enumerate(images)]
    )
    torch.cuda.synchronize()
    wall = time.perf_counter() - started
    keys = ("decode_seconds", "prefill_seconds", "decode_steps", "graph_capture_seconds")
    timing = {k: engine.stats.get(k, 0) - before.get(k, 0) for k in keys}
    return results, images, wall, sum(len(r.token_ids) for r in results), timing


def _replay_ms(decoder, rows, length, n=50):
    decoder.step(rows, length, False)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        decoder.step(rows, length, False)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def _tower_seconds(policy, batch: int, seed0: int) -> float:
    """Seconds of the vision tower alone on ``batch`` new images (processed before the timer)."""
    images = [diagram(seed0 + i) for i in range(batch)]
    processed = policy.processor.image_processor(images=images, return_tensors="pt")
    pixel_values, grid = processed["pixel_values"].cuda(), processed["image_grid_thw"].cuda()
    torch.cuda.synchronize()
    started = time.perf_counter()
    with torch.no_grad():
        policy.model.get_image_features(pixel_values, grid)
    torch.cuda.synchronize()
    return time.perf_counter() - started


async def _end_to_end(engine, ids, n: int, seed0: int) -> dict:
    """A warm-up batch of ``n`` (the same length: every graph it needs is captured), then a timed
    batch of new diagrams, 256 tokens each."""
    await _batch(engine, ids, n, 256, seed0 + 500)
    _, _, wall, generated, timing = await _batch(engine, ids, n, 256, seed0)
    return dict(
        batch=n,
        wall=wall,
        tok_s=generated / wall,
        decode_tok_s=generated / timing["decode_seconds"],
        **timing,
        ms_per_step=1000 * timing["decode_seconds"] / timing["decode_steps"],
    )


async def _vision_attention_ab(policy, ids, batch: int = 64, runs: int = 2) -> dict:
    """transformers' SDPA vision attention (one call per window), then ``segmented_sdpa`` (one call
    per window size, the default on CUDA): the prefill seconds of a batch of new images (one new
    token each) and the vision tower's seconds alone; with the former also the end-to-end batches
    of 16 and 64 that step 1 measured with the latter."""
    from models.vision_attention import use_segmented_vision_attention, use_transformers_vision_attention

    results: dict = {}
    async with LocalEngine(policy, decode="static", max_batch_size=batch, max_seq_len=2048, seed=0) as engine:
        for name in ("sdpa", "segmented"):
            if name == "sdpa":
                use_transformers_vision_attention(policy.model)
            else:
                assert use_segmented_vision_attention(policy.model)
            await _batch(engine, ids, batch, 1, 50_000 + (name == "sdpa") * 500)  # warm-up
            prefill = []
            for run in range(runs):
                _, _, _, _, timing = await _batch(
                    engine, ids, batch, 1, 60_000 + 1000 * run + (name == "sdpa") * 500
                )
                prefill.append(timing["prefill_seconds"])
            tower = [
                _tower_seconds(policy, batch, 70_000 + 1000 * run + (name == "sdpa") * 500)
                for run in range(3)
            ]
            results[name] = {"prefill_seconds": prefill, "vision_tower_seconds": tower}
            print(f"vision attention {name}, {batch} new images:", json.dumps(results[name]), flush=True)
            if name == "sdpa":
                for n in (16, 64):
                    row = await _end_to_end(engine, ids, n, 80_000 + 1000 * n)
                    print("transformers' SDPA vision attention", json.dumps(row), flush=True)
                    results[f"static-sdpa-{n}"] = row
    return results


async def main(shape: str, output_dir: Path) -> dict:
    policy = random_init_policy(SHAPES[shape], "cuda", torch.bfloat16)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Find x in the diagram."}]}
    ]
    text = policy.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = policy.tokenizer(text)["input_ids"]
    results: dict = {"card": torch.cuda.get_device_name(), "shape": shape, "prompt_ids": len(ids)}
    output_dir.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each part: a run stopped part-way keeps what it measured
        (output_dir / "static_decode_check.json").write_text(json.dumps(results, indent=1))

    async with LocalEngine(policy, decode="static", max_batch_size=64, max_seq_len=2048, seed=0) as engine:
        for n in (1, 16, 64):
            row = await _end_to_end(engine, ids, n, 1000 * n)
            print(json.dumps(row), flush=True)
            results[f"static-{n}"] = row
        save()
        decoder = engine._decoder
        for rows, length in ((1, 384), (16, 384), (64, 384), (64, 512)):
            ms = _replay_ms(decoder, rows, length)
            print("replay", rows, length, round(ms, 3), "ms", flush=True)
            results[f"replay-{rows}-{length}"] = ms
        from torch.profiler import ProfilerActivity, profile

        decoder.step(64, 384, False)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            started = time.perf_counter()
            for _ in range(20):
                decoder.step(64, 384, False)
            torch.cuda.synchronize()
            wall = time.perf_counter() - started
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        kernel_ms = sum(e.device_time for e in kernels) / 1000
        top = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:12]
        print(
            "profile: wall ms/step",
            wall * 50,
            "kernel ms/step",
            kernel_ms / 20,
            "kernels/step",
            len(kernels) / 20,
        )
        for e in top:
            print(
                f"  {e.key[:90]:90s} {e.self_device_time_total / 20 / 1000:.3f} ms/step x{e.count / 20:.0f}"
            )
        results["profile_static_64"] = dict(
            wall_ms=wall * 50, kernel_ms=kernel_ms / 20, kernels=len(kernels) / 20
        )
    for mode in ("eager", "static"):
        async with LocalEngine(policy, decode=mode, max_batch_size=16, max_seq_len=2048) as engine:
            generated, images, *_ = await _batch(engine, ids, 16, 128, 777)
        diffs = []
        for result, image in zip(generated, images, strict=True):
            prompt = policy.processor(text=[text], images=[image], return_tensors="pt")
            sequence = torch.cat([prompt["input_ids"], torch.tensor([result.token_ids])], dim=1).cuda()
            with torch.no_grad():
                trainer = token_log_probs(
                    policy.model,
                    sequence,
                    len(result.token_ids),
                    pixel_values=prompt["pixel_values"].cuda(),
                    image_grid_thw=prompt["image_grid_thw"].cuda(),
                )[0]
            diffs += [
                abs(a - b) for a, b in zip(trainer.float().cpu().tolist(), result.log_probs, strict=True)
            ]
        diffs.sort()
        mismatch = dict(
            tokens=len(diffs),
            max=diffs[-1],
            mean=sum(diffs) / len(diffs),
            p99=diffs[int(0.99 * (len(diffs) - 1))],
            share_over_0_1=sum(d > 0.1 for d in diffs) / len(diffs),
        )
        print("mismatch", mode, json.dumps(mismatch), flush=True)
        results[f"mismatch-{mode}"] = mismatch
        save()
    results["vision_attention"] = await _vision_attention_ab(policy, ids)
    save()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--random-init-shape", default="qwen2.5-vl-3b", choices=sorted(SHAPES))
    parser.add_argument("--output-dir", type=Path, default=Path(os.environ.get("OUT", HERE / "results")))
    cli = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA device")
    asyncio.run(main(cli.random_init_shape, cli.output_dir))
