"""Evaluate a policy on a Geometry3K split with multi-turn calc_score episodes: pass@k and more.

    python examples/geo3k_vlm_multi_turn/eval_geo3k.py --data data/geo3k/test.parquet \\
        --model Qwen/Qwen2.5-VL-3B-Instruct -n 8 --ks 1,2,4,8 --out runs/eval/test.json
    python examples/geo3k_vlm_multi_turn/eval_geo3k.py --data data/geo3k/test.parquet \\
        --sglang-url http://127.0.0.1:30000 --hf-checkpoint /models/Qwen3-VL-2B-Instruct -n 8

The policy is a preset name or local checkpoint run in-process (``--model``), or an SGLang server
(``--sglang-url``; ``--hf-checkpoint`` names the served model's tokenizer and processor, which build
the prompts). Every problem gets ``n`` episodes of up to ``max_turns`` turns with the env of the
plugin config. Prints a table (pass@k with the unbiased estimator, accuracy by turn, tool-call
validity, mean turns and tokens, status counts) and writes a JSON file with the summary and every
problem's per-sample results.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("rollout") is None:
    # Run from a checkout where the package is not installed.
    sys.path.insert(0, str(REPO_ROOT))

DEFAULT_PLUGIN_CONFIG = REPO_ROOT / "configs" / "geo3k_vlm_multi_turn.yaml"


def _ints(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 1,2,4,8, got {text!r}"
        ) from None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a geo3k parquet split (e.g. test.parquet)")
    engine = parser.add_mutually_exclusive_group(required=True)
    engine.add_argument("--model", help="preset name or local checkpoint, generated in-process")
    engine.add_argument("--sglang-url", help="an SGLang server or router, e.g. http://127.0.0.1:30000")
    parser.add_argument("--hf-checkpoint", help="with --sglang-url: the served model's tokenizer/processor")
    parser.add_argument("-n", "--n-samples", type=int, default=8, help="episodes per problem (default 8)")
    parser.add_argument(
        "--ks", type=_ints, default=None, help="k values for pass@k (default 1,2,4,.. up to n)"
    )
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=4096,
        help="response budget per episode, model plus env tokens (default 4096, the training recipe)",
    )
    parser.add_argument("--max-turns", type=int, default=None, help="override the plugin config's max_turns")
    parser.add_argument(
        "--max-tokens-per-turn",
        type=int,
        default=None,
        help="override the plugin config's per-turn generation cap (what training ran with, e.g. the demo's 64)",
    )
    parser.add_argument(
        "--tools-in-prompt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="override the plugin config's tools_in_prompt (render the env's TOOLS into the prompt)",
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_PLUGIN_CONFIG, help="plugin YAML (env, max_turns, env_kwargs)"
    )
    parser.add_argument("--concurrency", type=int, default=64, help="episodes in flight at once")
    parser.add_argument(
        "--seed", type=int, default=0, help="sampling seed (episodes and turns derive theirs)"
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON report path")
    parser.add_argument("--device", default=None, help="--model only: default cuda when available, else cpu")
    parser.add_argument("--max-batch-size", type=int, default=32, help="--model only: engine batch rows")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.sglang_url and not args.hf_checkpoint:
        parser.error("--sglang-url needs --hf-checkpoint (the served model's tokenizer and processor)")
    for name in ("n_samples", "concurrency", "max_new_tokens", "max_tokens_per_turn"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    return args


def rollout_args(cli: argparse.Namespace, engine: Any, hf_checkpoint: str) -> types.SimpleNamespace:
    """slime-like args for the episodes: the plugin YAML's keys set one by one (as slime merges them)."""
    from rollout.config import RolloutConfig

    plugin = RolloutConfig.from_yaml(cli.config)  # validates every key
    args = types.SimpleNamespace(
        hf_checkpoint=hf_checkpoint,
        rollout_engine=engine,
        rollout_max_response_len=cli.max_new_tokens,
        rollout_max_context_len=None,
    )
    for name in RolloutConfig.setting_names():
        setattr(args, name, getattr(plugin, name))
    if cli.max_turns is not None:
        args.max_turns = cli.max_turns
    if getattr(cli, "max_tokens_per_turn", None) is not None:
        args.max_tokens_per_turn = cli.max_tokens_per_turn
    if getattr(cli, "tools_in_prompt", None) is not None:
        args.tools_in_prompt = cli.tools_in_prompt
    return args


def check_env(cli: argparse.Namespace) -> None:
    """The plugin YAML (every key) and the env module it names, before a model is loaded."""
    from envs.loader import load_env_module
    from rollout.config import RolloutConfig

    load_env_module(RolloutConfig.from_yaml(cli.config).rollout_interaction_env_path)


def failure_lines(report: Any, *, top: int = 5) -> list[str]:
    """Why episodes failed (and problems could not run), most common cause first."""
    from collections import Counter

    from trainer.metrics import failure_cause

    causes: Counter[str] = Counter()
    for problem in report.problems:
        if problem.error:
            causes[f"problem could not run: {failure_cause(problem.error)}"] += 1
        for sample in problem.samples:
            if sample.status == "FAILED":
                causes[failure_cause(sample.status_reason)] += 1
    if not causes:
        return []
    episodes = sum(len(problem.samples) for problem in report.problems)
    lines = [f"failures ({sum(causes.values())} of {episodes} episodes, or problems that could not run):"]
    lines += [f"  {count}x {cause}" for cause, count in causes.most_common(top)]
    if len(causes) > top:
        lines.append(f"  ... and {len(causes) - top} more cause(s); every reason is in the JSON report")
    return lines


async def run(cli: argparse.Namespace):
    from envs.geo3k.dataset import read_geo3k_parquet
    from rollout.evaluation import evaluate

    check_env(cli)
    rows = read_geo3k_parquet(cli.data)
    if cli.limit is not None:
        rows = rows[: cli.limit]
    if cli.model:
        from models import load_policy
        from rollout.engines.local import LocalEngine

        policy = await asyncio.to_thread(load_policy, cli.model, device=cli.device)
        engine: Any = LocalEngine(policy, max_batch_size=cli.max_batch_size, seed=cli.seed)
        checkpoint = cli.model
    else:
        from rollout.engines.sglang_client import SGLangClient

        engine = SGLangClient(cli.sglang_url)
        checkpoint = cli.hf_checkpoint
    args = rollout_args(cli, engine, checkpoint)
    try:
        report = await evaluate(
            rows,
            args,
            n=cli.n_samples,
            ks=cli.ks,
            temperature=cli.temperature,
            top_p=cli.top_p,
            top_k=cli.top_k,
            max_new_tokens=cli.max_new_tokens,
            seed=cli.seed,
            concurrency=cli.concurrency,
            progress=not cli.no_progress,
        )
    finally:
        await (engine.aclose() if cli.model else engine.close())
    report.settings.update(
        data=str(cli.data.resolve()),
        engine=f"local {cli.model}" if cli.model else f"sglang {cli.sglang_url}",
        hf_checkpoint=checkpoint,
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    cli = parse_args(argv)
    from envs.loader import EnvLoadError

    try:
        report = asyncio.run(run(cli))
    except (FileNotFoundError, ValueError, EnvLoadError) as error:
        # ValueError covers the plugin's ConfigError and a dataset's DatasetError: messages that
        # name the problem and the fix, which a traceback would only bury.
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{cli.data}: {report.settings['engine']}")
    print(report.format_table())
    for line in failure_lines(report):
        print(line)
    if cli.out is not None:
        print(f"wrote {report.write_json(cli.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
