"""Where each kernel's backend is decided: whether Triton can run on a device, and "auto" made concrete.

Every entry point (selective_scan, causal_conv1d, add_rms_norm, ...) resolves its `backend` argument here, so the
rule is the same everywhere: "auto" is the fused Triton kernels for CUDA tensors when Triton imports and the
operation's PyTorch path otherwise; an explicit "triton" that cannot run is an error that says why (never a silent
switch); an unknown name is an error that lists the allowed ones.

Whether Triton is installed is probed once, when this module is imported. The entry points resolve their backend on
every call, and some calls run inside code that torch.compile traces (the model's decoding step): Dynamo refuses an
import probe there (torch 2.11: "Attempted to call function marked as skipped" on importlib.util.find_spec), so
traced code only reads the stored answer. On CUDA tensors resolving reads nothing else; TRITON_INTERPRET is read only
for an explicit "triton" on another device.
"""
from __future__ import annotations

import importlib.util
import os

import torch


TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None     # the one probe (see the module doc)


def triton_importable() -> bool:
    return TRITON_IMPORTABLE


def triton_interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported) runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs_on(device: torch.device | str) -> bool:
    return triton_importable() and (torch.device(device).type == "cuda" or triton_interpreting())


def resolve(op: str, backend: str, allowed: tuple[str, ...], device: torch.device | str, pytorch_path: str) -> str:
    """The concrete backend of operation `op` ("scan", "conv", ...) for `device`.

    Args:
        allowed: every name the operation takes, "auto" and "triton" among them
        pytorch_path: what "auto" picks where Triton cannot run, and what an error suggests instead
    """
    if backend not in allowed:
        raise ValueError(f"{op} backend {backend!r} is unknown; allowed: {', '.join(allowed)}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_importable() else pytorch_path
    if backend == "triton" and not triton_runs_on(device):
        why = ("Triton is not installed (pip install triton)" if not triton_importable()
               else f"Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 to run them on "
                    "the CPU")
        raise RuntimeError(f"{op} backend 'triton' cannot run here: {why}. Use backend={pytorch_path!r} or 'auto'.")
    return backend
