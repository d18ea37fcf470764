"""The Mamba-1 layer (pattern letter "M"): the selective SSM mixer of Gu & Dao (state-spaces/mamba) behind a
pre-norm, in plain PyTorch.

Parameter names and math match HF transformers' MambaForCausalLM, so its checkpoints load as they are
(models/formats/hf_mamba.py). The selective scan itself lives in kernels/ and is chosen there.

Shape letters (the paper's notation, as in mamba-minimal):
    b: batch size                     l: sequence length
    d: d_model (residual stream)      d_in: d_inner = expand * d_model (channels of the SSM)
    n: d_state (SSM state per channel) r: dt_rank (rank of the delta projection)
    k: d_conv (conv width)

There are no positional embeddings: the recurrence (and the causal conv) already knows the order of tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels import block_step, causal_conv1d, causal_conv1d_update, mixer_step, selective_scan, selective_state_update

from .base import KernelChoice, Layer, ModelKernels, REFERENCE, RMSNorm, add_norm, compute_dtype, init_projections


class SelectiveSSM(nn.Module):
    """The Mamba mixer: in_proj -> causal depthwise conv -> SiLU -> selective scan (D skip, SiLU(z) gate) ->
    out_proj."""

    def __init__(self, config):
        """config: a MambaConfig (models/config.py): the mixer's settings; n_layer is the whole stack's (init)."""
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
        init_projections(self.in_proj, self.out_proj, cfg.n_layer)

    def forward(self, x, attention_mask=None, conv_state=None, ssm_state=None, kernels=REFERENCE, seq_idx=None):
        """Args:
            x: (b, l, d)
            attention_mask: (b, l) bool or None; False = left padding, which never moves the state
            conv_state, ssm_state: this layer's cache tensors to fill (prefill), or None
            kernels: the concrete kernel backends (KernelChoice)
            seq_idx: (b, l) int32 or None: packed rows, the document of each token; the conv's window and the
                scan's state restart at each document start (kernels/documents.py)
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
                          mask=attention_mask, conv_state=conv_state, seq_idx=seq_idx,
                          backend=kernels.conv)                                # (b, d_in, l) view
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
                           seq_idx=seq_idx, backend=kernels.scan)     # (b, d_in, l) view of (b, l, d_in)
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

    def step(self, x, conv_state, ssm_state, kernels=REFERENCE):
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


class Mamba1Layer(Layer):
    """RMSNorm -> SelectiveSSM, the residual add fused into the norm (models/layers/base.py).

    cache entry: conv (b, d_in, k) in the model dtype, SSM state (b, d_in, n) fp32"""
    description = "Mamba-1"

    def __init__(self, config):
        """config: the model's ModelConfig (models/config.py); the mixer takes its mamba1_config()."""
        super().__init__()
        settings = config.mamba1_config()
        self.residual_in_fp32 = settings.residual_in_fp32
        self.norm = RMSNorm(settings.d_model, eps=settings.norm_epsilon)
        self.mixer = SelectiveSSM(settings)

    @torch.no_grad()
    def reset_parameters(self):
        """Every parameter drawn afresh: PyTorch's init of the projections and the conv, then the released one."""
        nn.init.ones_(self.norm.weight)
        m = self.mixer
        for module in (m.in_proj, m.conv1d, m.x_proj, m.dt_proj, m.out_proj):
            module.reset_parameters()
        m.reset_parameters()

    def _residual_dtype(self) -> torch.dtype:
        return torch.float32 if self.residual_in_fp32 else self.norm.weight.dtype

    def forward(self, h, residual=None, ctx=None, state=None, kernels: ModelKernels = ModelKernels()):
        """h: (b, l, d) the previous layer's output (the embedding for the first layer); residual: (b, l, d) or
        None. Returns (mixer output, residual), both (b, l, d)."""
        conv_state, ssm_state = state if state is not None else (None, None)
        normed, residual = add_norm(self.norm, h, residual, self.mixer.in_proj.weight, self.residual_in_fp32,
                                    kernels.mamba1.norm)
        mask, seq_idx = (None, None) if ctx is None else (ctx.mask, ctx.seq_idx)
        return self.mixer(normed, mask, conv_state, ssm_state, kernels.mamba1, seq_idx), residual

    def step(self, h, residual, ctx, state, kernels: ModelKernels = ModelKernels()):
        """h, residual: (b, d) -> (mixer output, residual), both (b, d)"""
        conv_state, ssm_state = state
        choice, mixer = kernels.mamba1, self.mixer
        in_proj = mixer.in_proj.weight
        # the block step computes the norm in in_proj's dtype: not under autocast, which would run in_proj in another
        if mixer.fused_step_runs(choice, with_in_proj=True) and compute_dtype(h, in_proj) == in_proj.dtype:
            y, residual = block_step(h, residual, self.norm.weight, self.norm.eps, in_proj, conv_state, ssm_state,
                                     *mixer.step_weights(), residual_dtype=self._residual_dtype(),
                                     backend="triton")                         # (b, d_in), (b, d)
            return mixer.out_proj(y), residual
        normed, residual = add_norm(self.norm, h, residual, in_proj, self.residual_in_fp32, choice.norm)
        return mixer.step(normed, conv_state, ssm_state, choice), residual

    def init_state(self, batch_size, slots, device, dtype):
        c = self.mixer.config
        return (torch.zeros(batch_size, c.d_inner, c.d_conv, device=device, dtype=dtype),
                torch.zeros(batch_size, c.d_inner, c.d_state, device=device, dtype=torch.float32))
