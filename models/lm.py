"""THE language model: token embedding -> one layer per letter of the layer pattern -> RMSNorm -> LM head.

    embedding (v, d) -> layers (models/layers: LAYERS[letter] for each letter) -> final RMSNorm -> head (v, d)

Mamba-1 ("M" * n, from a MambaConfig), Mamba-2 ("2" * n, from a Mamba2Config), hybrids and the transformer
("T" * n) are configurations of this one model (models/config.py), not subclasses. One cache holds an entry per
layer; one forward (with the chunked loss), prefill, step and generate serve every pattern, and inference/decoder.py
(CUDA graphs included), models/sampling.py and generate.py serve every family through them.

Shape letters: b batch, l sequence length, d d_model, v padded vocabulary size, s KV-cache slots.

Decoding: Cache pre-allocates `slots` KV positions per attention layer (the generation's length) next to the
recurrent states; a step writes slot `index` of every attention layer and attends over the slots marked in
`kv_valid`. All bookkeeping lives in tensors updated in place, so step_states is one static graph
(inference/decoder.py captures it in a CUDA graph). A pattern without attention keeps no KV bookkeeping.

Checkpoints: the formats (models/formats/) import this model, never the reverse. from_pretrained / save_pretrained
reach them through register_checkpoint_io, which models/formats/ calls when the `models` package is imported.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import add_rms_norm, linear_cross_entropy, resolve_backend
from kernels.causal_conv import resolve_conv_backend
from kernels.documents import check_seq_idx
from kernels.norm import resolve_norm_backend
from kernels.ssd import resolve_ssd_backend

from .config import ATTENTION_SYMBOLS, ModelConfig
from .layers import LAYERS
from .layers.attention import AttentionContext, positions_from_mask, positions_from_seq_idx, rope_tables
from .layers.base import REFERENCE, KernelChoice, ModelKernels, RMSNorm, compute_dtype
from .sampling import SamplingParams, sample

logger = logging.getLogger(__name__)

SLOT_MULTIPLE = 16     # KV slots are allocated in multiples of this (a decoder's warm-up steps need a few)


@dataclass
class Cache:
    """Decoding state, one entry per layer, updated in place by prefill (forward(cache=...)) and step.

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
        """Tokens the cache can hold in all; None = no limit (no attention layer: a recurrent state does not grow)."""
        return self.slots if self.has_attention else None

    def step_args(self) -> tuple:
        """The bare tensors model.step_states takes after the tokens (what a CUDA graph captures)."""
        return self.states, self.kv_valid, self.positions, self.index


def resolve_or_fall_back(resolve, requested: str, device: torch.device, what: str) -> str:
    """resolve(requested, device), or resolve("auto", device) with a logged warning saying why when the requested
    backend cannot run here (a model built for a GPU still loads on a CPU, and says so)."""
    try:
        return resolve(requested, device)
    except RuntimeError as err:
        name = resolve("auto", device)
        logger.warning("%s Falling back to %s backend %r.", err, what, name)
        return name


# ---- checkpoint formats, registered by models/formats/ ---------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointIO:
    load: Callable      # load(path, device, dtype, scan_backend, family) -> LanguageModel
    save: Callable      # save(model, path, eos_token_id)


_checkpoint_io: CheckpointIO | None = None


def register_checkpoint_io(io: CheckpointIO) -> None:
    """Called once by models/formats/ (imported by the `models` package): the model reaches its formats through
    this, so that no module of the model imports a format."""
    global _checkpoint_io
    _checkpoint_io = io


def _formats() -> CheckpointIO:
    if _checkpoint_io is None:
        raise RuntimeError("no checkpoint formats are registered: import the `models` package (models/formats/)")
    return _checkpoint_io


class LanguageModel(nn.Module):
    """Token embedding -> the pattern's layers -> RMSNorm -> LM head (tied to the embedding by default)."""

    def __init__(self, config):
        """config: a ModelConfig, or a family preset that stands for one (MambaConfig, Mamba2Config)."""
        super().__init__()
        self.config = config                    # what the model was made from: the checkpoint formats write it
        spec = config.to_model_config()
        self.spec: ModelConfig = spec           # the pattern and every layer kind's settings (config itself if a
                                                # ModelConfig)
        self.has_attention = any(s in ATTENTION_SYMBOLS for s in spec.pattern)
        self.backbone = nn.ModuleDict(dict(
            embeddings=nn.Embedding(spec.padded_vocab_size, spec.d_model),
            layers=nn.ModuleList(LAYERS[letter](spec) for letter in spec.pattern),
            norm_f=RMSNorm(spec.d_model, eps=spec.norm_epsilon),
        ))
        self.lm_head = nn.Linear(spec.d_model, spec.padded_vocab_size, bias=False)
        nn.init.normal_(self.backbone.embeddings.weight, std=spec.init_std)
        if spec.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.gradient_checkpointing = False
        self._kernels = None        # (device type, ModelKernels), resolved on first use

    # ---- set-up -------------------------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each layer's activations in backward (training only): memory ~ one layer instead of all."""
        self.gradient_checkpointing = enabled

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def kernels_for(self, device: torch.device) -> ModelKernels:
        """The concrete backend of every kernel for `device`: chosen (and logged) once per device type."""
        if self._kernels is None or self._kernels[0] != device.type:
            self._kernels = (device.type, self._choose_kernels(device))
        return self._kernels[1]

    def use_kernels(self, device: torch.device | str, choice: ModelKernels) -> None:
        """Run `choice` on `device`'s type from now on instead of what kernels_for picked: for a benchmark that times
        one kernel against another on the same weights (bench/bench_generate.py --parts variants)."""
        self._kernels = (torch.device(device).type, choice)

    def scan_backend_for(self, device: torch.device) -> str:
        """The scan backend of the Mamba layers for `device` (start-up summaries, memory estimate): the selective
        scan's when there are M layers, else the SSD scan's."""
        k = self.kernels_for(device)
        return k.mamba2.scan if "M" not in self.spec.pattern and "2" in self.spec.pattern else k.mamba1.scan

    def _choose_kernels(self, device: torch.device) -> ModelKernels:
        """Each layer kind's kernels for `device`, for the kinds the pattern has (called once per device type)."""
        # the backend asked for is read from the config the model was made from: a loader may set it there after
        # building the model (training/checkpoint.py), before the first forward
        requested, pattern = self.config.scan_backend, self.spec.pattern
        mamba1 = mamba2 = None
        parts = []
        if "M" in pattern:
            mamba1 = KernelChoice.for_scan(resolve_or_fall_back(resolve_backend, requested, device, "scan"))
            parts.append(f"selective scan {mamba1.scan} (requested {requested!r}), causal conv {mamba1.conv}, "
                         f"add+RMSNorm {mamba1.norm}, decoding step {mamba1.step}")
        if "2" in pattern:
            ssd = resolve_or_fall_back(resolve_ssd_backend, requested, device, "SSD")
            mamba2 = KernelChoice(scan=ssd, conv=resolve_conv_backend("auto", device),
                                  norm=resolve_norm_backend("auto", device))
            note = (" (Triton forward and backward)" if ssd == "triton"
                    else " (the matmul-based chunked scan on CUDA)" if device.type == "cuda" and ssd == "chunked"
                    else "")
            parts.append(f"SSD scan {ssd} (requested {requested!r}){note}, causal conv {mamba2.conv}, "
                         f"add+RMSNorm {mamba2.norm}, gated RMSNorm torch")
        # attention / MLP norms and the final norm: as the Mamba layers' (so "M" * n computes what it always did)
        mamba = mamba1 or mamba2
        norm = mamba.norm if mamba else KernelChoice.for_scan(
            resolve_or_fall_back(resolve_backend, requested, device, "scan")).norm
        if set(pattern) - {"M", "2"}:
            parts.append(f"attention SDPA / MLP, add+RMSNorm {norm}")
        logger.info("kernels on %s for pattern %s: %s; LM loss chunked", device.type, _short(pattern),
                    "; ".join(parts))
        return ModelKernels(mamba1=mamba1 or REFERENCE, mamba2=mamba2 or REFERENCE, norm=norm)

    # ---- cache --------------------------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, device=None, dtype=None, slots: int = 0) -> Cache:
        """Empty decoding state for `batch_size` sequences of up to `slots` tokens (rounded up to a multiple of
        SLOT_MULTIPLE; attention layers only). Conv states and KV in `dtype`, SSM states in fp32."""
        weight = self.backbone.embeddings.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        slots = -(-max(slots, 1) // SLOT_MULTIPLE) * SLOT_MULTIPLE if self.has_attention else 0
        return Cache(
            states=[layer.init_state(batch_size, slots, device, dtype) for layer in self.backbone.layers],
            kv_valid=torch.zeros(batch_size, slots, dtype=torch.bool, device=device),
            positions=torch.zeros(batch_size, dtype=torch.long, device=device),
            index=torch.zeros(1, dtype=torch.long, device=device),
            slots=slots, has_attention=self.has_attention)

    def init_decode_cache(self, batch_size: int, max_length: int, device=None) -> Cache:
        """The cache for decoding up to max_length tokens in all (prompt included): KV slots for each of them where
        there are attention layers; a recurrent state does not grow with the length."""
        return self.init_cache(batch_size, device=device, slots=max_length)

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(self, input_ids, targets=None, attention_mask=None, cache=None, return_logits=True, seq_idx=None):
        """Args:
            input_ids: (b, l) long
            targets: (b, l) long or None; -100 (the loss's ignore index) marks positions left out of the loss
            attention_mask: (b, l) 1 = token, 0 = left padding; or None
            cache: an empty Cache (from init_cache / init_decode_cache) to fill for decoding with step(), or None
            return_logits: False skips the (b, l, v) logits when a loss is asked for: the loss is then taken
                chunk by chunk from the hidden states (kernels.linear_cross_entropy), which never holds the fp32
                logits of the whole batch (what training wants)
            seq_idx: (b, l) integer or None: packed rows, the document index of each token, non-decreasing along a
                row (kernels/documents.py). Every layer keeps documents apart: the Mamba layers' conv and scan
                restart at each document start, attention attends within the document only, with RoPE positions
                counted from the document's first token. The loss is the same mean over targets != -100: the
                caller sets the target of each document's last token to -100 (it would otherwise be the next
                document's first token). Not with attention_mask or cache. None: one document per row
        Returns:
            logits (b, l, v) or None, loss (mean cross-entropy over targets != -100) or None
        """
        hidden = self._hidden_states(input_ids, attention_mask, cache, seq_idx)   # (b, l, d)
        if targets is not None and targets.shape != input_ids.shape:
            raise ValueError(f"targets must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(targets.shape)}")
        if targets is not None and not return_logits:
            return None, linear_cross_entropy(hidden, self.lm_head.weight, targets, ignore_index=-100)
        logits = self.lm_head(hidden)                                          # (b, l, v)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    def hidden_states(self, input_ids, attention_mask=None, cache=None, seq_idx=None):
        """The final-normed residual stream (b, l, d): the LM head's input, for callers that take the head over a
        few positions at a time (evaluation/scoring.py). Same arguments as forward; fills an empty `cache`."""
        return self._hidden_states(input_ids, attention_mask, cache, seq_idx)

    def _rope(self, positions):
        spec = self.spec
        if not (spec.rope and self.has_attention):
            return None
        return rope_tables(positions, spec.resolved_head_dim, spec.rope_theta, spec.rope_scaling)

    def _hidden_states(self, input_ids, attention_mask=None, cache: Cache | None = None, seq_idx=None):
        """The final-normed residual stream (b, l, d); fills `cache` (prefill) when given."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a (batch, length) long tensor, "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        mask = None if attention_mask is None else self._check_mask(attention_mask, input_ids)
        if seq_idx is not None:
            seq_idx = self._check_seq_idx(seq_idx, input_ids, attention_mask, cache)
        if cache is not None:
            if cache.seqlen_offset != 0:
                raise ValueError("forward(cache=...) fills an empty cache (prompt prefill); "
                                 "continue a filled one token by token with step()")
            if cache.batch_size != b:
                raise ValueError(f"cache is for batch size {cache.batch_size}, input_ids has {b}")
            if cache.capacity is not None and l > cache.capacity:
                raise ValueError(f"the prompt has {l} tokens but the KV cache only {cache.capacity} slots; "
                                 f"allocate the cache for the prompt plus the new tokens")
        h = self.backbone.embeddings(input_ids)                                # (b, l, d)
        kernels = self.kernels_for(h.device)
        if not self.has_attention:
            rope = None
        elif seq_idx is not None:
            rope = self._rope(positions_from_seq_idx(seq_idx))
        else:
            rope = self._rope(positions_from_mask(mask, b, l, h.device))
        ctx = AttentionContext(mask=mask, rope=rope, seq_idx=seq_idx)
        use_checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        residual = None
        for i, layer in enumerate(self.backbone.layers):
            if use_checkpoint:
                h, residual = checkpoint(layer, h, residual, ctx, None, kernels, use_reentrant=False)
            else:
                h, residual = layer(h, residual, ctx, None if cache is None else cache.states[i], kernels)
        if cache is not None:
            if self.has_attention:
                self._reset_bookkeeping(cache, mask, l)
            cache.seqlen_offset = l
        return self._final_norm(h, residual, kernels)

    def _final_norm(self, h, residual, kernels: ModelKernels):
        norm_f = self.backbone.norm_f
        hidden, _ = add_rms_norm(h, residual, norm_f.weight, norm_f.eps, out_dtype=compute_dtype(h, norm_f.weight),
                                 backend=kernels.norm)
        return hidden

    @staticmethod
    def _check_mask(attention_mask, input_ids):
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.bool()
        if (mask != attention_mask).any():
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
        if (mask[:, 1:] < mask[:, :-1]).any():
            raise ValueError("attention_mask must be LEFT padding (all 0s before all 1s in each row); "
                             "a recurrent model cannot skip pads in the middle or at the end")
        return mask

    @staticmethod
    def _check_seq_idx(seq_idx, input_ids, attention_mask, cache):
        """seq_idx as the kernels take it ((b, l) int32); ValueError for what packed rows do not support."""
        if attention_mask is not None:
            raise ValueError("seq_idx and attention_mask cannot be combined: a packed row has no padding to mask "
                             "(pad a row's tail as one more document, with targets -100)")
        if cache is not None:
            raise ValueError("seq_idx cannot fill a decoding cache: prefill one document per row")
        if seq_idx.device != input_ids.device:
            raise ValueError(f"seq_idx must be on input_ids' device ({input_ids.device}), got {seq_idx.device}")
        return check_seq_idx(seq_idx, *input_ids.shape)

    @staticmethod
    def _reset_bookkeeping(cache: Cache, mask, l):
        """After a prefill of l tokens: slots [0, l) hold the prompt (pads invalid), the rest nothing yet."""
        cache.kv_valid.zero_()
        cache.kv_valid[:, :l] = True if mask is None else mask
        cache.positions.copy_(torch.full_like(cache.positions, l) if mask is None else mask.sum(dim=1))
        cache.index.fill_(l)

    # ---- decoding -----------------------------------------------------------------------------------------------

    def step(self, token_ids, cache: Cache):
        """Advance every sequence by one token (O(1) time and memory for the recurrent layers).

        Args:
            token_ids: (b,) long
            cache: Cache, updated in place
        Returns:
            logits (b, v)
        """
        if token_ids.dim() != 1 or token_ids.shape[0] != cache.batch_size:
            raise ValueError(f"step() takes one token per sequence, shape ({cache.batch_size},); "
                             f"got {tuple(token_ids.shape)}")
        if cache.capacity is not None and cache.seqlen_offset >= cache.capacity:
            raise ValueError(f"the KV cache is full ({cache.capacity} tokens); allocate it for the prompt plus "
                             f"every new token (init_decode_cache / Decoder max_length)")
        logits = self.step_states(token_ids, *cache.step_args())
        cache.seqlen_offset += 1
        return logits

    def step_states(self, token_ids, states, kv_valid, positions, index):
        """step() on the bare cache tensors, with no Python bookkeeping: what a CUDA graph captures and
        torch.compile traces (inference/decoder.py). token_ids (b,) -> logits (b, v); every tensor updated in place."""
        h = self.backbone.embeddings(token_ids)                                # (b, d)
        kernels = self.kernels_for(h.device)
        if self.has_attention:             # (a model without attention layers keeps no KV bookkeeping)
            kv_valid.index_fill_(1, index, True)
            ctx = AttentionContext(rope=self._rope(positions[:, None]), kv_valid=kv_valid, index=index)
        else:
            ctx = None
        residual = None
        for layer, state in zip(self.backbone.layers, states):
            h, residual = layer.step(h, residual, ctx, state, kernels)
        if self.has_attention:
            index.add_(1)
            positions.add_(1)
        return self.lm_head(self._final_norm(h, residual, kernels))           # (b, v)

    def prefill(self, input_ids, cache: Cache, attention_mask=None):
        """Fill an empty cache from prompts in one parallel pass; return only the last position's logits (b, v)
        (the head over a whole long prompt would cost (b, l, v) memory). Left-pad prompts of different lengths."""
        hidden = self._hidden_states(input_ids, attention_mask, cache)        # (b, l, d)
        return self.lm_head(hidden[:, -1])                                     # (b, v)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, generator=None):
        """Sample continuations: the prompt is prefilled in one parallel pass, then one step per token.

        Args:
            input_ids: (b, l) long prompts, LEFT-padded if their lengths differ (then give attention_mask)
            max_new_tokens: tokens to add
            temperature: 0 = greedy; otherwise logits are divided by it before sampling
            top_k: keep only the k most likely tokens (None = all)
            top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (None = all)
            eos_token_id: a sequence that produces it stops; its later positions are filled with eos_token_id.
                Generation ends early once every sequence has stopped.
            attention_mask: (b, l), 1 = token, 0 = left padding
            generator: torch.Generator for reproducible sampling
        Returns:
            (b, l + new) prompt followed by the new tokens (new <= max_new_tokens)
        """
        self._check_generate_args(input_ids, max_new_tokens)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)   # checks the values
        cache = self.init_decode_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens,
                                       device=input_ids.device)
        logits = self.prefill(input_ids, cache, attention_mask)              # (b, v)
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        tokens = [input_ids]
        for i in range(max_new_tokens):
            # (b,) never one of the padding rows beyond vocab_size
            next_ids = sample(logits, params, vocab_size=self.spec.vocab_size, generator=generator)
            if eos_token_id is not None:
                next_ids = torch.where(finished, torch.full_like(next_ids, eos_token_id), next_ids)
                finished |= next_ids == eos_token_id
            tokens.append(next_ids[:, None])
            if i == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            logits = self.step(next_ids, cache)
        return torch.cat(tokens, dim=1)

    @staticmethod
    def _check_generate_args(input_ids, max_new_tokens):
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be (batch, length >= 1), got shape {tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")

    # ---- checkpoints (models/formats/) --------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, scan_backend="auto", family=None) -> "LanguageModel":
        """Load a checkpoint directory of any format models/formats/ reads (HF Mamba / Mamba2, mamba_ssm, HF
        Llama, the project's own); with `family` ("mamba1", "mamba2", "hybrid"), a checkpoint of another family is an
        error."""
        return _formats().load(path, device=device, dtype=dtype, scan_backend=scan_backend, family=family)

    def save_pretrained(self, path, eos_token_id=None):
        """Write the checkpoint directory in the format of the model's family (models/formats/): HF Mamba for
        mamba1, HF Mamba2 for mamba2, the project's own for any other pattern."""
        _formats().save(self, path, eos_token_id=eos_token_id)


def _short(pattern: str) -> str:
    """A pattern for a log line: a run of one letter as "M*24"."""
    return f"{pattern[0]}*{len(pattern)}" if len(set(pattern)) == 1 else pattern
