"""bench/engine_throughput.py: the random-init 3B shape builds with the right size, and the
benchmark runs end to end on small models (the GPU numbers themselves are measured elsewhere)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import torch

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


async def test_benchmark_runs_on_a_small_random_init_shape():
    bench = _bench_module()
    small = dataclasses.replace(
        bench.SHAPES["qwen2.5-vl-3b"],
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        mrope_section=(2, 3, 3),
        vision_depth=2,
        vision_hidden_size=32,
        vision_intermediate_size=64,
        vision_num_heads=2,
        vision_fullatt_block_indexes=(1,),
    )
    policy = bench.random_init_policy(small, "cpu", torch.float32)
    rows = await bench.run_benchmark(policy, [1, 2], new_tokens=3, repeats=1)
    assert [(r.batch_size, r.generated_tokens, r.prompt_tokens_per_request) for r in rows] == [
        (1, 3, 285),
        (2, 6, 285),
    ]


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


class _Day:
    def isoformat(self) -> str:
        return "2026-01-02"
