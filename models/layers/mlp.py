"""The MLP layer (pattern letter "F"): a SwiGLU MLP behind a pre-norm, position-wise (no cache).

Shape letters: b batch, l sequence length, d d_model, f d_ff (SwiGLU hidden width).
The math is Llama's: down(silu(gate(x)) * up(x)) (Shazeer 2020), no biases.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Layer, ModelKernels, RMSNorm, add_norm


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020; Llama's names)."""

    def __init__(self, config):
        """config: the model's ModelConfig (models/config.py): d_ff, init_std."""
        super().__init__()
        d, f = config.d_model, config.resolved_d_ff
        self.init_std, self.n_residual_branches = config.init_std, config.n_residual_branches
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """N(0, init_std); the output projection (a residual branch) scaled by 1/sqrt(branches), as attention's."""
        nn.init.normal_(self.gate_proj.weight, std=self.init_std)
        nn.init.normal_(self.up_proj.weight, std=self.init_std)
        nn.init.normal_(self.down_proj.weight, std=self.init_std / math.sqrt(self.n_residual_branches))

    def forward(self, x):
        """(..., d) -> (..., d)"""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLPLayer(Layer):
    """RMSNorm -> SwiGLU, the residual add fused into the norm (models/layers/base.py). cache entry: nothing"""
    description = "SwiGLU MLP"

    def __init__(self, config):
        """config: the model's ModelConfig (models/config.py)."""
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mlp = SwiGLU(config)

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.ones_(self.norm.weight)
        self.mlp.reset_parameters()

    def forward(self, h, residual, ctx, state, kernels: ModelKernels):
        normed, residual = add_norm(self.norm, h, residual, self.mlp.up_proj.weight, self.residual_in_fp32,
                                    kernels.norm)
        return self.mlp(normed), residual

    step = forward     # position-wise: one token is a sequence of one

    def init_state(self, batch_size, slots, device, dtype):
        return ()
