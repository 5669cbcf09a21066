"""The single-machine trainer's configuration: one validated dataclass with slime's hyper-parameter names.

Names match slime's command-line flags with dashes turned into underscores (``--eps-clip-high`` ->
``eps_clip_high``), and defaults match slime's defaults or the geo3k recipe, so a setting can move
between the two backends unchanged. Settings that only the local backend has (device, output
directory, engine batching, report sizes) use names slime does not have.

Plugin settings (``max_turns``, ``rollout_interaction_env_path``, ``env_kwargs``, ...) live in the
plugin YAML (``custom_config_path``), as on slime; ``max_turns``, ``max_tokens_per_turn`` and
``env_kwargs`` here override it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollout.config import ConfigError as PluginConfigError
from rollout.config import RolloutConfig
from trainer.grpo import KL_LOSS_TYPES

DEFAULT_PLUGIN_CONFIG = "configs/geo3k_vlm_multi_turn.yaml"


class ConfigError(ValueError):
    """A trainer setting is unknown or out of range; the message names the key and the fix."""


#: Every way a setting can be wrong, trainer's or plugin's: what an entry point reports and exits on.
CONFIG_ERRORS: tuple[type[Exception], ...] = (ConfigError, PluginConfigError)


_PLAIN_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}


@dataclass
class TrainConfig:
    # --- model and data ---
    hf_checkpoint: str = "tiny-qwen2.5-vl-small-vocab"  # a models preset or a local HF checkpoint dir
    prompt_data: str = ""  # train.parquet with columns problem, answer, images
    drop_bad_rows: bool = False  # train on a file's usable rows; otherwise any bad row stops the run
    custom_config_path: str = DEFAULT_PLUGIN_CONFIG  # the plugin YAML (max_turns, env path, env kwargs)
    output_dir: str = "runs/geo3k"
    # --- rollout ---
    num_rollout: int = 100  # optimizer "steps" of the outer loop: one rollout batch each
    rollout_batch_size: int = 8  # prompts per rollout
    n_samples_per_prompt: int = 8  # episodes per prompt (the GRPO group)
    rollout_temperature: float = 1.0
    rollout_top_p: float = 1.0
    rollout_top_k: int = -1  # -1: no top-k filter (SGLang's convention)
    rollout_max_response_len: int = 4096  # all turns of one episode together (model and env tokens)
    rollout_stop: list[str] | None = None  # stop strings (slime's --rollout-stop)
    rollout_stop_token_ids: list[int] | None = None  # slime's --rollout-stop-token-ids
    rollout_shuffle: bool = True
    max_turns: int | None = None  # overrides the plugin YAML's max_turns
    max_tokens_per_turn: int | None = None  # overrides the plugin YAML's per-turn generation cap
    env_kwargs: dict[str, Any] | None = None  # overrides the plugin YAML's env_kwargs
    # --- GRPO ---
    rewards_normalization: bool = True
    grpo_std_normalization: bool = True
    eps_clip: float = 0.2
    eps_clip_high: float = 0.28
    use_rollout_logprobs: bool = True  # old log-probs = the engine's (else the trainer's, before the update)
    use_kl_loss: bool = False
    kl_loss_coef: float = 0.0
    kl_loss_type: str = "low_var_kl"
    entropy_coef: float = 0.0
    # --- supervised warm-start before GRPO (trainer.sft; local backend only) ---
    sft_steps: int = 0  # 0: none; otherwise SFT steps on scripted tool-call transcripts, then GRPO
    sft_data: str = ""  # geo3k-format parquet (or a directory with train.parquet); "": prompt_data
    sft_batch_size: int = 8  # transcripts per SFT step
    sft_transcripts_per_row: int = 2
    sft_wrong_first: float = 0.5  # fraction of transcripts whose first call is wrong, the second right
    sft_lr: float | None = None  # None: lr
    # --- optimizer (AdamW) ---
    lr: float = 1e-6
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    clip_grad: float = 1.0
    global_batch_size: int | None = None  # samples per optimizer step; None: the whole rollout (one step)
    micro_batch_size: int = 1  # samples per forward pass (left-padded); gradients accumulate over a step
    # recompute activations in the backward pass; "auto": on for models over 1B parameters on CUDA
    gradient_checkpointing: bool | str = "auto"
    freeze_vision: bool = False  # train the language model only (the vision tower keeps its weights)
    # --- local engine ---
    device: str | None = None  # None: cuda when available, else cpu
    engine_max_batch_size: int = 32
    engine_batch_wait_ms: float = 5.0
    # "static": KV cache in slots, CUDA graphs, continuous batching; "eager": one forward per token;
    # "auto": static on CUDA for models it supports (not Qwen3.5's linear attention), else eager.
    engine_decode: str = "auto"
    engine_max_seq_len: int | None = None  # static: tokens one request may hold (None: 8192)
    # Cap on this process's CUDA memory in GiB (torch.cuda.set_per_process_memory_fraction, set
    # before the model loads): a run on a larger card then fails where a card of this size would.
    # None: the whole card.
    gpu_memory_limit_gib: float | None = None
    # --- bookkeeping ---
    seed: int = 1234
    save_interval: int | None = None  # checkpoint every N rollouts; the last rollout is always saved
    keep_checkpoints: int = 2
    # optimizer state (needed to resume exactly) in checkpoints: true (every one kept), "latest" (only
    # the newest; older ones keep their weights), false; "auto": true up to 1B parameters, else "latest"
    save_optimizer: bool | str = "auto"
    use_tensorboard: bool = False
    use_wandb: bool = False
    wandb_project: str = "vlm-multiturn"
    wandb_group: str | None = None
    report_episodes: int = 12  # episodes shown in the HTML report
    progress: bool = True  # tqdm progress bar
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in the trainer state, never read

    def __post_init__(self) -> None:
        self.validate()

    @property
    def samples_per_rollout(self) -> int:
        return self.rollout_batch_size * self.n_samples_per_prompt

    @property
    def step_batch_size(self) -> int:
        """Samples per optimizer step."""
        return self.global_batch_size or self.samples_per_rollout

    @property
    def steps_per_rollout(self) -> int:
        return self.samples_per_rollout // self.step_batch_size

    def validate(self) -> None:
        self._check_types()
        positive = (
            "num_rollout",
            "rollout_batch_size",
            "n_samples_per_prompt",
            "rollout_max_response_len",
            "micro_batch_size",
            "engine_max_batch_size",
            "keep_checkpoints",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rollout_temperature <= 0:
            raise ConfigError(
                f"rollout_temperature must be > 0, got {self.rollout_temperature} (0 is greedy decoding, "
                "which has no log-probs to learn from)"
            )
        if not 0 < self.rollout_top_p <= 1:
            raise ConfigError(f"rollout_top_p must be in (0, 1], got {self.rollout_top_p}")
        if self.grpo_std_normalization and self.rewards_normalization and self.n_samples_per_prompt < 2:
            raise ConfigError(
                "n_samples_per_prompt must be >= 2 for GRPO (a group of one has no baseline); "
                f"got {self.n_samples_per_prompt}"
            )
        if not (0 <= self.eps_clip < 1) or self.eps_clip_high < 0:
            raise ConfigError(
                f"eps_clip must be in [0, 1) and eps_clip_high >= 0; got {self.eps_clip}, {self.eps_clip_high}"
            )
        if self.kl_loss_type not in KL_LOSS_TYPES:
            raise ConfigError(
                f"kl_loss_type must be one of {', '.join(KL_LOSS_TYPES)}; got {self.kl_loss_type!r}"
            )
        if self.kl_loss_coef != 0 and not self.use_kl_loss:
            raise ConfigError(f"kl_loss_coef={self.kl_loss_coef} has no effect without use_kl_loss=True")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.clip_grad <= 0:
            raise ConfigError(f"clip_grad must be > 0, got {self.clip_grad}")
        if self.global_batch_size is not None and (
            self.global_batch_size < 1 or self.samples_per_rollout % self.global_batch_size
        ):
            raise ConfigError(
                f"global_batch_size ({self.global_batch_size}) must divide rollout_batch_size x "
                f"n_samples_per_prompt ({self.samples_per_rollout})"
            )
        if self.save_interval is not None and self.save_interval < 1:
            raise ConfigError(f"save_interval must be >= 1 or None, got {self.save_interval}")
        if self.sft_steps < 0 or self.sft_batch_size < 1 or self.sft_transcripts_per_row < 1:
            raise ConfigError(
                "sft_steps must be >= 0, sft_batch_size and sft_transcripts_per_row >= 1; got "
                f"{self.sft_steps}, {self.sft_batch_size}, {self.sft_transcripts_per_row}"
            )
        if not 0 <= self.sft_wrong_first <= 1:
            raise ConfigError(f"sft_wrong_first must be in [0, 1], got {self.sft_wrong_first}")
        if self.sft_lr is not None and not (self.sft_lr > 0 and math.isfinite(self.sft_lr)):
            raise ConfigError(f"sft_lr must be a positive number or null, got {self.sft_lr}")
        if self.engine_decode not in ("auto", "eager", "static"):
            raise ConfigError(f'engine_decode must be "auto", "eager" or "static", got {self.engine_decode!r}')
        if self.engine_max_seq_len is not None and self.engine_max_seq_len < 2:
            raise ConfigError(f"engine_max_seq_len must be >= 2 or null, got {self.engine_max_seq_len}")
        if not (isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"):
            raise ConfigError(
                f'gradient_checkpointing must be true, false or "auto", got {self.gradient_checkpointing!r}'
            )
        if not (isinstance(self.save_optimizer, bool) or self.save_optimizer in ("auto", "latest")):
            raise ConfigError(
                f'save_optimizer must be true, false, "latest" or "auto", got {self.save_optimizer!r}'
            )
        if self.gpu_memory_limit_gib is not None and not (
            self.gpu_memory_limit_gib > 0 and math.isfinite(self.gpu_memory_limit_gib)
        ):
            raise ConfigError(
                f"gpu_memory_limit_gib must be a positive number or null, got {self.gpu_memory_limit_gib}"
            )
        for name in ("max_turns", "max_tokens_per_turn"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or None, got {getattr(self, name)}")

    def _check_types(self) -> None:
        """Plain-typed settings hold their type: ``--set lr=1e-5x`` is a string, which the range checks
        below would meet with a TypeError traceback, and ``num_rollout: true`` would pass as 1."""
        for item in dataclasses.fields(self):
            kinds = [kind.strip() for kind in str(item.type).split("|")]
            plain = [kind for kind in kinds if kind != "None"]
            if len(plain) != 1 or plain[0] not in _PLAIN_TYPES:
                continue
            value = getattr(self, item.name)
            if value is None and "None" in kinds:
                continue
            allowed = _PLAIN_TYPES[plain[0]]
            if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
                expected = plain[0] + (" or null" if "None" in kinds else "")
                raise ConfigError(f"{item.name} must be {expected}, got {type(value).__name__} {value!r}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys with the nearest valid name."""
        names = cls.field_names()
        for key in values:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"unknown trainer setting '{key}'.{hint} Valid settings: {', '.join(names)}"
                )
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir).expanduser()


def plugin_config(cfg: TrainConfig) -> RolloutConfig:
    """The plugin YAML (``cfg.custom_config_path``) with the trainer's overrides, validated the one
    way every entry point validates it (``RolloutConfig.from_yaml``: unknown keys fail with the
    nearest valid name, a relative env file path is found next to the YAML)."""
    path = Path(cfg.custom_config_path).expanduser()
    if not path.is_file():
        raise PluginConfigError(
            f"plugin config {path} does not exist; pass the YAML with max_turns and "
            "rollout_interaction_env_path (e.g. configs/geo3k_vlm_multi_turn.yaml) as custom_config_path"
        )
    config = RolloutConfig.from_yaml(path)
    changes: dict[str, Any] = {}
    if cfg.max_turns is not None:
        changes["max_turns"] = cfg.max_turns
    if cfg.max_tokens_per_turn is not None:
        changes["max_tokens_per_turn"] = cfg.max_tokens_per_turn
    if cfg.env_kwargs is not None:
        changes["env_kwargs"] = dict(cfg.env_kwargs)
    return dataclasses.replace(config, **changes) if changes else config
