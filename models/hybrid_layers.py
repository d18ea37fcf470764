"""The layers a layer pattern is built from, one class per symbol, all with one interface:

    forward(h, residual, ctx, state, kernels) -> (h, residual)     (b, l, d) each; state = this layer's cache
                                                                    entry to fill (prompt prefill), or None
    step(h, residual, ctx, state, kernels)    -> (h, residual)     (b, d) each; state updated in place
    init_state(batch_size, slots, device, dtype) -> tuple of tensors: this layer's cache entry

As in the Mamba blocks, the residual add is fused into each sublayer's pre-norm (kernels.add_rms_norm) and the
stream is kept in fp32: a layer takes the previous sublayer's output h and the stream, and returns its own output
and the stream. The Mamba layers ARE the Mamba blocks (subclasses that only adapt the call), so their parameter
names, initialisation and math are models/mamba.py's and models/mamba2.py's.

    M  Mamba1Layer       cache: conv (b, d_in, k) in the model dtype, SSM state (b, d_in, n) fp32
    2  Mamba2Layer       cache: conv (b, conv_dim, k), SSM state (b, h, p, n) fp32
    A  AttentionLayer    cache: keys and values, each (b, g, slots, e)
    F  MLPLayer          cache: nothing
    T  TransformerLayer  attention then MLP, each pre-norm; cache as A
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kernels import add_rms_norm

from .attention import AttentionContext, CausalSelfAttention, SwiGLU
from .hybrid_config import HybridConfig
from .mamba import KernelChoice, MambaBlock, RMSNorm, _compute_dtype
from .mamba2 import Mamba2Block


@dataclass(frozen=True)
class HybridKernels:
    """The concrete kernel backends of every layer kind, decided once per device (HybridLanguageModel)."""
    mamba1: KernelChoice      # selective scan, conv, norm of M layers
    mamba2: KernelChoice      # SSD scan, conv, norm of 2 layers
    norm: str                 # add_rms_norm of attention / MLP layers and the final norm


class Mamba1Layer(MambaBlock):
    def __init__(self, config: HybridConfig):
        super().__init__(config.mamba1_config())

    def forward(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        conv_state, ssm_state = state if state is not None else (None, None)
        return super().forward(h, residual, ctx.mask, conv_state, ssm_state, kernels.mamba1)

    def step(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        return super().step(h, residual, state[0], state[1], kernels.mamba1)

    def init_state(self, batch_size, slots, device, dtype):
        c = self.mixer.config
        return (torch.zeros(batch_size, c.d_inner, c.d_conv, device=device, dtype=dtype),
                torch.zeros(batch_size, c.d_inner, c.d_state, device=device, dtype=torch.float32))


class Mamba2Layer(Mamba2Block):
    def __init__(self, config: HybridConfig):
        super().__init__(config.mamba2_config())

    def forward(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        conv_state, ssm_state = state if state is not None else (None, None)
        return super().forward(h, residual, ctx.mask, conv_state, ssm_state, kernels.mamba2)

    def step(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        return super().step(h, residual, state[0], state[1])

    def init_state(self, batch_size, slots, device, dtype):
        c = self.mixer.config
        return (torch.zeros(batch_size, c.conv_dim, c.d_conv, device=device, dtype=dtype),
                torch.zeros(batch_size, c.nheads, c.headdim, c.d_state, device=device, dtype=torch.float32))


class _PreNorm(nn.Module):
    """residual = residual + h; normed = RMSNorm(residual), the add fused (kernels.add_rms_norm)."""

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)

    def add_norm(self, h, residual, next_weight, backend):
        residual_dtype = torch.float32 if self.residual_in_fp32 else self.norm.weight.dtype
        return add_rms_norm(h, residual, self.norm.weight, self.norm.eps, out_dtype=_compute_dtype(h, next_weight),
                            residual_dtype=residual_dtype, backend=backend)


class AttentionLayer(_PreNorm):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.mixer = CausalSelfAttention(config)

    def forward(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        normed, residual = self.add_norm(h, residual, self.mixer.q_proj.weight, kernels.norm)
        return self.mixer(normed, ctx, state), residual

    def step(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        normed, residual = self.add_norm(h, residual, self.mixer.q_proj.weight, kernels.norm)
        return self.mixer.step(normed, ctx, state), residual

    def init_state(self, batch_size, slots, device, dtype):
        m = self.mixer
        shape = (batch_size, m.n_kv_heads, slots, m.head_dim)
        return (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))


class MLPLayer(_PreNorm):
    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.mlp = SwiGLU(config)

    def forward(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        normed, residual = self.add_norm(h, residual, self.mlp.up_proj.weight, kernels.norm)
        return self.mlp(normed), residual

    step = forward     # position-wise: one token is a sequence of one

    def init_state(self, batch_size, slots, device, dtype):
        return ()


class TransformerLayer(AttentionLayer):
    """Pre-norm attention, then pre-norm SwiGLU MLP: two residual branches in one layer (Llama's block)."""

    def __init__(self, config: HybridConfig):
        super().__init__(config)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mlp = SwiGLU(config)

    def _mlp(self, h, residual, backend):
        residual_dtype = torch.float32 if self.residual_in_fp32 else self.mlp_norm.weight.dtype
        normed, residual = add_rms_norm(h, residual, self.mlp_norm.weight, self.mlp_norm.eps,
                                        out_dtype=_compute_dtype(h, self.mlp.up_proj.weight),
                                        residual_dtype=residual_dtype, backend=backend)
        return self.mlp(normed), residual

    def forward(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        h, residual = super().forward(h, residual, ctx, state, kernels)
        return self._mlp(h, residual, kernels.norm)

    def step(self, h, residual, ctx: AttentionContext, state, kernels: HybridKernels):
        h, residual = super().step(h, residual, ctx, state, kernels)
        return self._mlp(h, residual, kernels.norm)


# The one table: pattern symbol -> layer class (the symbols' names are models/hybrid_config.LAYER_SYMBOLS).
LAYERS = {"M": Mamba1Layer, "2": Mamba2Layer, "A": AttentionLayer, "F": MLPLayer, "T": TransformerLayer}
