"""Peak GPU memory of a training step, estimated before the run starts, and the fit check.

The estimate adds what a step keeps alive at its peak (end of forward / start of backward):
    weights fp32 + grads fp32 + AdamW moments (2 x fp32)         16 bytes per parameter
    low-precision weight copies made by autocast                  2 bytes per parameter (bf16/fp16)
    activations saved for backward                                per token, per layer (see ACT_BYTES)
    logits, their fp32 upcast for the loss and its gradient       per token x vocabulary
The per-token coefficients were fitted to peaks measured on an H100 with the chunked and triton scans
(BENCHMARKS.md, section memory); the estimate errs high rather than low.
"""
from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

# Saved activations per token per layer, in units of d_inner, for 2-byte autocast (fp32 doubles it).
ACT_BYTES_PER_D_INNER = 40.0
# With checkpointing each block keeps only its input: the fp32 residual stream (4 bytes x d_model) + norm input.
CKPT_BYTES_PER_D_MODEL = 8.0
# Logits (2 B) + fp32 copy (4 B) + fp32 gradient (4 B) + low-precision gradient (2 B), per vocabulary entry.
LOGIT_BYTES = 12.0
# Allocator fragmentation and workspace (cuBLAS, Triton) on top of the sum.
OVERHEAD = 1.15
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
                         precision: str) -> MemoryEstimate:
    """Estimated peak bytes of one training step on one GPU (see the module docstring)."""
    low = precision in ("bf16", "fp16")
    states = 16.0 * n_params + (2.0 * n_params if low else 0.0)
    tokens = micro_batch_size * seq_len
    per_layer = ACT_BYTES_PER_D_INNER * d_inner * (1.0 if low else 2.0)
    if gradient_checkpointing:
        activations = tokens * (n_layer * CKPT_BYTES_PER_D_MODEL * d_model + per_layer)
    else:
        activations = tokens * n_layer * per_layer
    logits = tokens * vocab_padded * (LOGIT_BYTES if low else 12.0)
    total = OVERHEAD * (states + activations + logits)
    return MemoryEstimate(states, activations, logits, total)


def estimate_for(model_config, n_params: int, micro_batch_size: int, seq_len: int,
                 gradient_checkpointing: bool, precision: str) -> MemoryEstimate:
    return estimate_peak_memory(n_params, model_config.d_model, model_config.d_inner, model_config.n_layer,
                                model_config.padded_vocab_size, micro_batch_size, seq_len,
                                gradient_checkpointing, precision)


def budget_bytes(vram: str, device_total_bytes: int | None) -> float:
    """What a run may plan to use: the preset's nominal size (or the card, if smaller) times BUDGET_SHARE."""
    nominal = int(vram[:-2]) * GIB
    if device_total_bytes is not None:
        nominal = min(nominal, device_total_bytes)
    return BUDGET_SHARE * nominal


def fit_layout(model_config, n_params: int, micro_batch_size: int, grad_accum_steps: int, seq_len: int,
               gradient_checkpointing: bool, precision: str, budget: float):
    """Adjust a batch layout until its estimate fits `budget`, keeping the tokens per optimizer step.

    First turn on gradient checkpointing, then halve the micro-batch and double accumulation.
    Returns:
        (micro_batch_size, grad_accum_steps, gradient_checkpointing, estimate, notes: list[str]);
        estimate.total > budget means it cannot fit at all (the caller refuses to start)
    """
    notes = []

    def est():
        return estimate_for(model_config, n_params, micro_batch_size, seq_len, gradient_checkpointing, precision)

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
