"""The geo3k parquet format: round trips in both image modes, validation of broken rows, prompts."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from envs.geo3k.dataset import (
    PARQUET_SCHEMA,
    DatasetError,
    Geo3kRow,
    RowImageError,
    RowProblem,
    build_prompt_messages,
    encode_png,
    load_image,
    load_row_images,
    read_geo3k_parquet,
    validate_parquet,
    validate_rows,
    write_geo3k_parquet,
)
from envs.geo3k.sample_data import GeoProblem, generate_problems
from envs.images import ImageLoadError


@pytest.fixture(scope="module")
def records() -> list[GeoProblem]:
    return generate_problems(7, seed=11)


def raw_table(path: Path) -> dict[str, list]:
    return pq.read_table(path).to_pydict()


# ---------------------------------------------------------------------------------------------------------
# Round trips


def test_files_mode_round_trip(tmp_path, records):
    path = write_geo3k_parquet(records, tmp_path, split_name="train")
    assert path == tmp_path / "train.parquet"
    assert pq.read_schema(path).remove_metadata() == PARQUET_SCHEMA
    raw = raw_table(path)
    assert raw["images"] == [[f"images/train_{i:06d}_0.png"] for i in range(7)]

    rows = read_geo3k_parquet(path)
    assert [(r.index, r.problem, r.answer) for r in rows] == [
        (i, p.problem, p.answer) for i, p in enumerate(records)
    ]
    for row, record in zip(rows, records, strict=True):
        assert row.images == [str(tmp_path.resolve() / "images" / f"train_{row.index:06d}_0.png")]
        assert Path(row.images[0]).read_bytes() == encode_png(record.image)
        (image,) = load_row_images(row)
        assert image.tobytes() == record.image.tobytes()
    assert validate_rows(rows) == []


def test_relative_paths_resolve_against_the_parquet_directory_after_a_move(tmp_path, records):
    write_geo3k_parquet(records[:2], tmp_path / "a", split_name="test")
    (tmp_path / "a").rename(tmp_path / "b")
    rows = read_geo3k_parquet(tmp_path / "b" / "test.parquet")
    assert rows[1].images == [str(tmp_path.resolve() / "b" / "images" / "test_000001_0.png")]
    assert load_row_images(rows[1])[0].tobytes() == records[1].image.tobytes()


def test_absolute_paths_are_stored_as_given(tmp_path, records):
    path = write_geo3k_parquet(records[:1], tmp_path, absolute_paths=True)
    assert raw_table(path)["images"] == [[str((tmp_path / "images" / "train_000000_0.png").resolve())]]


def test_data_uri_mode_round_trip(tmp_path, records):
    path = write_geo3k_parquet(records, tmp_path, image_mode="data_uri", split_name="test")
    assert not (tmp_path / "images").exists()
    raw = raw_table(path)
    for refs, record in zip(raw["images"], records, strict=True):
        assert refs == ["data:image/png;base64," + base64.b64encode(encode_png(record.image)).decode()]
    rows = read_geo3k_parquet(path)
    assert [r.answer for r in rows] == [p.answer for p in records]
    assert [load_row_images(r)[0].tobytes() for r in rows] == [p.image.tobytes() for p in records]
    assert validate_rows(rows) == []


def test_write_rejects_bad_arguments(tmp_path, records):
    with pytest.raises(ValueError, match="image_mode must be one of files, data_uri, got 'bytes'"):
        write_geo3k_parquet(records, tmp_path, image_mode="bytes")
    with pytest.raises(ValueError, match=r"split_name '../x' must be a plain file stem"):
        write_geo3k_parquet(records, tmp_path, split_name="../x")

    class TwoPlaceholders:
        problem, answer, images = "<image><image>Find x.", "5", (records[0].image,)

    with pytest.raises(ValueError, match=r"record 0 has 2 <image> placeholder\(s\) but 1 image\(s\)"):
        write_geo3k_parquet([TwoPlaceholders()], tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Reading and validating broken files


def write_raw(path: Path, rows: list[tuple[str | None, str | None, list]], images_type=None) -> Path:
    problems, answers, images = (list(column) for column in zip(*rows, strict=True))
    schema = (
        PARQUET_SCHEMA
        if images_type is None
        else pa.schema([("problem", pa.string()), ("answer", pa.string()), ("images", images_type)])
    )
    pq.write_table(pa.table({"problem": problems, "answer": answers, "images": images}, schema=schema), path)
    return path


def test_validate_rows_reports_every_broken_row(tmp_path, records):
    (tmp_path / "good.png").write_bytes(encode_png(records[0].image))
    (tmp_path / "garbage.png").write_bytes(b"this is not a png")
    good_uri = "data:image/png;base64," + base64.b64encode(encode_png(records[0].image)).decode()
    path = write_raw(
        tmp_path / "broken.parquet",
        [
            ("<image>Find x.", "5", ["good.png"]),
            ("<image> and <image>Find x.", "5", ["good.png"]),
            ("<image>Find x.", "   ", [good_uri]),
            ("<image>Find x.", "7", ["garbage.png"]),
            ("<image>Find x.", "\\frac{", ["good.png"]),
            ("<image>Find x.", "x + 1", ["good.png"]),
            ("<image>Find x.", "2\\sqrt{3}", ["data:image/png;base64,@@@"]),
            ("<image>Find x.", "16\\pi", ["missing.png"]),
            ("Find x.", None, []),
        ],
    )
    problems = validate_rows(read_geo3k_parquet(path))
    root = tmp_path.resolve()
    assert [(p.index, p.column) for p in problems] == [
        (1, "problem"),
        (2, "answer"),
        (3, "images"),
        (4, "answer"),
        (5, "answer"),
        (6, "images"),
        (7, "images"),
        (8, "answer"),
    ]
    messages = [str(p) for p in problems]
    assert messages[0] == (
        "row 1 [problem]: problem has 2 <image> placeholder(s) but the row has 1 image(s); each placeholder "
        "is replaced in order by the next image, so the counts must match"
    )
    assert messages[1] == "row 2 [answer]: answer is empty; every row needs the exact answer as its label"
    assert messages[2].startswith(
        f"row 3 [images]: image 0: image {root / 'garbage.png'} does not decode (UnidentifiedImageError: "
    )
    assert messages[3] == (
        "row 4 [answer]: math-verify cannot parse answer '\\\\frac{'; write it as LaTeX math such as "
        "5, 12.5, 2\\sqrt{3}, \\frac{15}{2} or 16\\pi"
    )
    assert messages[4] == (
        "row 5 [answer]: answer 'x + 1' parses to an expression in the unknown(s) x; a label must be a number"
    )
    assert messages[5].startswith(
        "row 6 [images]: image 0: data URI data:image/png;base64,@@@ has an invalid base64 payload ("
    )
    assert messages[6] == f"row 7 [images]: image 0: image file {root / 'missing.png'} does not exist"
    assert messages[7] == "row 8 [answer]: answer is empty; every row needs the exact answer as its label"


def test_validate_rows_can_skip_image_decoding(tmp_path):
    rows = [Geo3kRow(index=0, problem="<image>Find x.", answer="5", images=[str(tmp_path / "absent.png")])]
    assert validate_rows(rows, check_images=False) == []
    assert validate_rows(rows) == [
        RowProblem(0, "images", f"image 0: image file {tmp_path / 'absent.png'} does not exist")
    ]


def test_read_rejects_missing_file_missing_columns_and_byte_images(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no parquet file at .*nothing\.parquet; write one with"):
        read_geo3k_parquet(tmp_path / "nothing.parquet")
    pq.write_table(pa.table({"problem": ["<image>Find x."], "label": ["5"]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) answer, images \(it has problem, label\)"):
        read_geo3k_parquet(tmp_path / "cols.parquet")
    path = write_raw(
        tmp_path / "bytes.parquet", [("<image>Find x.", "5", [b"\x89PNG"])], pa.list_(pa.binary())
    )
    with pytest.raises(
        DatasetError, match=r"row 0 \[images\]: image 0 is a bytes, not a string; .*slime drops raw bytes"
    ) as raised:
        read_geo3k_parquet(path)
    assert [(p.index, p.column) for p in raised.value.problems] == [(0, "images")]
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DatasetError, match=r"corrupt\.parquet is not a readable parquet file"):
        read_geo3k_parquet(tmp_path / "corrupt.parquet")


def test_validate_parquet_reports_cells_of_the_wrong_type_once_each(tmp_path, records):
    """Integer labels, a plain string in the images column and a list-valued problem are per-row
    findings (not an AttributeError, not one image per character, not a Python repr)."""
    (tmp_path / "good.png").write_bytes(encode_png(records[0].image))
    table = pa.table(
        {
            "problem": pa.array([["<image>Find x."], ["<image>Find y."], ["<image>Find z."]]),
            "answer": pa.array([5, 6, 7]),
            "images": pa.array(["good.png", "good.png", "good.png"]),
        }
    )
    pq.write_table(table, tmp_path / "typed.parquet")
    problems = validate_parquet(tmp_path / "typed.parquet")
    assert [(p.index, p.column) for p in problems] == [
        (row, column) for row in range(3) for column in ("problem", "answer", "images")
    ]
    assert str(problems[0]) == (
        "row 0 [problem]: problem is a list (['<image>Find x.']), not a string; write the question as one "
        "string with an <image> placeholder per image"
    )
    assert str(problems[1]) == (
        "row 0 [answer]: answer is an int (5), not a string; write the label as a string, e.g. '5' or '2\\sqrt{3}'"
    )
    assert str(problems[2]) == (
        "row 0 [images]: images is a str ('good.png'), not a list of strings; store a list even for one "
        "image, e.g. ['images/0.png']"
    )
    with pytest.raises(DatasetError, match=r"has 3 row\(s\) with cells of the wrong type"):
        read_geo3k_parquet(tmp_path / "typed.parquet")


def test_validate_parquet_reports_empty_problems_and_oversized_or_corrupt_images(tmp_path, records):
    png = encode_png(records[0].image)
    (tmp_path / "good.png").write_bytes(png)
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    flipped = bytearray(png)
    flipped[len(png) // 2] ^= 0xFF  # inside the compressed pixels: only the chunk CRC tells
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    Image.new("L", (7000, 6000)).save(tmp_path / "huge.png")  # 42 M pixels, a few kB on disk
    path = write_raw(
        tmp_path / "rows.parquet",
        [
            ("<image>Find x.", "5", ["good.png"]),
            ("", "5", []),
            ("  <image> ", "5", ["good.png"]),
            ("<image>Find x.", "5", ["truncated.png"]),
            ("<image>Find x.", "5", ["flipped.png"]),
            ("<image>Find x.", "5", ["huge.png"]),
        ],
    )
    root = tmp_path.resolve()
    problems = [str(p) for p in validate_parquet(path)]
    assert problems[:2] == [
        "row 1 [problem]: problem is empty; every row needs the question text the model is asked",
        "row 2 [problem]: problem is empty apart from its <image> placeholder(s); every row needs the "
        "question text the model is asked",
    ]
    assert problems[2].startswith(
        f"row 3 [images]: image 0: image {root / 'truncated.png'} does not decode ("
    )
    assert problems[3].startswith(f"row 4 [images]: image 0: image {root / 'flipped.png'} does not decode (")
    assert problems[4] == (
        f"row 5 [images]: image 0: image {root / 'huge.png'} is 7000x6000 = 42000000 pixels, over the limit "
        "of 37748736 (envs.images.MAX_IMAGE_PIXELS); downscale it"
    )
    assert len(problems) == 5
    full = [str(p) for p in validate_parquet(path, full_decode=True)]
    assert [line.split(":")[0] for line in full] == [line.split(":")[0] for line in problems]


def test_one_pixel_limit_for_every_image_source(tmp_path):
    huge = Image.new("L", (7000, 6000))
    huge.save(tmp_path / "huge.png")
    with pytest.raises(ImageLoadError, match=r"is 7000x6000 = 42000000 pixels, over the limit of 37748736"):
        load_image(str(tmp_path / "huge.png"))
    with pytest.raises(ImageLoadError, match=r"^a PIL image is 7000x6000 = 42000000 pixels"):
        load_image(huge)
    buffer = io.BytesIO()
    huge.save(buffer, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(ImageLoadError, match=r"^image data URI .* is 7000x6000 = 42000000 pixels"):
        load_image(uri)
    assert load_image(str(tmp_path / "huge.png"), max_pixels=7000 * 6000).size == (7000, 6000)


def test_urls_are_left_to_data_preparation():
    row = Geo3kRow(index=4, problem="<image>Find x.", answer="5", images=["https://example.com/a.png"])
    with pytest.raises(
        RowImageError,
        match=r"^row 4 image 0: image 'https://example.com/a.png' is a URL; .*Run the data preparation step",
    ):
        load_row_images(row)


def test_load_image_converts_to_rgb(tmp_path):
    Image.new("L", (9, 7), 128).save(tmp_path / "grey.png")
    image = load_image(str(tmp_path / "grey.png"))
    assert (image.mode, image.size, image.getpixel((0, 0))) == ("RGB", (9, 7), (128, 128, 128))


# ---------------------------------------------------------------------------------------------------------
# Prompt messages


def test_build_prompt_messages_puts_images_where_the_placeholders_are():
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    assert build_prompt_messages("Look: <image> then <image>.", [red, blue]) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look: "},
                {"type": "image", "image": red},
                {"type": "text", "text": " then "},
                {"type": "image", "image": blue},
                {"type": "text", "text": "."},
            ],
        }
    ]
    assert build_prompt_messages("<image>Find x.", [red])[0]["content"] == [
        {"type": "image", "image": red},
        {"type": "text", "text": "Find x."},
    ]
    with pytest.raises(
        ValueError, match=r"problem has 1 <image> placeholder\(s\) but 2 image\(s\) were given"
    ):
        build_prompt_messages("<image>Find x.", [red, blue])


def test_prompt_messages_render_with_the_qwen_chat_template_and_processor(records):
    from models import load_processing

    policy = load_processing("tiny-qwen2.5-vl")
    record = records[0]
    messages = build_prompt_messages(record.problem, record.images)
    text = policy.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    question = record.question.removeprefix("<image>")
    assert text.endswith(
        f"\n\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = policy.processor(text=[text], images=list(record.images), return_tensors="pt")
    pad_id = policy.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    # A 448x448 image is 32x32 patches of 14 pixels, merged 2x2 into 256 image tokens.
    assert inputs["image_grid_thw"].tolist() == [[1, 32, 32]]
    assert int((inputs["input_ids"] == pad_id).sum()) == 256
