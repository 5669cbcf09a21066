"""Geometry3K's prompt data: the generic parquet format (``envs.dataset``) with labels that must
be numbers, which is all that is geometry-specific about it.

The columns are ``problem`` (the instruction block, then the question with one ``<image>``
placeholder per image), ``answer`` (the label, LaTeX math such as ``2\\sqrt{3}``) and ``images``;
reading, writing, validation and image loading are :class:`envs.dataset.ParquetDataset`'s. What
:data:`GEO3K_DATASET` adds is :func:`answer_problem`: the env grades answers with math-verify, so
a label math-verify cannot read as a number could never be matched and fails validation up front.
The env module exposes it as ``envs.geo3k.DATASET``.

Labels are parsed with math-verify inside ``\\boxed{}`` or ``$...$``: bare, ``2\\sqrt{3}`` parses as
just ``2`` and ``16\\pi`` as ``16``.

The module-level functions (``read_geo3k_parquet``, ``validate_rows``, ...) are
:data:`GEO3K_DATASET`'s methods under the names the data tools and examples use.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any

from envs.dataset import (
    DEFAULT_DATASET,
    IMAGE_MODES,
    IMAGE_PLACEHOLDER,
    DatasetError,
    DatasetRow,
    ParquetDataset,
    RowImageError,
    RowProblem,
    SupportsRecord,
    format_row_problems,
    load_row_images,
)
from envs.images import encode_png, load_image

__all__ = [
    "COLUMNS",
    "GEO3K_DATASET",
    "IMAGE_MODES",
    "IMAGE_PLACEHOLDER",
    "DatasetError",
    "Geo3kDataset",
    "Geo3kRow",
    "RowImageError",
    "RowProblem",
    "SupportsGeo3kRecord",
    "answer_problem",
    "build_prompt_messages",
    "encode_png",
    "format_row_problems",
    "load_image",
    "load_row_images",
    "parse_answer",
    "read_and_validate",
    "read_geo3k_parquet",
    "validate_parquet",
    "validate_rows",
    "write_geo3k_parquet",
]

Geo3kRow = DatasetRow
SupportsGeo3kRecord = SupportsRecord


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
    """Why ``answer`` cannot serve as a Geometry3K label, or None when it can.

    Cached: parsing is most of validation's time (about 4 ms a label), and a dataset's labels
    repeat (2,100 generated rows have about 500 distinct ones)."""
    generic = DEFAULT_DATASET.label_problem(answer)  # a string, and not empty
    if generic is not None:
        return generic
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


@dataclass(frozen=True)
class Geo3kDataset(ParquetDataset):
    """The generic format, with labels math-verify reads as a number (:func:`answer_problem`)."""

    how_to_write: str = (
        "python examples/geo3k_vlm_multi_turn/make_sample_data.py --out DIR (generated problems) or "
        "examples/geo3k_vlm_multi_turn/prepare_data.py (Geometry3K)"
    )

    def label_problem(self, answer: str) -> str | None:
        return answer_problem(answer)


GEO3K_DATASET = Geo3kDataset()
COLUMNS: tuple[str, ...] = GEO3K_DATASET.columns

write_geo3k_parquet = GEO3K_DATASET.write
read_geo3k_parquet = GEO3K_DATASET.read
validate_parquet = GEO3K_DATASET.validate_parquet
read_and_validate = GEO3K_DATASET.read_and_validate
validate_rows = GEO3K_DATASET.validate_rows


def __getattr__(name: str) -> Any:
    # The schema is a pyarrow object, and what slime's processes import (envs.geo3k re-exports
    # DATASET from here) must not need pyarrow: it is built on first use.
    if name == "PARQUET_SCHEMA":
        return GEO3K_DATASET.parquet_schema
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_prompt_messages(problem_text: str, images: Any) -> list[dict[str, Any]]:
    """One chat user message: the text split at each ``<image>``, with the images in their places
    (Geo3K lays its prompts out the generic way: :func:`rollout.prompts.default_prompt_messages`)."""
    from rollout.prompts import default_prompt_messages

    return default_prompt_messages(problem_text, images)
