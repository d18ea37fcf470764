"""The gated RMSNorm of the Mamba-2 mixer (mamba_ssm's RMSNormGated with norm_before_gate=False), in PyTorch.

    g      = y * silu(z)                                              fp32
    normed = g / sqrt(mean over each group of g^2 + eps) * weight     groups of group_size consecutive channels

mamba_ssm normalises each of the ngroups groups of d_inner on its own (group_size = d_inner / ngroups), as HF
transformers' MambaRMSNormGated does. The result is in out_dtype (default y's dtype). One backend (PyTorch) for
now; autograd does the backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_gated(y, z, weight, eps=1e-5, group_size=None, out_dtype=None):
    """Args:
        y: (..., d) any float dtype;  z: (..., d) or None (no gate)
        weight: (d,);  group_size: channels per normalised group, dividing d (None = d, one group)
        out_dtype: dtype of the result (default y's)
    Returns:
        (..., d) in out_dtype
    """
    d = y.shape[-1]
    group_size = d if group_size is None else group_size
    if weight.shape != (d,):
        raise ValueError(f"weight must be ({d},), got {tuple(weight.shape)}")
    if d % group_size:
        raise ValueError(f"group_size {group_size} must divide the last dimension {d}")
    if z is not None and z.shape != y.shape:
        raise ValueError(f"z must have y's shape {tuple(y.shape)}, got {tuple(z.shape)}")
    g = y.float()
    if z is not None:
        g = g * F.silu(z.float())
    grouped = g.unflatten(-1, (d // group_size, group_size))                   # (..., groups, group_size)
    grouped = grouped * torch.rsqrt(grouped.square().mean(-1, keepdim=True) + eps)
    return (grouped.flatten(-2) * weight.float()).to(out_dtype or y.dtype)
