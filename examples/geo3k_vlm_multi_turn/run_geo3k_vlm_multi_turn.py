"""Train a vision-language model on Geometry3K with multi-turn ``calc_score`` tool calls, with GRPO.

    python examples/geo3k_vlm_multi_turn/run_geo3k_vlm_multi_turn.py --backend local --demo
    python examples/geo3k_vlm_multi_turn/run_geo3k_vlm_multi_turn.py --backend local \\
        --model Qwen/Qwen2.5-VL-3B-Instruct --data-dir DIR
    python examples/geo3k_vlm_multi_turn/run_geo3k_vlm_multi_turn.py --backend slime [--dry-run]
    python examples/geo3k_vlm_multi_turn/run_geo3k_vlm_multi_turn.py --backend slime \\
        --slime-version legacy --model Qwen3-VL-2B-Instruct --num-gpus 4 [--dry-run]

Two backends run the same episodes (``rollout.generate``) and rewards (``rollout.reward``):

- ``local``: the single-machine GRPO trainer (``trainer.loop``) with an in-process engine; CPU or
  one GPU. ``--demo`` trains the tiny offline model on generated sample data in a few minutes.
- ``slime``: Ray + SGLang + Megatron through slime's ``execute_train``, after preflight checks.
  ``--dry-run`` prints the exact command and environment and exits. Today's slime
  (``--slime-version current``, the default) trains Qwen3.5-35B-A3B on 8 GPUs; slime releases with
  megatron-bridge (``--slime-version legacy``) train Qwen3-VL 2B/4B/8B on 4.

Data and models are used where they are; otherwise they are downloaded with huggingface_hub (the
dataset ``VeraIsHere/geo3k_imgurl_processed``, models from their Hugging Face repo). The tiny presets
and the generated sample data need no network.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("trainer") is None:
    # Run from a checkout where the package is not installed.
    sys.path.insert(0, str(REPO_ROOT))

import yaml  # noqa: E402

from envs.geo3k.dataset import DatasetError  # noqa: E402
from envs.loader import EnvLoadError  # noqa: E402
from trainer.config import CONFIG_ERRORS, ConfigError, TrainConfig, plugin_config  # noqa: E402
from trainer.loop import RolloutFailedError  # noqa: E402
from trainer.sft import TranscriptError  # noqa: E402
from trainer.slime_launch import (  # noqa: E402
    DATASET_REPO,
    SLIME_RECIPE,
    SLIME_RELEASES,
    SlimeLaunch,
    build_slime_args,
    check_release,
    describe_command,
    preflight,
    slime_location,
    slime_model,
)

DEFAULT_PLUGIN_CONFIG = REPO_ROOT / "configs" / "geo3k_vlm_multi_turn.yaml"
DEMO_MODEL = "tiny-qwen2.5-vl-small-vocab"
DEMO_DATA_DIR = REPO_ROOT / "runs" / "data" / "geo3k-demo"
# Few problems, each seen in several steps: a tiny random-init model can learn the answers of a
# handful of diagrams (it cannot learn geometry).
DEMO_PROBLEMS = 8
# The demo: a supervised warm-start on scripted tool-call transcripts of the sample problems (half
# of them wrong first, then right after the env says "incorrect"), then GRPO on multi-turn episodes.
# Sized for 2 CPU cores in about three minutes.
DEMO_SETTINGS: dict[str, Any] = {
    "sft_steps": 60,
    "sft_lr": 3e-3,
    "sft_batch_size": 8,
    "sft_transcripts_per_row": 4,
    "sft_wrong_first": 0.5,
    "num_rollout": 12,
    # Every problem in every step (groups of 4): with 4 of the 8 per step, the step's problems
    # decided the mean reward more than training did.
    "rollout_batch_size": 8,
    "n_samples_per_prompt": 4,
    # Two calls and the env's feedback (about 130 tokens each) fit, three nearly.
    "rollout_max_response_len": 384,
    "max_tokens_per_turn": 48,
    # Small: at 1e-4 and above, noisy group advantages wore down the call format the warm-start
    # taught (fewer valid calls) faster than they taught answers.
    "lr": 5e-5,
    "micro_batch_size": 8,
    "device": "cpu",
    "report_episodes": 8,
}
DEFAULT_LOCAL_MODEL = "Qwen/Qwen3-VL-2B-Instruct"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backend", choices=("local", "slime"), help="default: slime with slime and GPUs, else local"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_PLUGIN_CONFIG, help="the plugin YAML")
    parser.add_argument(
        "--model", help="a models preset, a Hugging Face repo or name, or a checkpoint directory"
    )
    parser.add_argument(
        "--model-root", type=Path, default=Path.home() / "models", help="where models are downloaded"
    )
    parser.add_argument(
        "--data-dir", type=Path, help="directory with train.parquet (downloaded or generated if missing)"
    )
    parser.add_argument(
        "--output-dir", type=Path, help="run directory (default runs/geo3k[-demo]-<timestamp>)"
    )
    parser.add_argument(
        "--demo", action="store_true", help="the tiny CPU demo: tiny model, generated sample data"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would run, then exit")
    parser.add_argument(
        "--drop-bad-rows",
        action="store_true",
        help="local: train on the usable rows of the data (default: any bad row stops the run before step 1)",
    )
    parser.add_argument(
        "--resume", nargs="?", const="latest", help="resume from a checkpoint or run directory"
    )
    parser.add_argument("--num-gpus", type=int, help="slime: GPUs on this node (default: the model's recipe)")
    parser.add_argument(
        "--slime-version",
        choices=tuple(SLIME_RELEASES),
        default="current",
        help="slime: the installed release; "
        + "; ".join(
            f"{r.name}: {r.description} (default model {r.default_model})" for r in SLIME_RELEASES.values()
        ),
    )
    parser.add_argument(
        "--rollout-routing-replay",
        action="store_true",
        help="slime, MoE models: train with the experts the rollout engine routed each token to",
    )
    parser.add_argument("--megatron-path", default="/root/Megatron-LM/", help="slime: Megatron-LM checkout")
    parser.add_argument("--wandb-project", help="log to Weights & Biases (slime: needs WANDB_API_KEY)")
    parser.add_argument("--tensorboard", action="store_true", help="local: log to TensorBoard")
    for name, kind in (
        ("num-rollout", int),
        ("rollout-batch-size", int),
        ("n-samples-per-prompt", int),
        ("rollout-max-response-len", int),
        ("lr", float),
        ("save-interval", int),
        ("seed", int),
        ("sft-steps", int),
    ):
        parser.add_argument(f"--{name}", type=kind, help="trainer setting of the same name")
    parser.add_argument(
        "--sft-data",
        help="local: geo3k-format parquet (or a directory with train.parquet) whose rows give the "
        "SFT warm-start's tool-call transcripts (default: the training data); used with --sft-steps",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any trainer setting (trainer.config.TrainConfig), value parsed as YAML; repeatable",
    )
    return parser.parse_args(argv)


def choose_backend(requested: str | None) -> tuple[str, str]:
    if requested:
        return requested, "--backend"
    location = slime_location()
    if location is None:
        return "local", "slime is not importable"
    import torch

    gpus = torch.cuda.device_count()
    if gpus == 0:
        return "local", f"slime is installed ({location}) but no GPU is visible"
    return "slime", f"slime is installed ({location}) and {gpus} GPU(s) are visible"


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in (
        "num_rollout",
        "rollout_batch_size",
        "n_samples_per_prompt",
        "rollout_max_response_len",
        "lr",
        "save_interval",
        "seed",
        "sft_steps",
        "sft_data",
    ):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        values[key.strip().replace("-", "_")] = _setting_value(raw)
    return values


def _setting_value(raw: str) -> Any:
    """A --set value parsed as YAML, except that ``1e-5`` is a number (YAML 1.1 reads exponents
    without a dot as strings, so ``--set lr=1e-5`` would be the string '1e-5')."""
    value = yaml.safe_load(raw)
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------------------
# Data and model


def ensure_sample_data(data_dir: Path, n: int = DEMO_PROBLEMS, seed: int = 0) -> Path:
    """Generate Geometry3K-style sample problems into ``data_dir`` unless a train.parquet is there."""
    train = data_dir / "train.parquet"
    if train.is_file():
        return train
    from envs.geo3k.dataset import write_geo3k_parquet
    from envs.geo3k.sample_data import generate_problems

    print(f"generating {n} sample problems into {data_dir} (seed {seed})")
    return write_geo3k_parquet(generate_problems(n, seed), data_dir, split_name="train")


def ensure_dataset(data_dir: Path) -> Path:
    """A train.parquet with local images: ``data_dir/train.parquet`` when it has them, otherwise the
    processed geo3k dataset (downloaded into ``data_dir`` when missing) prepared next to it, with
    every image URL fetched once into a local store (resumable; see prepare_data.py)."""
    from envs.geo3k.prepare import find_parquet_splits

    train = data_dir / "train.parquet"
    if train.is_file() and not _has_url_images(train):
        return train
    if not data_dir.is_dir() or not any(data_dir.rglob("*.parquet")):
        from huggingface_hub import snapshot_download

        print(f"downloading {DATASET_REPO} into {data_dir}")
        try:
            snapshot_download(repo_id=DATASET_REPO, repo_type="dataset", local_dir=str(data_dir))
        except Exception as error:  # offline, no such host, no access: the cause is often a mistyped path
            raise FileNotFoundError(_no_data_hint(data_dir, error)) from error
    if "train" not in find_parquet_splits(data_dir):
        raise FileNotFoundError(f"{data_dir} holds no train split (train.parquet or train-*.parquet)")
    return prepare_local_images(data_dir)


def _no_data_hint(data_dir: Path, error: Exception) -> str:
    from envs.base import did_you_mean

    where = f"{data_dir} does not exist" if not data_dir.exists() else f"{data_dir} holds no .parquet file"
    siblings = [p.name for p in data_dir.parent.iterdir() if p.is_dir()] if data_dir.parent.is_dir() else []
    close = did_you_mean(data_dir.name, siblings)
    return (
        f"{where}, and downloading {DATASET_REPO} into it failed ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else 'no message'}). Check the --data-dir path.{close} "
        "Point --data-dir at a directory with train.parquet, or use --demo for generated sample data"
    )


def _has_url_images(train: Path) -> bool:
    from envs.geo3k.dataset import read_geo3k_parquet

    rows = read_geo3k_parquet(train)
    return any(ref.startswith(("http://", "https://")) for row in rows[:1] for ref in row.images)


def prepare_local_images(data_dir: Path) -> Path:
    """Fetch the train split's images into ``<data_dir>-prepared`` once; later runs reuse it."""
    from envs.geo3k.prepare import PrepareOptions, format_problems, format_summary, prepare_dataset

    out_dir = data_dir.with_name(data_dir.name + "-prepared")
    prepared = out_dir / "train.parquet"
    if prepared.is_file():
        return prepared
    print(f"fetching the images of {data_dir} into {out_dir} (once; bad rows are dropped)")
    reports = prepare_dataset(
        data_dir, PrepareOptions(out_dir=out_dir, bad_rows="drop", splits=("train",), progress=True)
    )
    problems = format_problems(reports)
    if problems:
        print(problems)
    print(format_summary(reports))
    if not prepared.is_file():
        raise SystemExit(f"preparing {data_dir} wrote no {prepared}; see the summary above")
    return prepared


def check_model_name(name: str) -> str:
    """The Hugging Face repo to download for ``name``, or "" for a preset or a checkpoint directory.
    Raises FileNotFoundError (with the nearest preset or recipe name) when it is none of these."""
    from envs.base import did_you_mean
    from models import PRESETS
    from trainer.slime_launch import SLIME_MODELS

    path = Path(name).expanduser()
    if name in PRESETS or (path / "config.json").is_file():
        return ""
    try:
        repo = slime_model(name).hf_repo
    except KeyError:
        repo = name
    if "/" not in repo:
        raise FileNotFoundError(
            f"model {name!r} is not a preset, not a checkpoint directory, and not a Hugging Face repo "
            f"(owner/name).{did_you_mean(name, [*PRESETS, *SLIME_MODELS])} Presets: {', '.join(PRESETS)}; "
            "or pass e.g. --model Qwen/Qwen2.5-VL-3B-Instruct"
        )
    if path.is_dir() or name.startswith((".", "~")) or path.is_absolute():
        raise FileNotFoundError(
            f"model directory {path} has no config.json; pass a Hugging Face checkpoint directory, a "
            f"preset ({', '.join(PRESETS)}) or a repo such as Qwen/Qwen2.5-VL-3B-Instruct"
        )
    return repo


def ensure_model(name: str, model_root: Path) -> str:
    """A preset name or a checkpoint directory, downloading a Hugging Face repo when it is not local."""
    from models import PRESETS

    repo = check_model_name(name)
    if not repo:
        return name if name in PRESETS else str(Path(name).expanduser())
    local = model_root / repo.split("/")[-1]
    if not (local / "config.json").is_file():
        from huggingface_hub import snapshot_download

        print(f"downloading {repo} into {local}")
        snapshot_download(repo_id=repo, local_dir=str(local))
    return str(local)


# ---------------------------------------------------------------------------------------------------------
# Backends


def local_config(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {"custom_config_path": str(args.config)}
    if args.demo:
        values.update(DEMO_SETTINGS)
    values.update(overrides(args))
    prefix = "geo3k-demo" if args.demo else "geo3k"
    values["output_dir"] = str(
        args.output_dir or REPO_ROOT / "runs" / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    values["use_tensorboard"] = args.tensorboard
    if args.drop_bad_rows:
        values["drop_bad_rows"] = True
    if args.wandb_project:
        values.update(use_wandb=True, wandb_project=args.wandb_project)
    return TrainConfig.from_dict(values)


def check_local(cfg: TrainConfig, model: str) -> str:
    """What can be checked before anything is downloaded or loaded: the plugin YAML (every key), the
    env module it names, and that the model names a preset, a checkpoint directory or a repo.
    Returns the env module's path; raises the error a run would otherwise hit later."""
    from envs.loader import load_env_module

    env_path = plugin_config(cfg).rollout_interaction_env_path
    load_env_module(env_path)
    check_model_name(model)
    return env_path


def run_local(args: argparse.Namespace) -> int:
    default_data = DEMO_DATA_DIR if args.demo else Path.home() / "datasets" / "geo3k_imgurl_processed"
    data_dir = args.data_dir or default_data
    model = args.model or (DEMO_MODEL if args.demo else DEFAULT_LOCAL_MODEL)
    cfg = local_config(args).replace(prompt_data=str(data_dir / "train.parquet"), hf_checkpoint=model)
    env_path = check_local(cfg, model)
    if args.dry_run:
        print("local trainer settings (nothing downloaded or generated):")
        for key, value in cfg.to_dict().items():
            print(f"  {key}: {value}")
        print(f"plugin config {cfg.custom_config_path}: valid; env module {env_path}: loads")
        return 0
    data = ensure_sample_data(data_dir) if args.demo else ensure_dataset(data_dir)
    cfg = cfg.replace(prompt_data=str(data))
    cfg = cfg.replace(hf_checkpoint=ensure_model(model, args.model_root))

    from trainer.loop import train

    started = time.perf_counter()
    result = train(cfg, resume=args.resume)
    elapsed = time.perf_counter() - started
    print(f"\ndone in {elapsed:.0f} s")
    print(summarize(result.metrics))
    print(f"  metrics:    {result.run_dir / 'metrics.jsonl'}")
    print(f"  curves:     {result.run_dir / 'training_curves.png'}")
    print(f"  report:     {result.report}")
    print(f"  checkpoint: {result.last_checkpoint}")
    return 0


def summarize(metrics: list[dict[str, Any]]) -> str:
    """The run in a few lines: the initial model's rollout, the SFT warm-start's first and last step,
    then GRPO's first and last steps (means of up to three), so that a rise is visible without
    opening the report."""
    before = [m for m in metrics if m.get("phase") == "before_sft"]
    sft = [m for m in metrics if m.get("phase") == "sft"]
    grpo = [m for m in metrics if m.get("phase") is None]
    lines = []
    if before:
        lines.append(
            f"  before SFT (the initial model on GRPO's first batch): mean reward "
            f"{before[0]['rollout/reward_mean']:.3f}, turns per episode {before[0]['rollout/turns_mean']:.2f}, "
            f"tool calls per episode {before[0]['rollout/tool_calls_per_episode']:.2f}"
        )
    if sft:
        lines.append(
            f"  SFT ({len(sft)} steps): loss {sft[0]['sft/loss']:.3f} -> {sft[-1]['sft/loss']:.3f}, "
            f"token accuracy {sft[0]['sft/token_accuracy']:.2f} -> {sft[-1]['sft/token_accuracy']:.2f}"
        )
    if grpo:
        k = min(3, len(grpo))
        lines.append(f"  GRPO ({len(grpo)} steps), mean of the first {k} -> the last {k} steps:")
        for key in (
            "rollout/reward_mean",
            "rollout/pass_rate",
            "rollout/turns_mean",
            "rollout/tool_call_validity",
            "rollout/response_length_mean",
        ):
            first = [m[key] for m in grpo[:k] if m.get(key) is not None]
            last = [m[key] for m in grpo[-k:] if m.get(key) is not None]
            if first and last:
                lines.append(f"    {key}: {sum(first) / len(first):.3f} -> {sum(last) / len(last):.3f}")
    return "\n".join(lines)


def slime_config(args: argparse.Namespace) -> TrainConfig:
    values = dict(SLIME_RECIPE)
    values.update(overrides(args))
    values["custom_config_path"] = str(args.config)
    return TrainConfig.from_dict(values)


def run_slime(args: argparse.Namespace) -> int:
    model = slime_model(args.model or SLIME_RELEASES[args.slime_version].default_model)
    try:
        check_release(model, args.slime_version)  # before any download: the other release's model won't run
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or Path.home() / "datasets" / "geo3k_imgurl_processed"
    model_dir = Path(args.model) if args.model and Path(args.model).is_dir() else args.model_root / model.name
    if not args.dry_run:
        data = ensure_dataset(data_dir)
        model_dir = Path(ensure_model(args.model or model.hf_repo, args.model_root))
    else:
        data = data_dir / "train.parquet"
    cfg = slime_config(args)
    launch = SlimeLaunch(
        model=model,
        model_dir=model_dir.resolve(),
        prompt_data=data.resolve(),
        plugin_config=args.config.resolve(),
        num_gpus=args.num_gpus or model.num_gpus,
        release=args.slime_version,
        rollout_routing_replay=args.rollout_routing_replay,
        save_dir=args.output_dir.resolve() if args.output_dir else None,
        save_interval=cfg.save_interval,
        megatron_path=args.megatron_path,
        wandb_project=args.wandb_project,
    )
    try:
        train_args = build_slime_args(cfg, launch)
    except ValueError as error:  # a GPU count the model's layout cannot use
        print(f"error: {error}", file=sys.stderr)
        return 2
    findings = preflight(launch)
    print("preflight:")
    for finding in findings:
        print(f"  {finding}")
    if args.dry_run:
        print(describe_command(train_args, launch))
        return 0
    errors = [f for f in findings if f.level == "error"]
    if errors:
        print(
            f"{len(errors)} preflight error(s); fix them or use --dry-run to see the command", file=sys.stderr
        )
        return 1
    from trainer.slime_launch import launch as execute

    execute(train_args, launch)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.demo and args.backend is None:
        backend, reason = "local", "--demo"
    else:
        backend, reason = choose_backend(args.backend)
    print(f"backend: {backend} ({reason})")
    if args.demo and backend != "local":
        print("--demo runs on the local backend only", file=sys.stderr)
        return 2
    try:
        return run_local(args) if backend == "local" else run_slime(args)
    except (*CONFIG_ERRORS, EnvLoadError, KeyError, FileNotFoundError, yaml.YAMLError) as error:
        # Messages that name the problem and the fix: a traceback would only bury them.
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    except (DatasetError, RolloutFailedError, TranscriptError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
