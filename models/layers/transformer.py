"""The transformer layer (pattern letter "T"): pre-norm attention, then a pre-norm SwiGLU MLP, two residual branches
in one layer: Llama's decoder block (models/layers/attention.py, models/layers/mlp.py). "T" * n is a Llama-style
Transformer++ (RoPE, RMSNorm, SwiGLU, no biases); the parameter names are Llama's below `mixer.` and `mlp.`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import AttentionContext, AttentionLayer
from .base import ModelKernels, RMSNorm, add_norm
from .mlp import SwiGLU


class TransformerLayer(AttentionLayer):
    """AttentionLayer, then RMSNorm -> SwiGLU. cache entry: as attention's (keys and values)"""
    description = "attention + SwiGLU MLP"
    residual_branches = 2

    def __init__(self, config):
        """config: the model's ModelConfig (models/config.py)."""
        super().__init__(config)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mlp = SwiGLU(config)

    @torch.no_grad()
    def reset_parameters(self):
        super().reset_parameters()
        nn.init.ones_(self.mlp_norm.weight)
        self.mlp.reset_parameters()

    def _mlp(self, h, residual, backend):
        normed, residual = add_norm(self.mlp_norm, h, residual, self.mlp.up_proj.weight, self.residual_in_fp32,
                                    backend)
        return self.mlp(normed), residual

    def forward(self, h, residual, ctx: AttentionContext, state, kernels: ModelKernels):
        h, residual = super().forward(h, residual, ctx, state, kernels)
        return self._mlp(h, residual, kernels.norm)

    def step(self, h, residual, ctx: AttentionContext, state, kernels: ModelKernels):
        h, residual = super().step(h, residual, ctx, state, kernels)
        return self._mlp(h, residual, kernels.norm)
