"""CPU cost of each new image (and of a text observation) in the rollout, against slime's reference.

Per item, in CPU time of the whole process (``time.process_time``: every thread, so the image
cache's background processing counts), everything the rollout does for it once:

- ours, prompt: ``rollout.episode._encode_prompt`` (template ids of a new prompt text, the image
  cache's digest, pad count and payload) and the image's pixel processing, waited for;
- ours, observation: ``rollout.episode._encode_observation`` + ``_observation_insert`` (chat
  template continuation, image lookup, payload) and the pixel processing, waited for;
- reference: the steps of slime's ``examples/geo3k_vlm_multi_turn/rollout.py`` (THUDM/slime, as of
  2026-08-21) for the same item. Its functions cannot be imported here: the module imports
  ``slime.rollout.sglang_rollout`` (slime and its Megatron/SGLang dependencies) and
  ``qwen_vl_utils``, neither installed. So :func:`reference_prompt` and
  :func:`reference_observation` write its steps down in our own code: for a prompt,
  ``processor(text=prompt, images=...)`` then ``encode_image_for_rollout_engine`` (RGB, Pillow
  PNG at its default level, base64 data URI) per image; for an observation, the chat template
  rendered twice (dummy messages, then dummy messages + the observation) and the dummy's token
  count, ``qwen_vl_utils.fetch_image``'s steps (RGB, ``smart_resize`` to the patch factor,
  ``resize``), the processor on the whole rendered text with its images (slime's
  ``build_processor_kwargs``), the trim, and the PNG data URI per image.

Items are new every time (no cache can serve them): 448x448 diagrams drawn at random
(``bench/bench_envs.py``), prompt texts numbered. Prompt images come two ways: as a PIL image
(slime's data loader hands decoded images over) and loaded from a PNG file (the local trainer's
dataset files: the file itself is sent). Both sides decode dataset files at load time, outside the
timers.

    python bench/image_cost.py [--items 60] [--quick]

Prints a table and writes bench/results/image_cost-<host>-<date>.json. Goal: at most 0.5x the
reference's CPU time per new image.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRESETS = {"Qwen2.5-VL": "tiny-qwen2.5-vl", "Qwen3-VL": "tiny-qwen3-vl"}
DUMMY_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "I am a user."},
]


# ---------------------------------------------------------------------------------------------
# The reference: slime's steps, written down (see the module docstring)


def _png_data_uri(image) -> str:
    buffer = io.BytesIO()
    if image.mode != "RGB":
        image = image.convert("RGB")
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("utf-8")


def _processor_kwargs(images) -> dict[str, Any]:
    return {
        "images": images,
        "text_kwargs": {"return_tensors": None, "return_mm_token_type_ids": False},
        "images_kwargs": {"return_tensors": "pt"},
    }


def _fetch_image(image, patch_size: int):
    """qwen_vl_utils.fetch_image for a PIL image: RGB, then resized to its smart_resize size."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    image = image.convert("RGB")
    factor = patch_size * 2
    height, width = smart_resize(
        image.height, image.width, factor, min_pixels=4 * factor * factor, max_pixels=16384 * factor * factor
    )
    return image.resize((width, height))


def reference_prompt(processor, prompt: str, images: list) -> tuple[list[int], list[str], dict]:
    out = processor(text=prompt, images=images)
    train_inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}
    return out["input_ids"][0], [_png_data_uri(image) for image in images], train_inputs


def reference_observation(tokenizer, processor, message: dict) -> tuple[list[int], list[str], dict | None]:
    dummy = tokenizer.apply_chat_template(DUMMY_MESSAGES, tokenize=False, add_generation_prompt=False)
    formatted = tokenizer.apply_chat_template(
        DUMMY_MESSAGES + [message], tokenize=False, add_generation_prompt=True
    )
    trim = len(tokenizer.encode(dummy, add_special_tokens=False))
    patch = processor.image_processor.patch_size
    images = [
        _fetch_image(item["image"], patch)
        for item in message["content"]
        if isinstance(item, dict) and item.get("type") == "image"
    ]
    out = processor(text=formatted, **_processor_kwargs(images or None))
    train_inputs = {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")} or None
    return out["input_ids"][0][trim:], [_png_data_uri(image) for image in images], train_inputs


# ---------------------------------------------------------------------------------------------
# Ours: the rollout's own functions


def ours_prompt(ctx, sample) -> None:
    from rollout.episode import _encode_prompt

    for entry in _encode_prompt(ctx, sample).entries:
        entry.tensors.result()


def ours_observation(ctx, message: dict) -> None:
    from rollout.episode import _encode_observation, _observation_insert

    _tokens, _text, entries, _request = _observation_insert(ctx, *_encode_observation(ctx, message, None))
    for entry in entries:
        entry.tensors.result()


# ---------------------------------------------------------------------------------------------


def _cpu_ms_per_item(function, items: list) -> float:
    started = time.process_time()
    for item in items:
        function(item)
    return (time.process_time() - started) / len(items) * 1e3


def measure(family: str, checkpoint: str, items: int, files: Path) -> dict[str, dict[str, float]]:
    from bench_envs import new_diagram

    from envs.images import load_image
    from rollout.engines.sglang_client import SGLangClient
    from rollout.runtime import RolloutRuntime
    from rollout.sample import Sample

    class Engine:  # only its image encoding is used: the SGLang client's
        prepare_image = staticmethod(SGLangClient("http://127.0.0.1:1").prepare_image)

    runtime = RolloutRuntime()
    args = argparse.Namespace(
        hf_checkpoint=checkpoint, rollout_engine=Engine(), max_turns=3, rollout_interaction_env_path="envs.geo3k",
        env_kwargs={},
    )  # fmt: skip
    ctx = runtime.context(args)
    processing = ctx.processing
    tok, processor = processing.tokenizer, processing.processor
    counter = iter(range(1 << 62))

    def prompt_text() -> str:
        content = [{"type": "image"}, {"type": "text", "text": f"Find x in figure {next(counter)}."}]
        return tok.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )

    def observation(image) -> dict:
        return {
            "role": "tool",
            "content": [{"type": "image", "image": image}, {"type": "text", "text": "Next figure."}],
        }

    def text_observation() -> dict:
        return {"role": "tool", "content": f"calc_score: {next(counter)} is not the answer. Try again."}

    def from_file() -> Any:
        path = files / f"{next(counter)}.png"
        new_diagram().save(path)
        return load_image(str(path))  # decoded at load time, as a dataset loader does

    rows: dict[str, dict[str, float]] = {}
    cases = {
        "prompt, new image (PIL)": (
            lambda: Sample(prompt=prompt_text(), multimodal_inputs={"images": [new_diagram()]}),
            lambda s: ours_prompt(ctx, s),
            lambda s: reference_prompt(processor, s.prompt, s.multimodal_inputs["images"]),
        ),
        "prompt, new image (PNG file)": (
            lambda: Sample(prompt=prompt_text(), multimodal_inputs={"images": [from_file()]}),
            lambda s: ours_prompt(ctx, s),
            lambda s: reference_prompt(processor, s.prompt, s.multimodal_inputs["images"]),
        ),
        "image observation, new 448x448 image": (
            lambda: observation(new_diagram()),
            lambda m: ours_observation(ctx, m),
            lambda m: reference_observation(tok, processor, m),
        ),
        "text observation": (
            text_observation,
            lambda m: ours_observation(ctx, m),
            lambda m: reference_observation(tok, processor, m),
        ),
    }
    for name, (make, ours, reference) in cases.items():
        # Fresh items for each side and each pass (made outside the timers); a short pass first
        # warms imports and code paths on both sides.
        _cpu_ms_per_item(ours, [make() for _ in range(3)])
        _cpu_ms_per_item(reference, [make() for _ in range(3)])
        ours_ms = _cpu_ms_per_item(ours, [make() for _ in range(items)])
        reference_ms = _cpu_ms_per_item(reference, [make() for _ in range(items)])
        rows[name] = {"ours_ms": ours_ms, "reference_ms": reference_ms, "ratio": ours_ms / reference_ms}
    runtime.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=60, help="new items per case and side")
    parser.add_argument("--quick", action="store_true", help="10 items")
    opts = parser.parse_args()
    items = 10 if opts.quick else opts.items
    sys.path.insert(0, str(HERE))
    from rollout_concurrency import load_average, machine_info, write_result

    load_before = load_average()
    results = {}
    with tempfile.TemporaryDirectory() as files:
        for family, checkpoint in PRESETS.items():
            results[family] = measure(family, checkpoint, items, Path(files))
    print(f"\nCPU ms per item, {items} new items per case and side (load average before: {load_before})\n")
    print("| item | " + " | ".join(f"{f} ours / reference / ratio" for f in results) + " |")
    print("|---|" + "---:|" * len(results))
    for name in next(iter(results.values())):
        cells = [
            f"{r[name]['ours_ms']:.2f} / {r[name]['reference_ms']:.2f} / {r[name]['ratio']:.2f}x"
            for r in results.values()
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")
    record = {
        "machine": machine_info(),
        "load_average_before_after": [load_before, load_average()],
        "command": "python bench/image_cost.py " + " ".join(sys.argv[1:]),
        "items": items,
        "cpu_ms": results,
    }
    print(f"\nwrote {write_result('image_cost' + ('-quick' if opts.quick else ''), record)}")


if __name__ == "__main__":
    main()
