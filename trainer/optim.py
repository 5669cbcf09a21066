"""AdamW with slime's hyper-parameter names, fp32 master weights for bf16 models, grad clipping.

Why master weights: the recipe's learning rate is 1e-6. A bf16 parameter of magnitude 0.02 has a
spacing of about 1e-4 between representable values, so an Adam update of ~1e-6 applied in bf16
rounds away to nothing and training silently does nothing. Like Megatron's mixed-precision
optimizer, each low-precision parameter gets an fp32 copy that AdamW updates; the model's bf16
weights are refreshed from it after every step. fp32 parameters (CPU runs) are updated in place.

Memory: a bf16 model of P parameters needs 2P bytes of weights, 2P of gradients and 12P of
optimizer state (fp32 masters and AdamW's two moments), 16P in all (56 GiB for a 3.75B model).
Gradients accumulate in the model's own dtype and are never copied to fp32 all at once: the step
walks the parameters in chunks of ``chunk_numel`` elements, converts one chunk's gradients to fp32,
frees the bf16 ones, clips, runs AdamW on that chunk alone and refreshes its bf16 weights, so the
fp32 gradients in existence at any time are one chunk's (a full fp32 copy would add 4P bytes). On
CUDA AdamW is the fused kernel, which keeps no full-size temporaries either. The global gradient
norm for clipping is taken over all gradients before the first chunk is stepped.

Weight decay applies to matrices only (not to biases and norm scales), as in Megatron's default
parameter groups, which slime uses.
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.config import TrainConfig

#: fp32 gradient elements converted per chunk of the step: 512 MiB of temporaries (a parameter
#: larger than this, such as a 151,936 x 2,048 embedding, is a chunk of its own).
DEFAULT_CHUNK_NUMEL = 2**27


class MasterWeightAdamW:
    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainConfig,
        *,
        fused: bool | None = None,
        chunk_numel: int = DEFAULT_CHUNK_NUMEL,
    ) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.masters = [
            p if p.dtype == torch.float32 else p.detach().to(torch.float32, copy=True) for p in self.params
        ]
        decay = [m for m in self.masters if m.ndim >= 2]
        no_decay = [m for m in self.masters if m.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if fused is None:
            # Fused on CUDA (one kernel per chunk, no temporaries); elsewhere torch's default
            # implementation, so CPU runs keep the numbers they always had.
            fused = all(m.device.type == "cuda" for m in self.masters)
        self.inner = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=True if fused else None,
        )
        self.clip_grad = cfg.clip_grad
        self.chunk_numel = chunk_numel

    def zero_grad(self) -> None:
        for param, master in zip(self.params, self.masters, strict=True):
            param.grad = None
            master.grad = None

    @torch.no_grad()
    def step(self) -> float:
        """Clip the accumulated gradients to ``clip_grad`` (global L2 norm), step, return the pre-clip norm."""
        pending = [
            (p, m, p.grad) for p, m in zip(self.params, self.masters, strict=True) if p.grad is not None
        ]
        if not pending:
            return 0.0
        total_norm = _total_norm([grad for _, _, grad in pending])
        if not torch.isfinite(total_norm):
            # A non-finite gradient would poison every weight; skip the step and report it.
            self.zero_grad()
            return float(total_norm)
        # Every parameter's gradient is held by ``pending`` alone from here on, so that AdamW sees
        # only the chunk being stepped and a bf16 gradient is freed as soon as it is converted.
        self.zero_grad()
        pending.reverse()  # popped from the end: the parameters' own order
        while pending:
            chunk, converted = [], 0
            while pending and (not chunk or converted + _cost(pending[-1]) <= self.chunk_numel):
                param, master, grad = pending.pop()
                converted += _cost((param, master, grad))
                master.grad = grad if grad.dtype == master.dtype else grad.to(master.dtype)
                del grad
                chunk.append((param, master))
            torch.nn.utils.clip_grads_with_norm_([m for _, m in chunk], self.clip_grad, total_norm)
            self.inner.step()
            for param, master in chunk:
                if master is not param:
                    param.copy_(master)
                master.grad = None
                param.grad = None
        return float(total_norm)

    @property
    def lr(self) -> float:
        return float(self.inner.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        low_precision = [
            m.detach().cpu() for p, m in zip(self.params, self.masters, strict=True) if m is not p
        ]
        return {"adamw": self.inner.state_dict(), "master_weights": low_precision}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_params = sum(len(group["params"]) for group in state["adamw"]["param_groups"])
        if saved_params != len(self.params):
            raise ValueError(
                f"the checkpoint's optimizer state is for {saved_params} trainable tensors, this model has "
                f"{len(self.params)}; resume with the settings the checkpoint was trained with "
                "(freeze_vision in particular)"
            )
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


def _cost(entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> int:
    """fp32 elements a parameter's step allocates: its gradient's size unless that is already fp32."""
    _, master, grad = entry
    return 0 if grad.dtype == master.dtype else grad.numel()


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together, accumulated in fp32 whatever their dtype.

    fp32 gradients go through ``torch.nn.utils.get_total_norm``, the function ``clip_grad_norm_``
    uses, so an fp32 run clips exactly as before; a bf16 gradient's norm is accumulated in fp32
    without an fp32 copy of the gradient (a bf16 result would be off by up to 0.4%).
    """
    full = [g for g in grads if g.dtype == torch.float32]
    norms = [torch.nn.utils.get_total_norm(full, 2.0)] if full else []
    norms += [
        torch.linalg.vector_norm(g, 2.0, dtype=torch.float32) for g in grads if g.dtype != torch.float32
    ]
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
