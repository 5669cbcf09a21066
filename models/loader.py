"""One loader for policies: a preset name (offline tiny builds) or a local Hugging Face checkpoint.

``load_policy`` returns tokenizer, processor and model; ``load_processing`` only the tokenizer and
processor (what the rollout needs). Presets are built once into the cache directory and afterwards
reload with ``from_pretrained``, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import torch
from transformers import Qwen2Tokenizer

from models.cache import cache_dir
from models.chat_templates import chat_template
from models.processors import PROCESSOR_CLASSES, build_processor
from models.qwen_vocab import VOCABULARIES, build_full_vocab_tokenizer, build_small_vocab_tokenizer
from models.tiny import MODEL_CLASSES, build_tiny_model
from models.vision_attention import use_default_vision_attention

# Bump when a preset's build changes, so stale caches are rebuilt rather than silently reused.
BUILD_VERSION = 1
_MODEL_TYPE_TO_FAMILY = {
    "qwen2_5_vl": "qwen2.5-vl",
    "qwen3_vl": "qwen3-vl",
    "qwen3_5": "qwen3.5",
    "qwen3_5_moe": "qwen3.5-moe",
}


@dataclass(frozen=True)
class Preset:
    family: str  # a key of models.tiny.MODEL_CLASSES
    template: str  # a name from models.chat_templates.TEMPLATE_NAMES
    small_vocab: bool
    vocabulary: str = "qwen"  # a key of models.qwen_vocab.VOCABULARIES


PRESETS: dict[str, Preset] = {
    "tiny-qwen2.5-vl": Preset("qwen2.5-vl", "qwen2.5-vl", small_vocab=False),
    "tiny-qwen3-vl": Preset("qwen3-vl", "qwen3-vl-instruct", small_vocab=False),
    "tiny-qwen3-vl-thinking": Preset("qwen3-vl", "qwen3-vl-thinking", small_vocab=False),
    "tiny-qwen2.5-vl-small-vocab": Preset("qwen2.5-vl", "qwen2.5-vl", small_vocab=True),
    "tiny-qwen3-vl-small-vocab": Preset("qwen3-vl", "qwen3-vl-instruct", small_vocab=True),
    "tiny-qwen3.5": Preset("qwen3.5", "qwen3.5", small_vocab=False, vocabulary="qwen3_5"),
    "tiny-qwen3.5-moe": Preset("qwen3.5-moe", "qwen3.5", small_vocab=False, vocabulary="qwen3_5"),
    "tiny-qwen3.5-small-vocab": Preset("qwen3.5", "qwen3.5", small_vocab=True, vocabulary="qwen3_5"),
}


@dataclass
class Policy:
    tokenizer: Any
    processor: Any
    model: Any | None
    family: str
    path: Path


class PolicyNotFound(FileNotFoundError):
    pass


def build_tokenizer(preset: Preset) -> Qwen2Tokenizer:
    vocab = VOCABULARIES[preset.vocabulary]
    backend = build_small_vocab_tokenizer(vocab=vocab) if preset.small_vocab else build_full_vocab_tokenizer(vocab)
    tokenizer = Qwen2Tokenizer(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = chat_template(preset.template)
    return tokenizer


@contextmanager
def _exclusive(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def preset_dir(name: str) -> Path:
    """The checkpoint directory of a preset, building it on first use."""
    preset = PRESETS[name]
    target = cache_dir() / "presets" / f"{name}-v{BUILD_VERSION}"
    with _exclusive(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():
            return target
        staging = target.with_name(target.name + ".building")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = build_tokenizer(preset)
        processor = build_processor(preset.family, tokenizer, chat_template(preset.template))
        regular_vocab = len(tokenizer) - VOCABULARIES[preset.vocabulary].added_tokens
        model = build_tiny_model(preset.family, len(tokenizer), regular_vocab)
        model.generation_config.do_sample = True
        model.generation_config.top_k = 0
        model.generation_config.top_p = 1.0
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "vlm_multiturn_preset.json").write_text(
            json.dumps({"preset": name, "family": preset.family, "template": preset.template})
        )
        staging.rename(target)
    return target


def resolve_checkpoint(name_or_path: str | Path) -> Path:
    if str(name_or_path) in PRESETS:
        return preset_dir(str(name_or_path))
    path = Path(name_or_path).expanduser()
    if (path / "config.json").is_file():
        return path
    hint = get_close_matches(str(name_or_path), list(PRESETS), n=1)
    suggestion = f" Did you mean the preset {hint[0]!r}?" if hint else ""
    raise PolicyNotFound(
        f"{str(name_or_path)!r} is neither a preset ({', '.join(PRESETS)}) nor a directory with a "
        f"config.json.{suggestion} Download a checkpoint first, e.g. "
        f"`hf download Qwen/Qwen2.5-VL-3B-Instruct --local-dir <dir>`."
    )


def model_family(path: Path) -> str:
    config = json.loads((path / "config.json").read_text())
    model_type = config.get("model_type")
    if model_type not in _MODEL_TYPE_TO_FAMILY:
        raise ValueError(
            f"{path}: model_type {model_type!r} is not supported; supported: {', '.join(_MODEL_TYPE_TO_FAMILY)}"
        )
    return _MODEL_TYPE_TO_FAMILY[model_type]


def load_processing(name_or_path: str | Path) -> Policy:
    """Tokenizer and image-only processor of a preset or checkpoint (no model weights)."""
    path = resolve_checkpoint(name_or_path)
    family = model_family(path)
    processor = PROCESSOR_CLASSES[family].from_pretrained(path)
    tokenizer = processor.tokenizer
    if tokenizer.chat_template is None and processor.chat_template is not None:
        tokenizer.chat_template = processor.chat_template
    return Policy(tokenizer=tokenizer, processor=processor, model=None, family=family, path=path)


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_policy(
    name_or_path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Policy:
    """Tokenizer, processor and model. bf16 on GPU, fp32 on CPU unless ``dtype`` says otherwise; on
    a GPU the vision tower attends through ``models.vision_attention.segmented_sdpa``."""
    policy = load_processing(name_or_path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)
    model = MODEL_CLASSES[policy.family].from_pretrained(policy.path, dtype=dtype)
    policy.model = model.to(device).eval()
    use_default_vision_attention(policy.model)
    return policy
