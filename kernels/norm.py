"""The one residual-add + RMSNorm entry point, its PyTorch reference, and the choice of backend.

Per block of a pre-norm model (mamba_ssm's fused_add_norm, residual in fp32):

    new_residual = residual + x        in fp32 (x alone for the first layer, which has no residual yet)
    normed       = new_residual / sqrt(mean(new_residual^2) + eps) * weight        fp32 math, out_dtype result

    hidden, residual = add_rms_norm(mixer_out, residual, norm.weight, eps, out_dtype=torch.bfloat16)

Both outputs carry gradients: normed feeds the block's mixer, new_residual continues to the next block. The sum is
formed in fp32 and the norm is taken of that fp32 sum; new_residual is the sum rounded once to residual_dtype (exact
for the default fp32).

Backends, one signature:
    "torch"   add_rms_norm_torch below: the spec, and the CPU path (autograd does the backward)
    "triton"  kernels/triton_norm.py: one fused kernel forward, one backward, registered as torch custom ops
              (mamba_trainer::add_rms_norm_fwd / _bwd) so that torch.compile keeps the model in one graph.
              CUDA, or CPU tensors under TRITON_INTERPRET=1
    "auto"    triton on CUDA when Triton imports, else torch
This module is the only place that decides which backend runs.
"""
from __future__ import annotations

import torch

from .backends import resolve

NORM_BACKENDS = ("auto", "torch", "triton")


def add_rms_norm_torch(x, residual, weight, eps=1e-5, out_dtype=None, residual_dtype=torch.float32):
    """The reference; see add_rms_norm."""
    s = x.float() if residual is None else residual.float() + x.float()          # (..., d) fp32
    rstd = torch.rsqrt(s.square().mean(-1, keepdim=True) + eps)                  # (..., 1)
    normed = (s * rstd * weight.float()).to(out_dtype or weight.dtype)
    return normed, s.to(residual_dtype)


def resolve_norm_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn "auto" into a concrete backend for `device`; check that an explicit one can run there."""
    return resolve("norm", backend, NORM_BACKENDS, device, pytorch_path="torch")


def add_rms_norm(x, residual, weight, eps=1e-5, out_dtype=None, residual_dtype=torch.float32, backend="auto"):
    """Residual add then RMSNorm, returning both the normed activations and the new residual stream.

    Args:
        x: (..., d) any float dtype: the block's output (or the embedding, for the first layer)
        residual: (..., d) any float dtype, or None (first layer)
        weight: (d,) the norm's scale
        out_dtype: dtype of normed (default weight's)
        residual_dtype: dtype of new_residual (default fp32: the residual stream is kept in fp32)
        backend: "auto", "torch" or "triton"
    Returns:
        normed: (..., d) out_dtype;  new_residual: (..., d) residual_dtype
    """
    d = x.shape[-1]
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if weight.shape != (d,):
        raise ValueError(f"weight must be ({d},), got {tuple(weight.shape)}")
    out_dtype = out_dtype or weight.dtype
    if resolve_norm_backend(backend, x.device) == "torch":
        return add_rms_norm_torch(x, residual, weight, eps, out_dtype, residual_dtype)
    from .triton_norm import add_rms_norm_triton
    return add_rms_norm_triton(x, residual, weight, eps, out_dtype, residual_dtype)
