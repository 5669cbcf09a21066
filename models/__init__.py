"""Loading Qwen-VL tokenizers, processors and models: local checkpoints and offline tiny builds."""

from models.loader import PRESETS, Policy, PolicyNotFound, load_policy, load_processing, resolve_checkpoint

__all__ = ["PRESETS", "Policy", "PolicyNotFound", "load_policy", "load_processing", "resolve_checkpoint"]
