"""Mamba-1 language model, as released by Gu & Dao (state-spaces/mamba), in plain PyTorch.

Parameter names and math match HF transformers' MambaForCausalLM, so its checkpoints load as they are
(models/hf_format.py). The selective scan itself lives in kernels/ and is chosen there.

Shape letters (the paper's notation, as in mamba-minimal):
    b: batch size                     l: sequence length
    d: d_model (residual stream)      d_in: d_inner = expand * d_model (channels of the SSM)
    n: d_state (SSM state per channel) r: dt_rank (rank of the delta projection)
    k: d_conv (conv width)            v: padded vocabulary size

There are no positional embeddings: the recurrence (and the causal conv) already knows the order of tokens.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kernels import (add_rms_norm, block_step, causal_conv1d, causal_conv1d_update, linear_cross_entropy,
                     mixer_step, resolve_backend, selective_scan, selective_state_update)

from .config import MambaConfig
from .sampling import SamplingParams, sample

logger = logging.getLogger(__name__)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in the weight's dtype.

    The blocks call kernels.add_rms_norm with this module's weight directly, fusing the residual add (the module
    holds the parameter under the name HF checkpoints use)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, backend="torch"):
        return add_rms_norm(x, None, self.weight, self.eps, backend=backend)[0]


@dataclass(frozen=True)
class KernelChoice:
    """The concrete backend of each kernel for one device: decided once (MambaLanguageModel.kernels_for), logged,
    and handed down to every layer."""
    scan: str             # kernels.selective_scan backend
    conv: str             # kernels.causal_conv1d backend
    norm: str             # kernels.add_rms_norm backend
    # a block's decoding step (kernels/decode_step.py): "triton_block" = two Triton kernels for all of it but
    # out_proj (add+RMSNorm, in_proj and the conv in the first); "triton" = add+RMSNorm and in_proj apart, then two
    # kernels for the mixer; "torch" = one module or kernel per op (the conv step and the state update still take
    # their own Triton kernels on CUDA)
    step: str = "torch"

    @classmethod
    def for_scan(cls, scan: str) -> "KernelChoice":
        # The conv, norm and step kernels follow the scan: fused Triton kernels together, or PyTorch together.
        fused = "triton" if scan == "triton" else "torch"
        # "triton", not "triton_block": on the H200 (2026-12-02, bench/gpu_check.sh) the mixer step took 0.52 ms per
        # token at batch 1 and 0.87 at batch 64 against the block step's 0.64 and 1.55 (CUDA graph, mamba-130m).
        return cls(scan=scan, conv=fused, norm=fused, step="triton" if scan == "triton" else "torch")


def resolve_or_fall_back(resolve, requested: str, device: torch.device, what: str) -> str:
    """resolve(requested, device), or resolve("auto", device) with a logged warning saying why when the requested
    backend cannot run here (a model built for a GPU still loads on a CPU, and says so)."""
    try:
        return resolve(requested, device)
    except RuntimeError as err:
        name = resolve("auto", device)
        logger.warning("%s Falling back to %s backend %r.", err, what, name)
        return name


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What the next matmul will run in: autocast's dtype when autocast is on for x's device, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


@dataclass
class MambaCache:
    """Recurrent state for decoding, one entry per layer. Updated in place by forward(cache=...) and step().

    conv_states[i]: (b, d_in, k) the last k inputs of layer i's causal conv, in the model's dtype
    ssm_states[i]:  (b, d_in, n) the SSM state h of layer i, always fp32
    seqlen_offset:  tokens consumed so far
    """
    conv_states: list[torch.Tensor]
    ssm_states: list[torch.Tensor]
    seqlen_offset: int = 0

    @property
    def batch_size(self) -> int:
        return self.ssm_states[0].shape[0]

    @property
    def capacity(self) -> int | None:
        """Tokens the cache can hold: no limit for a recurrent state (a KV cache has one: models/hybrid.py)."""
        return None

    def step_args(self) -> tuple:
        """The bare tensors model.step_states takes after the tokens (what a CUDA graph captures)."""
        return self.conv_states, self.ssm_states


class SelectiveSSM(nn.Module):
    """The Mamba mixer: in_proj -> causal depthwise conv -> SiLU -> selective scan (D skip, SiLU(z) gate) -> out_proj."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        d, d_in, n, r, k = config.d_model, config.d_inner, config.d_state, config.resolved_dt_rank, config.d_conv
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = d_in, n, r, k
        self.in_proj = nn.Linear(d, 2 * d_in, bias=config.bias)
        self.conv1d = nn.Conv1d(d_in, d_in, kernel_size=k, groups=d_in, padding=k - 1, bias=config.conv_bias)
        self.x_proj = nn.Linear(d_in, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, d_in, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_in, n))
        self.D = nn.Parameter(torch.empty(d_in))
        self.out_proj = nn.Linear(d_in, d, bias=config.bias)
        # The trainer leaves these out of weight decay, as mamba_ssm does.
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The released initialisation (mamba_ssm Mamba.__init__ and MambaLMHeadModel._init_weights).

        in_proj, x_proj, conv1d keep PyTorch's default init; only what mamba_ssm changes is set here.
        """
        cfg = self.config
        dt_init_std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        # delta = softplus(bias) starts log-uniform in [dt_min, dt_max]: store softplus^-1(dt) = dt + log(1 - e^-dt)
        log_min, log_max = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(self.d_inner, device=self.D.device) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A = -(1, 2, ..., n) for every channel
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(A).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        for linear in (self.in_proj, self.out_proj):
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        # GPT-2 style: out_proj feeds the residual stream once per layer, so scale it by 1/sqrt(n_layer)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight.div_(math.sqrt(cfg.n_layer))

    def forward(self, x, attention_mask=None, conv_state=None, ssm_state=None, kernels=KernelChoice.for_scan("ref")):
        """Args:
            x: (b, l, d)
            attention_mask: (b, l) bool or None; False = left padding, which never moves the state
            conv_state, ssm_state: this layer's cache tensors to fill (prefill), or None
            kernels: the concrete kernel backends (KernelChoice)
        Returns:
            (b, l, d)

        One memory layout throughout: every (b, l, ·) activation stays token-major, as the projections produce and
        consume it. The conv and the scan take (b, d_in, l) *views* of that storage (channels contiguous) and
        return their outputs (and, in backward, their input gradients) the same way, so no activation is ever
        transposed into a copy.
        """
        xz = self.in_proj(x)                                                   # (b, l, 2*d_in)
        x, z = xz.chunk(2, dim=-1)                                             # (b, l, d_in) views of xz
        # weight (d_in, 1, k) -> (d_in, k) by squeeze, a view whose gradient is a view too (indexing [:, 0, :]
        # would cost a zero-filled (d_in, 1, k) and a copy per layer in backward)
        x = causal_conv1d(x.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                          mask=attention_mask, conv_state=conv_state, backend=kernels.conv)   # (b, d_in, l) view
        x_dbl = self.x_proj(x.transpose(1, 2))                                 # (b, l, r + 2n)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        # delta with dt_proj's bias, through the module (so that adapters wrapping dt_proj act on every path)
        delta = self.dt_proj(dt)                                               # (b, l, d_in)
        softplus = True
        if attention_mask is not None:
            # delta = 0 at pads: exp(0 * A) = 1 and delta * B * x = 0, so h does not move
            delta = F.softplus(delta.float()) * attention_mask[:, :, None]
            softplus = False
        A = -torch.exp(self.A_log.float())                                     # (d_in, n)
        y = selective_scan(x, delta.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D=self.D.float(),
                           z=z.transpose(1, 2), delta_softplus=softplus, return_last_state=ssm_state is not None,
                           backend=kernels.scan)                               # (b, d_in, l) view of (b, l, d_in)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return self.out_proj(y.transpose(1, 2))                                # (b, l, d)

    def fused_step_runs(self, kernels: KernelChoice, with_in_proj: bool = False) -> bool:
        """Whether the fused decoding step (kernels/decode_step.py; with in_proj: the block step) runs here. It reads
        the projections' weights itself, so only where they are plain linears (a LoRA adapter wraps them:
        models/lora.py), and not under torch.compile, which traces the PyTorch step and fuses it itself (a Triton
        launcher cannot be traced)."""
        wanted = ("triton_block",) if with_in_proj else ("triton", "triton_block")
        linears = (self.x_proj, self.dt_proj, self.in_proj) if with_in_proj else (self.x_proj, self.dt_proj)
        return (kernels.step in wanted and all(type(m) is nn.Linear for m in linears)
                and not (with_in_proj and self.in_proj.bias is not None) and not torch.compiler.is_compiling())

    def step_weights(self) -> tuple:
        """The mixer's weights after in_proj, as kernels.mixer_step takes them: conv weight (d_in, k) and bias,
        x_proj and dt_proj weights, dt_proj bias, A_log, D."""
        return (self.conv1d.weight[:, 0, :], self.conv1d.bias, self.x_proj.weight, self.dt_proj.weight,
                self.dt_proj.bias, self.A_log, self.D)

    def step(self, x, conv_state, ssm_state, kernels=KernelChoice.for_scan("ref")):
        """One token. Args: x (b, d); conv_state (b, d_in, k) and ssm_state (b, d_in, n), updated in place.
        Returns: (b, d)"""
        xz = self.in_proj(x)                                                   # (b, 2*d_in)
        if self.fused_step_runs(kernels):
            y = mixer_step(xz, conv_state, ssm_state, *self.step_weights(), backend="triton")   # (b, d_in)
            return self.out_proj(y)                                            # (b, d)
        x, z = xz.chunk(2, dim=-1)                                             # (b, d_in) each
        # one kernel for the conv window's shift and dot product where the fused kernels run (under torch.compile
        # the PyTorch step is traced and fused by the compiler instead)
        fused = kernels.conv == "triton" and not torch.compiler.is_compiling()
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                 backend="triton" if fused else "torch").to(z.dtype)                    # (b, d_in)
        dt, B, C = torch.split(self.x_proj(x), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self.dt_proj(dt)                                                  # (b, d_in), bias included
        A = -torch.exp(self.A_log.float())                                     # (d_in, n)
        y = selective_state_update(ssm_state, x, dt, A, B, C, D=self.D.float(), z=z, dt_softplus=True)  # (b, d_in)
        return self.out_proj(y)                                                # (b, d)


class MambaBlock(nn.Module):
    """Pre-norm residual block. As in mamba_ssm, the residual add is fused into the norm: a block takes the
    previous block's mixer output and the residual stream so far, and returns its own mixer output and the stream:

        residual = residual + h;   h = mixer(norm(residual))

    which is h_{i+1} = h_i + mixer(norm(h_i)) with the stream kept in fp32 (residual_in_fp32)."""

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_epsilon)
        self.mixer = SelectiveSSM(config)

    def _residual_dtype(self) -> torch.dtype:
        return torch.float32 if self.residual_in_fp32 else self.norm.weight.dtype

    def _add_norm(self, h, residual, backend):
        return add_rms_norm(h, residual, self.norm.weight, self.norm.eps,
                            out_dtype=_compute_dtype(h, self.mixer.in_proj.weight),
                            residual_dtype=self._residual_dtype(), backend=backend)

    def forward(self, h, residual=None, attention_mask=None, conv_state=None, ssm_state=None,
                kernels=KernelChoice.for_scan("ref")):
        """h: (b, l, d) the previous mixer output (the embedding for the first block); residual: (b, l, d) or None.
        Returns (mixer output, residual), both (b, l, d)."""
        normed, residual = self._add_norm(h, residual, kernels.norm)
        return self.mixer(normed, attention_mask, conv_state, ssm_state, kernels), residual

    def step(self, h, residual, conv_state, ssm_state, kernels=KernelChoice.for_scan("ref")):
        """h, residual: (b, d) -> (mixer output, residual), both (b, d)"""
        mixer = self.mixer
        in_proj = mixer.in_proj.weight
        # the block step computes the norm in in_proj's dtype: not under autocast, which would run in_proj in another
        if mixer.fused_step_runs(kernels, with_in_proj=True) and _compute_dtype(h, in_proj) == in_proj.dtype:
            y, residual = block_step(h, residual, self.norm.weight, self.norm.eps, in_proj, conv_state, ssm_state,
                                     *mixer.step_weights(), residual_dtype=self._residual_dtype(),
                                     backend="triton")                         # (b, d_in), (b, d)
            return mixer.out_proj(y), residual
        normed, residual = self._add_norm(h, residual, kernels.norm)
        return mixer.step(normed, conv_state, ssm_state, kernels), residual


class MambaLanguageModel(nn.Module):
    """Token embedding -> n_layer MambaBlocks -> RMSNorm -> LM head (tied to the embedding)."""

    family = "mamba1"            # the checkpoints from_pretrained accepts (models/registry.py)
    block_class = MambaBlock     # Mamba2LanguageModel (models/mamba2.py) swaps in its own block

    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = nn.ModuleDict(dict(
            embeddings=nn.Embedding(config.padded_vocab_size, config.d_model),
            layers=nn.ModuleList(self._build_layers(config)),
            norm_f=RMSNorm(config.d_model, eps=config.norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        nn.init.normal_(self.backbone.embeddings.weight, std=0.02)
        if config.tie_embeddings:
            self.lm_head.weight = self.backbone.embeddings.weight
        self.gradient_checkpointing = False
        self._kernels = None        # (device type, KernelChoice), resolved on first use

    def _build_layers(self, config) -> list[nn.Module]:
        """The blocks, first to last (models/hybrid.py builds them from its layer pattern instead)."""
        return [self.block_class(config) for _ in range(config.n_layer)]

    # ---- set-up -------------------------------------------------------------------------------------------------

    def set_gradient_checkpointing(self, enabled: bool = True):
        """Recompute each block's activations in backward (training only): memory ~ one block instead of all."""
        self.gradient_checkpointing = enabled

    def num_parameters(self) -> int:
        """Trainable parameters, the tied embedding/head counted once."""
        return sum(p.numel() for p in self.parameters())

    def scan_backend_for(self, device: torch.device) -> str:
        """The concrete selective-scan backend for `device` (see kernels_for)."""
        return self.kernels_for(device).scan

    def kernels_for(self, device: torch.device):
        """The concrete backend of every kernel for `device`: chosen (and logged) once per device type."""
        if self._kernels is None or self._kernels[0] != device.type:
            self._kernels = (device.type, self._choose_kernels(device))
        return self._kernels[1]

    def use_kernels(self, device: torch.device | str, choice) -> None:
        """Run `choice` on `device`'s type from now on instead of what kernels_for picked: for a benchmark that times
        one kernel against another on the same weights (bench/bench_generate.py --parts variants)."""
        self._kernels = (torch.device(device).type, choice)

    def _choose_kernels(self, device: torch.device) -> KernelChoice:
        """Each family's own choice of kernels for `device` (called once per device type by kernels_for)."""
        requested = self.config.scan_backend
        choice = KernelChoice.for_scan(resolve_or_fall_back(resolve_backend, requested, device, "scan"))
        logger.info("kernels on %s: selective scan %s (requested %r), causal conv %s, add+RMSNorm %s, "
                    "decoding step %s, LM loss chunked", device.type, choice.scan, requested, choice.conv, choice.norm,
                    choice.step)
        return choice

    def init_cache(self, batch_size: int, device=None, dtype=None) -> MambaCache:
        """Empty recurrent state for `batch_size` sequences (conv states in `dtype`, SSM states in fp32)."""
        weight = self.backbone.embeddings.weight
        device = weight.device if device is None else device
        dtype = weight.dtype if dtype is None else dtype
        cfg = self.config
        return MambaCache(
            conv_states=[torch.zeros(batch_size, cfg.d_inner, cfg.d_conv, device=device, dtype=dtype)
                         for _ in range(cfg.n_layer)],
            ssm_states=[torch.zeros(batch_size, cfg.d_inner, cfg.d_state, device=device, dtype=torch.float32)
                        for _ in range(cfg.n_layer)],
        )

    def init_decode_cache(self, batch_size: int, max_length: int, device=None):
        """The cache for decoding up to max_length tokens in all (prompt included). A recurrent state does not grow
        with the length, so this is init_cache; models with a KV cache pre-allocate max_length slots."""
        return self.init_cache(batch_size, device=device)

    # ---- forward ------------------------------------------------------------------------------------------------

    def forward(self, input_ids, targets=None, attention_mask=None, cache=None, return_logits=True):
        """Args:
            input_ids: (b, l) long
            targets: (b, l) long or None; -100 marks positions left out of the loss
            attention_mask: (b, l) 1 = token, 0 = left padding; or None
            cache: an empty MambaCache (from init_cache) to fill for decoding with step(), or None
            return_logits: False skips the (b, l, v) logits when a loss is asked for: the loss is then taken
                chunk by chunk from the hidden states (kernels.linear_cross_entropy), which never holds the fp32
                logits of the whole batch (what training wants)
        Returns:
            logits (b, l, v) or None, loss (mean cross-entropy over targets != -100) or None
        """
        hidden = self._hidden_states(input_ids, attention_mask, cache)        # (b, l, d)
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

    def hidden_states(self, input_ids, attention_mask=None, cache=None):
        """The final-normed residual stream (b, l, d): the LM head's input, for callers that take the head over a
        few positions at a time (evaluation/scoring.py). Same arguments as forward; fills an empty `cache`."""
        return self._hidden_states(input_ids, attention_mask, cache)

    def _hidden_states(self, input_ids, attention_mask=None, cache=None):
        """The final-normed residual stream (b, l, d)."""
        if input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise ValueError(f"input_ids must be a (batch, length) long tensor, "
                             f"got {input_ids.dtype} of shape {tuple(input_ids.shape)}")
        mask = None if attention_mask is None else self._check_mask(attention_mask, input_ids)
        if cache is not None:
            if cache.seqlen_offset != 0:
                raise ValueError("forward(cache=...) fills an empty cache (prompt prefill); "
                                 "continue a filled one token by token with step()")
            if cache.batch_size != input_ids.shape[0]:
                raise ValueError(f"cache is for batch size {cache.batch_size}, input_ids has {input_ids.shape[0]}")
        h = self.backbone.embeddings(input_ids)                                # (b, l, d)
        kernels = self.kernels_for(h.device)
        use_checkpoint = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        residual = None
        for i, layer in enumerate(self.backbone.layers):
            conv_state = None if cache is None else cache.conv_states[i]
            ssm_state = None if cache is None else cache.ssm_states[i]
            if use_checkpoint:
                h, residual = checkpoint(layer, h, residual, mask, None, None, kernels, use_reentrant=False)
            else:
                h, residual = layer(h, residual, mask, conv_state, ssm_state, kernels)
        if cache is not None:
            cache.seqlen_offset += input_ids.shape[1]
        norm_f = self.backbone.norm_f
        hidden, _ = add_rms_norm(h, residual, norm_f.weight, norm_f.eps, out_dtype=_compute_dtype(h, norm_f.weight),
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

    def step(self, token_ids, cache: MambaCache):
        """Advance every sequence by one token, in O(1) time and memory.

        Args:
            token_ids: (b,) long
            cache: MambaCache, updated in place
        Returns:
            logits (b, v)
        """
        if token_ids.dim() != 1 or token_ids.shape[0] != cache.batch_size:
            raise ValueError(f"step() takes one token per sequence, shape ({cache.batch_size},); "
                             f"got {tuple(token_ids.shape)}")
        logits = self.step_states(token_ids, *cache.step_args())
        cache.seqlen_offset += 1
        return logits

    def step_states(self, token_ids, conv_states, ssm_states):
        """step() on the bare per-layer state tensors, with no Python bookkeeping: what a CUDA graph captures and
        torch.compile traces (inference/decoder.py). token_ids (b,) -> logits (b, v); states updated in place."""
        h = self.backbone.embeddings(token_ids)                                # (b, d)
        kernels = self.kernels_for(h.device)
        residual = None
        for layer, conv_state, ssm_state in zip(self.backbone.layers, conv_states, ssm_states):
            h, residual = layer.step(h, residual, conv_state, ssm_state, kernels)
        norm_f = self.backbone.norm_f
        hidden, _ = add_rms_norm(h, residual, norm_f.weight, norm_f.eps, out_dtype=_compute_dtype(h, norm_f.weight),
                                 backend=kernels.norm)
        return self.lm_head(hidden)                                            # (b, v)

    def prefill(self, input_ids, cache: MambaCache, attention_mask=None):
        """Fill an empty cache from prompts in one parallel pass; return only the last position's logits (b, v)
        (the head over a whole long prompt would cost (b, l, v) memory). Left-pad prompts of different lengths."""
        hidden = self._hidden_states(input_ids, attention_mask, cache)        # (b, l, d)
        return self.lm_head(hidden[:, -1])                                     # (b, v)

    # ---- sampling -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token_id=None,
                 attention_mask=None, generator=None):
        """Sample continuations: the prompt is prefilled in one parallel pass, then one O(1) step per token.

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
            next_ids = sample(logits, params, vocab_size=self.config.vocab_size, generator=generator)
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

    # ---- checkpoints --------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, scan_backend="auto") -> "MambaLanguageModel":
        """Load an HF MambaForCausalLM directory or an original mamba_ssm one (see models/hf_format.py); a
        checkpoint of another family is an error (models.load_pretrained takes any family)."""
        from .hf_format import load_pretrained
        return load_pretrained(path, device=device, dtype=dtype, scan_backend=scan_backend, family=cls.family)

    def save_pretrained(self, path, eos_token_id=None):
        """Write config.json + model.safetensors that transformers' MambaForCausalLM loads (models/hf_format.py)."""
        from .hf_format import save_pretrained
        save_pretrained(self, path, eos_token_id=eos_token_id)
