"""The sample-data command: both splits written, disjoint, validated, summarized; runs as a script."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

from envs.geo3k.dataset import load_row_images, read_geo3k_parquet, validate_rows
from envs.geo3k.sample_data import generate_problems

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "examples" / "geo3k_vlm_multi_turn" / "make_sample_data.py"


def load_script():
    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_writes_disjoint_validated_splits_and_prints_a_summary(tmp_path, capsys):
    script = load_script()
    assert script.main(["--out", str(tmp_path), "--train", "14", "--test", "7", "--seed", "5"]) == 0

    train, test = (
        read_geo3k_parquet(tmp_path / "train.parquet"),
        read_geo3k_parquet(tmp_path / "test.parquet"),
    )
    assert (len(train), len(test)) == (14, 7)
    assert validate_rows(train) == validate_rows(test) == []
    expected_train = generate_problems(14, 5)
    expected_test = generate_problems(
        7, 5 + script.TEST_SEED_OFFSET, exclude=frozenset(p.signature for p in expected_train)
    )
    assert [r.answer for r in train] == [p.answer for p in expected_train]
    assert [r.answer for r in test] == [p.answer for p in expected_test]
    assert not {p.signature for p in expected_train} & {p.signature for p in expected_test}
    train_pixels = {load_row_images(r)[0].tobytes() for r in train}
    assert not train_pixels & {load_row_images(r)[0].tobytes() for r in test}

    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"train: 14 problems -> {tmp_path / 'train.parquet'}"
    assert out[1] == (
        "  by kind: angle_pair 2, circle 2, isosceles_triangle 2, parallel_lines 2, right_triangle 2, "
        "similar_triangles 2, triangle_angle_sum 2"
    )
    assert out[2].startswith("  by answer form: ")
    assert out[3] == f"test: 7 problems -> {tmp_path / 'test.parquet'}"
    assert out[-1].startswith("validated both splits; ")


def test_data_uri_mode_and_kind_selection(tmp_path, capsys):
    script = load_script()
    args = [
        "--out",
        str(tmp_path),
        "--train",
        "4",
        "--test",
        "2",
        "--image-mode",
        "data_uri",
        "--kinds",
        "circle",
    ]
    assert script.main(args) == 0
    images = pq.read_table(tmp_path / "train.parquet").column("images").to_pylist()
    assert all(refs[0].startswith("data:image/png;base64,") for refs in images)
    assert not (tmp_path / "images").exists()
    assert "  by kind: circle 4" in capsys.readouterr().out.splitlines()


def test_runs_as_a_script_from_the_repo_root(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT.relative_to(REPO_ROOT)),
            "--out",
            str(tmp_path),
            "--train",
            "3",
            "--test",
            "2",
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert f"train: 3 problems -> {tmp_path / 'train.parquet'}" in result.stdout
    assert [len(read_geo3k_parquet(tmp_path / f"{split}.parquet")) for split in ("train", "test")] == [3, 2]
