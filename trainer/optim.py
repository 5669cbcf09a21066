"""AdamW with slime's hyper-parameter names, fp32 master weights for bf16 models, grad clipping.

Why master weights: the recipe's learning rate is 1e-6. A bf16 parameter of magnitude 0.02 has a
spacing of about 1e-4 between representable values, so an Adam update of ~1e-6 applied in bf16
rounds away to nothing and training silently does nothing. Like Megatron's mixed-precision
optimizer, each low-precision parameter gets an fp32 copy that AdamW updates; the model's bf16
weights are refreshed from it after every step. fp32 parameters (CPU runs) are updated in place.

Weight decay applies to matrices only (not to biases and norm scales), as in Megatron's default
parameter groups, which slime uses.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.config import TrainConfig


class MasterWeightAdamW:
    def __init__(self, model: torch.nn.Module, cfg: TrainConfig) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.masters = [p if p.dtype == torch.float32 else p.detach().float().clone() for p in self.params]
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.inner = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
        )
        self.clip_grad = cfg.clip_grad

    def zero_grad(self) -> None:
        for param, master in zip(self.params, self.masters, strict=True):
            param.grad = None
            master.grad = None

    def step(self) -> float:
        """Clip the accumulated gradients to ``clip_grad`` (global L2 norm), step, return the pre-clip norm."""
        for param, master in zip(self.params, self.masters, strict=True):
            if master is not param:
                master.grad = None if param.grad is None else param.grad.float()
        with_grad = [m for m in self.masters if m.grad is not None]
        if not with_grad:
            return 0.0
        grad_norm = torch.nn.utils.clip_grad_norm_(with_grad, self.clip_grad)
        if not torch.isfinite(grad_norm):
            # A non-finite gradient would poison every weight; skip the step and report it.
            self.zero_grad()
            return float(grad_norm)
        self.inner.step()
        with torch.no_grad():
            for param, master in zip(self.params, self.masters, strict=True):
                if master is not param:
                    param.copy_(master)
        self.zero_grad()
        return float(grad_norm)

    @property
    def lr(self) -> float:
        return float(self.inner.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        low_precision = [
            m.detach().cpu() for p, m in zip(self.params, self.masters, strict=True) if m is not p
        ]
        return {"adamw": self.inner.state_dict(), "master_weights": low_precision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["adamw"])
        saved = state.get("master_weights") or []
        pairs = [(p, m) for p, m in zip(self.params, self.masters, strict=True) if m is not p]
        # A checkpoint written by an fp32 run has no master copies: the model's weights are the masters.
        if len(saved) != len(pairs):
            return
        with torch.no_grad():
            for (param, master), weights in zip(pairs, saved, strict=True):
                master.copy_(weights)
                param.copy_(master)
