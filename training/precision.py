"""The one place that decides the device, the compute precision, autocast and the GradScaler.

    auto on a GPU with bf16 (Ampere and newer)  -> bf16 autocast, no scaler
    auto on an older GPU                         -> fp16 autocast + GradScaler
    auto on the CPU                              -> fp32
Parameters and optimizer state always stay fp32; autocast only runs the matmuls in the lower precision.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .config import ConfigError


@dataclass
class Precision:
    name: str                         # "fp32", "bf16" or "fp16"
    device_type: str                  # "cpu" or "cuda"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self):
        """Context for forward passes: autocast in bf16/fp16, nothing in fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is active only for fp16 (a disabled one is a no-op with the same API)."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_device(requested: str, local_rank: int | None = None) -> torch.device:
    """"auto" -> cuda (the local rank's GPU under torchrun) if available, else cpu."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {requested!r} was asked for, but this PyTorch sees no CUDA GPU "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        if requested == "cuda":
            requested = f"cuda:{local_rank or 0}"
        index = int(requested.split(":")[1])
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {requested!r} does not exist; this machine has "
                              f"{torch.cuda.device_count()} GPU(s)")
    return torch.device(requested)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    if device.type == "cpu":
        if requested == "fp16":
            raise ConfigError("precision 'fp16' needs a CUDA GPU; on the CPU use fp32 (default) or bf16")
        return Precision("fp32" if requested == "auto" else requested, "cpu")
    if requested == "auto":
        requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    elif requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"precision 'bf16' is not supported by {torch.cuda.get_device_name(device)}; "
                          f"use fp16 (with loss scaling) or auto")
    return Precision(requested, "cuda")
