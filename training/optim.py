"""AdamW with the Mamba weight-decay split, and the learning-rate schedule.

No weight decay on: norms and biases (1-D), A_log and D (the SSM's decay rates and skip: decaying them
towards 0 changes the dynamics, not just the scale; the released Mamba marks them _no_weight_decay).
Decay on: every matrix and the (tied) embedding, as in GPT-2/nanoGPT.
"""
from __future__ import annotations

import inspect
import math

import torch

NO_DECAY_NAMES = ("A_log", "D")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed (matrices, embeddings) and not (norms, biases, A_log, D).

    Tied parameters (embedding = lm_head) appear once: named_parameters() deduplicates them.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if p.dim() < 2 or leaf in NO_DECAY_NAMES:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def fused_available(device: torch.device) -> bool:
    """AdamW's fused kernel exists in this torch build for this device (CUDA; recent builds also the CPU)."""
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    return device.type in ("cuda", "cpu")


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    device: torch.device, eps: float = 1e-8) -> tuple[torch.optim.AdamW, bool]:
    """AdamW over param_groups(model); fused where the build has it. Returns (optimizer, fused)."""
    fused = fused_available(device)
    opt = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                            **({"fused": True} if fused else {}))
    return opt, fused


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine down to lr*min_lr_ratio.

    A pure function of the step, so a resumed run needs no scheduler state to continue exactly.
    """
    min_lr = lr * min_lr_ratio
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
