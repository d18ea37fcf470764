"""Peak GPU memory of a training step, estimated before the run starts, and the fit check.

The estimate adds what a step keeps alive at its peak, with coefficients fitted (least squares, 19 points, every
point within 0.1 GiB) to the peak allocated memory of real training steps on an H100, bf16 autocast, triton scan
(BENCHMARKS.md, section memory, has the measurements and the command):
    weights fp32 + grads fp32 + AdamW moments + bf16 weight copies    17.85 bytes per parameter
    logits (bf16), their fp32 copy for the loss and its gradient      14.1 bytes per token per vocabulary entry
        (measured with the plain loss; the trainer now takes the chunked loss, kernels/loss.py, whose logits live
        one chunk at a time: see _loss_bytes, derived from the chunk size, not yet measured on a GPU)
    activations saved for backward, without checkpointing            22.5 bytes per token per layer per d_inner
    with checkpointing: each block's input + one block recomputed    3.54 per d_model per layer + 7.2 per d_inner
Frozen weights (LoRA's base, DPO's reference) need no gradient or optimizer state: FROZEN_BYTES_PER_PARAM (the
fp32 weight and its bf16 autocast copy; derived from the fit above, not measured separately).
The chunked PyTorch scan keeps about 1.47x the triton scan's activations (measured for medium at 8 x 2048).
The allocator's fragmentation comes on top (OVERHEAD), and a run plans for BUDGET_SHARE of the card.
"""
from __future__ import annotations

from dataclasses import dataclass

from .memory_coefficients import (ACT_BYTES_PER_D_INNER, BACKEND_ACT_FACTOR, CKPT_BYTES_PER_D_MODEL,
                                  CKPT_RECOMPUTE_BYTES_PER_D_INNER, FROZEN_BYTES_PER_PARAM, LOGIT_BYTES, OVERHEAD,
                                  STATE_BYTES_PER_PARAM)
from .memory_hybrid import activation_bytes_per_token
from .memory_mamba2 import activation_bytes_per_token_layer

GIB = 2**30

# The fitted coefficients (the table above) live in training/memory_coefficients.py, which the per-family estimates
# (memory_mamba2.py, memory_hybrid.py) share; this module imports them and the estimates.

# Share of a card's nominal memory a run may plan to use (the CUDA context and other processes take the rest).
BUDGET_SHARE = 0.90


@dataclass
class MemoryEstimate:
    states: float            # weights + grads + optimizer (bytes)
    activations: float
    logits: float
    total: float

    def describe(self) -> str:
        return (f"~{self.total / GIB:.1f} GiB (weights+grads+AdamW {self.states / GIB:.1f}, "
                f"activations {self.activations / GIB:.1f}, logits {self.logits / GIB:.1f})")


def estimate_peak_memory(n_params: int, d_model: int, d_inner: int, n_layer: int, vocab_padded: int,
                         micro_batch_size: int, seq_len: int, gradient_checkpointing: bool,
                         precision: str, backend: str = "triton", n_trainable: int | None = None) -> MemoryEstimate:
    """Estimated peak bytes of one training step on one GPU (see the module docstring). n_trainable: parameters
    that train (default all); the other n_params - n_trainable are frozen."""
    act_scale = BACKEND_ACT_FACTOR[backend] * (1.0 if precision in ("bf16", "fp16") else 2.0)
    n_trainable = n_params if n_trainable is None else n_trainable
    states = STATE_BYTES_PER_PARAM * n_trainable + FROZEN_BYTES_PER_PARAM * (n_params - n_trainable)
    tokens = micro_batch_size * seq_len
    if gradient_checkpointing:
        per_token = n_layer * CKPT_BYTES_PER_D_MODEL * d_model + act_scale * CKPT_RECOMPUTE_BYTES_PER_D_INNER * d_inner
    else:
        per_token = act_scale * n_layer * ACT_BYTES_PER_D_INNER * d_inner
    activations = tokens * per_token
    logits = _loss_bytes(tokens, vocab_padded, d_model)
    total = OVERHEAD * (states + activations + logits)
    return MemoryEstimate(states, activations, logits, total)


def _loss_bytes(tokens: int, vocab_padded: int, d_model: int) -> float:
    """Peak memory of the chunked LM loss (kernels/loss.py): one chunk's fp32 logits (CHUNK_BYTES on CUDA), their
    bf16 copy and bf16 gradient (half as much each), plus the gradients it keeps for the backward (dhidden per token
    in fp32 at most, dW fp32); never more than the plain loss's measured LOGIT_BYTES per token and vocabulary entry."""
    from kernels.loss import CHUNK_BYTES
    chunk = min(CHUNK_BYTES["cuda"], tokens * vocab_padded * 4)
    chunked = 2 * chunk + 4 * tokens * d_model + 4 * vocab_padded * d_model
    return min(chunked, tokens * vocab_padded * LOGIT_BYTES)


def estimate_for(model_config, n_params: int, micro_batch_size: int, seq_len: int,
                 gradient_checkpointing: bool, precision: str, backend: str = "triton",
                 n_trainable: int | None = None) -> MemoryEstimate:
    if model_config.family == "hybrid":      # summed over the layer pattern, unmeasured (training/memory_hybrid.py)
        return _estimate_hybrid(model_config, n_params, micro_batch_size, seq_len, gradient_checkpointing, precision,
                                backend, n_trainable)
    if model_config.family == "mamba2":      # derived from activation counts, unmeasured (training/memory_mamba2.py)
        return _estimate_mamba2(model_config, n_params, micro_batch_size, seq_len, gradient_checkpointing, precision,
                                n_trainable)
    return estimate_peak_memory(n_params, model_config.d_model, model_config.d_inner, model_config.n_layer,
                                model_config.padded_vocab_size, micro_batch_size, seq_len,
                                gradient_checkpointing, precision, backend, n_trainable)


def _estimate_mamba2(config, n_params, micro_batch_size, seq_len, gradient_checkpointing, precision,
                     n_trainable=None):
    per_layer = activation_bytes_per_token_layer(config, precision)
    tokens = micro_batch_size * seq_len
    per_token = (config.n_layer * CKPT_BYTES_PER_D_MODEL * config.d_model + per_layer if gradient_checkpointing
                 else config.n_layer * per_layer)
    n_trainable = n_params if n_trainable is None else n_trainable
    states = STATE_BYTES_PER_PARAM * n_trainable + FROZEN_BYTES_PER_PARAM * (n_params - n_trainable)
    activations = tokens * per_token
    logits = _loss_bytes(tokens, config.padded_vocab_size, config.d_model)
    return MemoryEstimate(states, activations, logits, OVERHEAD * (states + activations + logits))


def _estimate_hybrid(config, n_params, micro_batch_size, seq_len, gradient_checkpointing, precision, backend,
                     n_trainable=None):
    tokens = micro_batch_size * seq_len
    per_token = activation_bytes_per_token(config, precision, seq_len, gradient_checkpointing, backend)
    n_trainable = n_params if n_trainable is None else n_trainable
    states = STATE_BYTES_PER_PARAM * n_trainable + FROZEN_BYTES_PER_PARAM * (n_params - n_trainable)
    activations = tokens * per_token
    logits = _loss_bytes(tokens, config.padded_vocab_size, config.d_model)
    return MemoryEstimate(states, activations, logits, OVERHEAD * (states + activations + logits))


def budget_bytes(vram: str, device_total_bytes: int | None) -> float:
    """What a run may plan to use: the preset's nominal size (or the card, if smaller) times BUDGET_SHARE."""
    nominal = int(vram[:-2]) * GIB
    if device_total_bytes is not None:
        nominal = min(nominal, device_total_bytes)
    return BUDGET_SHARE * nominal


def fit_layout(model_config, n_params: int, micro_batch_size: int, grad_accum_steps: int, seq_len: int,
               gradient_checkpointing: bool, precision: str, budget: float, backend: str = "triton",
               n_trainable: int | None = None):
    """Adjust a batch layout until its estimate fits `budget`, keeping the tokens per optimizer step.

    First turn on gradient checkpointing, then halve the micro-batch and double accumulation.
    Returns:
        (micro_batch_size, grad_accum_steps, gradient_checkpointing, estimate, notes: list[str]);
        estimate.total > budget means it cannot fit at all (the caller refuses to start)
    """
    notes = []

    def est():
        return estimate_for(model_config, n_params, micro_batch_size, seq_len, gradient_checkpointing, precision,
                            backend, n_trainable)

    e = est()
    if e.total > budget and not gradient_checkpointing:
        gradient_checkpointing = True
        e = est()
        notes.append("turned on gradient checkpointing to fit the memory budget")
    while e.total > budget and micro_batch_size > 1 and micro_batch_size % 2 == 0:
        micro_batch_size //= 2
        grad_accum_steps *= 2
        e = est()
        notes.append(f"halved the micro-batch to {micro_batch_size} (accumulation {grad_accum_steps}) "
                     f"to fit the memory budget")
    return micro_batch_size, grad_accum_steps, gradient_checkpointing, e, notes
