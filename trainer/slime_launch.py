"""The slime backend: which model runs on which slime release, the argument list for slime's
``train.py``, preflight checks.

slime's Megatron VLM support changed over time, so a recipe belongs to a release (:data:`SLIME_RELEASES`):

- ``current``: slime from f655e13 (2026-08-04, "Internalize mbridge") on; checked against 624b824.
  Megatron loads the HF checkpoint directly and the only VLM type is ``qwen3.5-35B-A3B-vl`` (Qwen3.5
  MoE language model plus the HF vision tower); slime's own geo3k multi-turn example trains
  Qwen3.5-35B-A3B with TP 2, expert parallel and SGLang EP over all GPUs, colocated. This release's
  parser has no ``--megatron-to-hf-mode`` and drops unknown flags without a word.
- ``legacy``: slime before f655e13 (checked against 2a60f00), with megatron-bridge
  (``--megatron-to-hf-mode bridge``): Qwen3-VL 2B/4B/8B as the ``qwen3-*`` language types.

:data:`SLIME_MODELS` maps model names to their release, slime's Megatron model type (the
``scripts/models/<type>.sh`` that slime sources for the architecture flags) and the parallel layout.
:func:`preflight` tells which release the installed slime is.

:func:`build_slime_args` returns the argument list as a list of strings (tests assert on it);
:func:`launch` joins it for slime's ``execute_train``, which starts Ray, sources the model script
and submits ``python3 train.py ...`` from the slime checkout. slime replaces the job's PYTHONPATH
with its Megatron path, so the job's environment carries PYTHONPATH with both Megatron and this
repository: that is how slime's workers import ``rollout.generate``, ``rollout.reward`` and ``envs``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainer.config import DEFAULT_PLUGIN_CONFIG, TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The prompt file's problem, label and images columns, as slime is told them (the generic format's).
SLIME_DATA_COLUMNS = ("problem", "answer", "images")
DATASET_REPO = "VeraIsHere/geo3k_imgurl_processed"
DEFAULT_MEGATRON_PATH = "/root/Megatron-LM/"
CUDNN_FIX = "pip install nvidia-cudnn-cu12==9.16.0.29"
CUDNN_MIN = (9, 16)

# The seeds' geo3k multi-turn recipe; the local trainer's defaults are sized for one machine.
SLIME_RECIPE: dict[str, Any] = {
    "num_rollout": 3000,
    "rollout_batch_size": 64,
    "n_samples_per_prompt": 8,
    "rollout_max_response_len": 4096,
    "rollout_temperature": 1.0,
    "lr": 1e-6,
    "adam_beta1": 0.9,
    "adam_beta2": 0.98,
    "weight_decay": 0.1,
    "eps_clip": 0.2,
    "eps_clip_high": 0.28,
    "entropy_coef": 0.0,
    "use_kl_loss": False,
    "kl_loss_coef": 0.0,
    # slime's default: old log-probs recomputed by the trainer (the local trainer uses the engine's).
    "use_rollout_logprobs": False,
}
_CUDA_GRAPH_BATCH_SIZES = [1, 2, 4, 8, *range(16, 257, 8)]


@dataclass(frozen=True)
class SlimeRelease:
    name: str
    description: str
    default_model: str
    bridge: bool  # the parser has --megatron-to-hf-mode (megatron-bridge converts weights for SGLang)


SLIME_RELEASES: dict[str, SlimeRelease] = {
    release.name: release
    for release in (
        SlimeRelease(
            name="current",
            description="slime f655e13 (2026-08-04) and later, checked against 624b824: no megatron-bridge, "
            "the Megatron VLM is qwen3.5-35B-A3B-vl",
            default_model="Qwen3.5-35B-A3B",
            bridge=False,
        ),
        SlimeRelease(
            name="legacy",
            description="slime before f655e13 (2026-08-04), checked against 2a60f00: megatron-bridge, "
            "Qwen3-VL as the qwen3-* language types",
            default_model="Qwen3-VL-2B-Instruct",
            bridge=True,
        ),
    )
}
DEFAULT_SLIME_RELEASE = "current"


def slime_release(name: str) -> SlimeRelease:
    if name not in SLIME_RELEASES:
        raise KeyError(f"no slime release {name!r}; known: {', '.join(SLIME_RELEASES)}")
    return SLIME_RELEASES[name]


@dataclass(frozen=True)
class SlimeModel:
    hf_repo: str
    megatron_model_type: str
    release: str  # the SLIME_RELEASES entry whose slime has this model type
    num_gpus: int  # the recipe's GPU count
    tensor_parallel: int
    num_experts: int | None = None  # MoE: experts spread over all GPUs (expert and SGLang EP size)
    rotary_base: int | None = None  # exported as MODEL_ARGS_ROTARY_BASE for the model script

    @property
    def name(self) -> str:
        return self.hf_repo.split("/")[-1]

    @property
    def moe(self) -> bool:
        return self.num_experts is not None


def _qwen3_vl(size: str, variant: str, megatron_size: str) -> SlimeModel:
    return SlimeModel(
        hf_repo=f"Qwen/Qwen3-VL-{size}-{variant}",
        megatron_model_type=f"qwen3-{megatron_size}",
        release="legacy",
        num_gpus=4,
        tensor_parallel=4,
        rotary_base=5_000_000,
    )


SLIME_MODELS: dict[str, SlimeModel] = {
    model.name: model
    for model in [
        # slime's own examples/geo3k_vlm_multi_turn at 624b824
        SlimeModel(
            hf_repo="Qwen/Qwen3.5-35B-A3B",
            megatron_model_type="qwen3.5-35B-A3B-vl",
            release="current",
            num_gpus=8,
            tensor_parallel=2,
            num_experts=256,
        ),
        *(
            _qwen3_vl(size, variant, megatron)
            for size, megatron in (("2B", "1.7B"), ("4B", "4B"), ("8B", "8B"))
            for variant in ("Instruct", "Thinking")
        ),
    ]
}


def check_release(model: SlimeModel, release: str) -> SlimeRelease:
    """The release, when its slime has ``model``'s Megatron model type; ValueError saying what to do otherwise."""
    chosen = slime_release(release)
    if model.release != chosen.name:
        others = [name for name, m in SLIME_MODELS.items() if m.release == chosen.name]
        raise ValueError(
            f"{model.name} runs on {model.release} slime ({SLIME_RELEASES[model.release].description}), "
            f"not on {chosen.name} slime ({chosen.description}). Pass --slime-version {model.release}, "
            f"or a model of {chosen.name} slime: {', '.join(others)}"
        )
    return chosen


def slime_model(name: str) -> SlimeModel:
    """Look up a model by name (``Qwen3-VL-2B-Instruct``) or repo (``Qwen/Qwen3-VL-2B-Instruct``)."""
    key = name.rstrip("/").split("/")[-1]
    if key not in SLIME_MODELS:
        import difflib

        close = difflib.get_close_matches(key, list(SLIME_MODELS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise KeyError(
            f"no slime recipe for model {name!r}.{hint} Known: {', '.join(SLIME_MODELS)}. "
            "Add an entry to trainer.slime_launch.SLIME_MODELS with its Megatron model type."
        )
    return SLIME_MODELS[key]


@dataclass
class SlimeLaunch:
    """Where things are, for one slime run."""

    model: SlimeModel
    model_dir: Path  # the HF checkpoint (--hf-checkpoint and --load)
    prompt_data: Path  # train.parquet
    plugin_config: Path  # the plugin YAML (--custom-config-path)
    num_gpus: int
    release: str = DEFAULT_SLIME_RELEASE  # the SLIME_RELEASES entry the installed slime is
    save_dir: Path | None = None
    save_interval: int | None = None  # rollouts between checkpoints; None: only the last rollout's
    rollout_routing_replay: bool = False  # MoE: train with the experts SGLang routed each token to
    megatron_path: str = DEFAULT_MEGATRON_PATH
    repo_root: Path = REPO_ROOT
    wandb_project: str | None = None
    wandb_group: str = "geo3k_vlm_multi_turn"
    extra_args: list[str] = field(default_factory=list)


def build_slime_args(cfg: TrainConfig, launch: SlimeLaunch) -> list[str]:
    """slime's ``train.py`` arguments for the geo3k multi-turn recipe, hyper-parameters from ``cfg``."""
    model = launch.model
    gpus = launch.num_gpus
    release = check_release(model, launch.release)
    if gpus % model.tensor_parallel:
        raise ValueError(
            f"{model.name} uses tensor parallel size {model.tensor_parallel}, which does not divide {gpus} GPUs; "
            f"pass --num-gpus as a multiple of {model.tensor_parallel}"
        )
    if model.num_experts is not None and model.num_experts % gpus:
        raise ValueError(
            f"{model.name}'s {model.num_experts} experts are spread over all GPUs (expert parallel size = "
            f"GPU count), and {gpus} does not divide {model.num_experts}; pass --num-gpus 2, 4 or 8"
        )
    if launch.rollout_routing_replay and not model.moe:
        raise ValueError(f"rollout routing replay needs a MoE model; {model.name} is dense")
    args: list[str] = [
        "--hf-checkpoint", str(launch.model_dir),
        "--load", str(launch.model_dir),
        # data: slime builds the chat-templated prompt and decodes the images itself
        "--prompt-data", str(launch.prompt_data),
        "--input-key", SLIME_DATA_COLUMNS[0],
        "--label-key", SLIME_DATA_COLUMNS[1],
        "--multimodal-keys", json.dumps({"image": SLIME_DATA_COLUMNS[2]}),
        "--apply-chat-template",
        # the plugin
        "--custom-generate-function-path", "rollout.generate",
        "--custom-rm-path", "rollout.reward",
        "--custom-config-path", str(launch.plugin_config),
        # rollout
        "--num-rollout", str(cfg.num_rollout),
        "--rollout-batch-size", str(cfg.rollout_batch_size),
        "--n-samples-per-prompt", str(cfg.n_samples_per_prompt),
        "--rollout-max-response-len", str(cfg.rollout_max_response_len),
        "--rollout-temperature", f"{cfg.rollout_temperature:g}",
        "--global-batch-size", str(cfg.step_batch_size),
        # GRPO
        "--advantage-estimator", "grpo",
        "--kl-loss-coef", f"{cfg.kl_loss_coef:g}",
        "--kl-loss-type", cfg.kl_loss_type,
        "--kl-coef", "0",
        "--entropy-coef", f"{cfg.entropy_coef:g}",
        "--eps-clip", f"{cfg.eps_clip:g}",
        "--eps-clip-high", f"{cfg.eps_clip_high:g}",
        # optimizer
        "--optimizer", "adam",
        "--lr", f"{cfg.lr:g}",
        "--lr-decay-style", "constant",
        "--weight-decay", f"{cfg.weight_decay:g}",
        "--adam-beta1", f"{cfg.adam_beta1:g}",
        "--adam-beta2", f"{cfg.adam_beta2:g}",
        "--clip-grad", f"{cfg.clip_grad:g}",
        "--seed", str(cfg.seed),
    ]  # fmt: skip
    if cfg.rollout_shuffle:
        args.append("--rollout-shuffle")
    if cfg.use_kl_loss:
        args.append("--use-kl-loss")
    if cfg.use_rollout_logprobs:
        args.append("--use-rollout-logprobs")
    if cfg.rollout_top_p != 1.0:
        args += ["--rollout-top-p", f"{cfg.rollout_top_p:g}"]
    if cfg.rollout_stop:
        args += ["--rollout-stop", *cfg.rollout_stop]
    if cfg.rollout_stop_token_ids:
        args += ["--rollout-stop-token-ids", *map(str, cfg.rollout_stop_token_ids)]
    if not cfg.grpo_std_normalization:
        args.append("--disable-grpo-std-normalization")

    # SGLang rollout engines
    args += [
        "--rollout-num-gpus-per-engine", str(gpus if model.moe else 1),
        "--sglang-mem-fraction-static", "0.6",
        "--sglang-cuda-graph-bs", *map(str, _CUDA_GRAPH_BATCH_SIZES),
    ]  # fmt: skip
    if model.moe:
        args += ["--sglang-ep-size", str(gpus)]

    # Megatron training
    args += [
        "--train-backend", "megatron",
        "--tensor-model-parallel-size", str(model.tensor_parallel),
        "--sequence-parallel",
        "--pipeline-model-parallel-size", "1",
        "--context-parallel-size", "1",
        "--expert-model-parallel-size", str(gpus if model.moe else 1),
        "--expert-tensor-parallel-size", "1",
        "--recompute-granularity", "full",
        "--recompute-method", "uniform",
        "--recompute-num-layers", "1",
        "--attention-dropout", "0.0",
        "--hidden-dropout", "0.0",
        "--accumulate-allreduce-grads-in-fp32",
        "--attention-softmax-in-fp32",
        "--attention-backend", "flash",
    ]  # fmt: skip
    if model.moe:
        args += ["--micro-batch-size", str(cfg.micro_batch_size)]
    else:
        args += ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "4096"]
    if release.bridge:
        args += ["--megatron-to-hf-mode", "bridge"]
    if launch.rollout_routing_replay:
        args.append("--use-rollout-routing-replay")

    # placement: actor and rollout share the GPUs
    args += [
        "--actor-num-nodes", "1",
        "--actor-num-gpus-per-node", str(gpus),
        "--rollout-num-gpus", str(gpus),
        "--colocate",
    ]  # fmt: skip
    if launch.save_dir is not None:
        # Megatron's validate_args requires --save-interval with --save. slime always saves the last
        # rollout once an interval is set, so "only the last" is an interval of num_rollout.
        args += [
            "--save",
            str(launch.save_dir),
            "--save-interval",
            str(launch.save_interval or cfg.num_rollout),
        ]
    if launch.wandb_project:
        # The key travels in the job's environment (WANDB_API_KEY), never on the command line.
        args += ["--use-wandb", "--wandb-project", launch.wandb_project, "--wandb-group", launch.wandb_group]
    return args + list(launch.extra_args)


def job_env(launch: SlimeLaunch) -> dict[str, str]:
    """Environment of slime's Ray job (``extra_env_vars``): it replaces slime's own PYTHONPATH."""
    env = {"PYTHONPATH": f"{launch.megatron_path.rstrip('/')}/:{launch.repo_root}"}
    if os.environ.get("WANDB_API_KEY") and launch.wandb_project:
        env["WANDB_API_KEY"] = os.environ["WANDB_API_KEY"]
    return env


def launcher_env(launch: SlimeLaunch) -> dict[str, str]:
    """Variables the model script reads when slime sources it (set in this process before launching)."""
    if launch.model.rotary_base is not None:
        return {"MODEL_ARGS_ROTARY_BASE": str(launch.model.rotary_base)}
    return {}


def redacted(env: dict[str, str]) -> dict[str, str]:
    return {k: ("<set>" if "KEY" in k or "TOKEN" in k else v) for k, v in env.items()}


def describe_command(args: list[str], launch: SlimeLaunch) -> str:
    """The exact command and environment, for ``--dry-run`` (secrets redacted)."""
    lines = [
        f"# slime release: {launch.release} ({slime_release(launch.release).description})",
        f"# megatron model type: {launch.model.megatron_model_type} (scripts/models/"
        f"{launch.model.megatron_model_type}.sh is sourced by slime for MODEL_ARGS)",
        f"# slime's execute_train(num_gpus_per_node={launch.num_gpus}, "
        f"megatron_model_type={launch.model.megatron_model_type!r}, extra_env_vars=...)",
        "# environment of this process:",
        *(f"export {k}={shlex.quote(v)}" for k, v in launcher_env(launch).items()),
        "# environment of the Ray job (extra_env_vars):",
        *(f"{k}={shlex.quote(v)}" for k, v in redacted(job_env(launch)).items()),
        "# the job, run from the slime checkout:",
        "python3 train.py ${MODEL_ARGS[@]} " + shlex.join(args),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Preflight


@dataclass
class Finding:
    level: str  # "ok" | "warn" | "error"
    message: str

    def __str__(self) -> str:
        return f"[{self.level}] {self.message}"


def slime_location() -> Path | None:
    spec = importlib.util.find_spec("slime")
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).resolve().parent


def _cudnn_finding(torch_version: str, cudnn_version: int | None) -> Finding:
    """torch 2.9 with cuDNN < 9.16 runs Conv3d (Qwen-VL's patch embedding) very slowly."""
    if cudnn_version is None:
        return Finding("warn", f"torch {torch_version}: cuDNN not available")
    major, minor = cudnn_version // 10000, (cudnn_version // 100) % 100
    text = f"torch {torch_version}, cuDNN {major}.{minor}.{cudnn_version % 100}"
    if torch_version.startswith("2.9") and (major, minor) < CUDNN_MIN:
        return Finding(
            "warn",
            f"{text}: torch 2.9 with cuDNN older than 9.16 has a severe Conv3d slowdown (pytorch issue "
            f"168167; Qwen-VL's patch embedding is a Conv3d). Fix: {CUDNN_FIX}",
        )
    return Finding("ok", text)


def plugin_dataset(plugin_config: Path) -> Any:
    """The prompt-data format (``envs.dataset.ParquetDataset``) of the env that a plugin YAML names:
    the env module's ``DATASET``, or the generic format when it declares none."""
    from envs.dataset import dataset_of
    from envs.loader import load_env_module
    from rollout.config import RolloutConfig

    return dataset_of(load_env_module(RolloutConfig.from_yaml(plugin_config).rollout_interaction_env_path))


def dataset_problems(path: Path, dataset: Any) -> list[Any]:
    """Every problem of every row, as slime and this plugin will read them (``envs.dataset.RowProblem``).

    The validation of the env's format ``dataset`` (cell types, placeholder/image counts, empty
    problems, labels, images missing, oversized, corrupt or given as URLs, which the rollout
    refuses), plus what only slime minds: slime resolves a relative image path against its own
    working directory (the slime checkout), not the parquet file's. Raises ``DatasetError`` or
    ``FileNotFoundError`` for a file with no rows to report on (unreadable, columns missing)."""
    import pyarrow.parquet as pq

    from envs.dataset import RowProblem

    problems = dataset.validate_parquet(path)
    column = dataset.images_column
    images = pq.read_table(path, columns=[column]).column(column).to_pylist()
    for index, refs in enumerate(images):
        for k, ref in enumerate(refs if isinstance(refs, list) else []):
            if isinstance(ref, str) and not (
                ref.startswith(("http://", "https://", "data:", "file://")) or Path(ref).is_absolute()
            ):
                problems.append(
                    RowProblem(
                        index,
                        column,
                        f"image {k} path {ref!r} is relative; slime resolves it against its own working "
                        "directory. Rewrite the data with absolute paths (make_sample_data.py --absolute-paths) "
                        "or data URIs (--image-mode data_uri)",
                    )
                )
    return sorted(problems, key=lambda p: p.index)


def check_dataset(path: Path, plugin_config: Path = REPO_ROOT / DEFAULT_PLUGIN_CONFIG) -> list[Finding]:
    """One finding for the whole prompt data file, read in the format of the env that
    ``plugin_config`` names: every bad row (row, column, reason) or that all are valid."""
    from envs.dataset import DatasetError, format_row_problems
    from rollout.config import ConfigError

    if not path.is_file():
        return [Finding("error", f"prompt data {path} does not exist")]
    try:
        dataset = plugin_dataset(plugin_config)
    except (ConfigError, ImportError, TypeError) as error:
        return [Finding("error", f"cannot check {path}: its format is the env's of {plugin_config}: {error}")]
    if dataset.columns != SLIME_DATA_COLUMNS:
        return [
            Finding(
                "error",
                f"the env of {plugin_config} reads the columns {', '.join(dataset.columns)}, but slime is "
                f"given {', '.join(SLIME_DATA_COLUMNS)} (--input-key, --label-key, --multimodal-keys); "
                "a slime run needs prompt data in these default column names",
            )
        ]
    try:
        problems = dataset_problems(path, dataset)
    except (DatasetError, FileNotFoundError) as error:
        return [Finding("error", str(error))]
    if problems:
        rows = len({p.index for p in problems})
        return [
            Finding(
                "error",
                f"{path}: {len(problems)} problem(s) in {rows} row(s):\n{format_row_problems(problems)}\n"
                "Fix these rows, or leave them out with examples/geo3k_vlm_multi_turn/prepare_data.py --drop-bad-rows",
            )
        ]
    import pyarrow.parquet as pq

    num_rows = pq.read_metadata(path).num_rows
    if num_rows == 0:
        return [Finding("error", f"{path} has no rows")]
    return [Finding("ok", f"{path}: {num_rows} rows, all valid")]


def installed_release(checkout: Path) -> str:
    """Which SLIME_RELEASES entry a slime checkout is: the legacy parser has --megatron-to-hf-mode."""
    argument_files = [
        checkout / "slime" / "utils" / "arguments.py",
        checkout / "slime" / "backends" / "megatron_utils" / "arguments.py",
    ]
    has_bridge = any(
        f.is_file() and "--megatron-to-hf-mode" in f.read_text(errors="replace") for f in argument_files
    )
    return "legacy" if has_bridge else "current"


def _release_finding(checkout: Path, release: str) -> Finding:
    # slime drops flags its parser does not know, so a recipe for the other release would start and
    # then fail (or silently run differently) instead of being refused here.
    installed = installed_release(checkout)
    if installed == release:
        return Finding("ok", f"{checkout} is {installed} slime ({SLIME_RELEASES[installed].description})")
    return Finding(
        "error",
        f"{checkout} is {installed} slime ({SLIME_RELEASES[installed].description}), but the recipe is for "
        f"{release} slime. Pass --slime-version {installed} with one of its models "
        f"({', '.join(n for n, m in SLIME_MODELS.items() if m.release == installed)}), or install {release} slime",
    )


def preflight(launch: SlimeLaunch) -> list[Finding]:
    findings: list[Finding] = []
    location = slime_location()
    if location is None:
        findings.append(
            Finding(
                "error",
                "slime is not importable; install it (pip install -e <slime checkout>) or use --backend local",
            )
        )
    else:
        findings.append(Finding("ok", f"slime imported from {location}"))
        checkout = location.parent
        script = checkout / "scripts" / "models" / f"{launch.model.megatron_model_type}.sh"
        if not script.is_file():
            findings.append(
                Finding(
                    "error",
                    f"{script} does not exist: this slime has no Megatron model type "
                    f"{launch.model.megatron_model_type!r} for {launch.model.name}",
                )
            )
        findings.append(_release_finding(checkout, launch.release))
    try:
        import torch

        gpus = torch.cuda.device_count()
        level = "ok" if gpus >= launch.num_gpus else "error"
        findings.append(Finding(level, f"{gpus} GPU(s) visible, {launch.num_gpus} requested"))
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        findings.append(_cudnn_finding(torch.__version__, cudnn))
    except ImportError:
        findings.append(Finding("error", "torch is not importable"))
    findings.extend(check_dataset(launch.prompt_data, launch.plugin_config))
    if (launch.model_dir / "config.json").is_file():
        findings.append(Finding("ok", f"checkpoint {launch.model_dir}"))
    else:
        findings.append(Finding("error", f"checkpoint directory {launch.model_dir} has no config.json"))
    if not launch.plugin_config.is_file():
        findings.append(Finding("error", f"plugin config {launch.plugin_config} does not exist"))
    return findings


def launch(args: list[str], launch: SlimeLaunch) -> None:
    """Hand over to slime's ``execute_train`` (imported here: slime is only needed for this)."""
    from slime.utils.external_utils.command_utils import execute_train

    os.environ.update(launcher_env(launch))
    execute_train(
        train_args=shlex.join(args),
        num_gpus_per_node=launch.num_gpus,
        megatron_model_type=launch.model.megatron_model_type,
        extra_env_vars=job_env(launch),
    )
