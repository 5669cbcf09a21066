"""bench/engine_rollout.py: a whole rollout through the trainer's rollout code on a tiny model, every
episode running all of its turns (the GPU numbers themselves are measured elsewhere)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine_rollout.py"


def _bench_module():
    # bench/ is a folder of scripts, not a package; load the script as a module (once).
    if "engine_rollout" not in sys.modules:
        spec = importlib.util.spec_from_file_location("engine_rollout", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["engine_rollout"]


def test_every_episode_runs_three_turns_and_the_run_is_written(tmp_path, capsys):
    bench = _bench_module()
    argv = ["--model", "tiny-qwen2.5-vl", "--episodes", "4", "--turns", "3", "--tokens-per-turn", "4"]
    report = bench.main([*argv, "--device", "cpu", "--output-dir", str(tmp_path)])
    [row] = report["results"]
    assert row["turns_per_episode"] == [3, 3, 3, 3]
    assert row["statuses"] == {"COMPLETED": 4}
    # A turn ends at the cap or at the model's own end of turn: at most 4 tokens each.
    assert 12 <= row["generated_tokens"] <= 4 * 3 * 4
    assert row["tokens_per_s"] > 0
    stats = row["engine_stats"]
    assert stats["requests"] == 12  # the warm-up's requests are not counted
    assert stats["max_batch_rows"] <= 4
    assert report["observation"] == "text" and report["decode"] is None
    assert report["vision_tokens_masked"] is True
    assert "| repeat | episodes | turns / episode | generated tokens | wall s | tok/s end to end |" in (
        capsys.readouterr().out
    )
    [written] = tmp_path.glob("engine_rollout-*.json")
    assert json.loads(written.read_text())["runs"][0]["results"][0]["turns_per_episode"] == [3, 3, 3, 3]


def test_image_observations_change_colour_every_repeat():
    bench = _bench_module()
    assert bench.env_kwargs(False, 0) == {"kind": "text"}
    colours = {bench.env_kwargs(True, repeat)["colour"] for repeat in range(4)}
    assert len(colours) == 4 and all(c.startswith("#") and len(c) == 7 for c in colours)


def test_image_observations_run_through_the_rollout(tmp_path):
    bench = _bench_module()
    argv = ["--model", "tiny-qwen2.5-vl-small-vocab", "--episodes", "2", "--tokens-per-turn", "3"]
    report = bench.main(
        [*argv, "--observation-image", "--repeats", "2", "--device", "cpu", "--output-dir", str(tmp_path)]
    )
    assert [r["turns_per_episode"] for r in report["results"]] == [[3, 3], [3, 3]]
    assert report["observation"] == "image and text"


def _last_logits_masked(bench, policy, input_ids) -> torch.Tensor:
    """The last position's logits with ``forbid_vision_tokens``'s hook on, removed afterwards."""
    handle = bench.forbid_vision_tokens(policy)
    try:
        with torch.no_grad():
            return policy.model(input_ids=input_ids).logits[0, -1]
    finally:
        handle.remove()


def test_vision_tokens_are_masked_out_of_the_logits_until_the_hook_is_removed(qwen25_policy):
    bench = _bench_module()
    tokenizer, model = qwen25_policy.tokenizer, qwen25_policy.model
    vision = [tokenizer.convert_tokens_to_ids(token) for token in bench.VISION_TOKENS]
    vision += list(range(len(tokenizer), model.get_output_embeddings().out_features))  # rows with no token
    input_ids = torch.tensor([tokenizer("Find x.")["input_ids"]])
    masked = _last_logits_masked(bench, qwen25_policy, input_ids)
    with torch.no_grad():
        plain = model(input_ids=input_ids).logits[0, -1]
    assert torch.isneginf(masked[vision]).all()
    assert torch.isfinite(plain[vision]).all()
    others = torch.ones_like(plain, dtype=torch.bool)
    others[vision] = False
    assert torch.equal(masked[others], plain[others])


def test_embedding_rows_past_the_tokenizer_are_masked_too(qwen25_policy):
    """Released Qwen2.5-VL-3B pads its embedding past the tokenizer; a random model samples those ids."""

    class ShorterTokenizer:  # the tiny preset has no padding rows: pretend its last 5 ids have no token
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def __len__(self):
            return len(self.tokenizer) - 5

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    bench = _bench_module()
    model = qwen25_policy.model
    policy = SimpleNamespace(model=model, tokenizer=ShorterTokenizer(qwen25_policy.tokenizer))
    input_ids = torch.tensor([qwen25_policy.tokenizer("Find x.")["input_ids"]])
    masked = _last_logits_masked(bench, policy, input_ids)
    assert torch.isneginf(masked[-5:]).all()
    assert torch.isfinite(masked[-6])
