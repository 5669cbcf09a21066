"""Turning a published Geometry3K dataset into local, validated geo3k parquet files.

This module owns the data preparation step between a dataset on the Hugging Face Hub and
``--prompt-data``:

- **sources**: ``VeraIsHere/geo3k_imgurl_processed`` (images given as http(s) URLs) and
  ``hiyouga/geometry3k`` (images embedded as ``{"bytes", "path"}`` structs, bare questions) are
  downloaded with huggingface_hub; local parquet files are read where they are. Split names come
  from file names (``train.parquet``, ``test-00000-of-00001.parquet``).
- **the image store**: one directory of image files named by a hash (of the URL for fetched images,
  of the bytes for embedded ones), so a rerun finds what an earlier run stored and skips it. A file
  appears under its final name only once complete (written to a hidden temporary name, then renamed).
- **fetching** every distinct URL once, concurrently (aiohttp, at most ``concurrency`` requests at a
  time), with a per-request timeout, bounded retries with exponential backoff on transient failures
  (timeouts, connection errors, HTTP 408/429/5xx) and content checks (size cap while streaming, the
  body must decode as an image with PIL, a pixel cap). A failure is a reason in the report, never an
  exception that stops the run.
- **conversion**: rows of the original schema get this project's instruction block in front of the
  question, and their embedded images are saved as PNG files; every image reference is rewritten to
  a local path (absolute by default: slime resolves relative paths against its own working directory).
- **validation** of every row with ``envs.geo3k.dataset.validate_rows`` (one image per ``<image>``,
  an answer math-verify parses, images that decode), reported before anything is written; bad rows
  are kept (and listed), dropped, or make the run fail, as the caller chooses.

The output format is ``envs.geo3k.dataset``'s; the command line is
``examples/geo3k_vlm_multi_turn/prepare_data.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from envs.geo3k.dataset import (
    COLUMNS,
    IMAGE_PLACEHOLDER,
    PARQUET_SCHEMA,
    Geo3kRow,
    RowProblem,
    validate_rows,
)
from envs.geo3k.sample_data import INSTRUCTION_BLOCK, format_problem
from envs.images import MAX_IMAGE_PIXELS, describe, encode_png

#: ``--source`` names and the dataset repositories they download.
DATASET_SOURCES: dict[str, str] = {
    "processed": "VeraIsHere/geo3k_imgurl_processed",
    "original": "hiyouga/geometry3k",
}
BAD_ROW_POLICIES: tuple[str, ...] = ("report", "drop", "strict")
SourceSchema = Literal["processed", "original"]
BadRowPolicy = Literal["report", "drop", "strict"]

_URL_SCHEMES = ("http://", "https://")
_TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_SHARD_SUFFIX = re.compile(r"(?P<split>.+?)-\d+-of-\d+")
_KEY_CHARS = 32  # hex digits of sha256 in store file names: 128 bits, collisions are not a concern
_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "MPO": ".jpg", "GIF": ".gif", "WEBP": ".webp", "BMP": ".bmp"}
# Modes PNG stores as they are; anything else (CMYK, YCbCr, ...) is converted to RGB first.
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16"})
_CHUNK_BYTES = 64 * 1024


class PrepareError(ValueError):
    """The source cannot be prepared at all (missing columns, no parquet files, unknown source)."""


class ImageCheckError(ValueError):
    """Bytes that are not an acceptable image: too large, too many pixels, or not an image."""


# ---------------------------------------------------------------------------------------------------------
# Limits and image checks


@dataclass(frozen=True)
class FetchLimits:
    """How images are fetched and what an acceptable image is."""

    timeout_s: float = 30.0  # per request, connect to last byte
    retries: int = 3  # extra attempts after a transient failure
    backoff_s: float = 0.5  # wait before retry r is backoff_s * 2**(r-1), at most max_backoff_s
    max_backoff_s: float = 8.0
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = MAX_IMAGE_PIXELS
    concurrency: int = 16

    def __post_init__(self) -> None:
        positive = {
            "timeout_s": self.timeout_s,
            "max_bytes": self.max_bytes,
            "max_pixels": self.max_pixels,
            "concurrency": self.concurrency,
        }
        for name, value in positive.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"FetchLimits.{name} must be a positive number, got {value!r}")
        for name, value in {
            "retries": self.retries,
            "backoff_s": self.backoff_s,
            "max_backoff_s": self.max_backoff_s,
        }.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"FetchLimits.{name} must be >= 0, got {value!r}")

    def backoff(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        return min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))


def decode_image_bytes(data: bytes, limits: FetchLimits) -> Image.Image:
    """The decoded image, or ImageCheckError saying which limit or check it failed."""
    if len(data) > limits.max_bytes:
        raise ImageCheckError(
            f"{len(data)} bytes, over the limit of {limits.max_bytes} bytes (raise --max-image-bytes)"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                raise ImageCheckError(
                    f"{width}x{height} = {width * height} pixels, over the limit of {limits.max_pixels} "
                    "(raise --max-image-pixels)"
                )
            image.load()
            return image
    except ImageCheckError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageCheckError(f"too many pixels for PIL to decode safely ({error})") from error
    except Image.UnidentifiedImageError as error:
        raise ImageCheckError(
            f"not an image: PIL does not recognize its format (the body starts {data[:32]!r})"
        ) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageCheckError(
            f"not a decodable image ({type(error).__name__}: {error}; the body starts {data[:32]!r})"
        ) from error


def image_extension(image_format: str | None) -> str:
    if not image_format:
        return ".img"
    return _EXTENSIONS.get(image_format.upper(), "." + image_format.lower())


# ---------------------------------------------------------------------------------------------------------
# The image store


def url_key(url: str) -> str:
    return hashlib.sha256(url.encode("utf-8")).hexdigest()[:_KEY_CHARS]


def bytes_key(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:_KEY_CHARS]


class ImageStore:
    """A directory of images named ``<key><extension>``; a key is a URL hash or a content hash.

    Writes go to a hidden ``.<key>.*.part`` file that is renamed into place when complete, so a
    killed run leaves no truncated image under a real name and the next run simply fetches again.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def find(self, key: str) -> Path | None:
        if not self.root.is_dir():
            return None
        for path in sorted(self.root.glob(f"{key}.*")):
            if path.is_file():
                return path
        return None

    def put(self, key: str, data: bytes, extension: str) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"{key}{extension}"
        temporary: Path | None = None
        try:
            with tempfile.NamedTemporaryFile(
                dir=self.root, prefix=f".{key}.", suffix=".part", delete=False
            ) as handle:
                temporary = Path(handle.name)
                handle.write(data)
            os.replace(temporary, final)
        except BaseException:
            if temporary is not None:
                temporary.unlink(missing_ok=True)
            raise
        return final

    def partial_files(self) -> list[Path]:
        return sorted(self.root.glob(".*.part")) if self.root.is_dir() else []


# ---------------------------------------------------------------------------------------------------------
# Fetching


@dataclass(frozen=True)
class FetchResult:
    url: str
    status: Literal["fetched", "present", "failed"]
    path: Path | None = None
    attempts: int = 0  # HTTP requests made (0 when the image was already in the store)
    reason: str | None = None


@dataclass
class FetchSummary:
    results: dict[str, FetchResult] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for result in self.results.values() if result.status == status)

    @property
    def fetched(self) -> int:
        return self.count("fetched")

    @property
    def present(self) -> int:
        return self.count("present")

    @property
    def failures(self) -> list[FetchResult]:
        return [result for result in self.results.values() if result.status == "failed"]


class _Transient(Exception):
    """A failure worth retrying (timeout, connection, 5xx)."""


class _Permanent(Exception):
    """A failure that retrying will not fix (4xx, oversized, not an image)."""


async def _download(session: aiohttp.ClientSession, url: str, limits: FetchLimits) -> bytes:
    timeout = aiohttp.ClientTimeout(total=limits.timeout_s)
    try:
        async with session.get(url, timeout=timeout) as response:
            if response.status != 200:
                reason = f"HTTP {response.status} {response.reason or ''}".rstrip()
                raise (_Transient if response.status in _TRANSIENT_HTTP else _Permanent)(reason)
            declared = response.content_length
            if declared is not None and declared > limits.max_bytes:
                raise _Permanent(
                    f"Content-Length {declared} is over the limit of {limits.max_bytes} bytes "
                    "(raise --max-image-bytes)"
                )
            body = bytearray()
            async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
                body.extend(chunk)
                if len(body) > limits.max_bytes:
                    raise _Permanent(
                        f"body is over the limit of {limits.max_bytes} bytes (raise --max-image-bytes)"
                    )
            return bytes(body)
    except asyncio.TimeoutError as error:
        raise _Transient(f"timed out after {limits.timeout_s:g} s") from error
    except aiohttp.ClientError as error:
        raise _Transient(f"{type(error).__name__}: {error}") from error


async def _fetch_one(
    session: aiohttp.ClientSession, url: str, store: ImageStore, limits: FetchLimits, slots: asyncio.Semaphore
) -> FetchResult:
    key = url_key(url)
    existing = store.find(key)
    if existing is not None:
        return FetchResult(url, "present", existing)
    attempts = 0
    while True:
        attempts += 1
        try:
            async with slots:
                data = await _download(session, url, limits)
            image = await asyncio.to_thread(decode_image_bytes, data, limits)
            path = await asyncio.to_thread(store.put, key, data, image_extension(image.format))
            return FetchResult(url, "fetched", path, attempts)
        except ImageCheckError as error:
            return FetchResult(url, "failed", None, attempts, str(error))
        except _Permanent as error:
            return FetchResult(url, "failed", None, attempts, str(error))
        except _Transient as error:
            if attempts > limits.retries:
                plural = "s" if attempts > 1 else ""
                return FetchResult(url, "failed", None, attempts, f"{error} ({attempts} attempt{plural})")
            await asyncio.sleep(limits.backoff(attempts))


async def fetch_images_async(
    urls: Iterable[str],
    store: ImageStore,
    limits: FetchLimits | None = None,
    *,
    progress: bool = False,
    description: str = "images",
) -> FetchSummary:
    """Fetch every distinct URL into ``store`` (skipping those already there); never raises for a URL."""
    limits = limits or FetchLimits()
    unique = list(dict.fromkeys(urls))
    summary = FetchSummary()
    started = time.perf_counter()
    if not unique:
        return summary
    slots = asyncio.Semaphore(limits.concurrency)
    connector = aiohttp.TCPConnector(limit=limits.concurrency)
    bar = tqdm(total=len(unique), desc=description, unit="img", disable=not progress)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:

            async def run(url: str) -> FetchResult:
                result = await _fetch_one(session, url, store, limits, slots)
                bar.update(1)
                return result

            results = await asyncio.gather(*(run(url) for url in unique))
    finally:
        bar.close()
    summary.results = {result.url: result for result in results}
    summary.elapsed_s = time.perf_counter() - started
    return summary


def fetch_images(
    urls: Iterable[str], store: ImageStore, limits: FetchLimits | None = None, *, progress: bool = False
) -> FetchSummary:
    """``fetch_images_async`` for callers without an event loop."""
    return asyncio.run(fetch_images_async(urls, store, limits, progress=progress))


# ---------------------------------------------------------------------------------------------------------
# Sources


Downloader = Callable[..., Any]


def download_dataset(repo_id: str, local_dir: str | Path, *, downloader: Downloader | None = None) -> Path:
    """Download a dataset repository's parquet files into ``local_dir`` (what
    ``hf download --repo-type dataset REPO --local-dir DIR`` does); returns ``local_dir``.

    ``downloader`` defaults to ``huggingface_hub.snapshot_download`` and is called with
    ``repo_id``, ``repo_type="dataset"``, ``local_dir`` and ``allow_patterns``. Files already
    there and unchanged are not downloaded again.
    """
    if downloader is None:
        from huggingface_hub import snapshot_download

        downloader = snapshot_download
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    try:
        downloader(
            repo_id=repo_id, repo_type="dataset", local_dir=str(local_dir), allow_patterns=["*.parquet"]
        )
    except Exception as error:  # offline, no such host, rate limit: the hub's own errors are many and long
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "no message"
        raise PrepareError(
            f"downloading {repo_id} into {local_dir} failed ({type(error).__name__}: {first_line}). Check the "
            "network (HF_HUB_OFFLINE must be unset), or download the parquet files elsewhere and pass their "
            "directory as --source DIR"
        ) from error
    return local_dir


def resolve_source(
    source: str, raw_dir: str | Path, *, downloader: Downloader | None = None
) -> tuple[Path, str | None]:
    """A local parquet file or directory for ``source`` and the repository it came from (None: local).

    ``source`` is a name from ``DATASET_SOURCES`` (downloaded into ``raw_dir/<repo name>``) or a
    parquet file or directory that already exists.
    """
    if source in DATASET_SOURCES:
        repo_id = DATASET_SOURCES[source]
        return download_dataset(
            repo_id, Path(raw_dir) / repo_id.split("/")[-1], downloader=downloader
        ), repo_id
    path = Path(source)
    if not path.exists():
        raise PrepareError(
            f"source {source!r} is neither one of {', '.join(DATASET_SOURCES)} nor an existing parquet "
            "file or directory; pass --source processed, --source original, or a path to parquet files"
        )
    return path, None


def split_name(path: Path) -> str:
    """``train.parquet`` -> train, ``test-00000-of-00001.parquet`` -> test."""
    match = _SHARD_SUFFIX.fullmatch(path.stem)
    return match.group("split") if match else path.stem


def find_parquet_splits(path: str | Path) -> dict[str, list[Path]]:
    """Parquet files under ``path`` (or the file itself) grouped by split name, shards in name order.

    Hidden directories (huggingface_hub's ``.cache``) are skipped.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    else:
        files = sorted(
            p
            for p in path.rglob("*.parquet")
            if not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    if not files:
        raise PrepareError(
            f"no .parquet files under {path}; point --source at a directory holding the splits"
        )
    splits: dict[str, list[Path]] = {}
    for file in files:
        splits.setdefault(split_name(file), []).append(file.resolve())
    return splits


# ---------------------------------------------------------------------------------------------------------
# Reading source rows


@dataclass
class SourceRow:
    """One row as read: the image items are still what the source holds (URL, path, bytes, struct)."""

    index: int  # position in the split (shards concatenated in name order)
    problem: str
    answer: str
    images: list[Any]
    source: Path
    # Cells of a type no conversion makes sense of (a list as the problem): reported, never written.
    cell_problems: list[RowProblem] = field(default_factory=list)


def detect_schema(table: pa.Table) -> SourceSchema:
    """The schema of a source file: images embedded (structs or binary) mean the original's."""
    kind = table.schema.field("images").type
    item = kind.value_type if pa.types.is_list(kind) or pa.types.is_large_list(kind) else kind
    embedded = pa.types.is_struct(item) or pa.types.is_binary(item) or pa.types.is_large_binary(item)
    return "original" if embedded else "processed"


def read_source_rows(
    files: Sequence[Path], *, limit: int | None = None
) -> tuple[list[SourceRow], SourceSchema]:
    """The rows of one split's files, and whether they are in the original or processed schema."""
    rows: list[SourceRow] = []
    schema: SourceSchema | None = None
    for file in files:
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as error:
            raise PrepareError(
                f"{file} is not a readable parquet file ({type(error).__name__}: {error})"
            ) from error
        missing = [name for name in COLUMNS if name not in table.column_names]
        if missing:
            raise PrepareError(
                f"{file} lacks column(s) {', '.join(missing)} (it has {', '.join(table.column_names)}); "
                f"a Geometry3K file needs {', '.join(COLUMNS)}, as in {DATASET_SOURCES['processed']} "
                f"or {DATASET_SOURCES['original']}"
            )
        file_schema = detect_schema(table)
        if schema is not None and file_schema != schema:
            raise PrepareError(
                f"{file} stores images as {file_schema} but earlier shards of the split as {schema}; "
                "put the two kinds of files in separate directories"
            )
        schema = file_schema
        columns = {name: table.column(name).to_pylist() for name in COLUMNS}
        for problem, answer, images in zip(*columns.values(), strict=True):
            if limit is not None and len(rows) >= limit:
                break
            if images is None:
                items: list[Any] = []
            elif isinstance(images, (list, tuple)):
                items = list(images)
            else:
                items = [images]  # a single image in place of a list
            index = len(rows)
            cell_problems: list[RowProblem] = []
            rows.append(
                SourceRow(
                    index=index,
                    problem=_text_cell(index, "problem", problem, cell_problems),
                    answer=_text_cell(index, "answer", answer, cell_problems),
                    images=items,
                    source=file,
                    cell_problems=cell_problems,
                )
            )
    assert schema is not None
    return rows, schema


def _text_cell(index: int, column: str, value: Any, problems: list[RowProblem]) -> str:
    """A problem or answer cell as text. A number is written as its decimal form (a label such as 5
    stored as an integer); anything else that is not a string (a list, a struct) is a bad row: its
    Python repr is no question and no label."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    problems.append(
        RowProblem(
            index,
            column,
            f"{column} is a {type(value).__name__} ({describe(repr(value))}), not a string; the source's "
            f"{column} column must hold text",
        )
    )
    return ""


def convert_problem(problem: str) -> str:
    """The original dataset's question with this project's instruction block in front (once)."""
    if problem.startswith(INSTRUCTION_BLOCK):
        return problem
    return format_problem(problem)


# ---------------------------------------------------------------------------------------------------------
# Preparing a split


@dataclass
class SplitReport:
    """What preparing one split found and did."""

    split: str
    sources: list[Path]
    schema: SourceSchema
    rows: int = 0
    images: int = 0  # image references in the rows
    urls: int = 0  # distinct URLs among them
    fetched: int = 0  # URLs downloaded by this run
    embedded: int = 0  # embedded images saved as PNG by this run
    present: int = 0  # images already in the store from an earlier run
    failures: list[FetchResult] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    written: int = 0
    output: Path | None = None
    elapsed_s: float = 0.0

    @property
    def bad_rows(self) -> list[int]:
        return sorted({problem.index for problem in self.problems})


@dataclass
class PreparedSplit:
    """Rows with local image references (absolute), ready to validate and write."""

    report: SplitReport
    rows: list[Geo3kRow]


def _embed(
    item: Any, store: ImageStore, limits: FetchLimits, report: SplitReport, cache: dict[str, Path]
) -> Path:
    data = item.get("bytes") if isinstance(item, dict) else item
    key = bytes_key(data)
    if key in cache:
        return cache[key]
    existing = store.find(key)
    if existing is not None:
        report.present += 1
    else:
        image = decode_image_bytes(data, limits)
        if image.mode not in _PNG_MODES:
            image = image.convert("RGB")
        existing = store.put(key, encode_png(image), ".png")
        report.embedded += 1
    cache[key] = existing
    return existing


def _resolve_item(
    item: Any,
    row: SourceRow,
    k: int,
    *,
    store: ImageStore,
    limits: FetchLimits,
    fetched: FetchSummary,
    report: SplitReport,
    cache: dict[str, Path],
) -> str | RowProblem:
    """A local reference (absolute path or data URI) for one image item, or why there is none."""
    if isinstance(item, dict) and not item.get("bytes"):
        item = item.get("path")  # a struct without bytes still names where the image is
    if isinstance(item, (bytes, bytearray, dict)):
        try:
            return str(_embed(item, store, limits, report, cache))
        except ImageCheckError as error:
            return RowProblem(row.index, "images", f"image {k}: embedded image rejected: {error}")
    if not isinstance(item, str) or not item:
        return RowProblem(
            row.index, "images", f"image {k} is {item!r}; each image must be a URL, a path or embedded bytes"
        )
    if item.startswith(_URL_SCHEMES):
        result = fetched.results[item]
        if result.path is None:
            return RowProblem(row.index, "images", f"image {k}: fetching {item} failed: {result.reason}")
        return str(result.path)
    if item.startswith("data:"):
        return item
    path = Path(item)
    return str(path if path.is_absolute() else (row.source.parent / path).resolve())


async def prepare_split_async(
    split: str,
    files: Sequence[Path],
    store: ImageStore,
    limits: FetchLimits | None = None,
    *,
    limit: int | None = None,
    progress: bool = False,
) -> PreparedSplit:
    """Read, convert, fetch and validate one split. Bad rows are reported, never raised."""
    limits = limits or FetchLimits()
    started = time.perf_counter()
    source_rows, schema = read_source_rows(files, limit=limit)
    report = SplitReport(split=split, sources=list(files), schema=schema, rows=len(source_rows))
    report.images = sum(len(row.images) for row in source_rows)
    urls = [
        item
        for row in source_rows
        for item in row.images
        if isinstance(item, str) and item.startswith(_URL_SCHEMES)
    ]
    fetched = await fetch_images_async(urls, store, limits, progress=progress, description=f"{split} images")
    report.urls = len(fetched.results)
    report.fetched = fetched.fetched
    report.present += fetched.present
    report.failures = fetched.failures

    rows: list[Geo3kRow] = []
    unresolved: list[RowProblem] = []
    cache: dict[str, Path] = {}
    for source_row in tqdm(source_rows, desc=f"{split} rows", unit="row", disable=not progress):
        refs: list[str] = []
        for k, item in enumerate(source_row.images):
            resolved = await asyncio.to_thread(
                _resolve_item,
                item,
                source_row,
                k,
                store=store,
                limits=limits,
                fetched=fetched,
                report=report,
                cache=cache,
            )
            if isinstance(resolved, RowProblem):
                unresolved.append(resolved)
                refs.append(_source_reference(item))
            else:
                refs.append(resolved)
        unresolved.extend(source_row.cell_problems)
        problem = source_row.problem
        # An empty question stays empty, for validation to report: with the instruction block in
        # front it would pass as a problem.
        if schema == "original" and problem.replace(IMAGE_PLACEHOLDER, "").strip():
            problem = convert_problem(problem)
        rows.append(Geo3kRow(source_row.index, problem, source_row.answer, refs, source_row.source))

    report.problems = _validate(rows, unresolved)
    report.elapsed_s = time.perf_counter() - started
    return PreparedSplit(report, rows)


def _source_reference(item: Any) -> str:
    """What a bad row's unusable image is written as: the source's own reference, where it has one."""
    if isinstance(item, dict):
        item = item.get("path")
    return item if isinstance(item, str) else ""


def _validate(rows: Sequence[Geo3kRow], unresolved: Sequence[RowProblem]) -> list[RowProblem]:
    """``validate_rows`` on every row, images decoded in full (preparation runs once, and a file it
    writes should not fail later). A cell already reported (an image that could not be obtained, a
    problem that is no string) is not checked again: that would only repeat it, less clearly."""
    skip = {(problem.index, problem.column) for problem in unresolved}
    problems = [*unresolved, *validate_rows(rows, full_decode=True, skip=skip)]
    order = {"problem": 0, "answer": 1, "images": 2}
    return sorted(problems, key=lambda p: (p.index, order.get(p.column, 3), p.message))


def write_rows(rows: Sequence[Geo3kRow], path: str | Path, *, absolute_paths: bool = True) -> Path:
    """Write rows as a geo3k parquet file (atomically: a reader never sees half a file).

    With ``absolute_paths=False`` image paths are stored relative to the file's directory, which
    ``read_geo3k_parquet`` resolves; slime needs absolute ones.
    """
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [[_output_ref(ref, path.parent, absolute_paths) for ref in row.images] for row in rows]
    table = pa.table(
        {"problem": [row.problem for row in rows], "answer": [row.answer for row in rows], "images": images},
        schema=PARQUET_SCHEMA,
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        pq.write_table(table, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _output_ref(ref: str, directory: Path, absolute_paths: bool) -> str:
    if absolute_paths or not Path(ref).is_absolute():
        return ref  # data URIs, and the unresolved references of bad rows, are written as they are
    return os.path.relpath(ref, directory)


# ---------------------------------------------------------------------------------------------------------
# A whole dataset


@dataclass(frozen=True)
class PrepareOptions:
    out_dir: Path
    image_dir: Path | None = None  # default: out_dir / "images"
    limits: FetchLimits = field(default_factory=FetchLimits)
    absolute_paths: bool = True
    bad_rows: BadRowPolicy = "report"
    splits: tuple[str, ...] | None = None  # None: every split found
    limit: int | None = None  # rows per split, for a quick trial
    progress: bool = False

    def __post_init__(self) -> None:
        if self.bad_rows not in BAD_ROW_POLICIES:
            raise ValueError(f"bad_rows must be one of {', '.join(BAD_ROW_POLICIES)}, got {self.bad_rows!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {self.limit}")

    @property
    def store_dir(self) -> Path:
        return Path(self.image_dir) if self.image_dir is not None else Path(self.out_dir) / "images"


async def prepare_dataset_async(source: str | Path, options: PrepareOptions) -> list[SplitReport]:
    """Prepare every split of a local source (a parquet file or a directory of them).

    Every split is read, converted, fetched and validated before anything is written, so that with
    ``bad_rows="strict"`` a dataset with a bad row leaves no output at all (``output`` stays None).
    With ``"drop"`` bad rows are left out of the written files; with ``"report"`` they are written
    and listed.
    """
    found = find_parquet_splits(source)
    wanted = list(found) if options.splits is None else list(options.splits)
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise PrepareError(
            f"split(s) {', '.join(unknown)} not found in {source}; it has {', '.join(sorted(found))}"
        )
    store = ImageStore(options.store_dir)
    prepared = [
        await prepare_split_async(
            name, found[name], store, options.limits, limit=options.limit, progress=options.progress
        )
        for name in wanted
    ]
    if options.bad_rows == "strict" and any(split.report.problems for split in prepared):
        return [split.report for split in prepared]
    for split in prepared:
        report = split.report
        rows = split.rows
        if options.bad_rows == "drop":
            bad = set(report.bad_rows)
            report.dropped = sorted(bad)
            rows = [row for row in rows if row.index not in bad]
        report.output = write_rows(
            rows, Path(options.out_dir) / f"{report.split}.parquet", absolute_paths=options.absolute_paths
        )
        report.written = len(rows)
    return [split.report for split in prepared]


def prepare_dataset(source: str | Path, options: PrepareOptions) -> list[SplitReport]:
    """``prepare_dataset_async`` for callers without an event loop."""
    return asyncio.run(prepare_dataset_async(source, options))


# ---------------------------------------------------------------------------------------------------------
# Reporting


def format_problems(reports: Sequence[SplitReport], *, max_lines: int | None = 50) -> str:
    """The bad rows of every split, one line each (``max_lines`` per split, then a count)."""
    lines: list[str] = []
    for report in reports:
        if not report.problems:
            continue
        lines.append(
            f"{report.split}: {len(report.bad_rows)} bad row(s) of {report.rows} "
            f"({len(report.problems)} problem(s))"
        )
        shown = report.problems if max_lines is None else report.problems[:max_lines]
        lines.extend(f"  {problem}" for problem in shown)
        if len(shown) < len(report.problems):
            lines.append(f"  ... and {len(report.problems) - len(shown)} more")
    return "\n".join(lines)


def format_summary(reports: Sequence[SplitReport], *, max_failures: int = 20) -> str:
    """One block per split: rows, images fetched / saved / already present, failures with reasons."""
    lines: list[str] = []
    for report in reports:
        target = f" -> {report.output}" if report.output is not None else " (not written)"
        lines.append(f"{report.split} [{report.schema}]: {report.rows} rows{target}")
        lines.append(
            f"  images: {report.images} references, {report.urls} distinct URLs; fetched {report.fetched}, "
            f"saved from embedded {report.embedded}, already present {report.present}, "
            f"failed {len(report.failures)}"
        )
        reasons: dict[str, int] = {}
        for failure in report.failures:
            reasons[failure.reason or "unknown"] = reasons.get(failure.reason or "unknown", 0) + 1
        for failure in report.failures[:max_failures]:
            lines.append(f"  failed: {failure.url}: {failure.reason}")
        if len(report.failures) > max_failures:
            lines.append(f"  ... and {len(report.failures) - max_failures} more failures")
            lines.append(
                "  failure reasons: " + ", ".join(f"{reason} x{n}" for reason, n in sorted(reasons.items()))
            )
        bad = len(report.bad_rows)
        verdict = f"dropped {len(report.dropped)}" if report.dropped else "kept"
        lines.append(
            f"  rows: {report.written} written, {bad} bad"
            + (f" ({verdict})" if bad and report.output else "")
        )
        lines.append(f"  {report.elapsed_s:.1f} s")
    return "\n".join(lines)
