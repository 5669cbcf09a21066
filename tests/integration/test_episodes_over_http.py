"""Whole episodes through the SGLang client and the real SGLang-compatible server on localhost.

The tiny models are random, so geo3k episodes end at the first turn (no tool call); the image
env answers every turn with an image, so those episodes run all three turns with a prompt image
and two observation images. The train/infer consistency check then recomputes every model
token's log-prob from the sample alone.
"""

from __future__ import annotations

import argparse

import pytest

import rollout
from rollout.consistency import check_logprob_consistency
from rollout.engines.local import LocalEngine
from rollout.sample import Sample
from rollout.server import start_server
from tests.rollout.conftest import TEST_ENVS, make_sample

Status = Sample.Status


def args_for(server, policy, **overrides):
    values = dict(
        hf_checkpoint=str(policy.path),
        sglang_router_ip=server.host,
        sglang_router_port=server.port,
        rollout_max_context_len=None,
        rollout_max_response_len=256,
        max_turns=3,
        rollout_interaction_env_path="envs.geo3k",
        env_kwargs={},
    )
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.mark.parametrize("fixture", ["qwen25_policy", "qwen3_policy", "qwen35_policy", "qwen35_moe_policy"])
async def test_multi_turn_image_episodes_over_http_are_consistent(request, fixture):
    policy = request.getfixturevalue(fixture)
    engine = LocalEngine(policy, max_batch_size=8, batch_wait_ms=5.0, seed=7)
    async with await start_server(engine) as server:
        params = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 256,
                  "skip_special_tokens": False, "no_stop_trim": True}  # fmt: skip
        # A random model rarely ends its turn by itself: the per-turn cap ends each turn.
        image_args = args_for(server, policy, rollout_interaction_env_path=TEST_ENVS, env_kwargs={"kind": "image"},
                              max_tokens_per_turn=12)  # fmt: skip
        geo_args = args_for(server, policy, max_tokens_per_turn=12)
        samples = [make_sample(policy.tokenizer, size=112) for _ in range(3)]
        geo = make_sample(policy.tokenizer, size=140)
        outs = [await rollout.generate(image_args, s, dict(params)) for s in samples]
        geo_out = await rollout.generate(geo_args, geo, dict(params))
    await engine.aclose()

    for out in outs:
        assert out.status in (Status.COMPLETED, Status.TRUNCATED), out.metadata["status_reason"]
        assert out.metadata["num_turns"] == 3 or out.status == Status.TRUNCATED
        assert len(out.loss_mask) == out.response_length == len(out.rollout_log_probs)
        grids = out.multimodal_train_inputs["image_grid_thw"].tolist()
        # 112x112: Qwen2.5-VL keeps it (8x8 merged patches); Qwen3-VL and Qwen3.5 upsize to their
        # 65,536-pixel minimum.
        assert grids[0] == ([1, 8, 8] if fixture == "qwen25_policy" else [1, 16, 16])
        assert len(grids) == 1 + sum(t["observation_images"] for t in out.metadata["turns"])
        report = check_logprob_consistency(policy.model, out)
        assert report.num_tokens == sum(out.loss_mask) > 0
        assert report.max_abs_diff <= 1e-4, report
    assert len(outs[0].multimodal_train_inputs["image_grid_thw"]) == 3  # prompt image + two observations

    assert geo_out.status == Status.COMPLETED
    assert geo_out.metadata["outcome"]["done_reason"] == "no_tool_call"
    assert check_logprob_consistency(policy.model, geo_out).max_abs_diff <= 1e-4
