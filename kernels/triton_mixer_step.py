"""The Mamba-1 mixer's one-token step in two Triton kernels (backend "triton" of kernels/mixer_step.py).

At batch 1 every kernel of a decoding step moves a few kilobytes, so its cost is its latency (a few microseconds
inside a CUDA graph), and the per-token time is the number of kernels on the chain. The PyTorch step spends about
nine between in_proj and out_proj (conv step, x_proj, dt_proj, -exp(A_log), D's cast, the state update, ...); here
there are two. Between them sits the one global dependency of the step: dt_proj needs every channel's x_proj
contribution.

1. _conv_x_proj_kernel, grid (b, channel blocks): each program owns BLOCK_C channels. It shifts their conv window
   in place, takes x = silu(<window, w> + bias) (written out, in xz's dtype, for kernel 2), and multiplies x by its
   (r + 2n, BLOCK_C) slice of x_proj's weight: a split-K partial product, written to parts[block, b] (fp32). Its
   own channels only, so no program reads what another writes, and no atomics (nothing to zero first).
2. _dt_state_update_kernel, grid (b, channel blocks): each program sums the partials in a fixed order (the same
   result in every program and on every run) into (dt_low, B, C), takes its channels' delta =
   softplus(dt_proj_weight @ dt_low + bias) (an r-long dot product per channel), A = -exp(A_log), and advances its
   (BLOCK_D, n) tile of the state: read once, written once; then y = (<state, C> + D x) silu(z).

dt_low, B, C and delta stay fp32 here, where the PyTorch step rounds them to the model's dtype between its kernels.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_scan import LOG2E, _softplus

PROJ_TILE = 8192       # elements of kernel 1's (r + 2n, BLOCK_C) weight tile and of kernel 2's (BLOCK_D, r) one
PARTS_PER_LOAD = 32   # kernel 2 sums kernel 1's partials this many at a time
STATE_TILE = 1024      # state elements per program of kernel 2: d_inner 1536, n 16 -> 24 programs at batch 1


@triton.jit
def _conv_x_proj_kernel(
    xz_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, xproj_w_ptr, xc_ptr, parts_ptr,
    dim, n_out,
    s_xzb, s_sb, s_sd, s_sk, s_cwd, s_cwk, s_wo, s_wc, s_xcb, s_pp, s_pb,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    mask_c = offs_c < dim
    mask_ck = mask_c[:, None] & (offs_k < K)[None, :]

    # the conv window shifted left by one, the new x as its last column (as kernels/triton_conv.py's step)
    state_ptrs = conv_state_ptr + pid_b * s_sb + offs_c[:, None] * s_sd
    shifted = tl.load(state_ptrs + (offs_k + 1)[None, :] * s_sk, mask=mask_c[:, None] & (offs_k + 1 < K)[None, :],
                      other=0.0)                                                          # (BC, BK)
    x_in = tl.load(xz_ptr + pid_b * s_xzb + offs_c, mask=mask_c, other=0.0)
    window = tl.where((offs_k == K - 1)[None, :], x_in[:, None].to(shifted.dtype), shifted)
    tl.debug_barrier()             # every column is read before any is overwritten
    tl.store(state_ptrs + offs_k[None, :] * s_sk, window, mask=mask_ck)
    w = tl.load(conv_w_ptr + offs_c[:, None] * s_cwd + offs_k[None, :] * s_cwk, mask=mask_ck, other=0.0)
    x = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)                            # (BC,)
    if HAS_CONV_BIAS:
        x += tl.load(conv_b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    x = (x * tl.sigmoid(x)).to(xc_ptr.dtype.element_ty)     # rounded as the model's activations are
    tl.store(xc_ptr + pid_b * s_xcb + offs_c, x, mask=mask_c)

    # this block's share of x_proj: parts[pid_c, b, o] = sum over its channels c of W[o, c] x[c]
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < n_out
    wx = tl.load(xproj_w_ptr + offs_o[:, None] * s_wo + offs_c[None, :] * s_wc,
                 mask=mask_o[:, None] & mask_c[None, :], other=0.0).to(tl.float32)          # (BO, BC)
    part = tl.sum(wx * x.to(tl.float32)[None, :], axis=1)                                   # (BO,)
    tl.store(parts_ptr + pid_c * s_pp + pid_b * s_pb + offs_o, part, mask=mask_o)


@triton.jit
def _dt_state_update_kernel(
    xz_ptr, xc_ptr, parts_ptr, dt_w_ptr, dt_b_ptr, A_log_ptr, D_ptr, state_ptr, y_ptr,
    dim, dt_rank, dstate,
    s_xzb, s_xcb, s_pp, s_pb, s_dwd, s_dwr, s_Ad, s_An, s_sb, s_sd, s_sn, s_yb,
    HAS_DT_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    N_PARTS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_r = offs_r < dt_rank
    mask_dn = mask_d[:, None] & mask_n[None, :]

    # x_proj's output for this row: kernel 1's partials summed over its channel blocks, BLOCK_P at a time (always
    # in the same order)
    dt_low = tl.zeros((BLOCK_R,), dtype=tl.float32)
    B = tl.zeros((BLOCK_N,), dtype=tl.float32)
    C = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, N_PARTS, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_p = (offs_p < N_PARTS)[:, None]
        row = parts_ptr + offs_p[:, None] * s_pp + pid_b * s_pb                              # (BP, 1)
        dt_low += tl.sum(tl.load(row + offs_r[None, :], mask=mask_p & mask_r[None, :], other=0.0), axis=0)
        B += tl.sum(tl.load(row + dt_rank + offs_n[None, :], mask=mask_p & mask_n[None, :], other=0.0), axis=0)
        C += tl.sum(tl.load(row + dt_rank + dstate + offs_n[None, :], mask=mask_p & mask_n[None, :], other=0.0),
                    axis=0)                                                                  # (BR,), (BN,), (BN,)

    # delta = softplus(dt_proj_weight @ dt_low + bias) for this block's channels
    w = tl.load(dt_w_ptr + offs_d[:, None] * s_dwd + offs_r[None, :] * s_dwr,
                mask=mask_d[:, None] & mask_r[None, :], other=0.0).to(tl.float32)           # (BD, BR)
    dt = tl.sum(w * dt_low[None, :], axis=1)                                                 # (BD,)
    if HAS_DT_BIAS:
        dt += tl.load(dt_b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    dt = _softplus(dt)

    x = tl.load(xc_ptr + pid_b * s_xcb + offs_d, mask=mask_d, other=0.0).to(tl.float32)     # (BD,)
    z = tl.load(xz_ptr + pid_b * s_xzb + dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    A = -tl.exp(tl.load(A_log_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn,
                        other=0.0).to(tl.float32))                                           # (BD, BN)
    state_ptrs = state_ptr + pid_b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=mask_dn, other=0.0)                                     # (BD, BN) fp32
    state = tl.exp2(dt[:, None] * A * LOG2E) * state + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state, mask=mask_dn)
    y = tl.sum(state * C[None, :], axis=1)                                                   # (BD,)
    y += tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32) * x
    y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * s_yb + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def step_config(dim: int, dstate: int, dt_rank: int, conv_width: int) -> dict:
    """Block sizes of both kernels (power-of-2 tiles; masks cover the rest)."""
    n_out = dt_rank + 2 * dstate
    block_o = triton.next_power_of_2(n_out)
    block_c = max(16, min(triton.next_power_of_2(dim), PROJ_TILE // block_o))
    block_n = triton.next_power_of_2(dstate)
    block_r = triton.next_power_of_2(dt_rank)
    block_d = max(16, min(triton.next_power_of_2(dim), STATE_TILE // block_n, PROJ_TILE // block_r))
    n_parts = triton.cdiv(dim, block_c)
    return dict(BLOCK_C=block_c, BLOCK_O=block_o, BLOCK_K=triton.next_power_of_2(conv_width),
                BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_R=block_r, n_parts=n_parts,
                BLOCK_P=min(PARTS_PER_LOAD, triton.next_power_of_2(n_parts)))


def mixer_step_triton(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                      A_log, D):
    """The contract of kernels/mixer_step.py's mixer_step_torch, in two kernels. Every operand is read through its
    strides (xz and the weights as the model holds them), so the step adds no copies."""
    batch, dim, dstate = ssm_state.shape
    dt_rank = dt_proj_weight.shape[1]
    n_out = dt_rank + 2 * dstate
    k = conv_weight.shape[1]
    if ssm_state.dtype != torch.float32:
        raise ValueError(f"the SSM state must be fp32 (it is updated in place), got {ssm_state.dtype}")
    if xz.shape != (batch, 2 * dim) or xz.stride(1) != 1:
        raise ValueError(f"xz must be ({batch}, {2 * dim}) with unit stride along channels, got {tuple(xz.shape)} "
                         f"strides {xz.stride()}")
    if conv_state.shape != (batch, dim, k) or x_proj_weight.shape != (n_out, dim) or A_log.shape != (dim, dstate):
        raise ValueError(f"shapes do not match: conv_state {tuple(conv_state.shape)}, x_proj_weight "
                         f"{tuple(x_proj_weight.shape)}, A_log {tuple(A_log.shape)} for d_inner {dim}, d_state "
                         f"{dstate}, dt_rank {dt_rank}, conv width {k}")
    y = torch.empty(batch, dim, device=xz.device, dtype=xz.dtype)
    if batch == 0:
        return y
    cfg = step_config(dim, dstate, dt_rank, k)
    n_parts = cfg["n_parts"]
    xc = torch.empty(batch, dim, device=xz.device, dtype=xz.dtype)                  # the conv's output x (b, d_in)
    parts = torch.empty(n_parts, batch, n_out, device=xz.device, dtype=torch.float32)   # x_proj's split-K partials
    _conv_x_proj_kernel[(batch, n_parts)](
        xz, conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight, x_proj_weight, xc, parts,
        dim, n_out,
        xz.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        conv_weight.stride(0), conv_weight.stride(1), x_proj_weight.stride(0), x_proj_weight.stride(1),
        xc.stride(0), parts.stride(0), parts.stride(1),
        K=k, BLOCK_K=cfg["BLOCK_K"], HAS_CONV_BIAS=conv_bias is not None,
        BLOCK_C=cfg["BLOCK_C"], BLOCK_O=cfg["BLOCK_O"], num_warps=4,
    )
    _dt_state_update_kernel[(batch, triton.cdiv(dim, cfg["BLOCK_D"]))](
        xz, xc, parts, dt_proj_weight, dt_proj_bias if dt_proj_bias is not None else D, A_log, D, ssm_state, y,
        dim, dt_rank, dstate,
        xz.stride(0), xc.stride(0), parts.stride(0), parts.stride(1),
        dt_proj_weight.stride(0), dt_proj_weight.stride(1), A_log.stride(0), A_log.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0),
        HAS_DT_BIAS=dt_proj_bias is not None, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=cfg["BLOCK_R"], N_PARTS=n_parts, BLOCK_P=cfg["BLOCK_P"], num_warps=4,
    )
    return y
