"""The attention layer (pattern letter "A"): causal self-attention, grouped-query, RoPE or NoPE, behind a pre-norm.

Shape letters:
    b: batch        l: sequence length        d: d_model          s: KV-cache slots (the generation's length)
    h: query heads  g: key/value heads (h / g query heads share one, GQA)              e: head_dim

The math is Llama's: q, k, v = x Wq, x Wk, x Wv; RoPE rotates q and k by each token's position (the "rotate half"
layout of HF transformers' Llama, so a Llama-shaped model needs no permutation to be saved as one);
o = softmax(q k^T / sqrt(e) + causal mask) v through F.scaled_dot_product_attention (flash / memory-efficient
kernels on GPUs, the math kernel on the CPU); out = o Wo. No biases.

Packed rows (seq_idx, kernels/documents.py): a token attends only to earlier tokens of its own document (a
block-diagonal causal mask through SDPA) and RoPE counts positions from its document's first token, so each document
gets what it gets alone.

Positions and padding: a LEFT-padded batch (attention_mask 0 before the prompt) must give every row what it gets
alone, so pads are masked out as keys and RoPE counts positions from each row's first real token. During decoding
the KV cache holds s slots per layer, pre-allocated; AttentionContext.kv_valid marks the slots that hold real
tokens (not pads, not yet written), so a step attends over all s slots with one static shape (CUDA graphs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Layer, ModelKernels, RMSNorm, add_norm


@dataclass
class AttentionContext:
    """What attention layers need besides their input, built once per forward or step by the language model.

    mask:     (b, l) bool, False at left padding; None = no padding (forward only)
    seq_idx:  (b, l) int32, the document of each token in packed rows (forward only; never with mask); None = one
              document per row. Read by the Mamba layers too (their conv and scan restart at each document)
    rope:     (cos, sin), each (b, l, e) (forward) or (b, 1, e) (step) in fp32; None = NoPE or no attention layer
    kv_valid: (b, s) bool, the cache slots a step may attend to (step only)
    index:    (1,) long, the cache slot the step writes (step only)
    """
    mask: torch.Tensor | None = None
    seq_idx: torch.Tensor | None = None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    kv_valid: torch.Tensor | None = None
    index: torch.Tensor | None = None


# ---- rotary position embeddings -------------------------------------------------------------------------------------

def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None, device=None) -> torch.Tensor:
    """The rotation frequencies theta^(-2i/e), i < e/2, fp32 (e/2,); with Llama 3's scaling (ModelConfig.rope_scaling)
    the low frequencies (wavelengths above original_max_position_embeddings / low_freq_factor) are divided by
    `factor`, the high ones (below .. / high_freq_factor) kept, and those between blended linearly in
    original_max_position_embeddings / wavelength."""
    # 1 / theta^x, not theta^-x: the same fp32 rounding as transformers' Llama (at position 10^5 one ulp of a
    # frequency is already ~1e-3 radians)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    blend = ((context / wavelength - low) / (high - low)).clamp(0, 1)        # 0 at long, 1 at short wavelengths
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's angles. positions (b, l) long -> (cos, sin), each (b, l, e) fp32.
    Frequencies from rope_frequencies, repeated for the two halves (HF Llama's layout)."""
    inv_freq = rope_frequencies(head_dim, theta, scaling, device=positions.device)
    angles = positions.float()[..., None] * inv_freq                         # (b, l, e/2)
    angles = torch.cat([angles, angles], dim=-1)                              # (b, l, e)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (b, l, heads, e) by (cos, sin) (b, l, e); computed in fp32, returned in x's dtype."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)                                    # rotate_half
    return (xf * cos[:, :, None] + rotated * sin[:, :, None]).to(x.dtype)


def positions_from_mask(mask: torch.Tensor | None, b: int, l: int, device) -> torch.Tensor:
    """(b, l) long positions counted from each row's first real token (0 at and before it)."""
    if mask is None:
        return torch.arange(l, device=device).expand(b, l)
    return (mask.long().cumsum(dim=1) - 1).clamp(min=0)


def positions_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) long positions counted from the first token of each token's document (packed rows)."""
    b, l = seq_idx.shape
    t = torch.arange(l, device=seq_idx.device).expand(b, l)
    starts = torch.ones(b, l, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    document_start = torch.where(starts, t, 0).cummax(dim=1).values          # (b, l): where each token's began
    return t - document_start


# ---- the mixers -----------------------------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """Grouped-query causal self-attention with an optional rotary embedding; Llama's parameter names."""

    def __init__(self, config):
        """config: the model's ModelConfig (models/config.py): heads, head_dim, init_std."""
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.resolved_head_dim
        self.init_std, self.n_residual_branches = config.init_std, config.n_residual_branches
        d, h, g, e = config.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(d, h * e, bias=False)
        self.k_proj = nn.Linear(d, g * e, bias=False)
        self.v_proj = nn.Linear(d, g * e, bias=False)
        self.o_proj = nn.Linear(h * e, d, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2/Llama: N(0, init_std); the output projection (a residual branch) scaled by 1/sqrt(branches)."""
        for linear in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(linear.weight, std=self.init_std)
        nn.init.normal_(self.o_proj.weight, std=self.init_std / math.sqrt(self.n_residual_branches))

    def _qkv(self, x, rope):
        """x (b, l, d) -> q (b, h, l, e), k and v (b, g, l, e), RoPE applied."""
        b, l, _ = x.shape
        q = self.q_proj(x).view(b, l, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, l, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, l, self.n_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, x, ctx: AttentionContext, kv_cache=None):
        """Args:
            x: (b, l, d)
            ctx: AttentionContext (mask, seq_idx, rope)
            kv_cache: (k (b, g, s, e), v (b, g, s, e)) to fill with this prompt's keys and values, or None
        Returns:
            (b, l, d)
        """
        b, l, _ = x.shape
        q, k, v = self._qkv(x, ctx.rope)                                      # (b, h|g, l, e)
        if kv_cache is not None:
            if kv_cache[0].shape[2] < l:
                raise ValueError(f"the KV cache has {kv_cache[0].shape[2]} slots, the prompt {l} tokens")
            kv_cache[0][:, :, :l] = k
            kv_cache[1][:, :, :l] = v
        gqa = self.n_kv_heads != self.n_heads
        if ctx.seq_idx is not None:
            # block-diagonal causal: earlier tokens of the same document (the diagonal always, so no row is empty)
            causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
            allowed = causal & (ctx.seq_idx[:, :, None] == ctx.seq_idx[:, None, :])   # (b, l, l)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=gqa)
        elif ctx.mask is None:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)   # (b, h, l, e)
        else:
            # pads are never keys; a pad query attends to itself only (its output is never used, but stays finite)
            causal = torch.ones(l, l, dtype=torch.bool, device=x.device).tril()
            allowed = causal & ctx.mask[:, None, :]                           # (b, l, l)
            allowed |= torch.eye(l, dtype=torch.bool, device=x.device)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None], enable_gqa=gqa)
        return self.o_proj(o.transpose(1, 2).reshape(b, l, -1))               # (b, l, d)

    def step(self, x, ctx: AttentionContext, kv_cache):
        """One token. x (b, d); kv_cache written at slot ctx.index; attends over the slots in ctx.kv_valid
        (which already includes ctx.index). Returns (b, d)."""
        b = x.shape[0]
        q, k, v = self._qkv(x[:, None], ctx.rope)                             # (b, h|g, 1, e)
        k_cache, v_cache = kv_cache
        k_cache.index_copy_(2, ctx.index, k.to(k_cache.dtype))
        v_cache.index_copy_(2, ctx.index, v.to(v_cache.dtype))
        o = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype),
                                           attn_mask=ctx.kv_valid[:, None, None, :],
                                           enable_gqa=self.n_kv_heads != self.n_heads)   # (b, h, 1, e)
        return self.o_proj(o.reshape(b, -1))                                 # (b, d)


class AttentionLayer(Layer):
    """RMSNorm -> CausalSelfAttention, the residual add fused into the norm (models/layers/base.py).

    cache entry: keys and values, each (b, g, slots, e) in the model dtype"""
    description = "attention"
    has_kv_cache = True

    def __init__(self, config):
        """config: the model's ModelConfig (models/config.py)."""
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mixer = CausalSelfAttention(config)

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.ones_(self.norm.weight)
        self.mixer.reset_parameters()

    def forward(self, h, residual, ctx: AttentionContext, state, kernels: ModelKernels):
        normed, residual = add_norm(self.norm, h, residual, self.mixer.q_proj.weight, self.residual_in_fp32,
                                    kernels.norm)
        return self.mixer(normed, ctx, state), residual

    def step(self, h, residual, ctx: AttentionContext, state, kernels: ModelKernels):
        normed, residual = add_norm(self.norm, h, residual, self.mixer.q_proj.weight, self.residual_in_fp32,
                                    kernels.norm)
        return self.mixer.step(normed, ctx, state), residual

    def init_state(self, batch_size, slots, device, dtype):
        m = self.mixer
        shape = (batch_size, m.n_kv_heads, slots, m.head_dim)
        return (torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
