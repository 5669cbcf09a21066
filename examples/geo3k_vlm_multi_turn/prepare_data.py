"""Prepare Geometry3K for training: local images, this project's parquet format, every row validated.

    python examples/geo3k_vlm_multi_turn/prepare_data.py --source processed --out data/geo3k
    python examples/geo3k_vlm_multi_turn/prepare_data.py --source original --out data/geo3k-original
    python examples/geo3k_vlm_multi_turn/prepare_data.py --source DIR_OR_FILE --out data/geo3k --strict

Sources: ``processed`` downloads VeraIsHere/geo3k_imgurl_processed (images are URLs, fetched here
into OUT/images); ``original`` downloads hiyouga/geometry3k (images embedded in the parquet, saved
as PNG files; the questions get the calc_score instruction block); a path uses parquet files that are
already on disk (no download). Writes OUT/<split>.parquet with absolute image paths, which is what
slime's ``--prompt-data`` needs. Rerunning skips every image already stored.

Bad rows (placeholder/image count mismatch, an answer math-verify cannot parse, an image that failed
to fetch or does not decode) are listed before anything is written. By default they are written
anyway; ``--drop-bad-rows`` leaves them out; ``--strict`` writes no parquet file and exits with status 1
(images stored so far stay in the store, so the next run does not fetch them again).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if importlib.util.find_spec("envs") is None:
    # Run from a checkout where the package is not installed: the repository root is two levels up.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from envs.geo3k.prepare import (  # noqa: E402
    DATASET_SOURCES,
    Downloader,
    FetchLimits,
    PrepareError,
    PrepareOptions,
    format_problems,
    format_summary,
    prepare_dataset,
    resolve_source,
)

EXIT_BAD_ROWS = 1
EXIT_USAGE = 2


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = FetchLimits()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        required=True,
        help=f"{' | '.join(DATASET_SOURCES)} (download from the Hub) or a local parquet file or directory",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory for <split>.parquet")
    parser.add_argument("--image-dir", type=Path, default=None, help="image store (default OUT/images)")
    parser.add_argument(
        "--raw-dir", type=Path, default=None, help="where downloaded sources go (default OUT/raw)"
    )
    parser.add_argument("--splits", default=None, help="comma-separated splits to prepare (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N rows of each split")
    parser.add_argument(
        "--relative-paths",
        action="store_true",
        help="store image paths relative to OUT (readable by this project, not by slime)",
    )
    bad = parser.add_mutually_exclusive_group()
    bad.add_argument("--strict", action="store_true", help="any bad row: write no parquet file, exit 1")
    bad.add_argument("--drop-bad-rows", action="store_true", help="leave bad rows out of the output")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="parallel downloads")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="seconds per request")
    parser.add_argument("--retries", type=int, default=defaults.retries, help="retries on transient errors")
    parser.add_argument("--backoff", type=float, default=defaults.backoff_s, help="first retry delay (s)")
    parser.add_argument("--max-image-bytes", type=int, default=defaults.max_bytes)
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_pixels)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    return args


def main(argv: Sequence[str] | None = None, *, downloader: Downloader | None = None) -> int:
    """Run the command; ``downloader`` replaces huggingface_hub's ``snapshot_download``."""
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        limits = FetchLimits(
            timeout_s=args.timeout,
            retries=args.retries,
            backoff_s=args.backoff,
            max_bytes=args.max_image_bytes,
            max_pixels=args.max_image_pixels,
            concurrency=args.concurrency,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    policy = "strict" if args.strict else "drop" if args.drop_bad_rows else "report"
    options = PrepareOptions(
        out_dir=args.out,
        image_dir=args.image_dir,
        limits=limits,
        absolute_paths=not args.relative_paths,
        bad_rows=policy,
        splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()) if args.splits else None,
        limit=args.limit,
        progress=not args.no_progress,
    )
    try:
        source, repo_id = resolve_source(args.source, args.raw_dir or args.out / "raw", downloader=downloader)
        if repo_id is not None:
            print(f"downloaded {repo_id} into {source}")
        reports = prepare_dataset(source, options)
    except PrepareError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE

    problems = format_problems(reports)
    if problems:
        print(problems, file=sys.stderr)
    print(format_summary(reports))
    bad = sum(len(report.bad_rows) for report in reports)
    print(f"done in {time.perf_counter() - started:.1f} s")
    if bad and policy == "strict":
        print(f"{bad} bad row(s) and --strict: no parquet file was written", file=sys.stderr)
        return EXIT_BAD_ROWS
    if bad and policy == "report":
        print(
            f"warning: {bad} bad row(s) were written as they are; training will fail on them or learn "
            "from unusable labels. "
            "Rerun with --drop-bad-rows to leave them out",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
