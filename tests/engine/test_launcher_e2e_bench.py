"""bench/launcher_e2e.py: the launcher runs as a subprocess and its per-step metrics become the table
and the JSON; a random-init checkpoint directory loads like a real one (the GPU numbers themselves
are measured elsewhere)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import launcher_e2e
from bench.engine_throughput import SHAPES, random_init_policy
from models import load_policy, load_processing
from tests.engine.conftest import small_3b_shape
from trainer.config import ConfigError, TrainConfig
from trainer.loop import limit_gpu_memory
from trainer.metrics import peak_memory_metrics

SMALL_3B_SHAPE = small_3b_shape(SHAPES)


def _report(output_dir) -> dict:
    [path] = output_dir.glob("launcher_e2e-*.json")
    [run] = json.loads(path.read_text())["runs"]
    return run


def test_one_launcher_step_on_cpu_gives_one_row_with_rollout_and_update_seconds(tmp_path, capsys):
    argv = ["--model", "tiny-qwen2.5-vl", "--device", "cpu", "--steps", "1", "--prompts", "2", "--samples", "2",
            "--work-dir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "results"),
            "--", "--rollout-max-response-len", "32", "--set", "max_tokens_per_turn=8"]  # fmt: skip
    launcher_e2e.main(argv)

    printed = capsys.readouterr().out
    header = "| step | rollout s | update s | peak GiB allocated (rollout / update) |"
    table = printed[printed.index(header) :].split("\n\n")[0].splitlines()
    assert len(table) == 3  # header, alignment, one step
    assert table[2].startswith("| 0 |") and "| - | - |" in table[2]  # no GPU memory on CPU

    run = _report(tmp_path / "results")
    assert run["launcher_returncode"] == 0
    assert "--num-rollout 1 --rollout-batch-size 2 --n-samples-per-prompt 2" in run["launcher_command"]
    assert run["launcher_command"].endswith("--rollout-max-response-len 32 --set max_tokens_per_turn=8")
    assert run["card"] == {"name": None, "total_gib": None, "memory_cap_gib": None}
    assert run["machine"]["torch"] == torch.__version__
    [row] = run["results"]
    assert row["step"] == 0
    assert row["rollout_s"] > 0 and row["update_s"] > 0
    # 4 episodes of one or more turns of at most 8 model tokens, within 32 tokens each.
    assert 4 <= row["trained_tokens"] <= row["response_tokens"] <= 4 * 32
    assert not any(key.endswith("_gib") for key in row)


def test_a_failed_launcher_run_is_reported_with_its_exit_status_and_log(tmp_path):
    argv = ["--model", "tiny-qwen2.5-vl", "--device", "cpu", "--steps", "1", "--prompts", "1", "--samples", "2",
            "--work-dir", str(tmp_path / "work"), "--output-dir", str(tmp_path / "results"),
            "--", "--set", "rollout_max_respons_len=32"]  # fmt: skip
    launcher_e2e.main(argv)

    run = _report(tmp_path / "results")
    assert run["launcher_returncode"] == 2
    assert run["results"] == []
    assert any(
        "unknown trainer setting 'rollout_max_respons_len'. Did you mean 'rollout_max_response_len'?" in line
        for line in run["launcher_log_tail"]
    )


def test_a_random_init_checkpoint_directory_loads_with_the_same_weights(tmp_path):
    target = tmp_path / "random-init-small"
    assert launcher_e2e.write_random_init_checkpoint(SMALL_3B_SHAPE, target, "cpu") == target
    assert not target.with_name(target.name + ".writing").exists()

    loaded = load_policy(target, device="cpu", dtype=torch.bfloat16)
    built = random_init_policy(SMALL_3B_SHAPE, "cpu", torch.bfloat16, vocab_to_tokenizer=True)
    saved, expected = loaded.model.state_dict(), built.model.state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    assert loaded.model.lm_head.weight is loaded.model.model.language_model.embed_tokens.weight
    assert loaded.model.generation_config.eos_token_id == loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")

    preset = load_processing(SMALL_3B_SHAPE.processing_preset)
    assert loaded.family == "qwen2.5-vl"
    assert loaded.tokenizer.chat_template == preset.tokenizer.chat_template
    assert len(loaded.tokenizer) == len(preset.tokenizer)
    # One embedding row per token: a random model samples no id the rollout would refuse.
    assert loaded.model.get_input_embeddings().num_embeddings == len(preset.tokenizer) < SMALL_3B_SHAPE.vocab_size

    # A complete directory is reused as it is.
    written = (target / "config.json").stat().st_mtime_ns
    launcher_e2e.write_random_init_checkpoint(SMALL_3B_SHAPE, target, "cpu")
    assert (target / "config.json").stat().st_mtime_ns == written


def test_the_memory_cap_is_for_cuda_only():
    with pytest.raises(SystemExit):
        launcher_e2e.parse_args(["--device", "cpu", "--gpu-memory-gib", "80"])
    with pytest.raises(ConfigError, match="caps CUDA memory, but the run is on cpu"):
        limit_gpu_memory(80.0, "cpu")
    assert limit_gpu_memory(None, "cpu") is None
    with pytest.raises(ConfigError, match="gpu_memory_limit_gib must be a positive number or null"):
        TrainConfig.from_dict({"gpu_memory_limit_gib": 0})
    assert peak_memory_metrics("cpu", "update") == {}


def test_launcher_arguments_are_the_ones_after_the_double_dash():
    args, extra = launcher_e2e.parse_args(["--device", "cpu", "--", "--set", "lr=1e-5", "--steps", "9"])
    assert (args.steps, args.prompts, args.samples) == (3, 4, 8)
    assert extra == ["--set", "lr=1e-5", "--steps", "9"]
