"""One decoding step of the selective scan as a single Triton kernel (backend "triton" of selective_state_update).

    delta = softplus(dt + dt_bias)
    state = exp(delta * A) * state + delta * B * x         (b, d, n), in place
    y     = (<state, C> + D * x) * silu(z)                  (b, d)

The PyTorch step (kernels/state_update.py) launches about ten small kernels and writes (b, d, n) temporaries; here
one program per (batch, block of channels) reads the state once, writes it once and writes y.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .backends import triton_interpreting
from .triton_scan import LOG2E, _softplus

TILE = 2048            # state elements per program: small programs so that batch 1 still fills the GPU


@triton.jit
def _state_update_kernel(
    state_ptr, x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, y_ptr,
    dim, dstate,
    s_sb, s_sd, s_sn, s_xb, s_dtb, s_Ad, s_An, s_Bb, s_Cb, s_zb, s_yb,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_dn = mask_d[:, None] & mask_n[None, :]

    state_ptrs = state_ptr + pid_b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=mask_dn, other=0.0)                                  # (BD, BN) fp32
    x = tl.load(x_ptr + pid_b * s_xb + offs_d, mask=mask_d, other=0.0).to(tl.float32)     # (BD,)
    dt = tl.load(dt_ptr + pid_b * s_dtb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    A = tl.load(A_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn, other=0.0).to(tl.float32)
    B = tl.load(B_ptr + pid_b * s_Bb + offs_n, mask=mask_n, other=0.0).to(tl.float32)      # (BN,)
    C = tl.load(C_ptr + pid_b * s_Cb + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        dt = _softplus(dt)

    state = tl.exp2(dt[:, None] * A * LOG2E) * state + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state, mask=mask_dn)
    y = tl.sum(state * C[None, :], axis=1)                                                # (BD,)
    if HAS_D:
        y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    if HAS_Z:
        z = tl.load(z_ptr + pid_b * s_zb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * s_yb + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Advance `state` by one token in place and return y; same contract as selective_state_update_torch.

    Args:
        state: (b, d, n) fp32, updated in place
        x, dt: (b, d);  A: (d, n);  B, C: (b, n);  D, dt_bias: (d,) or None;  z: (b, d) or None
    Returns:
        y: (b, d) in x's dtype
    """
    if state.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"the Triton state update needs CUDA tensors (got {state.device.type}); set "
                           "TRITON_INTERPRET=1 to run it on the CPU, or use backend='torch'")
    if state.dtype != torch.float32:
        raise ValueError(f"the state must be fp32 (it is updated in place), got {state.dtype}")
    batch, dim, dstate = state.shape
    x, dt, B, C, z = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (x, dt, B, C, z))
    D = D.contiguous() if D is not None else None
    dt_bias = dt_bias.contiguous() if dt_bias is not None else None
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    block_n = triton.next_power_of_2(dstate)
    block_d = max(1, min(triton.next_power_of_2(dim), TILE // block_n))
    zz = z if z is not None else x
    grid = (batch, triton.cdiv(dim, block_d))
    _state_update_kernel[grid](
        state, x, dt, A, B, C, D if D is not None else A, zz, dt_bias if dt_bias is not None else A, y,
        dim, dstate,
        state.stride(0), state.stride(1), state.stride(2), x.stride(0), dt.stride(0), A.stride(0), A.stride(1),
        B.stride(0), C.stride(0), zz.stride(0), y.stride(0),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus,
        BLOCK_D=block_d, BLOCK_N=block_n, num_warps=4,
    )
    return y
