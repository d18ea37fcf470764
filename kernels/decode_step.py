"""A Mamba-1 block's one-token step, for recurrent decoding, at two granularities.

mixer_step: everything between the mixer's two big projections

    x, z  = xz[:, :d_in], xz[:, d_in:]                          in_proj's output (b, 2 d_in)
    x     = silu(conv step of x)                                the conv window shifts in place (b, d_in, k)
    dt, B, C = split(x @ x_proj_weight^T, [r, n, n])           (b, r), (b, n), (b, n)
    dt    = softplus(dt @ dt_proj_weight^T + dt_proj_bias)      (b, d_in)
    state = exp(dt * A) * state + dt * B * x,  A = -exp(A_log)  (b, d_in, n) fp32, in place
    y     = (<state, C> + D * x) * silu(z)                      (b, d_in): out_proj's input

block_step: the same with the block's residual add, RMSNorm and in_proj in front

    residual = residual + h;  xz = rmsnorm(residual) @ in_proj_weight^T;  y = mixer_step(xz)

Backends, one signature each:
    "torch"   the *_torch functions below: the spec, made of the single-op steps (one kernel per op on a GPU)
    "triton"  kernels/triton_decode_step.py: two kernels each (mixer: conv step + x_proj, then dt_proj + softplus +
              state update + D skip + gate; block: the norm and in_proj join the first). At batch 1 a decoding
              step is a chain of tiny kernels whose cost is their count, so this is what decides the per-token
              time. CUDA, or CPU tensors under TRITON_INTERPRET=1
The model (models/layers/mamba1.py Mamba1Layer.step, SelectiveSSM.step) picks one from its KernelChoice.step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import triton_interpreting
from .causal_conv import causal_conv1d_update_torch
from .norm import add_rms_norm_torch
from .state_update import selective_state_update_torch

MIXER_STEP_BACKENDS = ("torch", "triton")


def mixer_step_torch(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                     A_log, D):
    """The reference; see mixer_step."""
    d_in, n = ssm_state.shape[1:]
    x, z = xz.chunk(2, dim=-1)                                                 # (b, d_in) each
    x = causal_conv1d_update_torch(x, conv_state, conv_weight, conv_bias, activation="silu")
    dt, B, C = torch.split(F.linear(x, x_proj_weight), [dt_proj_weight.shape[1], n, n], dim=-1)
    dt = F.linear(dt, dt_proj_weight, dt_proj_bias)                            # (b, d_in)
    A = -torch.exp(A_log.float())                                              # (d_in, n)
    return selective_state_update_torch(ssm_state, x, dt, A, B, C, D=D.float(), z=z, dt_softplus=True)


def mixer_step(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
               A_log, D, backend="torch"):
    """One token through the mixer's conv, projections and state update; both states advance in place.

    Args:
        xz: (b, 2 d_in) in_proj's output (x then z)
        conv_state: (b, d_in, k) the conv window, in xz's dtype;  ssm_state: (b, d_in, n) fp32
        conv_weight: (d_in, k);  conv_bias: (d_in,) or None
        x_proj_weight: (r + 2n, d_in);  dt_proj_weight: (d_in, r);  dt_proj_bias: (d_in,) or None
        A_log: (d_in, n), A = -exp(A_log);  D: (d_in,)
        backend: "torch" or "triton"
    Returns:
        y: (b, d_in) in xz's dtype
    """
    if backend not in MIXER_STEP_BACKENDS:
        raise ValueError(f"mixer-step backend {backend!r} is unknown; allowed: {', '.join(MIXER_STEP_BACKENDS)}")
    args = (xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D)
    if backend == "torch":
        return mixer_step_torch(*args)
    _check_triton_runs(xz)
    from .triton_decode_step import mixer_step_triton
    return mixer_step_triton(*args)


def block_step_torch(h, residual, norm_weight, eps, in_proj_weight, conv_state, ssm_state, conv_weight, conv_bias,
                     x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, residual_dtype=torch.float32):
    """The reference; see block_step."""
    normed, new_residual = add_rms_norm_torch(h, residual, norm_weight, eps, out_dtype=in_proj_weight.dtype,
                                              residual_dtype=residual_dtype)
    y = mixer_step_torch(F.linear(normed, in_proj_weight), conv_state, ssm_state, conv_weight, conv_bias,
                         x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D)
    return y, new_residual


def block_step(h, residual, norm_weight, eps, in_proj_weight, conv_state, ssm_state, conv_weight, conv_bias,
               x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, residual_dtype=torch.float32, backend="torch"):
    """mixer_step with the block's residual add, RMSNorm and in_proj (no bias) in front: everything of a Mamba
    block's decoding step but out_proj. "triton" runs it in two kernels (kernels/triton_decode_step.py).

    Args:
        h: (b, d) the previous block's output (the embedding for the first block);  residual: (b, d) or None
        norm_weight: (d,);  eps: the norm's epsilon;  in_proj_weight: (2 d_in, d)
        the rest: as mixer_step;  residual_dtype: the new residual stream's dtype
    Returns:
        y: (b, d_in) in in_proj_weight's dtype (out_proj's input);  new_residual: (b, d) = residual + h
    """
    if backend not in MIXER_STEP_BACKENDS:
        raise ValueError(f"block-step backend {backend!r} is unknown; allowed: {', '.join(MIXER_STEP_BACKENDS)}")
    args = (h, residual, norm_weight, eps, in_proj_weight, conv_state, ssm_state, conv_weight, conv_bias,
            x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, residual_dtype)
    if backend == "torch":
        return block_step_torch(*args)
    _check_triton_runs(h)
    from .triton_decode_step import block_step_triton
    return block_step_triton(*args)


def _check_triton_runs(t):
    if t.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"the Triton decoding step needs CUDA tensors (got {t.device.type}); set TRITON_INTERPRET=1 "
                           "to run it on the CPU, or use backend='torch'")
