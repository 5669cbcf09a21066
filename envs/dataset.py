"""The prompt-data parquet format, its up-front checks, and the seam through which an env module
provides its own.

A prompt file is what slime's ``--prompt-data`` and the local trainer read: one row per prompt,
three columns (names configurable per format, defaults shown):

- ``problem`` (string): the question the model is asked, with one ``<image>`` placeholder per image;
- ``answer`` (string): the label the env grades against (``sample.label``);
- ``images`` (list<string>): image file paths (relative to the parquet's directory, or absolute) or
  ``data:image/png;base64,...`` URIs. Never raw bytes: slime silently drops them.

:class:`ParquetDataset` owns reading, writing and validating such files: ``validate_parquet``
reports every bad row of a file at once (a cell of the wrong type, an empty problem, a
placeholder/image count mismatch, an unusable label, an image that is missing, too large or
corrupt), so a dataset fails before training, not mid-run.

An env module chooses its format with an optional module-level ``DATASET`` (like ``TOOLS`` and
``build_prompt_messages``): a :class:`ParquetDataset`, or an instance of a subclass that overrides
:meth:`ParquetDataset.label_problem` (what makes a label usable: Geometry3K's must parse as a
number) or reads other column names. A module without one gets :data:`DEFAULT_DATASET`, whose
labels need only be non-empty. :func:`dataset_of` is the one lookup every entry point uses.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

from PIL import Image

from envs.images import ImageLoadError, check_image, describe, encode_png, load_image, to_data_uri

__all__ = [
    "DEFAULT_DATASET",
    "IMAGE_MODES",
    "IMAGE_PLACEHOLDER",
    "DatasetError",
    "DatasetRow",
    "ParquetDataset",
    "RowImageError",
    "RowProblem",
    "SupportsRecord",
    "dataset_of",
    "format_row_problems",
    "load_row_images",
]

IMAGE_PLACEHOLDER = "<image>"
IMAGE_MODES: tuple[str, ...] = ("files", "data_uri")
_URL_SCHEMES = ("http://", "https://")
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class SupportsRecord(Protocol):
    """What :meth:`ParquetDataset.write` needs from a record (``envs.geo3k.sample_data.GeoProblem`` is one)."""

    @property
    def problem(self) -> str: ...

    @property
    def answer(self) -> str: ...

    @property
    def images(self) -> Sequence[Image.Image]: ...


@dataclass(frozen=True)
class DatasetRow:
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


def load_row_images(row: DatasetRow) -> list[Image.Image]:
    """The row's images, decoded, in placeholder order."""
    images = []
    for k, ref in enumerate(row.images):
        try:
            images.append(load_image(ref))
        except ImageLoadError as error:
            raise RowImageError(f"row {row.index} image {k}: {error}") from error
    return images


@dataclass(frozen=True)
class ParquetDataset:
    """A prompt-file format: its column names, what makes a label usable, and where to get a file.

    Subclass and override :meth:`label_problem` for a stricter label check; pass other column names
    for data whose columns are called otherwise (slime is given the same names as its
    ``--input-key``, ``--label-key`` and ``--multimodal-keys``)."""

    problem_column: str = "problem"
    answer_column: str = "answer"
    images_column: str = "images"
    #: Where a usable file comes from, quoted by the errors for a missing or unreadable one.
    how_to_write: str = "envs.dataset.ParquetDataset.write (columns problem, answer, images)"

    @property
    def columns(self) -> tuple[str, str, str]:
        return (self.problem_column, self.answer_column, self.images_column)

    @property
    def parquet_schema(self) -> Any:
        import pyarrow as pa

        return pa.schema(
            [
                pa.field(self.problem_column, pa.string()),
                pa.field(self.answer_column, pa.string()),
                pa.field(self.images_column, pa.list_(pa.string())),
            ]
        )

    # -----------------------------------------------------------------------------------------------------
    # What an env's format decides

    def label_problem(self, answer: str) -> str | None:
        """Why ``answer`` cannot serve as a label, or None when it can. Any non-empty string can,
        by default; a format whose env grades labels some way (as numbers, as one of a set) says so
        here, so that a label the env could never match fails before training."""
        if not isinstance(answer, str):
            return f"answer is a {type(answer).__name__}, not a string"
        if not answer.strip():
            return "answer is empty; every row needs the exact answer as its label"
        return None

    def load_images(self, row: DatasetRow) -> list[Image.Image]:
        """The row's images, decoded, in placeholder order (:func:`load_row_images`)."""
        return load_row_images(row)

    # -----------------------------------------------------------------------------------------------------
    # Writing

    def write(
        self,
        records: Iterable[SupportsRecord],
        out_dir: str | Path,
        *,
        image_mode: Literal["files", "data_uri"] = "files",
        split_name: str = "train",
        absolute_paths: bool = False,
    ) -> Path:
        """Write ``out_dir/<split_name>.parquet``; return its path.

        ``image_mode="files"`` saves each image as ``out_dir/images/<split_name>_<row>_<k>.png`` and
        stores its path relative to ``out_dir`` (the directory can be moved as a whole), or absolute
        with ``absolute_paths``: slime resolves a relative path against its own working directory
        (the slime checkout), so files meant for slime need absolute paths or
        ``image_mode="data_uri"``, which embeds the PNG in the row as a ``data:image/png;base64,...`` URI.
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

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
                    f"record {row} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(images)} "
                    "image(s); each placeholder is replaced in order by the next image, so the counts must match"
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
        table = pa.table(
            dict(zip(self.columns, (problems, answers, image_column), strict=True)),
            schema=self.parquet_schema,
        )
        path = out_dir / f"{split_name}.parquet"
        pq.write_table(table, path)
        return path

    # -----------------------------------------------------------------------------------------------------
    # Reading

    def read(self, path: str | Path) -> list[DatasetRow]:
        """Rows of a parquet file, with relative image paths resolved against the file's directory.

        Raises DatasetError listing every cell of the wrong type (a number where a string belongs, a
        string where a list of images belongs, raw bytes): such a row cannot even be represented.
        The contents are not checked; :meth:`validate_rows` (or :meth:`validate_parquet` for both)
        does that."""
        path = Path(path).resolve()
        rows, problems = self._read_rows(path)
        if problems:
            raise DatasetError(
                f"{path} has {len({p.index for p in problems})} row(s) with cells of the wrong type:\n"
                f"{format_row_problems(problems)}\nThe columns are {self.problem_column} (string), "
                f"{self.answer_column} (string) and {self.images_column} (list of strings: file paths or "
                f"data URIs; slime drops raw bytes); rewrite the file with {self.how_to_write}",
                problems,
            )
        return rows

    def validate_parquet(
        self, path: str | Path, *, check_images: bool = True, full_decode: bool = False
    ) -> list[RowProblem]:
        """Every problem of every row of a parquet file, in row order (empty: the file is usable).

        Cells of the wrong type, placeholder/image count mismatches, empty problems, unusable labels
        (:meth:`label_problem`), and images that are missing, oversized
        (``envs.images.MAX_IMAGE_PIXELS``) or corrupt (see :meth:`validate_rows`). A file that
        cannot be read at all (no such file, not a parquet file, a missing column) raises instead:
        there are no rows to report on."""
        return self.read_and_validate(path, check_images=check_images, full_decode=full_decode)[1]

    def read_and_validate(
        self, path: str | Path, *, check_images: bool = True, full_decode: bool = False
    ) -> tuple[list[DatasetRow], list[RowProblem]]:
        """The rows of a parquet file and every problem found in them (:meth:`validate_parquet`). A
        row with a cell of the wrong type is still in the list (that cell read as empty) and
        reported once."""
        rows, problems = self._read_rows(Path(path).resolve())
        typed = {(p.index, p.column) for p in problems}
        problems += self.validate_rows(rows, check_images=check_images, full_decode=full_decode, skip=typed)
        return rows, self._in_row_order(problems)

    def _in_row_order(self, problems: list[RowProblem]) -> list[RowProblem]:
        order = {column: k for k, column in enumerate(self.columns)}
        return sorted(problems, key=lambda p: (p.index, order.get(p.column, len(order))))

    def _read_rows(self, path: Path) -> tuple[list[DatasetRow], list[RowProblem]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not path.is_file():
            raise FileNotFoundError(f"no parquet file at {path}; write one with {self.how_to_write}")
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as error:
            raise DatasetError(
                f"{path} is not a readable parquet file ({type(error).__name__}: {error})"
            ) from error
        missing = [name for name in self.columns if name not in table.column_names]
        if missing:
            raise DatasetError(
                f"{path} lacks column(s) {', '.join(missing)} (it has {', '.join(table.column_names)}); "
                f"this env's prompt data has the columns {', '.join(self.columns)}"
            )
        columns = [table.column(name).to_pylist() for name in self.columns]
        rows: list[DatasetRow] = []
        problems: list[RowProblem] = []
        for index, (problem, answer, images) in enumerate(zip(*columns, strict=True)):
            problem = self._string_cell(index, self.problem_column, problem, problems)
            answer = self._string_cell(index, self.answer_column, answer, problems)
            refs = self._image_refs(index, images, path, problems)
            rows.append(DatasetRow(index=index, problem=problem, answer=answer, images=refs, source=path))
        return rows, problems

    def _string_cell(self, index: int, column: str, value: Any, problems: list[RowProblem]) -> str:
        """The cell as a string; None reads as empty (reported by validation). Any other non-string
        is a problem: str() would turn a list into its Python repr and a number into a label that
        never went through the file's own writer."""
        if value is None or isinstance(value, str):
            return value or ""
        problems.append(
            RowProblem(
                index,
                column,
                f"{column} is {_a(type(value).__name__)} ({describe(repr(value))}), not a string; "
                + (
                    "write the label as a string, e.g. '5' or '2\\sqrt{3}'"
                    if column == self.answer_column
                    else "write the question as one string with an <image> placeholder per image"
                ),
            )
        )
        return ""

    def _image_refs(self, index: int, images: Any, parquet: Path, problems: list[RowProblem]) -> list[str]:
        column = self.images_column
        if images is None:
            return []
        if not isinstance(images, list):
            problems.append(
                RowProblem(
                    index,
                    column,
                    f"{column} is {_a(type(images).__name__)} ({describe(repr(images))}), not a list of "
                    "strings; store a list even for one image, e.g. ['images/0.png']",
                )
            )
            return []
        refs = []
        for k, item in enumerate(images):
            if not isinstance(item, str):
                problems.append(
                    RowProblem(
                        index,
                        column,
                        f"image {k} is {_a(type(item).__name__)}, not a string; the {column} column must "
                        "hold file paths or data URIs (slime drops raw bytes)",
                    )
                )
                return []
            refs.append(_image_ref(item, parquet))
        return refs

    # -----------------------------------------------------------------------------------------------------
    # Validation

    def validate_rows(
        self,
        rows: Sequence[DatasetRow],
        *,
        check_images: bool = True,
        full_decode: bool = False,
        skip: Collection[tuple[int, str]] = (),
    ) -> list[RowProblem]:
        """Every problem found in ``rows``, in row order; an empty list means the rows are usable.

        Images are checked with ``envs.images.check_image`` (header, pixel limit, and every PNG
        chunk's CRC, without decoding pixels), or decoded in full with ``full_decode``: a PNG whose
        chunks are intact but whose compressed stream was written broken passes only the first.
        ``skip`` holds (row, column) pairs already reported (a cell of the wrong type) that are not
        checked again."""
        check = load_image if full_decode else check_image
        problems: list[RowProblem] = []
        for row in rows:
            if (row.index, self.problem_column) not in skip:
                problems.extend(self._problem_text_problems(row))
            if (row.index, self.answer_column) not in skip:
                reason = self.label_problem(row.answer)
                if reason is not None:
                    problems.append(RowProblem(row.index, self.answer_column, reason))
            if check_images and (row.index, self.images_column) not in skip:
                for k, ref in enumerate(row.images):
                    try:
                        check(ref)
                    except ImageLoadError as error:
                        problems.append(RowProblem(row.index, self.images_column, f"image {k}: {error}"))
        return problems

    def _problem_text_problems(self, row: DatasetRow) -> list[RowProblem]:
        column = self.problem_column
        if not isinstance(row.problem, str):
            return [
                RowProblem(row.index, column, f"{column} is a {type(row.problem).__name__}, not a string")
            ]
        if not row.problem.replace(IMAGE_PLACEHOLDER, "").strip():
            return [
                RowProblem(
                    row.index,
                    column,
                    f"{column} is empty"
                    + (" apart from its <image> placeholder(s)" if row.problem.strip() else "")
                    + "; every row needs the question text the model is asked",
                )
            ]
        placeholders = row.problem.count(IMAGE_PLACEHOLDER)
        if placeholders != len(row.images):
            return [
                RowProblem(
                    row.index,
                    column,
                    f"{column} has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but the row has "
                    f"{len(row.images)} image(s); each placeholder is replaced in order by the next image, "
                    "so the counts must match",
                )
            ]
        return []


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


def _image_ref(item: str, parquet: Path) -> str:
    if item.startswith("data:") or item.startswith(_URL_SCHEMES) or Path(item).is_absolute():
        return item
    return str(parquet.parent / item)


#: The format of an env module that declares no ``DATASET``.
DEFAULT_DATASET = ParquetDataset()


def dataset_of(env_module: ModuleType) -> ParquetDataset:
    """The env module's ``DATASET`` when it has one, else :data:`DEFAULT_DATASET`."""
    dataset = getattr(env_module, "DATASET", None)
    if dataset is None:
        return DEFAULT_DATASET
    if not isinstance(dataset, ParquetDataset):
        raise TypeError(
            f"{env_module.__name__}.DATASET must be an envs.dataset.ParquetDataset (or an instance of a "
            f"subclass), got {type(dataset).__name__}; set DATASET = ParquetDataset(...) or leave it out "
            "for the default format"
        )
    return dataset
