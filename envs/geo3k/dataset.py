"""The Geometry3K parquet format that slime's ``--prompt-data`` reads, and the checks it needs up front.

This module owns reading and writing that format and turning a row into what a chat template takes:

- columns, exactly: ``problem`` (string: the instruction block, then the question with one ``<image>``
  placeholder per image), ``answer`` (string: the label, LaTeX math such as ``2\\sqrt{3}``) and
  ``images`` (list<string>: image file paths, relative to the parquet's directory or absolute, or
  ``data:image/png;base64,...`` URIs). Never raw bytes: slime silently drops them.
- ``validate_parquet`` reports every bad row of a file at once (a cell of the wrong type, an empty
  problem, placeholder/image count mismatch, empty or unparsable label, an image that is missing,
  too large or corrupt), so a dataset fails before training, not mid-run; ``validate_rows`` does the
  same for rows already read.
- ``build_prompt_messages`` turns a problem into one chat user message whose content parts put each
  image where its ``<image>`` placeholder was, which is how slime builds multimodal prompts.

Labels are parsed with math-verify inside ``\\boxed{}`` or ``$...$``: bare, ``2\\sqrt{3}`` parses as
just ``2`` and ``16\\pi`` as ``16``.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from envs.images import ImageLoadError, check_image, describe, encode_png, load_image, to_data_uri

IMAGE_PLACEHOLDER = "<image>"
COLUMNS: tuple[str, ...] = ("problem", "answer", "images")
PARQUET_SCHEMA = pa.schema(
    [
        pa.field("problem", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("images", pa.list_(pa.string())),
    ]
)
IMAGE_MODES: tuple[str, ...] = ("files", "data_uri")
_URL_SCHEMES = ("http://", "https://")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SupportsGeo3kRecord(Protocol):
    """What ``write_geo3k_parquet`` needs from a record (``sample_data.GeoProblem`` is one)."""

    @property
    def problem(self) -> str: ...

    @property
    def answer(self) -> str: ...

    @property
    def images(self) -> Sequence[Image.Image]: ...


@dataclass(frozen=True)
class Geo3kRow:
    """One parquet row. ``images`` are absolute paths, data URIs, or (unresolved) URLs."""

    index: int
    problem: str
    answer: str
    images: list[str] = field(default_factory=list)
    source: Path | None = None


@dataclass(frozen=True)
class RowProblem:
    """Something wrong with one row: which row, which column, and what to do about it."""

    index: int
    column: str
    message: str

    def __str__(self) -> str:
        return f"row {self.index} [{self.column}]: {self.message}"


class RowImageError(ImageLoadError):
    """A row's image reference that cannot be turned into a decoded image."""


# ---------------------------------------------------------------------------------------------------------
# Writing


def write_geo3k_parquet(
    records: Iterable[SupportsGeo3kRecord],
    out_dir: str | Path,
    *,
    image_mode: Literal["files", "data_uri"] = "files",
    split_name: str = "train",
    absolute_paths: bool = False,
) -> Path:
    """Write ``out_dir/<split_name>.parquet``; return its path.

    ``image_mode="files"`` saves each image as ``out_dir/images/<split_name>_<row>_<k>.png`` and stores
    its path relative to ``out_dir`` (the directory can be moved as a whole), or absolute with
    ``absolute_paths``: slime resolves a relative path against its own working directory (the slime
    checkout), so files meant for slime need absolute paths or ``image_mode="data_uri"``, which embeds
    the PNG in the row as a ``data:image/png;base64,...`` URI.
    """
    if image_mode not in IMAGE_MODES:
        raise ValueError(f"image_mode must be one of {', '.join(IMAGE_MODES)}, got {image_mode!r}")
    if not _SPLIT_NAME.fullmatch(split_name):
        raise ValueError(f"split_name {split_name!r} must be a plain file stem such as 'train' or 'test'")
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    answers: list[str] = []
    image_column: list[list[str]] = []
    for row, record in enumerate(records):
        images = list(record.images)
        placeholders = record.problem.count(IMAGE_PLACEHOLDER)
        if placeholders != len(images):
            raise ValueError(
                f"record {row} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} image(s); "
                "each placeholder is replaced in order by the next image, so the counts must match"
            )
        refs: list[str] = []
        for k, image in enumerate(images):
            if image_mode == "data_uri":
                refs.append(to_data_uri(image))
                continue
            image_dir.mkdir(exist_ok=True)
            name = f"{split_name}_{row:06d}_{k}.png"
            (image_dir / name).write_bytes(encode_png(image))
            refs.append(str((image_dir / name).resolve()) if absolute_paths else f"images/{name}")
        problems.append(record.problem)
        answers.append(record.answer)
        image_column.append(refs)
    table = pa.table({"problem": problems, "answer": answers, "images": image_column}, schema=PARQUET_SCHEMA)
    path = out_dir / f"{split_name}.parquet"
    pq.write_table(table, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# Reading


class DatasetError(ValueError):
    """A parquet file that cannot be used as it is; ``problems`` lists every bad row found."""

    def __init__(self, message: str, problems: Sequence[RowProblem] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems)


def format_row_problems(problems: Sequence[RowProblem], *, limit: int | None = 50) -> str:
    """One line per problem (the first ``limit``), then how many more there are."""
    shown = problems if limit is None else problems[:limit]
    lines = [f"  {problem}" for problem in shown]
    if len(problems) > len(shown):
        rest = problems[len(shown) :]
        lines.append(f"  ... and {len(rest)} more problem(s) in {len({p.index for p in rest})} more row(s)")
    return "\n".join(lines)


def read_geo3k_parquet(path: str | Path) -> list[Geo3kRow]:
    """Rows of a geo3k parquet file, with relative image paths resolved against the file's directory.

    Raises DatasetError listing every cell of the wrong type (a number where a string belongs, a
    string where a list of images belongs, raw bytes): such a row cannot even be represented. The
    contents are not checked; ``validate_rows`` (or ``validate_parquet`` for both) does that."""
    path = Path(path).resolve()
    rows, problems = _read_rows(path)
    if problems:
        raise DatasetError(
            f"{path} has {len({p.index for p in problems})} row(s) with cells of the wrong type:\n"
            f"{format_row_problems(problems)}\nThe columns are problem (string), answer (string) and images "
            "(list of strings: file paths or data URIs; slime drops raw bytes); rewrite the file with "
            "envs.geo3k.dataset.write_geo3k_parquet or examples/geo3k_vlm_multi_turn/prepare_data.py",
            problems,
        )
    return rows


def validate_parquet(
    path: str | Path, *, check_images: bool = True, full_decode: bool = False
) -> list[RowProblem]:
    """Every problem of every row of a geo3k parquet file, in row order (empty: the file is usable).

    Cells of the wrong type, placeholder/image count mismatches, empty problems, labels math-verify
    cannot read as a number, and images that are missing, oversized (``envs.images.MAX_IMAGE_PIXELS``)
    or corrupt (see ``validate_rows``). A file that cannot be read at all (no such file, not a
    parquet file, a missing column) raises instead: there are no rows to report on."""
    return read_and_validate(path, check_images=check_images, full_decode=full_decode)[1]


def read_and_validate(
    path: str | Path, *, check_images: bool = True, full_decode: bool = False
) -> tuple[list[Geo3kRow], list[RowProblem]]:
    """The rows of a parquet file and every problem found in them (``validate_parquet``). A row with
    a cell of the wrong type is still in the list (that cell read as empty) and reported once."""
    rows, problems = _read_rows(Path(path).resolve())
    typed = {(p.index, p.column) for p in problems}
    problems += validate_rows(rows, check_images=check_images, full_decode=full_decode, skip=typed)
    return rows, _in_row_order(problems)


def _in_row_order(problems: list[RowProblem]) -> list[RowProblem]:
    order = {column: k for k, column in enumerate(COLUMNS)}
    return sorted(problems, key=lambda p: (p.index, order.get(p.column, len(order))))


def _read_rows(path: Path) -> tuple[list[Geo3kRow], list[RowProblem]]:
    if not path.is_file():
        raise FileNotFoundError(
            f"no parquet file at {path}; write one with "
            "python examples/geo3k_vlm_multi_turn/make_sample_data.py --out DIR"
        )
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise DatasetError(
            f"{path} is not a readable parquet file ({type(error).__name__}: {error})"
        ) from error
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise DatasetError(
            f"{path} lacks column(s) {', '.join(missing)} (it has {', '.join(table.column_names)}); "
            f"a geo3k file has the columns {', '.join(COLUMNS)}"
        )
    columns = {name: table.column(name).to_pylist() for name in COLUMNS}
    rows: list[Geo3kRow] = []
    problems: list[RowProblem] = []
    for index, (problem, answer, images) in enumerate(zip(*columns.values(), strict=True)):
        problem = _string_cell(index, "problem", problem, problems)
        answer = _string_cell(index, "answer", answer, problems)
        refs = _image_refs(index, images, path, problems)
        rows.append(Geo3kRow(index=index, problem=problem, answer=answer, images=refs, source=path))
    return rows, problems


def _string_cell(index: int, column: str, value: Any, problems: list[RowProblem]) -> str:
    """The cell as a string; None reads as empty (reported by validation). Any other non-string is
    a problem: str() would turn a list into its Python repr and a number into a label that never
    went through the file's own writer."""
    if value is None or isinstance(value, str):
        return value or ""
    problems.append(
        RowProblem(
            index,
            column,
            f"{column} is {_a(type(value).__name__)} ({describe(repr(value))}), not a string; "
            + (
                "write the label as a string, e.g. '5' or '2\\sqrt{3}'"
                if column == "answer"
                else "write the question as one string with an <image> placeholder per image"
            ),
        )
    )
    return ""


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _image_refs(index: int, images: Any, parquet: Path, problems: list[RowProblem]) -> list[str]:
    if images is None:
        return []
    if not isinstance(images, list):
        problems.append(
            RowProblem(
                index,
                "images",
                f"images is {_a(type(images).__name__)} ({describe(repr(images))}), not a list of strings; "
                "store a list even for one image, e.g. ['images/0.png']",
            )
        )
        return []
    refs = []
    for k, item in enumerate(images):
        if not isinstance(item, str):
            problems.append(
                RowProblem(
                    index,
                    "images",
                    f"image {k} is {_a(type(item).__name__)}, not a string; the images column must hold "
                    "file paths or data URIs (slime drops raw bytes)",
                )
            )
            return []
        refs.append(_image_ref(item, parquet))
    return refs


def _image_ref(item: str, parquet: Path) -> str:
    if item.startswith("data:") or item.startswith(_URL_SCHEMES) or Path(item).is_absolute():
        return item
    return str(parquet.parent / item)


def load_row_images(row: Geo3kRow) -> list[Image.Image]:
    """The row's images, decoded, in placeholder order."""
    images = []
    for k, ref in enumerate(row.images):
        try:
            images.append(load_image(ref))
        except ImageLoadError as error:
            raise RowImageError(f"row {row.index} image {k}: {error}") from error
    return images


# ---------------------------------------------------------------------------------------------------------
# Validation


def parse_answer(answer: str) -> list[Any]:
    """math-verify's parse of a label read as LaTeX math: inside ``\\boxed{}``, else inside ``$...$``
    (the grader reads labels the same way). Empty when neither yields an expression.

    Runs without math-verify's signal-based timeout, so call it on trusted labels only.
    """
    from math_verify import parse

    text = answer.strip()
    # math-verify warns that its timeout is off; here that is deliberate (labels are trusted).
    math_verify_logger = logging.getLogger("math_verify")
    level = math_verify_logger.level
    math_verify_logger.setLevel(logging.ERROR)
    try:
        for wrapped in (f"\\boxed{{{text}}}", f"${text}$"):
            parsed = parse(wrapped, parsing_timeout=None)
            if any(not isinstance(item, str) for item in parsed):
                return parsed
    finally:
        math_verify_logger.setLevel(level)
    return []


@functools.lru_cache(maxsize=8192)
def answer_problem(answer: str) -> str | None:
    """Why ``answer`` cannot serve as a label, or None when it can.

    Cached: parsing is most of validation's time (about 4 ms a label), and a dataset's labels
    repeat (2,100 generated rows have about 500 distinct ones)."""
    if not isinstance(answer, str):
        return f"answer is a {type(answer).__name__}, not a string"
    if not answer.strip():
        return "answer is empty; every row needs the exact answer as its label"
    parsed = parse_answer(answer)
    expressions = [item for item in parsed if not isinstance(item, str)]
    if not expressions:
        return (
            f"math-verify cannot parse answer {answer!r}; write it as LaTeX math such as "
            "5, 12.5, 2\\sqrt{3}, \\frac{15}{2} or 16\\pi"
        )
    unknowns = sorted(str(symbol) for symbol in getattr(expressions[0], "free_symbols", ()))
    if unknowns:
        return (
            f"answer {answer!r} parses to an expression in the unknown(s) {', '.join(unknowns)}; "
            "a label must be a number"
        )
    return None


def validate_rows(
    rows: Sequence[Geo3kRow],
    *,
    check_images: bool = True,
    full_decode: bool = False,
    skip: Collection[tuple[int, str]] = (),
) -> list[RowProblem]:
    """Every problem found in ``rows``, in row order; an empty list means the rows are usable.

    Images are checked with ``envs.images.check_image`` (header, pixel limit, and every PNG chunk's
    CRC, without decoding pixels), or decoded in full with ``full_decode``: a PNG whose chunks are
    intact but whose compressed stream was written broken passes only the first. ``skip`` holds
    (row, column) pairs already reported (a cell of the wrong type) that are not checked again."""
    check = load_image if full_decode else check_image
    problems: list[RowProblem] = []
    for row in rows:
        if (row.index, "problem") not in skip:
            problems.extend(_problem_text_problems(row))
        if (row.index, "answer") not in skip:
            reason = answer_problem(row.answer)
            if reason is not None:
                problems.append(RowProblem(row.index, "answer", reason))
        if check_images and (row.index, "images") not in skip:
            for k, ref in enumerate(row.images):
                try:
                    check(ref)
                except ImageLoadError as error:
                    problems.append(RowProblem(row.index, "images", f"image {k}: {error}"))
    return problems


def _problem_text_problems(row: Geo3kRow) -> list[RowProblem]:
    if not isinstance(row.problem, str):
        return [RowProblem(row.index, "problem", f"problem is a {type(row.problem).__name__}, not a string")]
    if not row.problem.replace(IMAGE_PLACEHOLDER, "").strip():
        return [
            RowProblem(
                row.index,
                "problem",
                "problem is empty"
                + (" apart from its <image> placeholder(s)" if row.problem.strip() else "")
                + "; every row needs the question text the model is asked",
            )
        ]
    placeholders = row.problem.count(IMAGE_PLACEHOLDER)
    if placeholders != len(row.images):
        return [
            RowProblem(
                row.index,
                "problem",
                f"problem has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the row has "
                f"{len(row.images)} image(s); each placeholder is replaced in order by the next image, "
                "so the counts must match",
            )
        ]
    return []


# ---------------------------------------------------------------------------------------------------------
# Prompts


def build_prompt_messages(problem_text: str, images: Sequence[Image.Image]) -> list[dict[str, Any]]:
    """One chat user message: the text split at each ``<image>``, with the images in their places
    (Geo3K lays its prompts out the generic way: :func:`rollout.prompts.default_prompt_messages`)."""
    from rollout.prompts import default_prompt_messages

    return default_prompt_messages(problem_text, images)
