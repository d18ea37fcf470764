"""The one selective-scan entry point and the choice of backend.

Backends, all with the signature of `selective_scan` below:
    "ref"      kernels/reference.py  sequential loop from the equations (the spec; slow)
    "chunked"  kernels/chunked.py    pure PyTorch, parallel inside chunks, sequential across them
    "triton"   kernels/triton_scan.py fused Triton kernels, forward and backward (CUDA, or TRITON_INTERPRET=1)
    "auto"     the fastest available for the tensors' device: triton on CUDA when Triton imports, else chunked
                                      (kernels/backends.py decides, for every kernel alike)

This module is the only place that picks the scan's implementation.
"""
from __future__ import annotations

import torch

from .backends import resolve, triton_runs_on
from .documents import check_seq_idx

BACKENDS = ("auto", "ref", "chunked", "triton")


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on `device`, slowest first."""
    device = torch.device(device)
    names = ["ref", "chunked"]
    if triton_runs_on(device):
        names.append("triton")
    return names


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn "auto" into a concrete backend for `device`; check that an explicit one can run there."""
    return resolve("scan", backend, BACKENDS, device, pytorch_path="chunked")


def _implementation(name: str):
    if name == "ref":
        from .reference import selective_scan_ref
        return selective_scan_ref
    if name == "chunked":
        from .chunked import selective_scan_chunked
        return selective_scan_chunked
    from .triton_scan import selective_scan_triton
    return selective_scan_triton


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, seq_idx=None, backend="auto"):
    """y = selective scan of u with input-dependent step delta and projections B, C (Mamba, Algorithm 2).

    Args:
        u, delta: (batch, d_inner, L), any float dtype
        A: (d_inner, d_state), fp32
        B, C: (batch, d_state, L)
        D, delta_bias: (d_inner,) or None
        z: (batch, d_inner, L) or None; gates the output with silu(z)
        delta_softplus: apply softplus to delta + delta_bias
        return_last_state: also return the state after the last step (with seq_idx: the last document's)
        seq_idx: (batch, L) int32 or None; the document index of each token, non-decreasing along a row; the state
            restarts from zero where it changes (kernels/documents.py). None: one document per row
        backend: "auto", "ref", "chunked" or "triton"
    Returns:
        y: (batch, d_inner, L) in u's dtype; with return_last_state, (y, last_state (batch, d_inner, d_state) fp32)
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    seq_idx = check_seq_idx(seq_idx, u.shape[0], u.shape[2])
    name = resolve_backend(backend, u.device)
    return _implementation(name)(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                                 delta_softplus=delta_softplus, return_last_state=return_last_state, seq_idx=seq_idx)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias):
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d_inner, L), got shape {tuple(u.shape)}")
    batch, d_inner, seqlen = u.shape
    if A.dim() != 2 or A.shape[0] != d_inner:
        raise ValueError(f"A must be (d_inner={d_inner}, d_state), got {tuple(A.shape)}")
    d_state = A.shape[1]
    expected = {"delta": (delta, (batch, d_inner, seqlen)), "B": (B, (batch, d_state, seqlen)),
                "C": (C, (batch, d_state, seqlen)), "z": (z, (batch, d_inner, seqlen)),
                "D": (D, (d_inner,)), "delta_bias": (delta_bias, (d_inner,))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
