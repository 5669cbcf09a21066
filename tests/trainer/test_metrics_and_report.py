"""Per-step metrics from finished episodes, and the run's report files."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from rollout.sample import Sample
from trainer.metrics import MetricsLogger, read_metrics, rollout_metrics
from trainer.report import append_episodes, episode_record, select_episodes, write_report


def _episode(reward, turns, valid, invalid, status, response_length, mask_ones, solved=None, removed=False):
    return Sample(
        reward=reward,
        status=status,
        response_length=response_length,
        loss_mask=[1] * mask_ones + [0] * (response_length - mask_ones),
        remove_sample=removed,
        metadata={
            "turns": [{"turn": i + 1} for i in range(turns)],
            "outcome": {"valid_tool_calls": valid, "invalid_tool_calls": invalid, "solved_at_turn": solved},
        },
    )


def test_rollout_metrics_by_hand():
    samples = [
        _episode(1.0, 2, 2, 0, Sample.Status.COMPLETED, 30, 20, solved=2),
        _episode(0.0, 3, 1, 2, Sample.Status.COMPLETED, 50, 40),
        _episode(0.0, 1, 0, 1, Sample.Status.TRUNCATED, 10, 10),
        _episode(0.0, 1, 0, 0, Sample.Status.FAILED, 6, 6, removed=True),
    ]
    m = rollout_metrics(samples)
    assert m["rollout/reward_mean"] == 0.25
    assert m["rollout/reward_std"] == pytest.approx(math.sqrt(3 / 16))  # population std
    assert m["rollout/pass_rate"] == 0.25
    assert m["rollout/turns_mean"] == 7 / 4
    assert m["rollout/tool_call_validity"] == 3 / 6
    assert m["rollout/tool_calls_per_episode"] == 6 / 4
    assert m["rollout/response_length_mean"] == 24.0 and m["rollout/response_length_max"] == 50.0
    assert m["rollout/model_tokens_mean"] == 19.0
    assert m["rollout/solved_at_turn_mean"] == 2.0
    assert m["rollout/removed_fraction"] == 0.25
    assert (
        m["rollout/completed_fraction"],
        m["rollout/truncated_fraction"],
        m["rollout/failed_fraction"],
    ) == (
        0.5,
        0.25,
        0.25,
    )


def test_validity_is_undefined_without_any_call():
    m = rollout_metrics([_episode(0.0, 1, 0, 0, Sample.Status.COMPLETED, 4, 4)] * 2)
    assert math.isnan(m["rollout/tool_call_validity"]) and math.isnan(m["rollout/solved_at_turn_mean"])


def test_metrics_jsonl_writes_null_for_nan_and_last_record_of_a_step_wins(tmp_path):
    logger = MetricsLogger(tmp_path, total_steps=2, progress=False)
    logger.log(0, {"a": 1.0, "b": math.nan})
    logger.log(1, {"a": 2.0, "b": 3.0})
    logger.log(1, {"a": 5.0, "b": 3.0})  # a resumed run repeating step 1
    logger.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0]) == {
        "step": 0,
        "a": 1.0,
        "b": None,
    }
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"step": 0, "a": 1.0, "b": None},
        {"step": 1, "a": 5.0, "b": 3.0},
    ]


def _record(qwen25_small_policy):
    tok = qwen25_small_policy.tokenizer
    pad = qwen25_small_policy.model.config.image_token_id
    prompt = tok.encode("Q?")
    model_turn = tok.encode("I think <x>")
    env_turn = [pad] * 4 + tok.encode(" ok")
    sample = Sample(
        index=3,
        group_index=1,
        prompt="<question> & image",
        label="7",
        tokens=prompt + model_turn + env_turn + model_turn,
        response_length=len(model_turn) * 2 + len(env_turn),
        loss_mask=[1] * len(model_turn) + [0] * len(env_turn) + [1] * len(model_turn),
        reward=1.0,
        status=Sample.Status.COMPLETED,
        multimodal_inputs={"images": [Image.new("RGB", (40, 30), "red")]},
        metadata={
            "turns": [
                {
                    "turn": 1,
                    "model_tokens": len(model_turn),
                    "tool_call": {"name": "calc_score"},
                    "score": 0.0,
                },
                {"turn": 2, "model_tokens": len(model_turn), "tool_call": None, "score": None},
            ],
            "observation_images": [Image.new("RGB", (20, 20), "blue")],
        },
    )
    return episode_record(sample, tok, step=4, advantage=0.5, image_pad_id=pad)


def test_episode_record_splits_model_and_env_tokens(qwen25_small_policy):
    record = _record(qwen25_small_policy)
    assert [run["trained"] for run in record["runs"]] == [True, False, True]
    assert "".join(record["runs"][0]["pieces"]) == "I think <x>"
    assert record["runs"][1]["pieces"][0] == "<|image_pad|>×4"
    assert len(record["prompt_images"]) == 1 and record["prompt_images"][0].startswith(
        "data:image/png;base64,"
    )
    assert len(record["observation_images"]) == 1


def test_report_is_self_contained_html(tmp_path, qwen25_small_policy):
    record = _record(qwen25_small_policy)
    logger = MetricsLogger(tmp_path, total_steps=2, progress=False)
    for step in range(2):
        logger.log(step, {"rollout/reward_mean": 0.5 * step, "rollout/response_length_mean": 10.0 + step})
    logger.close()
    append_episodes(tmp_path, [record, {**record, "step": 9, "index": 8, "reward": 0.0}])
    report = write_report(tmp_path, title="t", limit=4)
    text = report.read_text()
    assert (tmp_path / "training_curves.png").stat().st_size > 0
    assert "src='data:image/png;base64," in text and "src='http" not in text
    assert "&lt;question&gt; &amp; image" in text  # prompt text is escaped
    assert "think" in text and "&lt;|image_pad|&gt;×4" in text
    assert text.count("class='episode'") == 2 and "class='run model'" in text and "class='run env'" in text


def test_select_episodes_takes_first_and_last_step_best_first():
    episodes = [
        {"step": s, "reward": r, "index": i}
        for i, (s, r) in enumerate([(0, 0.0), (0, 1.0), (5, 0.0), (9, 0.0), (9, 1.0)])
    ]
    assert [e["index"] for e in select_episodes(episodes, 2)] == [1, 4]
    assert [e["index"] for e in select_episodes(episodes, 4)] == [1, 0, 4, 3]
