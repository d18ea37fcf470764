"""The Mamba-1 mixer's one-token step in two Triton kernels (backend "triton" of kernels/decode_step.py).

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

from .backends import triton_interpreting
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
    # x_proj's columns for these channels, loaded first: the largest load, and independent of the conv
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < n_out
    wx = tl.load(xproj_w_ptr + offs_o[:, None] * s_wo + offs_c[None, :] * s_wc,
                 mask=mask_o[:, None] & mask_c[None, :], other=0.0).to(tl.float32)          # (BO, BC)

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
    part = tl.sum(wx * x.to(tl.float32)[None, :], axis=1)                                   # (BO,)
    tl.store(parts_ptr + pid_c * s_pp + pid_b * s_pb + offs_o, part, mask=mask_o)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (the interpreter with bf16 operands only): Triton 3.6's interpreter
    multiplies bf16 operands as their raw uint16 bits, so there they are multiplied as the fp32 numbers they are."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")           # bf16 operands: a tensor-core dot; fp32: exact


@triton.jit
def _norm_in_proj_conv_kernel(
    h_ptr, res_ptr, norm_w_ptr, in_w_ptr, conv_state_ptr, conv_w_ptr, conv_b_ptr, xproj_w_ptr,
    res_out_ptr, z_ptr, xc_ptr, parts_ptr,
    batch, dim, n_out, eps,
    s_hb, s_rb, s_iwo, s_iwi, s_sb, s_sd, s_sk, s_cwd, s_cwk, s_wo, s_wc, s_rob, s_zb, s_xcb, s_pp, s_pb,
    D_MODEL: tl.constexpr, HAS_RES: tl.constexpr, K: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_CONV_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_O: tl.constexpr, UPCAST: tl.constexpr,
):
    """Kernel 1 of the block step: the residual add and RMSNorm, in_proj's rows of this program's BLOCK_C channels
    (x and z), then kernel 1 of the mixer step (conv window, SiLU, x_proj's split-K partial). BLOCK_B batch rows per
    program, so that a larger batch reads each weight tile once per BLOCK_B rows (tl.dot needs 16 rows; at batch 1
    the other 15 are masked: no memory traffic, and the tensor-core work is free)."""
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = rows < batch
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < dim
    mask_bc = mask_b[:, None] & mask_c[None, :]

    # What does not depend on in_proj is loaded first, so that its latency hides behind the in_proj loop's loads:
    # the conv window shifted left by one (its last column is x_in, below), the conv weights and bias, and this
    # block's columns of x_proj's weight.
    offs_k = tl.arange(0, BLOCK_K)
    state_ptrs = conv_state_ptr + rows[:, None, None] * s_sb + offs_c[None, :, None] * s_sd         # (BB, BC, 1)
    shifted = tl.load(state_ptrs + (offs_k + 1)[None, None, :] * s_sk,
                      mask=mask_bc[:, :, None] & (offs_k + 1 < K)[None, None, :], other=0.0)  # (BB, BC, BK)
    cw = tl.load(conv_w_ptr + offs_c[:, None] * s_cwd + offs_k[None, :] * s_cwk,
                 mask=mask_c[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)   # (BC, BK)
    conv_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_CONV_BIAS:
        conv_b = tl.load(conv_b_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    offs_o = tl.arange(0, BLOCK_O)
    mask_o = offs_o < n_out
    w_p = tl.load(xproj_w_ptr + offs_o[None, :] * s_wo + offs_c[:, None] * s_wc,
                  mask=mask_c[:, None] & mask_o[None, :], other=0.0)                        # (BC, BO)

    # 1/rms of each row's new residual stream s = h + residual (fp32); the rows are read again below, from L1/L2
    sumsq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for m0 in range(0, D_MODEL, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        mask_bm = mask_b[:, None] & (cols < D_MODEL)[None, :]
        s = tl.load(h_ptr + rows[:, None] * s_hb + cols[None, :], mask=mask_bm, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(res_ptr + rows[:, None] * s_rb + cols[None, :], mask=mask_bm, other=0.0).to(tl.float32)
        sumsq += tl.sum(s * s, axis=1)
    rstd = tl.rsqrt(sumsq / D_MODEL + eps)                                                   # (BB,)

    # in_proj for this block's channels: x, z = normed @ W_in[c]^T, normed = s * rstd * norm_w in W_in's dtype
    acc_x = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    acc_z = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, D_MODEL, BLOCK_M):
        cols = m0 + tl.arange(0, BLOCK_M)
        mask_m = cols < D_MODEL
        mask_bm = mask_b[:, None] & mask_m[None, :]
        s = tl.load(h_ptr + rows[:, None] * s_hb + cols[None, :], mask=mask_bm, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(res_ptr + rows[:, None] * s_rb + cols[None, :], mask=mask_bm, other=0.0).to(tl.float32)
        if pid_c == 0:             # the new residual stream, written once (by the first channel block)
            tl.store(res_out_ptr + rows[:, None] * s_rob + cols[None, :], s.to(res_out_ptr.dtype.element_ty),
                     mask=mask_bm)
        w = tl.load(norm_w_ptr + cols, mask=mask_m, other=0.0).to(tl.float32)
        normed = (s * rstd[:, None] * w[None, :]).to(in_w_ptr.dtype.element_ty)               # (BB, BM)
        mask_mc = mask_m[:, None] & mask_c[None, :]
        w_x = tl.load(in_w_ptr + offs_c[None, :] * s_iwo + cols[:, None] * s_iwi, mask=mask_mc, other=0.0)
        w_z = tl.load(in_w_ptr + (dim + offs_c)[None, :] * s_iwo + cols[:, None] * s_iwi, mask=mask_mc, other=0.0)
        acc_x = _dot(normed, w_x, acc_x, UPCAST)                                             # (BB, BC)
        acc_z = _dot(normed, w_z, acc_z, UPCAST)
    tl.store(z_ptr + rows[:, None] * s_zb + offs_c[None, :], acc_z.to(z_ptr.dtype.element_ty), mask=mask_bc)
    x_in = acc_x.to(z_ptr.dtype.element_ty)               # in_proj's x, rounded as the model's activations are

    # the conv window (BB, BC, BK) shifted left by one with x_in as its last column, in place
    window = tl.where((offs_k == K - 1)[None, None, :], x_in[:, :, None].to(shifted.dtype), shifted)
    tl.debug_barrier()             # every column is read before any is overwritten
    tl.store(state_ptrs + offs_k[None, None, :] * s_sk, window, mask=mask_bc[:, :, None] & (offs_k < K)[None, None, :])
    x = tl.sum(window.to(tl.float32) * cw[None, :, :], axis=2) + conv_b[None, :]             # (BB, BC)
    x = (x * tl.sigmoid(x)).to(xc_ptr.dtype.element_ty)
    tl.store(xc_ptr + rows[:, None] * s_xcb + offs_c[None, :], x, mask=mask_bc)

    # this block's share of x_proj: parts[pid_c, row, o] = sum over its channels c of W[o, c] x[row, c]
    part = _dot(x.to(w_p.dtype), w_p, tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32), UPCAST)  # (BB, BO)
    tl.store(parts_ptr + pid_c * s_pp + rows[:, None] * s_pb + offs_o[None, :], part,
             mask=mask_b[:, None] & mask_o[None, :])


@triton.jit
def _dt_state_update_kernel(
    z_ptr, xc_ptr, parts_ptr, dt_w_ptr, dt_b_ptr, A_log_ptr, D_ptr, state_ptr, y_ptr,
    dim, dt_rank, dstate,
    s_zb, s_xcb, s_pp, s_pb, s_dwd, s_dwr, s_Ad, s_An, s_sb, s_sd, s_sn, s_yb,
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

    # What does not depend on kernel 1's partials is loaded first, so that its latency hides behind theirs.
    w = tl.load(dt_w_ptr + offs_d[:, None] * s_dwd + offs_r[None, :] * s_dwr,
                mask=mask_d[:, None] & mask_r[None, :], other=0.0)                          # (BD, BR)
    dt_bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_DT_BIAS:
        dt_bias = tl.load(dt_b_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x = tl.load(xc_ptr + pid_b * s_xcb + offs_d, mask=mask_d, other=0.0).to(tl.float32)     # (BD,)
    z = tl.load(z_ptr + pid_b * s_zb + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    A_log = tl.load(A_log_ptr + offs_d[:, None] * s_Ad + offs_n[None, :] * s_An, mask=mask_dn, other=0.0)
    state_ptrs = state_ptr + pid_b * s_sb + offs_d[:, None] * s_sd + offs_n[None, :] * s_sn
    state = tl.load(state_ptrs, mask=mask_dn, other=0.0)                                     # (BD, BN) fp32

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

    dt = _softplus(tl.sum(w.to(tl.float32) * dt_low[None, :], axis=1) + dt_bias)   # softplus(W_dt dt_low + b) (BD,)
    A = -tl.exp(A_log.to(tl.float32))                                                        # (BD, BN)
    state = tl.exp2(dt[:, None] * A * LOG2E) * state + (dt * x)[:, None] * B[None, :]
    tl.store(state_ptrs, state, mask=mask_dn)
    y = tl.sum(state * C[None, :], axis=1) + D * x                                           # (BD,)
    y *= z * tl.sigmoid(z)
    tl.store(y_ptr + pid_b * s_yb + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def parts_per_load(n_parts: int) -> int:
    return min(PARTS_PER_LOAD, triton.next_power_of_2(n_parts))


def step_config(dim: int, dstate: int, dt_rank: int, conv_width: int) -> dict:
    """Block sizes of both kernels (power-of-2 tiles; masks cover the rest)."""
    n_out = dt_rank + 2 * dstate
    block_o = triton.next_power_of_2(n_out)
    block_c = max(16, min(triton.next_power_of_2(dim), PROJ_TILE // block_o))
    block_n = triton.next_power_of_2(dstate)
    block_r = triton.next_power_of_2(dt_rank)
    block_d = max(16, min(triton.next_power_of_2(dim), STATE_TILE // block_n, PROJ_TILE // block_r))
    return dict(BLOCK_C=block_c, BLOCK_O=block_o, BLOCK_K=triton.next_power_of_2(conv_width),
                BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_R=block_r, n_parts=triton.cdiv(dim, block_c))


def mixer_step_triton(xz, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias,
                      A_log, D):
    """The contract of kernels/decode_step.py's mixer_step_torch, in two kernels. Every operand is read through its
    strides (xz and the weights as the model holds them), so the step adds no copies."""
    batch, dim, dstate = ssm_state.shape
    dt_rank = dt_proj_weight.shape[1]
    n_out = dt_rank + 2 * dstate
    k = conv_weight.shape[1]
    if ssm_state.dtype != torch.float32:
        raise ValueError(f"the SSM state must be fp32 (it is updated in place), got {ssm_state.dtype}")
    if xz.shape != (batch, 2 * dim):
        raise ValueError(f"xz must be ({batch}, {2 * dim}), got {tuple(xz.shape)}")
    xz = xz if xz.stride(1) == 1 else xz.contiguous()                      # rows may be strided, channels not
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
    _state_update(xz[:, dim:], xc, parts, ssm_state, dt_proj_weight, dt_proj_bias, A_log, D, y, cfg)
    return y


def _state_update(z, xc, parts, ssm_state, dt_proj_weight, dt_proj_bias, A_log, D, y, cfg):
    """Kernel 2's launch (both steps end with it): y (b, d_in) <- the state update from x_proj's partials."""
    batch, dim, dstate = ssm_state.shape
    _dt_state_update_kernel[(batch, triton.cdiv(dim, cfg["BLOCK_D"]))](
        z, xc, parts, dt_proj_weight, dt_proj_bias if dt_proj_bias is not None else D, A_log, D, ssm_state, y,
        dim, dt_proj_weight.shape[1], dstate,
        z.stride(0), xc.stride(0), parts.stride(0), parts.stride(1),
        dt_proj_weight.stride(0), dt_proj_weight.stride(1), A_log.stride(0), A_log.stride(1),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), y.stride(0),
        HAS_DT_BIAS=dt_proj_bias is not None, BLOCK_D=cfg["BLOCK_D"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_R=cfg["BLOCK_R"], N_PARTS=parts.shape[0], BLOCK_P=parts_per_load(parts.shape[0]), num_warps=4,
    )


# The block step's kernel 1. Registers (ptxas, sm_90, mamba-130m's shape): 219 per thread at 8 warps, BLOCK_MODEL 128
# and 2 stages, no spills; 4 warps or BLOCK_MODEL 256 take 255 and spill.
BLOCK_ROWS = 16        # batch rows per program (tl.dot's least M)
BLOCK_CHANNELS = 16    # channels per program: in_proj's 2 x 16 rows; 96 programs at d_inner 1536
BLOCK_MODEL = 128      # d_model elements per step of the loop over in_proj's inner dimension
BLOCK_WARPS = 8
BLOCK_STAGES = 2


def block_config(d_model: int, dim: int, dstate: int, dt_rank: int, conv_width: int) -> dict:
    """Block sizes of the block step's kernel 1 (kernel 2's come from step_config), and its launch options."""
    return dict(BLOCK_B=BLOCK_ROWS, BLOCK_C=BLOCK_CHANNELS, BLOCK_M=min(BLOCK_MODEL, triton.next_power_of_2(d_model)),
                BLOCK_O=max(16, triton.next_power_of_2(dt_rank + 2 * dstate)),
                BLOCK_K=triton.next_power_of_2(conv_width), n_parts=triton.cdiv(dim, BLOCK_CHANNELS),
                num_warps=BLOCK_WARPS, num_stages=BLOCK_STAGES)


def block_step_triton(h, residual, norm_weight, eps, in_proj_weight, conv_state, ssm_state, conv_weight, conv_bias,
                      x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D, residual_dtype=torch.float32):
    """The contract of kernels/decode_step.py's block_step_torch, in two kernels (the norm, in_proj and the conv in
    the first)."""
    batch, dim, dstate = ssm_state.shape
    d_model = h.shape[1]
    dt_rank = dt_proj_weight.shape[1]
    n_out = dt_rank + 2 * dstate
    k = conv_weight.shape[1]
    if ssm_state.dtype != torch.float32:
        raise ValueError(f"the SSM state must be fp32 (it is updated in place), got {ssm_state.dtype}")
    if h.shape != (batch, d_model) or (residual is not None and residual.shape != h.shape):
        raise ValueError(f"h and residual must be ({batch}, d_model), got {tuple(h.shape)} and "
                         f"{None if residual is None else tuple(residual.shape)}")
    h, residual = (t if t is None or t.stride(1) == 1 else t.contiguous() for t in (h, residual))   # rows strided
    if in_proj_weight.shape != (2 * dim, d_model) or x_proj_weight.shape != (n_out, dim) or (
            conv_state.shape != (batch, dim, k)) or A_log.shape != (dim, dstate) or norm_weight.shape != (d_model,):
        raise ValueError(f"shapes do not match: in_proj_weight {tuple(in_proj_weight.shape)}, x_proj_weight "
                         f"{tuple(x_proj_weight.shape)}, conv_state {tuple(conv_state.shape)}, A_log "
                         f"{tuple(A_log.shape)}, norm_weight {tuple(norm_weight.shape)} for d_model {d_model}, "
                         f"d_inner {dim}, d_state {dstate}, dt_rank {dt_rank}, conv width {k}")
    dtype = in_proj_weight.dtype
    y = torch.empty(batch, dim, device=h.device, dtype=dtype)
    new_residual = torch.empty(batch, d_model, device=h.device, dtype=residual_dtype)
    if batch == 0:
        return y, new_residual
    cfg = block_config(d_model, dim, dstate, dt_rank, k)
    z = torch.empty(batch, dim, device=h.device, dtype=dtype)
    xc = torch.empty(batch, dim, device=h.device, dtype=dtype)
    parts = torch.empty(cfg["n_parts"], batch, n_out, device=h.device, dtype=torch.float32)
    res = residual if residual is not None else h
    _norm_in_proj_conv_kernel[(triton.cdiv(batch, cfg["BLOCK_B"]), cfg["n_parts"])](
        h, res, norm_weight, in_proj_weight, conv_state, conv_weight,
        conv_bias if conv_bias is not None else conv_weight, x_proj_weight, new_residual, z, xc, parts,
        batch, dim, n_out, eps,
        h.stride(0), res.stride(0), in_proj_weight.stride(0), in_proj_weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), conv_weight.stride(0), conv_weight.stride(1),
        x_proj_weight.stride(0), x_proj_weight.stride(1), new_residual.stride(0), z.stride(0), xc.stride(0),
        parts.stride(0), parts.stride(1),
        D_MODEL=d_model, HAS_RES=residual is not None, K=k, BLOCK_K=cfg["BLOCK_K"],
        HAS_CONV_BIAS=conv_bias is not None, BLOCK_B=cfg["BLOCK_B"], BLOCK_C=cfg["BLOCK_C"],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_O=cfg["BLOCK_O"], UPCAST=triton_interpreting() and dtype == torch.bfloat16,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    _state_update(z, xc, parts, ssm_state, dt_proj_weight, dt_proj_bias, A_log, D, y,
                  step_config(dim, dstate, dt_rank, k))
    return y, new_residual
