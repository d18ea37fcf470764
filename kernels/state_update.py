"""One step of the selective scan, for recurrent decoding: the state moves by one token, in place.

    delta = softplus(dt + dt_bias)                         (if dt_softplus)
    state = exp(delta * A) * state + delta * B * x         (b, d, n)
    y     = <state, C> + D * x;  y = y * silu(z)           (b, d)

Same equations as the full scan (kernels/reference.py) for a sequence of length one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import triton_importable

STATE_UPDATE_BACKENDS = ("auto", "torch", "triton")


def selective_state_update_torch(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Args:
        state: (b, d, n) fp32, updated in place
        x, dt: (b, d);  A: (d, n);  B, C: (b, n);  D, dt_bias: (d,);  z: (b, d)
    Returns:
        y: (b, d) in x's dtype
    """
    dtype_in = x.dtype
    x, dt = x.float(), dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    dA = torch.exp(dt[:, :, None] * A.float())                                # (b, d, n)
    dBx = dt[:, :, None] * B.float()[:, None, :] * x[:, :, None]               # (b, d, n)
    state.mul_(dA).add_(dBx)
    y = torch.einsum("bdn,bn->bd", state, C.float())                           # (b, d)
    if D is not None:
        y = y + D.float() * x
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype_in)


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, backend="auto"):
    """Advance `state` by one token and return y. backend: "auto" (triton on CUDA when it is available), "torch",
    "triton"."""
    if backend not in STATE_UPDATE_BACKENDS:
        raise ValueError(f"state-update backend {backend!r} is unknown; allowed: {', '.join(STATE_UPDATE_BACKENDS)}")
    if backend == "auto":
        # under torch.compile the PyTorch math is traced and fused by inductor (the launcher cannot be traced)
        backend = ("triton" if state.device.type == "cuda" and not torch.compiler.is_compiling()
                   and triton_importable() else "torch")
    if backend == "torch":
        return selective_state_update_torch(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias,
                                            dt_softplus=dt_softplus)
    if not triton_importable():
        raise RuntimeError("state-update backend 'triton' needs Triton (pip install triton); use backend='torch'")
    from .triton_state_update import selective_state_update_triton
    return selective_state_update_triton(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)
