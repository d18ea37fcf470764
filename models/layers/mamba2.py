"""The Mamba-2 layer (pattern letter "2"): the SSD mixer of Dao & Gu (state-spaces/mamba modules/mamba2.py) behind a
pre-norm, in plain PyTorch.

Parameter names and math match HF transformers' Mamba2ForCausalLM and mamba_ssm's MambaLMHeadModel with
ssm_cfg {"layer": "Mamba2"}, so their checkpoints load as they are (models/formats/hf_mamba2.py). The SSD scan lives
in kernels/ssd.py and is chosen there.

Shape letters (mamba_ssm's names):
    b: batch size          l: sequence length        d: d_model (residual stream)
    d_in: d_inner = expand * d_model                 h: nheads = d_in / p      p: headdim
    g: ngroups (B, C shared by h / g heads each)      n: d_state                k: d_conv
    conv_dim = d_in + 2 g n (x, B and C go through the conv together)

The mixer, token by token:
    [z, x, B, C, dt] = in_proj(u)                              (b, l, d_in | d_in | g n | g n | h)
    x, B, C = silu(causal depthwise conv(x, B, C))             one conv over conv_dim channels
    y = SSD(x, dt + dt_bias -> softplus -> clamp(dt_limit), A = -exp(A_log), B, C) + D * x     per head
    out = out_proj(RMSNorm_per_group(y * silu(z)))             norm_before_gate=False, group size d_in / g
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from kernels import causal_conv1d, causal_conv1d_update
from kernels.norm_gated import rms_norm_gated
from kernels.ssd import process_dt, ssd_scan, ssd_state_update

from .base import Layer, ModelKernels, REFERENCE, RMSNorm, add_norm, compute_dtype, init_projections


class GatedRMSNorm(nn.Module):
    """RMSNorm(y * silu(z)) per group of `group_size` channels (kernels/norm_gated.py); holds `weight` under the
    name the checkpoints use (mixer.norm.weight)."""

    def __init__(self, d: int, group_size: int, eps: float = 1e-5):
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, y, z, out_dtype=None):
        return rms_norm_gated(y, z, self.weight, self.eps, self.group_size, out_dtype)


class Mamba2Mixer(nn.Module):
    """The Mamba-2 mixer: in_proj -> conv over (x, B, C) -> SiLU -> SSD scan (+ D x) -> gated group RMSNorm ->
    out_proj."""

    def __init__(self, config):
        """config: a Mamba2Config (models/config.py): the mixer's settings; n_layer is the whole stack's (init)."""
        super().__init__()
        self.config = config
        c = config
        self.d_inner, self.nheads, self.headdim = c.d_inner, c.nheads, c.headdim
        self.ngroups, self.d_state, self.d_conv, self.conv_dim = c.ngroups, c.d_state, c.d_conv, c.conv_dim
        self.in_proj = nn.Linear(c.d_model, c.d_in_proj, bias=c.bias)
        self.conv1d = nn.Conv1d(c.conv_dim, c.conv_dim, kernel_size=c.d_conv, groups=c.conv_dim,
                                padding=c.d_conv - 1, bias=c.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(c.nheads))
        self.A_log = nn.Parameter(torch.empty(c.nheads))
        self.D = nn.Parameter(torch.empty(c.nheads))
        self.norm = GatedRMSNorm(c.d_inner, group_size=c.d_inner // c.ngroups, eps=c.norm_epsilon)
        self.out_proj = nn.Linear(c.d_inner, c.d_model, bias=c.bias)
        # The trainer leaves these out of weight decay, as mamba_ssm does.
        for p in (self.A_log, self.D, self.dt_bias):
            p._no_weight_decay = True
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """The released initialisation (mamba_ssm Mamba2.__init__ and MambaLMHeadModel._init_weights).

        in_proj and conv1d keep PyTorch's default init; only what mamba_ssm changes is set here."""
        cfg = self.config
        device = self.A_log.device
        # dt = softplus(dt_bias) starts log-uniform in [dt_min, dt_max], floored: store softplus^-1(dt)
        log_min, log_max = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt = torch.exp(torch.rand(self.nheads, device=device) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # one scalar decay per head: A = -U(A_init_range)
        low, high = cfg.A_init_range
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(low, high)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)
        init_projections(self.in_proj, self.out_proj, cfg.n_layer)

    def forward(self, u, attention_mask=None, conv_state=None, ssm_state=None, kernels=None, seq_idx=None):
        """Args:
            u: (b, l, d)
            attention_mask: (b, l) bool or None; False = left padding, which never moves the state
            conv_state (b, conv_dim, k), ssm_state (b, h, p, n): this layer's cache tensors to fill, or None
            kernels: the concrete kernel backends (KernelChoice; its `scan` is the SSD backend)
            seq_idx: (b, l) int32 or None: packed rows, the document of each token; the conv's window and the
                scan's state restart at each document start (kernels/documents.py)
        Returns:
            (b, l, d)
        """
        kernels = kernels or REFERENCE
        b, l, _ = u.shape
        zxbcdt = self.in_proj(u)                                               # (b, l, d_in_proj)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        # the conv takes a (b, conv_dim, l) view of the token-major storage and returns one the same way
        xBC = causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                            mask=attention_mask, conv_state=conv_state, seq_idx=seq_idx,
                            backend=kernels.conv).transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())                                     # (h,)
        dt_bias, softplus, dt_limit = self.dt_bias, True, self.config.dt_limit
        if attention_mask is not None:
            # dt = 0 at pads (after the clamp): exp(0 * A) = 1 and dt * x = 0, so the state does not move
            dt = process_dt(dt, self.dt_bias, True, dt_limit) * attention_mask[:, :, None]
            dt_bias, softplus, dt_limit = None, False, (0.0, math.inf)
        y = ssd_scan(x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
                     B.unflatten(-1, (self.ngroups, self.d_state)), C.unflatten(-1, (self.ngroups, self.d_state)),
                     D=self.D, dt_bias=dt_bias, dt_softplus=softplus, dt_limit=dt_limit,
                     return_final_states=ssm_state is not None, chunk_size=self.config.chunk_size,
                     seq_idx=seq_idx, backend=kernels.scan)                    # (b, l, h, p)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        y = self.norm(y.flatten(-2), z, out_dtype=compute_dtype(y, self.out_proj.weight))   # (b, l, d_in)
        return self.out_proj(y)                                                # (b, l, d)

    def step(self, u, conv_state, ssm_state, kernels=None):
        """One token. Args: u (b, d); conv_state (b, conv_dim, k) and ssm_state (b, h, p, n), updated in place.
        Returns: (b, d)"""
        kernels = kernels or REFERENCE
        zxbcdt = self.in_proj(u)                                               # (b, d_in_proj)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        fused = kernels.conv == "triton" and not torch.compiler.is_compiling()   # as in SelectiveSSM.step
        xBC = causal_conv1d_update(xBC, conv_state, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation="silu",
                                   backend="triton" if fused else "torch").to(z.dtype)   # (b, conv_dim)
        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        y = ssd_state_update(ssm_state, x.unflatten(-1, (self.nheads, self.headdim)), dt, A,
                             B.unflatten(-1, (self.ngroups, self.d_state)),
                             C.unflatten(-1, (self.ngroups, self.d_state)), D=self.D, dt_bias=self.dt_bias,
                             dt_softplus=True, dt_limit=self.config.dt_limit)  # (b, h, p)
        y = self.norm(y.flatten(-2), z, out_dtype=compute_dtype(y, self.out_proj.weight))   # (b, d_in)
        return self.out_proj(y)                                                # (b, d)


class Mamba2Layer(Layer):
    """RMSNorm -> Mamba2Mixer, the residual add fused into the norm (models/layers/base.py).

    cache entry: conv (b, conv_dim, k) in the model dtype, SSM state (b, h, p, n) fp32"""
    description = "Mamba-2"

    def __init__(self, config):
        """config: the model's ModelConfig (models/config.py); the mixer takes its mamba2_config()."""
        super().__init__()
        settings = config.mamba2_config()
        self.residual_in_fp32 = settings.residual_in_fp32
        self.norm = RMSNorm(settings.d_model, eps=settings.norm_epsilon)
        self.mixer = Mamba2Mixer(settings)

    @torch.no_grad()
    def reset_parameters(self):
        """Every parameter drawn afresh: PyTorch's init of the projections and the conv, then the released one."""
        m = self.mixer
        nn.init.ones_(self.norm.weight)
        nn.init.ones_(m.norm.weight)
        for module in (m.in_proj, m.conv1d, m.out_proj):
            module.reset_parameters()
        m.reset_parameters()

    def forward(self, h, residual=None, ctx=None, state=None, kernels: ModelKernels = ModelKernels()):
        """h, residual: (b, l, d) -> (mixer output, residual), both (b, l, d)."""
        conv_state, ssm_state = state if state is not None else (None, None)
        normed, residual = add_norm(self.norm, h, residual, self.mixer.in_proj.weight, self.residual_in_fp32,
                                    kernels.mamba2.norm)
        mask, seq_idx = (None, None) if ctx is None else (ctx.mask, ctx.seq_idx)
        return self.mixer(normed, mask, conv_state, ssm_state, kernels.mamba2, seq_idx), residual

    def step(self, h, residual, ctx, state, kernels: ModelKernels = ModelKernels()):
        """h, residual: (b, d) -> (mixer output, residual), both (b, d)"""
        normed, residual = add_norm(self.norm, h, residual, self.mixer.in_proj.weight, self.residual_in_fp32,
                                    kernels.mamba2.norm)
        return self.mixer.step(normed, state[0], state[1], kernels.mamba2), residual

    def init_state(self, batch_size, slots, device, dtype):
        c = self.mixer.config
        return (torch.zeros(batch_size, c.conv_dim, c.d_conv, device=device, dtype=dtype),
                torch.zeros(batch_size, c.nheads, c.headdim, c.d_state, device=device, dtype=torch.float32))
