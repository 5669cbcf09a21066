"""Preparing whole splits: both source schemas, bad-row policies, the command line, injected downloads."""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from envs.geo3k.dataset import RowProblem, load_row_images, read_geo3k_parquet, validate_rows
from envs.geo3k.prepare import (
    FetchLimits,
    PrepareError,
    PrepareOptions,
    bytes_key,
    find_parquet_splits,
    format_summary,
    prepare_dataset,
    split_name,
    url_key,
)
from envs.geo3k.sample_data import INSTRUCTION_BLOCK

from .conftest import diagram_png, write_original_parquet, write_processed_parquet

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "examples" / "geo3k_vlm_multi_turn" / "prepare_data.py"
LIMITS = FetchLimits(timeout_s=5.0, retries=1, backoff_s=0.01)
PLACEHOLDER_MISMATCH = (
    "problem has 0 <image> placeholder(s) but the row has 1 image(s); each placeholder is replaced in "
    "order by the next image, so the counts must match"
)


def load_script():
    spec = importlib.util.spec_from_file_location("prepare_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def processed_source(server, directory: Path, tag: str) -> Path:
    """Seven rows: three good, one with a 404 image, an empty answer, a missing placeholder, a non-image."""
    Image.open(io.BytesIO(diagram_png("local"))).save(directory / "local.png")
    rows = [
        ("<image>Find x.", "5", [server.url(f"/img/{tag}-a")]),
        ("<image>Find y.", "2\\sqrt{3}", [server.url(f"/img/{tag}-a")]),
        ("<image>Find z.", "7", [server.url("/missing")]),
        ("<image>Find w.", "", [server.url(f"/img/{tag}-b")]),
        ("Find v.", "3", [server.url(f"/img/{tag}-c")]),
        ("<image>Find u.", "4", ["local.png"]),
        ("<image>Find t.", "1", [server.url("/html")]),
    ]
    return write_processed_parquet(directory / "train.parquet", rows)


def expected_problems(server) -> list[RowProblem]:
    html = server.url("/html")
    return [
        RowProblem(2, "images", f"image 0: fetching {server.url('/missing')} failed: HTTP 404 Not Found"),
        RowProblem(3, "answer", "answer is empty; every row needs the exact answer as its label"),
        RowProblem(4, "problem", PLACEHOLDER_MISMATCH),
        RowProblem(
            6,
            "images",
            f"image 0: fetching {html} failed: not an image: PIL does not recognize its format "
            "(the body starts b'<html>not an image</html>')",
        ),
    ]


def test_processed_split_is_fetched_rewritten_and_validated(image_server, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    processed_source(image_server, source, "p1")
    out = tmp_path / "out"
    [report] = prepare_dataset(source, PrepareOptions(out_dir=out, limits=LIMITS))

    assert report.problems == expected_problems(image_server)
    assert report.bad_rows == [2, 3, 4, 6]
    assert (report.rows, report.images, report.urls) == (7, 7, 5)
    assert (report.fetched, report.present, report.embedded, len(report.failures)) == (3, 0, 0, 2)
    assert (report.written, report.dropped, report.output) == (7, [], out / "train.parquet")

    table = pq.read_table(out / "train.parquet")
    assert table.column_names == ["problem", "answer", "images"]
    images = table.column("images").to_pylist()
    store = (out / "images").resolve()
    stored_a = str(store / f"{url_key(image_server.url('/img/p1-a'))}.png")
    assert images[0] == images[1] == [stored_a]
    assert images[5] == [str((source / "local.png").resolve())]
    assert images[2] == [image_server.url("/missing")]  # a bad row is written as it was
    assert table.column("problem").to_pylist()[0] == "<image>Find x."  # processed rows are kept as they are
    good = [row for row in read_geo3k_parquet(out / "train.parquet") if row.index in (0, 1, 5)]
    assert validate_rows(good) == []
    assert load_row_images(good[0])[0].tobytes() == Image.open(io.BytesIO(diagram_png("p1-a"))).tobytes()

    again = prepare_dataset(source, PrepareOptions(out_dir=out, limits=LIMITS))[0]
    assert (again.fetched, again.present, len(again.failures)) == (0, 3, 2)
    assert image_server.hits["/img/p1-a"] == 1


def test_drop_bad_rows_writes_only_valid_rows(image_server, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    processed_source(image_server, source, "p2")
    out = tmp_path / "out"
    [report] = prepare_dataset(source, PrepareOptions(out_dir=out, limits=LIMITS, bad_rows="drop"))

    assert (report.written, report.dropped) == (3, [2, 3, 4, 6])
    rows = read_geo3k_parquet(out / "train.parquet")
    assert [row.answer for row in rows] == ["5", "2\\sqrt{3}", "4"]
    assert validate_rows(rows) == []
    assert all(Path(ref).is_absolute() for row in rows for ref in row.images)


def test_strict_writes_nothing(image_server, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    processed_source(image_server, source, "p3")
    out = tmp_path / "out"
    [report] = prepare_dataset(source, PrepareOptions(out_dir=out, limits=LIMITS, bad_rows="strict"))
    assert report.output is None and report.written == 0
    assert report.bad_rows == [2, 3, 4, 6]
    assert not (out / "train.parquet").exists()


def test_relative_paths_are_relative_to_the_output(image_server, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    write_processed_parquet(
        source / "test.parquet", [("<image>Find x.", "5", [image_server.url("/img/rel")])]
    )
    out = tmp_path / "out"
    prepare_dataset(source, PrepareOptions(out_dir=out, limits=LIMITS, absolute_paths=False))
    [[ref]] = pq.read_table(out / "test.parquet").column("images").to_pylist()
    assert ref == f"images/{url_key(image_server.url('/img/rel'))}.png"
    assert validate_rows(read_geo3k_parquet(out / "test.parquet")) == []


def png(name: str) -> bytes:
    return diagram_png(name)


def original_row(problem: str, answer: str, image: bytes, row_id: str) -> dict:
    return {
        "images": [{"bytes": image, "path": f"{row_id}.png"}],
        "problem": problem,
        "answer": answer,
        "id": row_id,
        "choices": ["3", "4", "5", "6"],
        "ground_truth": "C",
    }


def write_original_source(directory: Path) -> None:
    write_original_parquet(
        directory / "data" / "train-00000-of-00001.parquet",
        [
            original_row("<image>Find x.", "5", png("o-a"), "1"),
            original_row("<image>Find y.", "12", png("o-b"), "2"),
            original_row("<image>Find z.", "3", png("o-a"), "3"),
            original_row("<image>Find w.", "4", b"GIF89a-broken", "4"),
        ],
    )
    write_original_parquet(
        directory / "data" / "test-00000-of-00001.parquet",
        [original_row("<image>Find v.", "\\frac{7}{2}", png("o-c"), "5")],
    )
    # huggingface_hub's cache lives in a hidden directory next to the files; it is never a split.
    write_original_parquet(directory / ".cache" / "huggingface" / "stale.parquet", [])


def test_original_schema_is_converted(tmp_path):
    source = tmp_path / "geometry3k"
    write_original_source(source)
    out = tmp_path / "out"
    reports = prepare_dataset(source, PrepareOptions(out_dir=out))
    assert [r.split for r in reports] == ["test", "train"]
    test, train = reports
    assert (train.schema, train.rows, train.images, train.urls) == ("original", 4, 4, 0)
    assert (train.embedded, train.present, train.written) == (2, 0, 4)
    assert train.problems == [
        RowProblem(
            3,
            "images",
            "image 0: embedded image rejected: not an image: PIL does not recognize its format "
            "(the body starts b'GIF89a-broken')",
        )
    ]
    assert (test.embedded, test.problems) == (1, [])

    rows = read_geo3k_parquet(out / "train.parquet")
    assert [row.problem for row in rows] == [
        f"{INSTRUCTION_BLOCK}\n\n<image>Find {v}." for v in ("x", "y", "z", "w")
    ]
    assert [row.answer for row in rows] == ["5", "12", "3", "4"]
    store = (out / "images").resolve()
    assert rows[0].images == rows[2].images == [str(store / f"{bytes_key(png('o-a'))}.png")]
    assert rows[1].images == [str(store / f"{bytes_key(png('o-b'))}.png")]
    assert pq.read_table(out / "train.parquet").column("images").to_pylist()[3] == ["4.png"]
    assert validate_rows(rows[:3]) == []
    decoded = load_row_images(rows[1])[0]
    assert decoded.tobytes() == Image.open(io.BytesIO(png("o-b"))).convert("RGB").tobytes()
    assert read_geo3k_parquet(out / "test.parquet")[0].answer == "\\frac{7}{2}"

    again = prepare_dataset(source, PrepareOptions(out_dir=out))
    assert [(r.embedded, r.present) for r in again] == [(0, 1), (0, 2)]


def test_split_discovery():
    assert split_name(Path("data/train-00000-of-00003.parquet")) == "train"
    assert split_name(Path("validation.parquet")) == "validation"
    assert split_name(Path("my-test.parquet")) == "my-test"


def test_find_parquet_splits_groups_shards(tmp_path):
    for name in ("train-00001-of-00002", "train-00000-of-00002", "test"):
        write_processed_parquet(tmp_path / "d" / f"{name}.parquet", [])
    write_processed_parquet(tmp_path / "d" / ".cache" / "x.parquet", [])
    splits = find_parquet_splits(tmp_path / "d")
    assert {name: [p.name for p in paths] for name, paths in splits.items()} == {
        "test": ["test.parquet"],
        "train": ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"],
    }
    with pytest.raises(PrepareError, match=r"^no \.parquet files under "):
        find_parquet_splits(tmp_path / "d" / ".cache" / "nothing-here")


def test_missing_columns_are_named(tmp_path):
    import pyarrow as pa

    pq.write_table(pa.table({"question": ["q"], "answer": ["1"]}), tmp_path / "train.parquet")
    with pytest.raises(PrepareError) as error:
        prepare_dataset(tmp_path, PrepareOptions(out_dir=tmp_path / "out"))
    assert str(error.value).startswith(
        f"{(tmp_path / 'train.parquet').resolve()} lacks column(s) problem, images (it has question, answer)"
    )


def test_summary_lists_counts_and_failures(image_server, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    processed_source(image_server, source, "p4")
    out = tmp_path / "out"
    [report] = prepare_dataset(source, PrepareOptions(out_dir=out, limits=LIMITS, bad_rows="drop"))
    lines = format_summary([report]).splitlines()
    assert lines[:5] == [
        f"train [processed]: 7 rows -> {out.resolve() / 'train.parquet'}",
        "  images: 7 references, 5 distinct URLs; fetched 3, saved from embedded 0, already present 0, failed 2",
        f"  failed: {image_server.url('/missing')}: HTTP 404 Not Found",
        f"  failed: {image_server.url('/html')}: not an image: PIL does not recognize its format "
        "(the body starts b'<html>not an image</html>')",
        "  rows: 3 written, 4 bad (dropped 4)",
    ]


# ---------------------------------------------------------------------------------------------------------
# The command line, with the Hub replaced by a function that writes files


class FakeDownloader:
    def __init__(self, write) -> None:
        self.write = write
        self.calls: list[dict] = []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        self.write(Path(kwargs["local_dir"]))
        return kwargs["local_dir"]


def test_cli_original_download_and_conversion(tmp_path, capsys):
    out = tmp_path / "out"
    fake = FakeDownloader(write_original_source)
    code = load_script().main(["--source", "original", "--out", str(out), "--no-progress"], downloader=fake)
    assert code == 0
    assert fake.calls == [
        {
            "repo_id": "hiyouga/geometry3k",
            "repo_type": "dataset",
            "local_dir": str(out / "raw" / "geometry3k"),
            "allow_patterns": ["*.parquet"],
        }
    ]
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == f"downloaded hiyouga/geometry3k into {out / 'raw' / 'geometry3k'}"
    assert "train: 1 bad row(s) of 4 (1 problem(s))" in captured.err
    assert "warning: 1 bad row(s) were written as they are" in captured.err
    assert sorted(os.listdir(out)) == ["images", "raw", "test.parquet", "train.parquet"]


def test_cli_processed_download_strict_and_drop(image_server, tmp_path, capsys):
    out = tmp_path / "out"
    fake = FakeDownloader(lambda directory: processed_source(image_server, directory, "cli"))
    script = load_script()
    common = ["--source", "processed", "--out", str(out), "--no-progress", "--retries", "0"]

    assert script.main([*common, "--strict"], downloader=fake) == 1
    assert fake.calls[0]["repo_id"] == "VeraIsHere/geo3k_imgurl_processed"
    err = capsys.readouterr().err
    assert "train: 4 bad row(s) of 7 (4 problem(s))" in err
    assert "  row 3 [answer]: answer is empty; every row needs the exact answer as its label" in err
    assert err.splitlines()[-1] == "4 bad row(s) and --strict: no parquet file was written"
    assert not (out / "train.parquet").exists()

    assert script.main([*common, "--drop-bad-rows", "--splits", "train"], downloader=fake) == 0
    assert len(read_geo3k_parquet(out / "train.parquet")) == 3


def test_cli_rejects_an_unknown_source_and_split(tmp_path, capsys):
    script = load_script()
    assert script.main(["--source", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: source {str(tmp_path / 'nope')!r} is neither one of processed, original nor an existing "
        "parquet file or directory; pass --source processed, --source original, or a path to parquet files\n"
    )
    write_processed_parquet(tmp_path / "src" / "train.parquet", [])
    assert script.main(["--source", str(tmp_path / "src"), "--out", str(tmp_path), "--splits", "dev"]) == 2
    assert capsys.readouterr().err == f"error: split(s) dev not found in {tmp_path / 'src'}; it has train\n"


def test_strict_fails_on_empty_and_list_valued_problems_and_converts_numeric_labels(tmp_path, capsys):
    """A list-valued problem is a bad row (not its Python repr written as the question), an empty
    problem fails --strict, and an integer label is written as its decimal string."""
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.png").write_bytes(diagram_png("typed"))
    table = pa.table(
        {
            "problem": pa.array(
                [["<image>Find x."], ["<image>Find y."], ["<image>Find z."], ["<image>Find w."]]
            ),
            "answer": pa.array([5, 6, 7, 8]),
            "images": pa.array([["a.png"]] * 4),
        }
    )
    pq.write_table(table, source / "lists.parquet")
    [report] = prepare_dataset(source, PrepareOptions(out_dir=tmp_path / "out1", bad_rows="drop"))
    assert [str(p) for p in report.problems] == [
        f"row {k} [problem]: problem is a list (['<image>Find {v}.']), not a string; the source's problem "
        "column must hold text"
        for k, v in enumerate("xyzw")
    ]
    assert report.written == 0

    write_processed_parquet(
        source / "train.parquet",
        [("<image>Find x.", "5", ["a.png"]), ("", "6", []), ("<image>", "7", ["a.png"])],
    )
    (source / "lists.parquet").unlink()
    script = load_script()
    common = ["--source", str(source), "--out", str(tmp_path / "out2"), "--no-progress"]
    assert script.main([*common, "--strict"]) == 1
    err = capsys.readouterr().err
    assert "  row 1 [problem]: problem is empty; every row needs the question text the model is asked" in err
    assert "  row 2 [problem]: problem is empty apart from its <image> placeholder(s)" in err
    assert not (tmp_path / "out2" / "train.parquet").exists()

    pq.write_table(
        pa.table({"problem": ["<image>Find x."], "answer": pa.array([5]), "images": [["a.png"]]}),
        source / "train.parquet",
    )
    assert script.main([*common, "--strict"]) == 0
    assert [row.answer for row in read_geo3k_parquet(tmp_path / "out2" / "train.parquet")] == ["5"]


def test_cli_reports_a_corrupt_source_file_without_a_traceback(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.parquet").write_bytes(b"PAR1 this is not parquet")
    assert load_script().main(["--source", str(tmp_path / "src"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: {(tmp_path / 'src' / 'train.parquet').resolve()} is not a readable parquet file ("
    )
    assert "Traceback" not in err


def test_cli_reports_a_failed_download_in_one_line(tmp_path, capsys):
    """huggingface_hub itself, offline (the suite sets HF_HUB_OFFLINE): its error becomes one line."""
    out = tmp_path / "out"
    assert load_script().main(["--source", "processed", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"error: downloading VeraIsHere/geo3k_imgurl_processed into {out / 'raw' / 'geo3k_imgurl_processed'} failed ("
    )
    assert err.rstrip().endswith(
        "or download the parquet files elsewhere and pass their directory as --source DIR"
    )
    assert "Traceback" not in err
