"""What the logs keep of an env's image observations: counts per turn in episodes.jsonl and the eval
JSON, each image at its turn in the HTML report, and the env and plugin settings in its header."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from rollout.evaluation import sample_result
from rollout.sample import Sample
from trainer.report import append_episodes, episode_record, write_report

ROOT = Path(__file__).resolve().parents[2]


def _zoom_episode(processing) -> Sample:
    tok = processing.tokenizer
    pad = processing.image_pad_id
    prompt = tok.encode("<|im_start|>user\nFind x.<|im_end|>\n<|im_start|>assistant\n")
    zoom, answer = tok.encode("zoom please"), tok.encode("x = 5")
    observation = tok.encode("<|im_end|>\n<|im_start|>user\n<tool_response>\n") + [pad] * 4 + tok.encode("crop")
    return Sample(
        index=0,
        group_index=0,
        prompt="Find x.",
        label="5",
        tokens=prompt + zoom + observation + answer,
        response_length=len(zoom) + len(observation) + len(answer),
        loss_mask=[1] * len(zoom) + [0] * len(observation) + [1] * len(answer),
        reward=1.0,
        status=Sample.Status.COMPLETED,
        metadata={
            "turns": [
                {"turn": 1, "model_tokens": len(zoom), "env_tokens": len(observation), "observation_images": 1,
                 "tool_call": {"name": "zoom", "arguments": {"left": 0}}, "tool_executed": True},
                {"turn": 2, "model_tokens": len(answer), "observation_images": 0, "tool_executed": True, "score": 1.0},
            ],  # fmt: skip
            "observation_images": [Image.new("RGB", (24, 24), "green")],
            "outcome": {"score": 1.0, "valid_tool_calls": 2},
        },
    )


def test_episode_records_and_the_report_keep_images_at_their_turn(qwen25_processing, tmp_path: Path) -> None:
    sample = _zoom_episode(qwen25_processing)
    record = episode_record(sample, qwen25_processing.tokenizer, step=1, advantage=0.5, image_pad_id=qwen25_processing.image_pad_id)
    assert [t["observation_images"] for t in record["turns"]] == [1, 0]
    assert len(record["turns"][0]["images"]) == 1 and record["turns"][1]["images"] == []
    assert record["observation_images"] == []  # every image is accounted for by its turn
    append_episodes(tmp_path, [record])
    config = {"custom_config_path": str(ROOT / "configs" / "geo3k_vlm_multi_turn.yaml"), "max_turns": 2, "hf_checkpoint": "x"}
    text = write_report(tmp_path, title="t", config=config).read_text()
    assert "env envs.geo3k" in text and "max_turns=2" in text and "tools_in_prompt=" in text
    # The crop sits between turn 1's env tokens and turn 2's model tokens.
    image_at = text.index("image inserted after turn 1")
    assert text.index("inserted by the env (loss mask 0)") < image_at < text.index("model, turn 2 (loss mask 1)")


def test_eval_results_count_images_per_turn(qwen25_processing) -> None:
    result = sample_result(_zoom_episode(qwen25_processing), 0, 1.0)
    assert result.observation_images == [1, 0]
