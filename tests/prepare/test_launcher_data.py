"""The launcher's local backend turns a dataset with image URLs into local files once."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from envs.geo3k.dataset import read_geo3k_parquet
from envs.geo3k.sample_data import INSTRUCTION_BLOCK

RUN_SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "geo3k_vlm_multi_turn" / "run_geo3k_vlm_multi_turn.py"


def _launcher():
    spec = importlib.util.spec_from_file_location("run_geo3k_vlm_multi_turn_under_test", RUN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_url_images_are_fetched_once_into_a_prepared_copy(tmp_path, image_server):
    data_dir = tmp_path / "geo3k_imgurl_processed"
    data_dir.mkdir()
    urls = [image_server.url(f"/img/launcher-{k}.png") for k in range(3)]
    table = pa.table({
        "problem": [f"{INSTRUCTION_BLOCK}\n\n<image>Find x. ({k})" for k in range(3)],
        "answer": ["5", "12", "\\frac{15}{2}"],
        "images": [[url] for url in urls],
    })  # fmt: skip
    pq.write_table(table, data_dir / "train.parquet")
    launcher = _launcher()

    prepared = launcher.ensure_dataset(data_dir)
    assert prepared == tmp_path / "geo3k_imgurl_processed-prepared" / "train.parquet"
    rows = read_geo3k_parquet(prepared)
    assert [row.answer for row in rows] == ["5", "12", "\\frac{15}{2}"]
    assert all(Path(ref).is_absolute() and Path(ref).is_file() for row in rows for ref in row.images)
    assert sum(image_server.hits[f"/img/launcher-{k}.png"] for k in range(3)) == 3

    assert launcher.ensure_dataset(data_dir) == prepared  # reused, nothing fetched again
    assert sum(image_server.hits[f"/img/launcher-{k}.png"] for k in range(3)) == 3


def test_local_images_are_used_as_they_are(tmp_path):
    from envs.geo3k.dataset import write_geo3k_parquet
    from envs.geo3k.sample_data import generate_problems

    train = write_geo3k_parquet(generate_problems(2, 0, image_size=224), tmp_path / "data", split_name="train")
    assert _launcher().ensure_dataset(tmp_path / "data") == train
