"""A language model whose layers follow a layer pattern: Mamba-1, Mamba-2, attention and MLP layers in any order.

    embedding -> one layer per pattern symbol (models/hybrid_layers.LAYERS) -> RMSNorm -> LM head (tied)

Everything around the layers (loss, forward, prefill, generate, sampling) is models/mamba.py's language model; this
class supplies the layers, a cache with one entry per layer, the attention context (padding mask, RoPE positions,
KV slots) and the kernel choice of each layer kind. "M" * n with the same weights computes exactly what
MambaLanguageModel computes (tests/test_hybrid.py). Checkpoints use the project's own format (models/native_format.py).

Decoding: HybridCache pre-allocates `slots` KV positions per attention layer (the generation's length) next to the
Mamba states; a step writes slot `index` of every attention layer and attends over the slots marked in `kv_valid`.
All bookkeeping lives in tensors updated in place, so step_states is one static graph (inference/decoder.py
captures it in a CUDA graph exactly as for pure Mamba).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from kernels import add_rms_norm, resolve_backend
from kernels.causal_conv import resolve_conv_backend
from kernels.norm import resolve_norm_backend
from kernels.ssd import resolve_ssd_backend

from .attention import AttentionContext, positions_from_mask, rope_tables
from .hybrid_config import ATTENTION_SYMBOLS, HybridConfig
from .hybrid_layers import LAYERS, HybridKernels
from .mamba import KernelChoice, MambaLanguageModel, _compute_dtype, resolve_or_fall_back

logger = logging.getLogger(__name__)

SLOT_MULTIPLE = 16     # KV slots are allocated in multiples of this (a decoder's warm-up steps need a few)


@dataclass
class HybridCache:
    """Decoding state, one entry per layer, updated in place by prefill and step.

    states[i]:  layer i's tensors (Mamba: conv and SSM state; attention: keys and values (b, g, slots, e); MLP: ())
    kv_valid:   (b, slots) bool, True where a slot holds a real token (not padding, not yet written)
    positions:  (b,) long, the RoPE position of each row's next token (tokens seen, pads not counted)
    index:      (1,) long, the slot the next token goes to
    slots:      KV slots per attention layer (0 when there is none)
    seqlen_offset: tokens consumed so far (padding included)
    """
    states: list[tuple[torch.Tensor, ...]]
    kv_valid: torch.Tensor
    positions: torch.Tensor
    index: torch.Tensor
    slots: int
    has_attention: bool
    seqlen_offset: int = 0

    @property
    def batch_size(self) -> int:
        return self.positions.shape[0]

    @property
    def capacity(self) -> int | None:
        """Tokens the cache can hold in all; None = no limit (no attention layer)."""
        return self.slots if self.has_attention else None

    def step_args(self) -> tuple:
        return self.states, self.kv_valid, self.positions, self.index


class HybridLanguageModel(MambaLanguageModel):
    """Token embedding -> the pattern's layers -> RMSNorm -> LM head (tied to the embedding)."""

    family = "hybrid"

    def __init__(self, config: HybridConfig):
        if not isinstance(config, HybridConfig):
            raise TypeError(f"HybridLanguageModel needs a HybridConfig, got {type(config).__name__}")
        super().__init__(config)
        nn.init.normal_(self.backbone.embeddings.weight, std=config.init_std)
        self.has_attention = any(s in ATTENTION_SYMBOLS for s in config.pattern)

    def _build_layers(self, config: HybridConfig) -> list[nn.Module]:
        return [LAYERS[symbol](config) for symbol in config.pattern]

    def _choose_kernels(self, device: torch.device) -> HybridKernels:
        requested = self.config.scan_backend
        scan = resolve_or_fall_back(resolve_backend, requested, device, "scan")
        ssd = resolve_or_fall_back(resolve_ssd_backend, requested, device, "SSD")
        choice = HybridKernels(
            mamba1=KernelChoice.for_scan(scan),
            mamba2=KernelChoice(scan=ssd, conv=resolve_conv_backend("auto", device),
                                norm=resolve_norm_backend("auto", device)),
            norm=KernelChoice.for_scan(scan).norm)    # as MambaLanguageModel: "M" * n computes the same
        logger.info("kernels on %s for pattern %s: Mamba-1 %s, Mamba-2 %s, attention SDPA, add+RMSNorm %s",
                    device.type, self.config.pattern, choice.mamba1, choice.mamba2, choice.norm)
        return choice

    def scan_backend_for(self, device: torch.device) -> str:
        """The scan backend of the Mamba layers for `device` (start-up summaries, memory estimate)."""
        k = self.kernels_for(device)
        return k.mamba2.scan if "M" not in self.config.pattern and "2" in self.config.pattern else k.mamba1.scan

    # ---- cache --------------------------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, device=None, dtype=None, slots: int = 0) -> HybridCache:
        """Empty decoding state for `batch_size` sequences of up to `slots` tokens (rounded up to a multiple of
        SLOT_MULTIPLE; attention layers only). Conv states and KV in `dtype`, SSM states in fp32."""
        weight = self.backbone.embeddings.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        slots = -(-max(slots, 1) // SLOT_MULTIPLE) * SLOT_MULTIPLE if self.has_attention else 0
        return HybridCache(
            states=[layer.init_state(batch_size, slots, device, dtype) for layer in self.backbone.layers],
            kv_valid=torch.zeros(batch_size, slots, dtype=torch.bool, device=device),
            positions=torch.zeros(batch_size, dtype=torch.long, device=device),
            index=torch.zeros(1, dtype=torch.long, device=device),
            slots=slots, has_attention=self.has_attention)

    def init_decode_cache(self, batch_size: int, max_length: int, device=None) -> HybridCache:
        return self.init_cache(batch_size, device=device, slots=max_length)

    # ---- forward ------------------------------------------------------------------------------------------------

    def _rope(self, positions):
        cfg = self.config
        if not (cfg.rope and self.has_attention):
            return None
        return rope_tables(positions, cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)

    def _hidden_states(self, input_ids, attention_mask=None, cache: HybridCache | None = None):
        """The final-normed residual stream (b, l, d); fills `cache` (prefill) when given."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a (batch, length) long tensor, "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        mask = None if attention_mask is None else self._check_mask(attention_mask, input_ids)
        if cache is not None:
            if cache.batch_size != b:
                raise ValueError(f"cache is for batch size {cache.batch_size}, input_ids has {b}")
            if cache.capacity is not None and l > cache.capacity:
                raise ValueError(f"the prompt has {l} tokens but the KV cache only {cache.capacity} slots; "
                                 f"allocate the cache for the prompt plus the new tokens")
        h = self.backbone.embeddings(input_ids)                                # (b, l, d)
        kernels = self.kernels_for(h.device)
        ctx = AttentionContext(mask=mask, rope=self._rope(positions_from_mask(mask, b, l, h.device)))
        use_checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        residual = None
        for i, layer in enumerate(self.backbone.layers):
            state = None if cache is None else cache.states[i]
            if use_checkpoint:
                h, residual = checkpoint(layer, h, residual, ctx, None, kernels, use_reentrant=False)
            else:
                h, residual = layer(h, residual, ctx, state, kernels)
        if cache is not None:
            self._reset_bookkeeping(cache, mask, l) if self.has_attention else None
            cache.seqlen_offset = l
        norm_f = self.backbone.norm_f
        hidden, _ = add_rms_norm(h, residual, norm_f.weight, norm_f.eps, out_dtype=_compute_dtype(h, norm_f.weight),
                                 backend=kernels.norm)
        return hidden

    @staticmethod
    def _reset_bookkeeping(cache: HybridCache, mask, l):
        """After a prefill of l tokens: slots [0, l) hold the prompt (pads invalid), the rest nothing yet."""
        cache.kv_valid.zero_()
        cache.kv_valid[:, :l] = True if mask is None else mask
        cache.positions.copy_(torch.full_like(cache.positions, l) if mask is None else mask.sum(dim=1))
        cache.index.fill_(l)

    def step(self, token_ids, cache: HybridCache):
        if cache.capacity is not None and cache.seqlen_offset >= cache.capacity:
            raise ValueError(f"the KV cache is full ({cache.capacity} tokens); allocate it for the prompt plus "
                             f"every new token (init_decode_cache / Decoder max_length)")
        return super().step(token_ids, cache)

    def step_states(self, token_ids, states, kv_valid, positions, index):
        """One token for every sequence on the bare cache tensors, with no Python bookkeeping (CUDA graphs,
        torch.compile). token_ids (b,) -> logits (b, v); every tensor of the cache updated in place."""
        h = self.backbone.embeddings(token_ids)                                # (b, d)
        kernels = self.kernels_for(h.device)
        if self.has_attention:             # (a model without attention layers keeps no KV bookkeeping)
            kv_valid.index_fill_(1, index, True)
        ctx = AttentionContext(rope=self._rope(positions[:, None]), kv_valid=kv_valid, index=index)
        residual = None
        for layer, state in zip(self.backbone.layers, states):
            h, residual = layer.step(h, residual, ctx, state, kernels)
        if self.has_attention:
            index.add_(1)
            positions.add_(1)
        norm_f = self.backbone.norm_f
        hidden, _ = add_rms_norm(h, residual, norm_f.weight, norm_f.eps, out_dtype=_compute_dtype(h, norm_f.weight),
                                 backend=kernels.norm)
        return self.lm_head(hidden)                                            # (b, v)

    # ---- checkpoints --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, scan_backend="auto") -> "HybridLanguageModel":
        """Load a directory in the project's own format (models/native_format.py) or an HF Llama one
        (models/formats/llama.py)."""
        from .registry import load_pretrained
        return load_pretrained(path, device=device, dtype=dtype, scan_backend=scan_backend, family=cls.family)

    def save_pretrained(self, path, eos_token_id=None):
        """Write config.json (family, pattern, every field) + model.safetensors (models/native_format.py)."""
        from .native_format import save_native
        save_native(self, path, eos_token_id=eos_token_id)
