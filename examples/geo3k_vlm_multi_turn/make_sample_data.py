"""Write the bundled Geometry3K-style sample data: train.parquet and test.parquet with their diagrams.

    python examples/geo3k_vlm_multi_turn/make_sample_data.py --out data/geo3k_sample --train 512 --test 64

The two splits come from different seeds, and the test split skips every problem whose mathematical
content (not just its layout) is already in the train split. The written files are read back and
validated before the summary is printed, so a file this script reports as written is usable as
``--prompt-data``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

if importlib.util.find_spec("envs") is None:
    # Run from a checkout where the package is not installed: the repository root is two levels up.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from envs.geo3k.dataset import IMAGE_MODES, read_geo3k_parquet, validate_rows, write_geo3k_parquet
from envs.geo3k.sample_data import DEFAULT_IMAGE_SIZE, PROBLEM_KINDS, GeoProblem, generate_problems

# The test seed is derived from the train seed, so one --seed fixes both splits and they never share one.
TEST_SEED_OFFSET = 1_000_003


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (created if missing)")
    parser.add_argument("--train", type=int, default=512, help="number of training problems (default 512)")
    parser.add_argument("--test", type=int, default=64, help="number of test problems (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="train seed; the test seed is derived from it")
    parser.add_argument(
        "--image-mode",
        choices=IMAGE_MODES,
        default="files",
        help="files: PNGs under OUT/images/ referenced by relative path; data_uri: PNGs embedded in the rows",
    )
    parser.add_argument(
        "--absolute-paths",
        action="store_true",
        help="with --image-mode files, store absolute image paths (slime resolves relative ones against its cwd)",
    )
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="diagram side in pixels")
    parser.add_argument(
        "--kinds",
        default=",".join(PROBLEM_KINDS),
        help=f"comma-separated problem kinds (default: all of {', '.join(PROBLEM_KINDS)})",
    )
    args = parser.parse_args(argv)
    for name in ("train", "test"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    return args


def summarize(name: str, path: Path, problems: Sequence[GeoProblem]) -> str:
    by_kind = Counter(problem.kind for problem in problems)
    by_form = Counter(problem.answer_form for problem in problems)
    lines = [f"{name}: {len(problems)} problems -> {path}"]
    lines.append("  by kind: " + ", ".join(f"{kind} {count}" for kind, count in sorted(by_kind.items())))
    lines.append(
        "  by answer form: " + ", ".join(f"{form} {count}" for form, count in sorted(by_form.items()))
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    started = time.perf_counter()
    common = {"kinds": kinds, "image_size": args.image_size}
    train = generate_problems(args.train, args.seed, **common)
    test = generate_problems(
        args.test,
        args.seed + TEST_SEED_OFFSET,
        exclude=frozenset(problem.signature for problem in train),
        **common,
    )
    summaries = []
    for name, problems in (("train", train), ("test", test)):
        path = write_geo3k_parquet(
            problems,
            args.out,
            image_mode=args.image_mode,
            split_name=name,
            absolute_paths=args.absolute_paths,
        )
        issues = validate_rows(read_geo3k_parquet(path))
        if issues:
            print(f"{path} has {len(issues)} invalid row(s):", file=sys.stderr)
            for issue in issues:
                print(f"  {issue}", file=sys.stderr)
            return 1
        summaries.append(summarize(name, path, problems))
    print("\n".join(summaries))
    print(f"validated both splits; {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
