"""Prompts from messages and the env's TOOLS on every backend; the env package's prompt hook."""

from __future__ import annotations

import argparse
import re
import types
from pathlib import Path

import pytest
from PIL import Image

import envs.geo3k_zoom
import rollout
from envs.tool_calls import format_call
from rollout.prompts import build_sample, default_prompt_messages, prompt_context, prompt_messages
from rollout.sample import Sample
from tests.rollout.conftest import ScriptedEngine, make_args

PROBLEM = "Problem: <image>Find x. Zoom in if you need to."


def test_default_messages_put_each_image_at_its_placeholder() -> None:
    a, b = Image.new("RGB", (4, 4)), Image.new("RGB", (8, 8))
    assert default_prompt_messages("A <image> B <image>", [a, b]) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "A "},
                {"type": "image", "image": a},
                {"type": "text", "text": " B "},
                {"type": "image", "image": b},
            ],
        }
    ]
    with pytest.raises(ValueError, match="problem has 1 <image> placeholder"):
        default_prompt_messages("<image>", [])


def test_an_env_module_lays_out_its_own_prompt() -> None:
    module = types.ModuleType("env_with_prompt")
    module.build_prompt_messages = lambda problem, images: [
        {"role": "system", "content": "You are a careful geometer."},
        *default_prompt_messages(problem, images),
    ]
    messages = prompt_messages("<image>Find x.", [Image.new("RGB", (4, 4))], module)
    assert [m["role"] for m in messages] == ["system", "user"]
    module.build_prompt_messages = lambda problem, images: "not messages"
    with pytest.raises(TypeError, match="build_prompt_messages must return a list of chat messages"):
        prompt_messages("x", [], module)


def test_tools_in_prompt_renders_the_env_tools(qwen25_processing) -> None:
    tok = qwen25_processing.tokenizer
    args = argparse.Namespace(rollout_interaction_env_path="envs.geo3k_zoom", tools_in_prompt=True)
    module, tools = prompt_context(args)
    assert module is envs.geo3k_zoom and tools == envs.geo3k_zoom.TOOLS
    sample = build_sample(PROBLEM, [Image.new("RGB", (56, 56))], "5", tok, tools=tools, env_module=module)
    system, user = sample.prompt.split("<|im_start|>user\n")
    assert '"name": "zoom"' in system and '"name": "calc_score"' in system
    assert user.startswith("Problem: <|vision_start|><|image_pad|><|vision_end|>Find x. Zoom in if you need to.")
    args.tools_in_prompt = False
    assert prompt_context(args)[1] is None
    assert '"name": "zoom"' not in build_sample(PROBLEM, [Image.new("RGB", (56, 56))], "5", tok).prompt


async def test_slime_without_apply_chat_template_gets_messages_and_tools(qwen25_processing) -> None:
    """The row's raw text reaches the rollout; it builds the prompt with the env's TOOLS."""
    tok = qwen25_processing.tokenizer
    engine = ScriptedEngine(tok, [format_call("calc_score", {"answer": "5"})])
    args = make_args(
        engine,
        rollout_interaction_env_path="envs.geo3k_zoom",
        tools_in_prompt=True,
        apply_chat_template=False,
    )
    sample = Sample(prompt=PROBLEM, multimodal_inputs={"images": [Image.new("RGB", (56, 56))]}, label="5")
    out = await rollout.generate(args, sample, {})
    assert out.status == Sample.Status.COMPLETED, out.metadata["status_reason"]
    sent = tok.decode(engine.requests[0]["input_ids"])
    assert '"name": "zoom"' in sent and sent.endswith("Find x. Zoom in if you need to.<|im_end|>\n<|im_start|>assistant\n")
    bad = Sample(prompt="<image><image>", multimodal_inputs={"images": [Image.new("RGB", (56, 56))]}, label="5")
    out = await rollout.generate(args, bad, {})
    assert out.status == Sample.Status.FAILED
    assert out.metadata["status_reason"].startswith("prompt: problem has 2 <image> placeholder(s) but 1 image(s)")


def test_the_generic_layers_do_not_import_geo3k() -> None:
    root = Path(__file__).resolve().parents[2]
    for name in ("rollout/prompts.py", "rollout/evaluation.py", "rollout/episode.py", "trainer/report.py"):
        source = (root / name).read_text()
        assert not re.search(r"^\s*(from|import) envs\.geo3k\b", source, flags=re.M), name


def test_eval_takes_the_per_turn_cap_and_tools_in_prompt(tmp_path: Path) -> None:
    import importlib.util

    from rollout.config import RolloutConfig

    script = Path(__file__).resolve().parents[2] / "examples" / "geo3k_vlm_multi_turn" / "eval_geo3k.py"
    spec = importlib.util.spec_from_file_location("eval_geo3k_cli", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base = ["--data", str(tmp_path / "test.parquet"), "--model", "tiny-qwen2.5-vl"]
    cli = module.parse_args([*base, "--max-tokens-per-turn", "64", "--tools-in-prompt"])
    config = RolloutConfig.from_args(module.rollout_args(cli, engine=None, hf_checkpoint="tiny-qwen2.5-vl"))
    assert (config.max_tokens_per_turn, config.tools_in_prompt) == (64, True)
    plain = RolloutConfig.from_args(module.rollout_args(module.parse_args(base), None, "tiny-qwen2.5-vl"))
    assert (plain.max_tokens_per_turn, plain.tools_in_prompt) == (None, False)
    with pytest.raises(SystemExit):
        module.parse_args([*base, "--max-tokens-per-turn", "0"])
