"""Memory-layout helpers shared by the kernels' PyTorch and Triton paths (imported by both, importing neither).

The model hands the conv and the scans (b, d, l) *views* of token-major (b, l, d) storage, channels contiguous;
outputs and input gradients are allocated in the same dim order as their input, so the next op reads them the way
it read the input and no activation is ever transposed into a copy.
"""
from __future__ import annotations

import torch


def channels_contiguous(x: torch.Tensor) -> bool:
    """True when x (b, d, l) is a transposed view of (b, l, d)-ordered storage (channels contiguous)."""
    return x.stride(1) == 1 and x.stride(2) != 1


def empty_like_order(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty (b, d, l) tensor in x's dim order: a transposed view of a contiguous (b, l, d) tensor when x's
    channels are contiguous, else contiguous (b, d, l)."""
    b, d, l = x.shape
    dtype = dtype or x.dtype
    if channels_contiguous(x):
        return torch.empty(b, l, d, device=x.device, dtype=dtype).transpose(1, 2)
    return torch.empty(b, d, l, device=x.device, dtype=dtype)
