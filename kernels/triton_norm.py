"""Residual add + RMSNorm as fused Triton kernels, forward and backward (backend "triton" of kernels/norm.py).

Rows are the flattened leading dimensions (m = b * l), d the width. A row of d = 768..2048 fits in registers, so a
program takes BLOCK_M whole rows (a (BLOCK_M, next_pow2(d)) tile) and does everything in one pass:

forward   s = x + residual (fp32);  new_residual = s (residual_dtype);  rstd = 1 / sqrt(mean(s^2) + eps);
          normed = s * rstd * w (out_dtype);  rstd (m,) fp32 is kept for the backward.
backward  with xhat = s * rstd and g = w * d(normed):
              ds = rstd * (g - xhat * mean(xhat * g)) + d(new_residual)
          ds is both inputs' gradient (written once in x's dtype, and once more in the residual's dtype only when
          the two differ); dweight = sum over rows of d(normed) * xhat. The backward is persistent: a grid of a few
          programs per SM, each looping over row blocks and keeping its dweight partial in fp32 registers, written
          once per program; the launcher sums the (programs, d) partials. No atomics.

s is recomputed in the backward, not saved: from new_residual when that is fp32 (it is exactly s, and the next block
keeps it alive anyway), else from x and residual.

Both launchers are torch custom ops (mamba_trainer::add_rms_norm_fwd, mamba_trainer::add_rms_norm_bwd) with fake
(meta) implementations and the backward registered through torch.library.register_autograd, so torch.compile
traces a model that uses them as one graph instead of breaking at every norm.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .backends import triton_interpreting

TILE_ELEMENTS = 4096          # elements of one (BLOCK_M, BLOCK_N) tile: BLOCK_M = 4 rows at d 768 / 1024
MAX_BLOCK_M = 16
BWD_PROGRAMS_PER_SM = 4       # persistent backward: programs per SM (each keeps a dweight partial)
INTERP_BWD_PROGRAMS = 3       # under the interpreter: few programs, so that tests exercise the row-block loop


@triton.jit
def _add_rms_norm_fwd_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, res_out_ptr, rstd_ptr,
    n_rows, d, s_x, s_res, s_y, s_ro, eps,
    HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    mask = mask_r[:, None] & (cols < d)[None, :]
    rows = rows.to(tl.int64)
    s = tl.load(x_ptr + rows[:, None] * s_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)   # (BM, BN)
    if HAS_RES:
        s += tl.load(res_ptr + rows[:, None] * s_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(res_out_ptr + rows[:, None] * s_ro + cols[None, :], s.to(res_out_ptr.dtype.element_ty), mask=mask)
    rstd = tl.rsqrt(tl.sum(s * s, axis=1) / d + eps)                                                 # (BM,)
    tl.store(rstd_ptr + rows, rstd, mask=mask_r)
    w = tl.load(w_ptr + cols, mask=cols < d, other=0.0).to(tl.float32)                               # (BN,)
    y = s * rstd[:, None] * w[None, :]
    tl.store(y_ptr + rows[:, None] * s_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_rms_norm_bwd_kernel(
    s_ptr, res_ptr, w_ptr, rstd_ptr, dy_ptr, dro_ptr, dx_ptr, dres_ptr, dw_ptr,
    n_rows, d, s_s, s_res, s_dy, s_dro, s_dx, s_dres,
    HAS_RES: tl.constexpr, HAS_DRO: tl.constexpr, SEPARATE_DRES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    n_progs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    mask_c = cols < d
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)                               # (BN,)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    n_blocks = tl.cdiv(n_rows, BLOCK_M)
    block = pid
    while block < n_blocks:    # (a while loop: Triton's interpreter cannot range() over a run-time bound)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_r = rows < n_rows
        mask = mask_r[:, None] & mask_c[None, :]
        rows = rows.to(tl.int64)
        s = tl.load(s_ptr + rows[:, None] * s_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(res_ptr + rows[:, None] * s_res + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)                                      # (BM,)
        dy = tl.load(dy_ptr + rows[:, None] * s_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        xhat = s * rstd[:, None]                                                                     # (BM, BN)
        g = dy * w[None, :]
        dw_acc += dy * xhat
        c = tl.sum(xhat * g, axis=1) / d                                                             # (BM,)
        ds = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DRO:
            ds += tl.load(dro_ptr + rows[:, None] * s_dro + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * s_dx + cols[None, :], ds.to(dx_ptr.dtype.element_ty), mask=mask)
        if SEPARATE_DRES:
            tl.store(dres_ptr + rows[:, None] * s_dres + cols[None, :], ds.to(dres_ptr.dtype.element_ty), mask=mask)
        block += n_progs
    tl.store(dw_ptr + pid * d + cols, tl.sum(dw_acc, axis=0), mask=mask_c)


def _config(d: int, n_rows: int) -> dict:
    """Whole rows per program: BLOCK_N = next_pow2(d), BLOCK_M rows so that a tile is about TILE_ELEMENTS."""
    block_n = triton.next_power_of_2(d)
    block_m = max(1, min(MAX_BLOCK_M, TILE_ELEMENTS // block_n, triton.next_power_of_2(max(n_rows, 1))))
    num_warps = max(1, min(8, block_m * block_n // 512))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)


def _rows(t):
    """(m, d) with unit stride along d (rows may be strided)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


# ---------------------------------------------------------------- the two launchers, as torch custom ops

@torch.library.custom_op("mamba_trainer::add_rms_norm_fwd", mutates_args=())
def add_rms_norm_fwd(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype, residual_dtype: torch.dtype
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual: (m, d). Returns normed (m, d) out_dtype, new_residual (m, d) residual_dtype, rstd (m,) fp32."""
    x, residual, weight = _rows(x), _rows(residual), weight.contiguous()
    n_rows, d = x.shape
    y = torch.empty(n_rows, d, device=x.device, dtype=out_dtype)
    res_out = torch.empty(n_rows, d, device=x.device, dtype=residual_dtype)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    if n_rows == 0:
        return y, res_out, rstd
    cfg = _config(d, n_rows)
    res = residual if residual is not None else x
    _add_rms_norm_fwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]),)](
        x, res, weight, y, res_out, rstd,
        n_rows, d, x.stride(0), res.stride(0), y.stride(0), res_out.stride(0), eps,
        HAS_RES=residual is not None, **cfg,
    )
    return y, res_out, rstd


@add_rms_norm_fwd.register_fake
def _(x, residual, weight, eps, out_dtype, residual_dtype):
    n_rows, d = x.shape
    return (x.new_empty(n_rows, d, dtype=out_dtype), x.new_empty(n_rows, d, dtype=residual_dtype),
            x.new_empty(n_rows, dtype=torch.float32))


@torch.library.custom_op("mamba_trainer::add_rms_norm_bwd", mutates_args=())
def add_rms_norm_bwd(dy: torch.Tensor, dres_out: Optional[torch.Tensor], s: torch.Tensor,
                     s_residual: Optional[torch.Tensor], weight: torch.Tensor, rstd: torch.Tensor,
                     dx_dtype: torch.dtype, dres_dtype: torch.dtype, separate_dres: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dy, dres_out: (m, d) gradients of normed and new_residual (dres_out may be None); s (+ s_residual): the
    forward's fp32 sum, or the two tensors that make it. Returns dx (m, d) dx_dtype; dres (m, d) dres_dtype when
    separate_dres, else an empty (0,) tensor (dx is then also the residual's gradient); dweight (d,)."""
    dy, dres_out, s, s_residual = (_rows(t) for t in (dy, dres_out, s, s_residual))
    weight = weight.contiguous()
    n_rows, d = dy.shape
    dx = torch.empty(n_rows, d, device=dy.device, dtype=dx_dtype)
    dres = torch.empty((n_rows, d) if separate_dres else (0,), device=dy.device, dtype=dres_dtype)
    cfg = _config(d, n_rows)
    n_blocks = triton.cdiv(n_rows, cfg["BLOCK_M"])
    if dy.device.type == "cuda":
        sms = torch.cuda.get_device_properties(dy.device).multi_processor_count
        n_progs = min(n_blocks, sms * BWD_PROGRAMS_PER_SM)
    else:
        n_progs = min(n_blocks, INTERP_BWD_PROGRAMS)
    dw_partial = torch.empty(max(n_progs, 1), d, device=dy.device, dtype=torch.float32)
    if n_rows == 0:
        return dx, dres, torch.zeros_like(weight)
    dres_buf = dres if separate_dres else dx
    _add_rms_norm_bwd_kernel[(n_progs,)](
        s, s_residual if s_residual is not None else s, weight, rstd, dy,
        dres_out if dres_out is not None else dy, dx, dres_buf, dw_partial,
        n_rows, d, s.stride(0), (s_residual if s_residual is not None else s).stride(0), dy.stride(0),
        (dres_out if dres_out is not None else dy).stride(0), dx.stride(0), dres_buf.stride(0),
        HAS_RES=s_residual is not None, HAS_DRO=dres_out is not None, SEPARATE_DRES=separate_dres, **cfg,
    )
    return dx, dres, dw_partial.sum(0).to(weight.dtype)


@add_rms_norm_bwd.register_fake
def _(dy, dres_out, s, s_residual, weight, rstd, dx_dtype, dres_dtype, separate_dres):
    n_rows, d = dy.shape
    return (dy.new_empty(n_rows, d, dtype=dx_dtype),
            dy.new_empty((n_rows, d) if separate_dres else (0,), dtype=dres_dtype), torch.empty_like(weight))


def _setup_context(ctx, inputs, output):
    x, residual, weight, eps, out_dtype, residual_dtype = inputs
    _, res_out, rstd = output
    if res_out.dtype == torch.float32:       # new_residual is exactly the fp32 sum: recompute nothing else
        ctx.save_for_backward(res_out, None, weight, rstd)
    else:
        ctx.save_for_backward(x, residual, weight, rstd)
    ctx.x_dtype = x.dtype
    ctx.res_dtype = residual.dtype if residual is not None else None


def _backward(ctx, d_normed, d_res_out, _d_rstd):
    s, s_residual, weight, rstd = ctx.saved_tensors
    if d_normed is None:                       # only new_residual was used
        d_normed = torch.zeros_like(s, dtype=ctx.x_dtype)
    separate = ctx.res_dtype is not None and ctx.res_dtype != ctx.x_dtype
    dx, dres, dweight = add_rms_norm_bwd(d_normed, d_res_out, s, s_residual, weight, rstd, ctx.x_dtype,
                                         ctx.res_dtype if separate else ctx.x_dtype, separate)
    if ctx.res_dtype is None:
        dres = None
    elif not separate:
        dres = dx
    return dx, dres, dweight, None, None, None


add_rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


def add_rms_norm_triton(x, residual, weight, eps=1e-5, out_dtype=None, residual_dtype=torch.float32):
    """Fused Triton residual add + RMSNorm; the signature and semantics of kernels/norm.py's add_rms_norm_torch.

    x, residual: (..., d) (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1); weight: (d,).
    Returns normed (..., d) out_dtype and new_residual (..., d) residual_dtype.
    """
    if x.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"the Triton norm needs CUDA tensors (got {x.device.type}); set TRITON_INTERPRET=1 to "
                           "run it on the CPU, or use backend='torch'")
    shape, d = x.shape, x.shape[-1]
    normed, res_out, _ = add_rms_norm_fwd(x.reshape(-1, d), residual.reshape(-1, d) if residual is not None else None,
                                          weight, float(eps), out_dtype or weight.dtype, residual_dtype)
    return normed.view(shape), res_out.view(shape)
