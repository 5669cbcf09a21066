"""The dataset seam: the generic layers read prompt data in the format of the configured env (its
``DATASET``, else the generic parquet format) and never import a particular env."""

from __future__ import annotations

import ast
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

import envs.geo3k
import envs.geo3k_zoom
from envs.dataset import DEFAULT_DATASET, DatasetError, ParquetDataset, dataset_of
from envs.images import encode_png
from envs.loader import load_env_module
from trainer.config import TrainConfig
from trainer.data import PromptSource, prompt_dataset
from trainer.loop import _open_prompts
from trainer.sft import TranscriptError, answer_tool, build_transcripts, sft_data_rows
from trainer.slime_launch import check_dataset

from .conftest import LEARNABLE_ENV

REPO = Path(__file__).resolve().parents[2]
ENV_PACKAGES = ("envs.geo3k", "envs.geo3k_zoom")

# An env whose prompt data has its own column names and its own rule for labels.
COLOUR_QUIZ_ENV = """
from dataclasses import dataclass

from envs.dataset import ParquetDataset
from envs.tool_env import ToolEnv, ToolResult

COLOURS = ("red", "green", "blue")


@dataclass(frozen=True)
class ColourDataset(ParquetDataset):
    def label_problem(self, answer):
        return None if answer in COLOURS else f"answer {answer!r} is not one of {', '.join(COLOURS)}"


DATASET = ColourDataset(problem_column="question", answer_column="colour", how_to_write="the quiz writer")
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "name_colour",
            "parameters": {
                "type": "object",
                "properties": {"answer": {"type": "string", "enum": list(COLOURS)}},
                "required": ["answer"],
            },
        },
    }
]


class ColourQuiz(ToolEnv):
    TOOLS = TOOLS

    def __init__(self, label):
        super().__init__(max_turns=1)
        self.label = label

    def tool_name_colour(self, answer):
        return ToolResult("right" if answer == self.label else "wrong", score=float(answer == self.label), done=True)


def build_env(sample=None, args=None, **kwargs):
    return ColourQuiz(str(sample.label))
"""


# ---------------------------------------------------------------------------------------------------------
# The generic layers import no env


def _imported_modules(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _imports_an_env_package(name: str) -> bool:
    return any(name == package or name.startswith(package + ".") for package in ENV_PACKAGES)


def test_the_scan_sees_every_form_of_import():
    tree = ast.parse(
        "import envs.geo3k\nfrom envs.geo3k_zoom.env import TOOLS\nfrom envs import geo3k\n"
        "def f():\n    from envs.geo3k.dataset import DatasetError\nimport envs.geo3kish\n"
    )
    assert [n for n in _imported_modules(tree) if _imports_an_env_package(n)] == [
        "envs.geo3k",
        "envs.geo3k_zoom.env",
        "envs.geo3k_zoom.env.TOOLS",
        "envs.geo3k",
        "envs.geo3k.dataset",
        "envs.geo3k.dataset.DatasetError",
    ]


@pytest.mark.parametrize("layer", ["trainer", "rollout"])
def test_generic_layers_import_no_particular_env(layer):
    files = sorted((REPO / layer).rglob("*.py"))
    assert files, f"no Python files under {layer}/"
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in files
        for name in _imported_modules(ast.parse(path.read_text(), filename=str(path)))
        if _imports_an_env_package(name)
    ]
    assert offenders == []


# ---------------------------------------------------------------------------------------------------------
# Which format each env gets


def _png(directory: Path, name: str, colour: str) -> str:
    (directory / name).write_bytes(encode_png(Image.new("RGB", (28, 28), colour)))
    return name


def _colour_task(tmp_path: Path, answers: list[str]) -> TrainConfig:
    """A plugin YAML naming the colour quiz env, and its prompt data in the quiz's columns."""
    env_file = tmp_path / "colour_quiz.py"
    env_file.write_text(COLOUR_QUIZ_ENV)
    plugin = tmp_path / "plugin.yaml"
    plugin.write_text(yaml.safe_dump({"max_turns": 1, "rollout_interaction_env_path": str(env_file)}))
    images = [[_png(tmp_path, f"{k}.png", colour)] for k, colour in enumerate(["red", "blue", "green"])]
    questions = [f"Which colour is this? <image> ({k})" for k in range(3)]
    table = pa.table({"question": questions, "colour": answers, "images": images})
    pq.write_table(table, tmp_path / "train.parquet")
    return TrainConfig(
        prompt_data=str(tmp_path / "train.parquet"),
        custom_config_path=str(plugin),
        output_dir=str(tmp_path / "run"),
    )


def test_an_env_with_its_own_dataset_has_its_columns_read_by_the_trainer(tmp_path):
    cfg = _colour_task(tmp_path, ["red", "blue", "green"])
    dataset = prompt_dataset(cfg)
    assert dataset is load_env_module(str(tmp_path / "colour_quiz.py")).DATASET
    prompts = _open_prompts(cfg, tmp_path / "run", log=print)
    assert [(row.problem, row.answer) for row in prompts.rows] == [
        ("Which colour is this? <image> (0)", "red"),
        ("Which colour is this? <image> (1)", "blue"),
        ("Which colour is this? <image> (2)", "green"),
    ]
    batch = sorted(prompts.batch(0, 3), key=lambda prompt: prompt.row)
    assert [prompt.label for prompt in batch] == ["red", "blue", "green"]
    assert [prompt.images[0].getpixel((0, 0)) for prompt in batch] == [(255, 0, 0), (0, 0, 255), (0, 128, 0)]
    # The generic format looks for the default columns and says which ones the file has.
    with pytest.raises(
        DatasetError, match=r"lacks column\(s\) problem, answer \(it has question, colour, images\)"
    ):
        PromptSource(cfg.prompt_data, seed=0)


def test_an_env_with_its_own_dataset_has_its_labels_checked_its_way(tmp_path):
    cfg = _colour_task(tmp_path, ["red", "purple", "green"])
    (tmp_path / "run").mkdir()
    with pytest.raises(DatasetError) as raised:
        _open_prompts(cfg, tmp_path / "run", log=print)
    assert [str(p) for p in raised.value.problems] == [
        "row 1 [colour]: answer 'purple' is not one of red, green, blue"
    ]
    assert (tmp_path / "run" / "bad_rows.txt").read_text().splitlines() == [
        "row 1 [colour]: answer 'purple' is not one of red, green, blue"
    ]


def test_an_env_without_a_dataset_gets_the_generic_format(learnable_task, tmp_path):
    cfg = TrainConfig(
        prompt_data=learnable_task["prompt_data"],
        custom_config_path=learnable_task["custom_config_path"],
        output_dir=str(tmp_path / "run"),
    )
    assert not hasattr(load_env_module(str(LEARNABLE_ENV)), "DATASET")
    assert prompt_dataset(cfg) is DEFAULT_DATASET
    prompts = _open_prompts(cfg, tmp_path / "run", log=print)
    assert [row.answer for row in prompts.rows] == ["1", "1", "1", "1"]
    # Any non-empty label will do; geo3k's format would refuse this one (it is not a number).
    assert DEFAULT_DATASET.label_problem("x + 1") is None
    assert envs.geo3k.DATASET.label_problem("x + 1") == (
        "answer 'x + 1' parses to an expression in the unknown(s) x; a label must be a number"
    )
    assert DEFAULT_DATASET.label_problem(" ") == (
        "answer is empty; every row needs the exact answer as its label"
    )


def test_the_geo3k_envs_get_the_geo3k_format(tmp_path):
    cfg = TrainConfig(custom_config_path=str(REPO / "configs" / "geo3k_vlm_multi_turn.yaml"))
    assert prompt_dataset(cfg) is envs.geo3k.DATASET
    zoom = TrainConfig(custom_config_path=str(REPO / "configs" / "geo3k_zoom.yaml"))
    assert prompt_dataset(zoom) is dataset_of(envs.geo3k_zoom) is envs.geo3k.DATASET  # numeric labels too


def test_a_dataset_that_is_not_a_parquet_dataset_is_refused(tmp_path):
    env_file = tmp_path / "odd_env.py"
    env_file.write_text(
        "DATASET = {'problem': 'question'}\ndef build_env(sample=None, args=None, **kwargs):\n    pass\n"
    )
    with pytest.raises(TypeError, match=r"DATASET must be an envs\.dataset\.ParquetDataset .*got dict"):
        dataset_of(load_env_module(str(env_file)))


def test_a_parquet_dataset_writes_what_it_reads(tmp_path):
    dataset = ParquetDataset(problem_column="q", answer_column="a", images_column="pictures")

    class Record:
        problem, answer, images = "Name it: <image>", "red", (Image.new("RGB", (8, 8), "red"),)

    path = dataset.write([Record()], tmp_path, split_name="train")
    assert pq.read_schema(path).names == ["q", "a", "pictures"]
    [row] = dataset.read(path)
    assert (row.problem, row.answer) == ("Name it: <image>", "red")
    assert dataset.load_images(row)[0].getpixel((0, 0)) == (255, 0, 0)
    assert dataset.validate_parquet(path) == []


# ---------------------------------------------------------------------------------------------------------
# SFT and the slime preflight go through the same seam


def test_sft_calls_the_answer_tool_of_the_configured_env_on_its_rows(tmp_path):
    cfg = _colour_task(tmp_path, ["red", "blue", "green"])
    module = load_env_module(str(tmp_path / "colour_quiz.py"))
    assert answer_tool(module) == "name_colour"
    assert answer_tool(envs.geo3k) == "calc_score"
    assert answer_tool(envs.geo3k_zoom) == "calc_score"  # zoom has no answer argument
    rows = sft_data_rows(cfg)
    transcripts = build_transcripts(
        rows, per_row=1, wrong_first=1.0, max_turns=2, seed=0, tool="name_colour", dataset=module.DATASET
    )
    assert [t.label for t in transcripts] == ["red", "blue", "green"]
    for transcript in transcripts:
        assert len(transcript.turns) == 2
        call = '{"name": "name_colour", "arguments": {"answer": "' + transcript.label + '"}}'
        assert transcript.turns[-1] == f"<tool_call>{call}</tool_call>"
        assert len(transcript.images) == 1


def test_sft_refuses_an_env_whose_tools_have_no_single_answer_tool(tmp_path):
    env_file = tmp_path / "no_answer_env.py"
    env_file.write_text(
        "TOOLS = [{'type': 'function', 'function': {'name': 'look', 'parameters': {'type': 'object', "
        "'properties': {'x': {'type': 'number'}}}}}]\ndef build_env(sample=None, args=None, **kwargs):\n    pass\n"
    )
    with pytest.raises(TranscriptError, match=r"has 0 such tool\(s\) \(its TOOLS: look\)"):
        answer_tool(load_env_module(str(env_file)))
    # An env without TOOLS parses calls its own way: it gets the default env's answer tool.
    assert answer_tool(load_env_module(str(LEARNABLE_ENV))) == "calc_score"


def test_slime_preflight_checks_the_data_in_the_format_of_the_configured_env(learnable_task, tmp_path):
    cfg = _colour_task(tmp_path, ["red", "blue", "green"])
    [finding] = check_dataset(Path(cfg.prompt_data), Path(cfg.custom_config_path))
    assert finding.level == "error"
    assert "reads the columns question, colour, images, but slime is given problem, answer, images" in (
        finding.message
    )
    # The learnable env declares no DATASET: its data is checked in the generic format.
    plugin = Path(learnable_task["custom_config_path"])
    [finding] = check_dataset(Path(learnable_task["prompt_data"]), plugin)
    assert (
        finding.level == "error" and "image 0 path 'images/train_000000_0.png' is relative" in finding.message
    )
    [finding] = check_dataset(Path(cfg.prompt_data), tmp_path / "missing.yaml")
    assert finding.level == "error" and "missing.yaml does not exist" in finding.message
