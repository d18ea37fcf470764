"""Peak-memory estimate of a Mamba-2 training step, derived from activation counts (not measured: no GPU was
available when the Mamba-2 family was added; BENCHMARKS.md says so).

What one block keeps for its backward, per token, on the PyTorch paths (chunked SSD in fp32, gated norm in
PyTorch), in bytes; `a` is the activation dtype's size (2 under bf16/fp16 autocast, 4 in fp32), Q the chunk size:

    residual add + norm       4 d (fp32 stream) + a d (normed, in_proj's input)
    in_proj output            a (2 d_in + 2 g n + h)
    causal conv (torch)       4 conv_dim (fp32 input) + 4 conv_dim (pre-SiLU) + a conv_dim (output)
    chunked SSD               ~36 d_in (fp32 copies of x, dt x, the diagonal and off-diagonal outputs, the skip)
                              + 8 h Q (the (Q, Q) decay matrix L and C B^T * L per head)
                              + 4 g Q + 24 g n (C B^T, fp32 B and C)
                              + 12 h p n / Q (chunk states before and after the carry, and their product)
    gated RMSNorm (torch)     ~26 d_in (fp32 y, z, silu(z), the gated product, the normalised groups)

The rest of the step (weights, gradients, AdamW state, logits) is counted as for Mamba-1 (training/memory.py).
With gradient checkpointing a block keeps only its input (as Mamba-1: CKPT_BYTES_PER_D_MODEL per d_model) and one
block is recomputed at a time.
"""
from __future__ import annotations


def activation_bytes_per_token_layer(config, precision: str) -> float:
    """Bytes one Mamba-2 block keeps for backward per token (see the module docstring)."""
    a = 2 if precision in ("bf16", "fp16") else 4
    d, d_in, g, n, h, p = (config.d_model, config.d_inner, config.ngroups, config.d_state, config.nheads,
                           config.headdim)
    Q = config.chunk_size
    conv_dim = config.conv_dim
    norm = 4 * d + a * d
    proj = a * (2 * d_in + 2 * g * n + h)
    conv = 8 * conv_dim + a * conv_dim
    ssd = 36 * d_in + 8 * h * Q + 4 * g * Q + 24 * g * n + 12 * h * p * n / Q
    gated_norm = 26 * d_in
    return norm + proj + conv + ssd + gated_norm
