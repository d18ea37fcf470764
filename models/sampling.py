"""Choosing the next token from a model's logits: repetition penalty, temperature, top-k, top-p, then a draw.

Pure functions on (b, v) logits, so every decoding loop (model.generate, inference/decoder.py) shares one
definition. The order is the one HF transformers' LogitsProcessors use: repetition penalty on the raw logits,
then temperature, then top-k, then top-p, then a multinomial draw with an optional torch.Generator
(the same generator state gives the same tokens). Temperature 0 means greedy: argmax of the penalised logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0              # 0 = greedy; otherwise logits are divided by it (< 1 sharper, > 1 flatter)
    top_k: int | None = None              # keep only the k most likely tokens (None = all)
    top_p: float | None = None            # nucleus: keep the fewest tokens whose probability reaches top_p (None = all)
    repetition_penalty: float = 1.0       # > 1 discourages tokens already in the prompt or output (1 = off; CTRL paper)

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        r = self.repetition_penalty
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not r > 0 or math.isinf(r):
            raise ValueError(f"repetition_penalty must be a finite number > 0 (1 = off), got {r!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens that already occurred less likely (Keskar et al. 2019, as in HF transformers).

    A seen token's logit is divided by `penalty` where it is positive and multiplied by it where it is negative,
    so penalty > 1 always lowers it (a plain division would raise a negative logit).

    Args:
        logits: (b, v) float
        seen: (b, v) bool, True where the token occurred in that row's prompt or output
        penalty: > 0; 1 leaves the logits as they are
    Returns:
        (b, v) new tensor
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th stay). (b, v) -> (b, v)"""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]                        # (b, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches p; -inf for the rest.

    A token is dropped when the tokens more likely than it already reach p, so the most likely always stays.
    (b, v) -> (b, v)
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)        # (b, v) each
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p                                  # (b, v) in sorted order
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def sample(logits: torch.Tensor, params: SamplingParams, vocab_size: int | None = None,
           seen: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row.

    Args:
        logits: (b, v_padded) any float dtype; computed in fp32
        params: SamplingParams
        vocab_size: the real vocabulary size; rows of the padded embedding beyond it are never picked
        seen: (b, vocab_size) bool for the repetition penalty (needed only when it is not 1)
        generator: torch.Generator on logits' device, for reproducible draws
    Returns:
        (b,) long token ids
    """
    if vocab_size is not None:
        logits = logits[:, :vocab_size]
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        if seen is None:
            raise ValueError("a repetition penalty needs `seen`, the (b, v) mask of tokens already present")
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
