"""The slime backend: which model runs how, the argument list for slime's ``train.py``, preflight checks.

:data:`SLIME_MODELS` maps model names to slime's Megatron model type (the ``scripts/models/<type>.sh``
that slime sources for the architecture flags) and to the parallel layout of the geo3k recipe.
slime's Megatron VLM support changed over time: releases with megatron-bridge
(``--megatron-to-hf-mode bridge``) ran Qwen3-VL 2B/4B/8B as the ``qwen3-*`` language types; since the
bridge was internalized the only VLM type is ``qwen3.5-35B-A3B-vl`` (Qwen3.5 MoE language model plus
the HF vision tower). :func:`preflight` tells which one the installed slime is.

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

from trainer.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
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
class SlimeModel:
    hf_repo: str
    megatron_model_type: str
    num_gpus: int  # the recipe's GPU count
    tensor_parallel: int
    moe: bool = False  # experts spread over all GPUs (expert and SGLang EP size = GPU count)
    needs_bridge: bool = False  # runs only on slime releases with --megatron-to-hf-mode bridge
    rotary_base: int | None = None  # exported as MODEL_ARGS_ROTARY_BASE for the model script

    @property
    def name(self) -> str:
        return self.hf_repo.split("/")[-1]


def _qwen3_vl(size: str, variant: str, megatron_size: str) -> SlimeModel:
    return SlimeModel(
        hf_repo=f"Qwen/Qwen3-VL-{size}-{variant}",
        megatron_model_type=f"qwen3-{megatron_size}",
        num_gpus=4,
        tensor_parallel=4,
        needs_bridge=True,
        rotary_base=5_000_000,
    )


SLIME_MODELS: dict[str, SlimeModel] = {
    model.name: model
    for model in [
        *(
            _qwen3_vl(size, variant, megatron)
            for size, megatron in (("2B", "1.7B"), ("4B", "4B"), ("8B", "8B"))
            for variant in ("Instruct", "Thinking")
        ),
        SlimeModel(
            hf_repo="Qwen/Qwen3.5-35B-A3B",
            megatron_model_type="qwen3.5-35B-A3B-vl",
            num_gpus=8,
            tensor_parallel=2,
            moe=True,
        ),
    ]
}


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
    save_dir: Path | None = None
    save_interval: int | None = None
    megatron_path: str = DEFAULT_MEGATRON_PATH
    repo_root: Path = REPO_ROOT
    wandb_project: str | None = None
    wandb_group: str = "geo3k_vlm_multi_turn"
    extra_args: list[str] = field(default_factory=list)


def build_slime_args(cfg: TrainConfig, launch: SlimeLaunch) -> list[str]:
    """slime's ``train.py`` arguments for the geo3k multi-turn recipe, hyper-parameters from ``cfg``."""
    model = launch.model
    gpus = launch.num_gpus
    if gpus % model.tensor_parallel and not model.moe:
        raise ValueError(
            f"{model.name} uses tensor parallel size {model.tensor_parallel}, which does not divide {gpus} GPUs"
        )
    args: list[str] = [
        "--hf-checkpoint", str(launch.model_dir),
        "--load", str(launch.model_dir),
        # data: slime builds the chat-templated prompt and decodes the images itself
        "--prompt-data", str(launch.prompt_data),
        "--input-key", "problem",
        "--label-key", "answer",
        "--multimodal-keys", json.dumps({"image": "images"}),
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
    if model.needs_bridge:
        args += ["--megatron-to-hf-mode", "bridge"]

    # placement: actor and rollout share the GPUs
    args += [
        "--actor-num-nodes", "1",
        "--actor-num-gpus-per-node", str(gpus),
        "--rollout-num-gpus", str(gpus),
        "--colocate",
    ]  # fmt: skip
    if launch.save_dir is not None:
        args += ["--save", str(launch.save_dir)]
        if launch.save_interval:
            args += ["--save-interval", str(launch.save_interval)]
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


def check_dataset(path: Path) -> list[Finding]:
    """Columns and the first row, as slime will read them (relative image paths resolve against slime's cwd)."""
    import pyarrow.parquet as pq

    from envs.geo3k.dataset import COLUMNS, IMAGE_PLACEHOLDER, answer_problem

    if not path.is_file():
        return [Finding("error", f"prompt data {path} does not exist")]
    table = pq.read_table(path)
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        return [
            Finding(
                "error", f"{path} lacks column(s) {', '.join(missing)}; has {', '.join(table.column_names)}"
            )
        ]
    if table.num_rows == 0:
        return [Finding("error", f"{path} has no rows")]
    row = {c: table.column(c)[0].as_py() for c in COLUMNS}
    findings = []
    images = row["images"] or []
    if row["problem"].count(IMAGE_PLACEHOLDER) != len(images):
        findings.append(
            Finding(
                "error",
                f"{path} row 0: {row['problem'].count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholder(s) "
                f"but {len(images)} image(s)",
            )
        )
    reason = answer_problem(row["answer"] or "")
    if reason:
        findings.append(Finding("error", f"{path} row 0 answer: {reason}"))
    for ref in images:
        if not isinstance(ref, str):
            findings.append(
                Finding("error", f"{path} row 0: image is {type(ref).__name__}; slime drops raw bytes")
            )
        elif not (ref.startswith(("http://", "https://", "data:")) or Path(ref).is_absolute()):
            findings.append(
                Finding(
                    "error",
                    f"{path} row 0: image path {ref!r} is relative; slime resolves it against its own working "
                    "directory. Rewrite the data with absolute paths (make_sample_data.py --absolute-paths) "
                    "or data URIs (--image-mode data_uri)",
                )
            )
    if not findings:
        findings.append(
            Finding("ok", f"{path}: {table.num_rows} rows, columns {', '.join(COLUMNS)}, row 0 valid")
        )
    return findings


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
        argument_files = [
            checkout / "slime" / "utils" / "arguments.py",
            checkout / "slime" / "backends" / "megatron_utils" / "arguments.py",
        ]
        has_bridge = any(
            f.is_file() and "--megatron-to-hf-mode" in f.read_text(errors="replace") for f in argument_files
        )
        if launch.model.needs_bridge and not has_bridge:
            findings.append(
                Finding(
                    "error",
                    f"{launch.model.name} needs a slime release with megatron-bridge (--megatron-to-hf-mode bridge); "
                    "the installed slime has none (Qwen2.5-VL/Qwen3-VL Megatron support was removed in Aug 2026). "
                    "Use an older slime or --model Qwen3.5-35B-A3B",
                )
            )
    try:
        import torch

        gpus = torch.cuda.device_count()
        level = "ok" if gpus >= launch.num_gpus else "error"
        findings.append(Finding(level, f"{gpus} GPU(s) visible, {launch.num_gpus} requested"))
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        findings.append(_cudnn_finding(torch.__version__, cudnn))
    except ImportError:
        findings.append(Finding("error", "torch is not importable"))
    findings.extend(check_dataset(launch.prompt_data))
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
