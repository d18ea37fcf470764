"""Peak-memory estimate of a hybrid training step: activations summed layer by layer over the pattern (derived from
what each layer keeps for backward, NOT measured: no GPU when the hybrid family was added; BENCHMARKS.md says so).

Per token, in bytes; `a` is the activation dtype's size (2 under bf16/fp16, 4 in fp32):

    M  Mamba-1 block     as training/memory.py measured it (ACT_BYTES_PER_D_INNER per d_inner, per backend)
    2  Mamba-2 block     training/memory_mamba2.py
    A  attention         pre-norm 4 d + a d; q, k, v a (h + 2 g) e; RoPE's fp32 copies of q and k 8 (h + g) e;
                         SDPA output a h e and its log-sum-exp 4 h; and, on the math kernel only, the (l, l)
                         scores and probabilities per head: 2 a h l per token, i.e. l^2 per sequence
    F  SwiGLU MLP        pre-norm 4 d + a d; gate, up, silu(gate), product: 4 a f
    T  transformer       A + F

Attention is the one layer whose memory per token depends on the sequence length. SDPA's flash kernel (bf16 /
fp16 on CUDA) keeps only O(l) per sequence, so the estimate counts the l^2 scores only where flash cannot run:
fp32 (PyTorch then picks the memory-efficient kernel when it can, else the math one: counted conservatively).
With gradient checkpointing every layer keeps its input (CKPT_BYTES_PER_D_MODEL per d_model) and the largest one
layer is recomputed at a time.
"""
from __future__ import annotations

from .memory_coefficients import ACT_BYTES_PER_D_INNER, BACKEND_ACT_FACTOR, CKPT_BYTES_PER_D_MODEL
from .memory_mamba2 import activation_bytes_per_token_layer as mamba2_bytes


def attention_bytes(config, a: int, seq_len: int, math_kernel: bool) -> float:
    d, h, g, e = config.d_model, config.n_heads, config.kv_heads, config.resolved_head_dim
    linear = 4 * d + a * d + a * (h + 2 * g) * e + (8 * (h + g) * e if config.rope else 0) + a * h * e + 4 * h
    return linear + (2 * a * h * seq_len if math_kernel else 0)


def mlp_bytes(config, a: int) -> float:
    return 4 * config.d_model + a * config.d_model + 4 * a * config.resolved_d_ff


def layer_bytes(config, precision: str, seq_len: int, backend: str) -> dict[str, float]:
    """Activation bytes per token that one layer of each symbol in config.pattern keeps for backward."""
    a = 2 if precision in ("bf16", "fp16") else 4
    math_kernel = a == 4
    out = {}
    for symbol in set(config.pattern):
        if symbol == "M":
            scale = BACKEND_ACT_FACTOR[backend] * (1.0 if a == 2 else 2.0)
            out[symbol] = scale * ACT_BYTES_PER_D_INNER * config.mamba1_config().d_inner
        elif symbol == "2":
            out[symbol] = mamba2_bytes(config.mamba2_config(), precision)
        elif symbol == "A":
            out[symbol] = attention_bytes(config, a, seq_len, math_kernel)
        elif symbol == "F":
            out[symbol] = mlp_bytes(config, a)
        else:   # "T"
            out[symbol] = attention_bytes(config, a, seq_len, math_kernel) + mlp_bytes(config, a)
    return out


def activation_bytes_per_token(config, precision: str, seq_len: int, gradient_checkpointing: bool,
                               backend: str) -> float:
    per_layer = layer_bytes(config, precision, seq_len, backend)
    if gradient_checkpointing:
        return config.n_layer * CKPT_BYTES_PER_D_MODEL * config.d_model + max(per_layer.values())
    return sum(per_layer[s] for s in config.pattern)
