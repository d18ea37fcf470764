"""What an optimizer step would cost on this machine's CPU, before any work: a compute model, not a measurement.

A training step of a language model does about 6 floating-point operations per parameter per token (2 in the
forward pass, 4 in the backward). Dividing by the rate this CPU's matrix products reach gives a lower bound on
the step's time: the selective scan, the norms and the optimizer only add to it. It is what train.py says when a
GPU --vram preset is asked for on a machine without a GPU (training/launch.py).
"""
from __future__ import annotations

import time

import torch

FLOPS_PER_PARAM_TOKEN = 6       # forward 2 + backward 4 (Kaplan et al. 2020, "C = 6ND")


def matmul_flops_per_s(size: int = 512, seconds: float = 0.2) -> float:
    """FLOP/s of fp32 (size x size) matrix products on this CPU, timed for about `seconds` (the best of the runs,
    so a moment of load from another process counts less)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)                                      # the first call allocates and picks the kernel
    best = float("inf")
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / max(best, 1e-9)


def step_seconds(n_params: int, tokens_per_step: int, flops_per_s: float) -> float:
    """Lower bound on the seconds of one optimizer step of `tokens_per_step` tokens for `n_params` parameters."""
    return FLOPS_PER_PARAM_TOKEN * n_params * tokens_per_step / flops_per_s


def describe_seconds(seconds: float) -> str:
    """'40 s', '12 min', '3.4 h', '5.2 days': the unit a reader takes in at a glance."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
