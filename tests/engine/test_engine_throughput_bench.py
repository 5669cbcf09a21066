"""bench/engine_throughput.py: the random-init 3B shape builds with the right size, the roofline
counts the bytes a decode step reads, and the benchmark runs end to end on small models (the GPU
numbers themselves are measured elsewhere)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

from tests.engine.conftest import small_3b_shape

BENCH = Path(__file__).resolve().parents[2] / "bench" / "engine_throughput.py"


def _bench_module():
    # bench/ is a folder of scripts, not a package; load the script as a module (once).
    if "engine_throughput" not in sys.modules:
        spec = importlib.util.spec_from_file_location("engine_throughput", BENCH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules["engine_throughput"]


def test_qwen25_vl_3b_shape_has_the_released_parameter_count():
    bench = _bench_module()
    policy = bench.random_init_policy(bench.SHAPES["qwen2.5-vl-3b"], "meta", torch.bfloat16)
    model = policy.model
    assert sum(p.numel() for p in model.parameters()) == 3_754_622_976
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    assert model.config.image_token_id == 151_655
    assert model.generation_config.eos_token_id == 151_645


def _small_shape(bench):
    return small_3b_shape(bench.SHAPES)


def _bytes(parameters) -> int:
    return sum(p.numel() * p.element_size() for p in parameters)


def _text_layers_and_norm_bytes(model) -> int:
    return _bytes(
        p
        for name, p in model.named_parameters()
        if name.startswith(("model.language_model.layers.", "model.language_model.norm."))
    )


def test_decode_weight_bytes_are_the_text_decoder_and_the_output_projection(qwen25_policy):
    bench = _bench_module()
    model = qwen25_policy.model  # untied: the embedding is not read whole, lm_head is
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    expected = _text_layers_and_norm_bytes(model) + _bytes([model.lm_head.weight])
    assert bench.decode_weight_bytes(model) == expected
    assert expected < _bytes(model.parameters()) - _bytes(model.model.visual.parameters())


def test_a_tied_output_projection_is_counted_once():
    bench = _bench_module()
    model = bench.random_init_policy(_small_shape(bench), "cpu", torch.bfloat16).model
    embedding = model.model.language_model.embed_tokens.weight
    assert model.lm_head.weight is embedding
    assert bench.decode_weight_bytes(model) == _text_layers_and_norm_bytes(model) + _bytes([embedding])


def test_qwen25_vl_3b_decode_step_bytes_at_batch_64():
    bench = _bench_module()
    model = bench.random_init_policy(bench.SHAPES["qwen2.5-vl-3b"], "meta", torch.bfloat16).model
    vision = sum(p.numel() for p in model.model.visual.parameters())
    # All parameters but the vision tower, the tied 151,936 x 2048 matrix once; 2 bytes each.
    weights = (3_754_622_976 - vision) * 2
    step = bench.decode_step_bytes(model, batch=64, mean_context=413)
    assert step.weights == weights + 64 * 2048 * 2  # plus the batch's embedding rows
    assert round(weights / 1e9, 2) == 6.17
    assert step.kv == 36 * 2 * 2 * 128 * 2 * 64 * 413  # layers x K,V x KV heads x head dim x bf16 x tokens
    assert step.state == 0
    assert step.kv_formula == "36 layers x 2 x 2 KV heads x 128 x 2 B x 64 rows x 413 tokens"


def test_hybrid_decode_step_bytes_count_full_attention_kv_and_linear_state(qwen35_policy):
    bench = _bench_module()
    model = qwen35_policy.model
    text = model.config.text_config
    assert text.layer_types.count("full_attention") == 1 and text.layer_types.count("linear_attention") == 4
    step = bench.decode_step_bytes(model, batch=2, mean_context=100)
    assert step.kv == 1 * 2 * text.num_key_value_heads * text.head_dim * 4 * 2 * 100
    conv_channels = 2 * text.linear_num_key_heads * text.linear_key_head_dim + (
        text.linear_num_value_heads * text.linear_value_head_dim
    )
    recurrent = text.linear_num_value_heads * text.linear_key_head_dim * text.linear_value_head_dim
    assert step.state == 4 * 2 * (recurrent * 4 + conv_channels * text.linear_conv_kernel_dim * 4)


async def test_benchmark_runs_on_a_small_random_init_shape():
    bench = _bench_module()
    policy = bench.random_init_policy(_small_shape(bench), "cpu", torch.float32)
    rows = await bench.run_benchmark(policy, [1, 2], new_tokens=3, repeats=1)
    assert [(r.batch_size, r.generated_tokens, r.prompt_tokens_per_request) for r in rows] == [
        (1, 3, 285),
        (2, 6, 285),
    ]
    for row in rows:
        step = bench.decode_step_bytes(policy.model, row.batch_size, 285 + 3 / 2)
        assert (row.weight_bytes, row.kv_bytes, row.bytes_per_step) == (step.weights, step.kv, step.total)
        assert row.bandwidth_gbs is None and row.roofline_tokens_per_s is None  # no bandwidth on CPU
        assert row.decode is None and row.profile is None
        assert row.engine_stats["max_batch_rows"] == row.batch_size


async def test_a_given_bandwidth_sets_the_roofline_and_decode_reaches_the_engine(monkeypatch):
    bench = _bench_module()
    policy = bench.random_init_policy(_small_shape(bench), "cpu", torch.float32)
    engine_kwargs = []
    real_engine = bench.LocalEngine

    def engine(policy, **kwargs):  # records what the benchmark asks for, runs the engine as it is
        engine_kwargs.append(dict(kwargs))
        kwargs.pop("decode")
        return real_engine(policy, **kwargs)

    monkeypatch.setattr(bench, "LocalEngine", engine)
    [row] = await bench.run_benchmark(
        policy, [2], new_tokens=3, repeats=1, decode="eager", bandwidth_gbs=100.0
    )
    assert engine_kwargs == [{"max_batch_size": 2, "batch_wait_ms": 1000.0, "decode": "eager"}]
    assert row.decode == "eager"
    assert row.roofline_tokens_per_s == round(2 * 100e9 / row.bytes_per_step, 1)
    line = bench.roofline_line(row)
    assert line.startswith(f"batch 2: bytes/step = {row.weight_bytes / 1e9:.2f} GB weights + ")
    assert f"roofline at 0.10 TB/s = {row.roofline_tokens_per_s:,.0f} tok/s" in line


def test_decode_is_passed_to_the_engine_only_when_given():
    bench = _bench_module()
    assert bench.engine_options(None) == {}
    assert bench.engine_options("static") == {"decode": "static"}


def test_main_prints_a_table_and_appends_its_run_to_the_days_json(tmp_path, capsys, monkeypatch):
    bench = _bench_module()
    monkeypatch.setattr(bench.socket, "gethostname", lambda: "testhost")
    monkeypatch.setattr(bench, "date", type("FixedDate", (), {"today": staticmethod(lambda: _Day())}))
    out = tmp_path / "engine_throughput-testhost-2026-01-02.json"
    out.write_text(json.dumps({"runs": [{"model": "an earlier run"}]}))
    argv = ["--model", "tiny-qwen2.5-vl-small-vocab", "--batch-sizes", "1,2", "--new-tokens", "2"]
    bench.main([*argv, "--device", "cpu", "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "| batch | prompt tokens / request | new tokens / request | wall s | generated tok/s |" in printed
    runs = json.loads(out.read_text())["runs"]
    assert [run["model"] for run in runs] == ["an earlier run", "tiny-qwen2.5-vl-small-vocab"]
    assert runs[1]["date"] == "2026-01-02"
    assert [r["generated_tokens"] for r in runs[1]["results"]] == [2, 4]
    assert runs[1]["results"][0]["prompt_tokens_per_request"] == 310
    assert runs[1]["results"][0]["roofline_tokens_per_s"] is None
    assert "no roofline (no bandwidth" in printed


def test_profile_on_cpu_reports_the_wall_time_per_decode_step(tmp_path, capsys):
    bench = _bench_module()
    # The full vocabulary makes every decode step heavy enough to stand out of a busy machine's noise.
    argv = ["--model", "tiny-qwen2.5-vl", "--batch-sizes", "1", "--new-tokens", "24", "--profile"]
    report = bench.main([*argv, "--device", "cpu", "--output-dir", str(tmp_path)])
    profile = report["results"][0]["profile"]
    assert profile["decode_steps"] == 23
    assert profile["wall_ms_per_step"] > 0
    assert [profile[key] for key in ("kernel_ms_per_step", "kernels_per_step", "gpu_busy_share")] == [
        None
    ] * 3
    assert "| batch | wall ms / decode step | GPU kernel ms / step |" in capsys.readouterr().out


class _Day:
    def isoformat(self) -> str:
        return "2026-01-02"
