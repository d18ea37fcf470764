"""Causal depthwise conv1d (+ SiLU) as Triton kernels, forward and backward (backend "triton" of causal_conv1d).

Same equations as kernels/causal_conv.py's reference (b: batch, d: channels, l: length, k: conv width):

    pre[t] = bias + sum_{j<k} w[j] * x[t - (k-1) + j]          (x[t < 0] = 0, masked x = 0)
    y[t]   = silu(pre[t])

How the work is split. One program owns a (BLOCK_L, BLOCK_D) tile of (time, channels) of one batch element. The
forward loads the tile's input k times, shifted by 0..k-1 rows (the k-1 rows before the tile are the halo); the
shifted loads after the first hit L1/L2, so DRAM sees x read about once. All three strides of x (and y) are kernel
arguments: Triton specialises a stride equal to 1, so in the model's layout (a transposed view of (b, l, 2d),
channels contiguous) the channel axis becomes the vectorised one (16-byte loads), and in a contiguous (b, d, l)
tensor the time axis does; the launcher picks a tile that is wide along the contiguous axis. Math in fp32; y is
written once, in x's dtype and dim order. weight and bias are read in whatever dtype they have (fp32 under
autocast) and cast in registers.

Backward, one kernel for all three gradients. With g[t] = dy[t] * silu'(pre[t]) (pre recomputed from x, never
saved):

    dx[t]      = sum_{i<k} w[k-1-i] * g[t + i]                  (0 at masked positions)
    dw[j]      = sum_{b,t} g[t] * x[t - (k-1) + j]
    dbias      = sum_{b,t} g[t]

Register tiles cannot be shifted along time, so the g[t + i] of dx are recomputed from shifted loads of x and dy
(k pre-activations per element; the loads are L1/L2 hits). A program walks TIME_BLOCKS tiles down the sequence,
summing dw and dbias in registers, and writes one fp32 partial per (batch, time segment); the launcher sums them
(a few MB at most, deterministic, no atomics).

Not measured yet (written without a GPU): the backward evaluates k sigmoids per element (two SFU instructions each),
which at k = 4 may bound it above the DRAM floor; if bench/bench_conv.py shows that, shifting one g tile through
shared memory (tl.gather) instead of recomputing it is the next step.

Both launchers are wrapped as torch custom ops (mamba_trainer::causal_conv1d_fwd and ::causal_conv1d_bwd, the
latter the former's registered autograd), with fake implementations that allocate exactly what the kernels return,
so that torch.compile traces a call as one node without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .causal_conv import channels_contiguous, empty_like_order
from .selective_scan import triton_interpreting

NUM_WARPS = 4
BWD_SEGMENT = 256           # time steps one backward program walks (its dw/dbias partial covers them)


@triton.jit
def _load_shifted(x_base, m_base, offs_t, mask_d, seqlen, s_xl, s_ml, HAS_MASK: tl.constexpr):
    """x at rows offs_t (BL,) of the program's channels as fp32 (BL, BD); rows outside [0, l) and masked rows are 0."""
    valid = (offs_t >= 0) & (offs_t < seqlen)
    xv = tl.load(x_base + offs_t[:, None] * s_xl, mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(m_base + offs_t * s_ml, mask=valid, other=0)
        xv = tl.where(keep[:, None] != 0, xv, 0.0)
    return xv


@triton.jit
def _pre_activation(x_base, m_base, w_base, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, bias,
                    K: tl.constexpr, HAS_MASK: tl.constexpr):
    """pre[t] = bias + sum_j w[j] x[t - (K-1) + j] for the rows offs_t, fp32 (BL, BD)."""
    acc = tl.zeros((offs_t.shape[0], mask_d.shape[0]), dtype=tl.float32) + bias[None, :]
    for j in tl.static_range(K):
        w = tl.load(w_base + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[None, :] * _load_shifted(x_base, m_base, offs_t - (K - 1) + j, mask_d, seqlen, s_xl, s_ml, HAS_MASK)
    return acc


@triton.jit
def _grad(x_base, m_base, w_base, dy_base, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, s_dyl, bias,
          K: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr):
    """g[t] = dy[t] * silu'(pre[t]) for the rows offs_t, fp32 (BL, BD); 0 past the end (those outputs do not exist)."""
    g = tl.load(dy_base + offs_t[:, None] * s_dyl, mask=(offs_t < seqlen)[:, None] & mask_d[None, :],
                other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_activation(x_base, m_base, w_base, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, bias, K, HAS_MASK)
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, m_ptr, y_ptr,
    dim, seqlen,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_mb, s_ml, s_yb, s_yd, s_yl,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_l = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_t = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x_base = x_ptr + pid_b * s_xb + offs_d[None, :] * s_xd
    m_base = m_ptr + pid_b * s_mb
    pre = _pre_activation(x_base, m_base, w_ptr + offs_d * s_wd, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, bias,
                          K, HAS_MASK)                                                      # (BL, BD) fp32
    if SILU:
        pre = pre * tl.sigmoid(pre)
    y_ptrs = y_ptr + pid_b * s_yb + offs_d[None, :] * s_yd + offs_t[:, None] * s_yl
    tl.store(y_ptrs, pre.to(y_ptr.dtype.element_ty), mask=(offs_t < seqlen)[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, m_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr,
    dim, seqlen, n_segs,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_mb, s_ml, s_dyb, s_dyd, s_dyl, s_dxb, s_dxd, s_dxl,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TIME_BLOCKS: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < dim

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x_base = x_ptr + pid_b * s_xb + offs_d[None, :] * s_xd
    m_base = m_ptr + pid_b * s_mb
    w_base = w_ptr + offs_d * s_wd
    dy_base = dy_ptr + pid_b * s_dyb + offs_d[None, :] * s_dyd
    dx_base = dx_ptr + pid_b * s_dxb + offs_d[None, :] * s_dxd

    dw_acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for blk in range(TIME_BLOCKS):
        offs_t = (pid_s * TIME_BLOCKS + blk) * BLOCK_L + tl.arange(0, BLOCK_L)
        # The tile's own g: dbias, dw (x shifted by j - (K-1): L1 hits after _grad's loads) and dx's first term.
        g = _grad(x_base, m_base, w_base, dy_base, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, s_dyl, bias,
                  K, HAS_MASK, SILU)
        db_acc += tl.sum(g, axis=0)
        for j in tl.static_range(K):
            xj = _load_shifted(x_base, m_base, offs_t - (K - 1) + j, mask_d, seqlen, s_xl, s_ml, HAS_MASK)
            dw_acc += tl.where(offs_k[:, None] == j, tl.sum(g * xj, axis=0)[None, :], 0.0)
        dx = tl.load(w_base + (K - 1) * s_wk, mask=mask_d, other=0.0).to(tl.float32)[None, :] * g
        # g[t + i] for i = 1..K-1, recomputed from shifted loads (a loop, not unrolled: code size linear in K).
        for i in range(1, K):
            g = _grad(x_base, m_base, w_base, dy_base, offs_t + i, mask_d, seqlen, s_xl, s_ml, s_wk, s_dyl, bias,
                      K, HAS_MASK, SILU)
            dx += tl.load(w_base + (K - 1 - i) * s_wk, mask=mask_d, other=0.0).to(tl.float32)[None, :] * g
        mask_t = offs_t < seqlen
        if HAS_MASK:
            keep = tl.load(m_base + offs_t * s_ml, mask=mask_t, other=0)
            dx = tl.where(keep[:, None] != 0, dx, 0.0)                    # masked inputs were zeros: no gradient
        tl.store(dx_base + offs_t[:, None] * s_dxl, dx.to(dx_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_d[None, :])

    # One fp32 partial per (batch, time segment): dw (b * n_segs, d, K), dbias (b * n_segs, d).
    part = pid_b * n_segs + pid_s
    tl.store(dw_ptr + (part * dim + offs_d[None, :]) * K + offs_k[:, None], dw_acc,
             mask=(offs_k < K)[:, None] & mask_d[None, :])
    tl.store(db_ptr + part * dim + offs_d, db_acc, mask=mask_d)


def _tile(x: torch.Tensor, wide: int, narrow: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_D): `wide` along x's contiguous axis (coalesced, vectorised), `narrow` along the other."""
    _, dim, seqlen = x.shape
    if channels_contiguous(x):
        return min(narrow, triton.next_power_of_2(seqlen)), min(wide, triton.next_power_of_2(dim))
    return min(wide, triton.next_power_of_2(seqlen)), min(narrow, triton.next_power_of_2(dim))


def fwd_config(x: torch.Tensor) -> dict:
    block_l, block_d = _tile(x, 128, 32)
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, num_warps=NUM_WARPS)


def bwd_config(x: torch.Tensor, k: int) -> dict:
    block_l, block_d = _tile(x, 64, 32)
    time_blocks = max(1, min(triton.cdiv(x.shape[2], block_l), BWD_SEGMENT // block_l))
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(k), TIME_BLOCKS=time_blocks,
                num_warps=NUM_WARPS)


def _mask_arg(mask, x):
    """The mask as uint8 (a view of the bool storage), or x as a never-read placeholder; and its strides."""
    if mask is None:
        return x, 0, 0
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def conv_fwd(x, weight, bias, mask, silu: bool) -> torch.Tensor:
    """Launch the forward. Returns y (b, d, l) in x's dtype and dim order."""
    batch, dim, seqlen = x.shape
    y = empty_like_order(x)
    if y.numel() == 0:
        return y
    cfg = fwd_config(x)
    m, s_mb, s_ml = _mask_arg(mask, x)
    grid = (triton.cdiv(seqlen, cfg["BLOCK_L"]), triton.cdiv(dim, cfg["BLOCK_D"]), batch)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, m, y,
        dim, seqlen,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), s_mb, s_ml,
        y.stride(0), y.stride(1), y.stride(2),
        K=weight.shape[1], HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu, **cfg,
    )
    return y


def conv_bwd(x, weight, bias, mask, dy, silu: bool):
    """Launch the backward. Returns dx (x's dtype and dim order), dweight (weight's dtype), dbias ((d,) in bias's
    dtype; zeros in weight's dtype when there is no bias)."""
    batch, dim, seqlen = x.shape
    k = weight.shape[1]
    dx = empty_like_order(x)
    if dx.numel() == 0:
        return dx, torch.zeros_like(weight), weight.new_zeros(dim, dtype=(bias if bias is not None else weight).dtype)
    cfg = bwd_config(x, k)
    n_segs = triton.cdiv(seqlen, cfg["BLOCK_L"] * cfg["TIME_BLOCKS"])
    f32 = dict(device=x.device, dtype=torch.float32)
    dw_part = torch.empty(batch * n_segs, dim, k, **f32)
    db_part = torch.empty(batch * n_segs, dim, **f32)
    m, s_mb, s_ml = _mask_arg(mask, x)
    grid = (n_segs, triton.cdiv(dim, cfg["BLOCK_D"]), batch)
    _conv_bwd_kernel[grid](
        x, weight, bias if bias is not None else weight, m, dy, dx, dw_part, db_part,
        dim, seqlen, n_segs,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), s_mb, s_ml,
        dy.stride(0), dy.stride(1), dy.stride(2), dx.stride(0), dx.stride(1), dx.stride(2),
        K=k, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu, **cfg,
    )
    dweight = dw_part.sum(0).to(weight.dtype)                                       # (d, k)
    dbias = db_part.sum(0).to((bias if bias is not None else weight).dtype)         # (d,)
    return dx, dweight, dbias


# ---------------------------------------------------------------- torch custom ops (one graph node each)

@torch.library.custom_op("mamba_trainer::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], silu: bool) -> torch.Tensor:
    return conv_fwd(x, weight, bias, mask, silu)


@causal_conv1d_fwd_op.register_fake
def _(x, weight, bias, mask, silu):
    return empty_like_order(x)


@torch.library.custom_op("mamba_trainer::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], dy: torch.Tensor,
                         silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return conv_bwd(x, weight, bias, mask, dy, silu)


@causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, mask, dy, silu):
    dbias_dtype = (bias if bias is not None else weight).dtype
    return empty_like_order(x), torch.empty_like(weight, memory_format=torch.contiguous_format), \
        weight.new_empty(weight.shape[0], dtype=dbias_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, silu = inputs
    ctx.save_for_backward(x, weight, bias, mask)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, mask = ctx.saved_tensors
    dx, dweight, dbias = causal_conv1d_bwd_op(x, weight, bias, mask, dy, ctx.silu)
    return dx, dweight, (dbias if bias is not None else None), None, None


causal_conv1d_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d_triton(x, weight, bias=None, activation="silu", mask=None):
    """Fused Triton causal conv1d (+ SiLU); semantics of kernels/causal_conv.py's reference (conv_state is filled
    by the entry point). x (b, d, l) any strides, CUDA (or CPU under TRITON_INTERPRET=1). Returns y in x's dtype
    and dim order."""
    if x.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"the Triton conv needs CUDA tensors (got {x.device.type}); set TRITON_INTERPRET=1 to "
                           "run it on the CPU, or use backend='torch'")
    return causal_conv1d_fwd_op(x, weight, bias, mask, activation == "silu")


# ---------------------------------------------------------------- one decoding step

@triton.jit
def _conv_update_kernel(
    x_ptr, state_ptr, w_ptr, bias_ptr, y_ptr,
    dim, s_xb, s_sb, s_sd, s_sk, s_wd, s_wk, s_yb,
    K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """conv_state (b, d, k) <- [conv_state[.., 1:], x];  y = act(<conv_state, w> + bias). One pass over the state:
    read once, written once, in place (each program owns its channels' whole window)."""
    pid_b = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < dim
    mask_dk = mask_d[:, None] & (offs_k < K)[None, :]
    state_ptrs = state_ptr + pid_b * s_sb + offs_d[:, None] * s_sd
    # the window shifted left by one: column j takes column j + 1, and the last column takes x
    shifted = tl.load(state_ptrs + (offs_k + 1)[None, :] * s_sk, mask=mask_d[:, None] & (offs_k + 1 < K)[None, :],
                      other=0.0)
    x = tl.load(x_ptr + pid_b * s_xb + offs_d, mask=mask_d, other=0.0)
    window = tl.where((offs_k == K - 1)[None, :], x[:, None].to(shifted.dtype), shifted)   # (BD, BK)
    tl.debug_barrier()             # every column is read before any is overwritten
    tl.store(state_ptrs + offs_k[None, :] * s_sk, window, mask=mask_dk)
    w = tl.load(w_ptr + offs_d[:, None] * s_wd + offs_k[None, :] * s_wk, mask=mask_dk, other=0.0).to(tl.float32)
    y = tl.sum(window.to(tl.float32) * w, axis=1)                                            # (BD,)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(y_ptr + pid_b * s_yb + offs_d, y.to(y_ptr.dtype.element_ty), mask=mask_d)


def causal_conv1d_update_triton(x, conv_state, weight, bias=None, activation="silu"):
    """One decoding step in one kernel; the contract of kernels/causal_conv.py's causal_conv1d_update_torch."""
    if x.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"the Triton conv step needs CUDA tensors (got {x.device.type}); set TRITON_INTERPRET=1 "
                           "to run it on the CPU, or use backend='torch'")
    batch, dim = x.shape
    k = weight.shape[1]
    y = torch.empty(batch, dim, device=x.device, dtype=x.dtype)
    if y.numel() == 0:
        return y
    block_d = min(256, triton.next_power_of_2(dim))
    _conv_update_kernel[(batch, triton.cdiv(dim, block_d))](
        x, conv_state, weight, bias if bias is not None else weight, y,
        dim, x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        weight.stride(0), weight.stride(1), y.stride(0),
        K=k, BLOCK_K=triton.next_power_of_2(k), HAS_BIAS=bias is not None, SILU=activation == "silu",
        BLOCK_D=block_d, num_warps=4,
    )
    return y
