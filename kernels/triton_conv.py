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

The weight and bias gradients are summed inside the kernel: each program adds its fp32 share into one zeroed
buffer (d * k + d,) with atomics (order-dependent in the last bits, like the scan's dA and dD); the autograd
formula hands out dweight and dbias as views of it. So a layer's conv backward is one fill and one kernel, no
reductions (it was a kernel and two torch sums of per-program partials).

Two kernels, one per layout (conv_bwd picks):

- rows (_conv_bwd_rows_kernel), channels-contiguous x (the model's token-major layout). A program owns BLOCK_D
  channels of one batch element and walks a segment of time BLOCK_L rows (4) at a time. Its tile is laid out with
  every row of a column in one thread (4 channels per thread, 8-byte loads along the contiguous channels), so
  moving rows is a register move: each tile's g is computed once (one sigmoid per element), and the shifted
  copies that pre (x shifted back), dw, and dx (g shifted forward) need come from the tile and its neighbour:
  the tile before for x (carried), the tile after for g (so dx is written one tile behind). DRAM sees x and dy
  read once and dx written once, plus a tile per segment. ~34 instructions per element, 157 registers
  (tests/test_causal_conv.py checks the sm_90 build for spills).
- tiles (_conv_bwd_tiles_kernel), any layout: register tiles that cannot be shifted along time, so the g[t + i]
  of dx are recomputed from shifted loads of x and dy (k pre-activations per element; the loads are L1/L2 hits).
  A program walks TIME_BLOCKS tiles down the sequence, summing dw and dbias in registers. It was the only
  backward until the rows one: 0.42 ms at (8, 2048, 1536, 4) bf16 on the H200 against the forward's 0.04 ms
  (k sigmoids and k^2 + 2k loads per element). bench/bench_conv.py times both.

Packed rows (seq_idx (b, l) int32, kernels/documents.py; HAS_SEQ_IDX, a constexpr, so that without it the kernels
compile exactly as before): output t's window takes x[t'] only where seq_idx[t'] == seq_idx[t], so in the backward
g[t + i] reaches dx[t] only within t's document, and dw's products are masked as the forward's. The forward and the
tiles backward compare the documents of the rows they load; the rows backward reads, per tile, how many of each
row's k-1 neighbours on either side share its document, and keeps a shifted row where that count reaches the shift.

Both launchers are wrapped as torch custom ops (mamba_trainer::causal_conv1d_fwd and ::causal_conv1d_bwd, the
latter the former's registered autograd), with fake implementations that allocate exactly what the kernels return,
so that torch.compile traces a call as one node without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from .backends import triton_interpreting
from .layout import channels_contiguous, empty_like_order

NUM_WARPS = 4
BWD_SEGMENT = 256           # time steps one program of the tiles backward walks
# The rows backward (channels-contiguous x): 4 channels per thread (8-byte bf16 loads; 16-byte vectors would
# double every tile's registers), ROWS_WARPS warps of 128 channels per program, ROWS_SEGMENT time steps each,
# the next tile's loads issued before the current tile's arithmetic (ROWS_PREFETCH). bench/bench_conv.py --sweep
# times the alternatives.
ROWS_VEC = 4
ROWS_WARPS = 1
ROWS_SEGMENT = 128
ROWS_PREFETCH = True


@triton.jit
def _doc_of(s_base, offs_t, seqlen, s_sl):
    """seq_idx at rows offs_t (BL,) int32: each row's document; -1 outside [0, l) (where x is 0 anyway)."""
    return tl.load(s_base + offs_t * s_sl, mask=(offs_t >= 0) & (offs_t < seqlen), other=-1)


@triton.jit
def _load_shifted(x_base, m_base, offs_t, mask_d, seqlen, s_xl, s_ml, HAS_MASK: tl.constexpr,
                  s_base, s_sl, doc, HAS_SEQ_IDX: tl.constexpr):
    """x at rows offs_t (BL,) of the program's channels as fp32 (BL, BD); rows outside [0, l) and masked rows are 0,
    and with HAS_SEQ_IDX so are rows of another document than `doc` (BL,) (the document of the row they feed)."""
    valid = (offs_t >= 0) & (offs_t < seqlen)
    xv = tl.load(x_base + offs_t[:, None] * s_xl, mask=valid[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    if HAS_MASK:
        keep = tl.load(m_base + offs_t * s_ml, mask=valid, other=0)
        xv = tl.where(keep[:, None] != 0, xv, 0.0)
    if HAS_SEQ_IDX:
        xv = tl.where((_doc_of(s_base, offs_t, seqlen, s_sl) == doc)[:, None], xv, 0.0)
    return xv


@triton.jit
def _pre_activation(x_base, m_base, w_base, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, bias,
                    K: tl.constexpr, HAS_MASK: tl.constexpr, s_base, s_sl, HAS_SEQ_IDX: tl.constexpr):
    """pre[t] = bias + sum_j w[j] x[t - (K-1) + j] for the rows offs_t, fp32 (BL, BD); with HAS_SEQ_IDX the window
    stops at the start of row t's document."""
    acc = tl.zeros((offs_t.shape[0], mask_d.shape[0]), dtype=tl.float32) + bias[None, :]
    doc = offs_t
    if HAS_SEQ_IDX:
        doc = _doc_of(s_base, offs_t, seqlen, s_sl)
    for j in tl.static_range(K):
        w = tl.load(w_base + j * s_wk, mask=mask_d, other=0.0).to(tl.float32)
        acc += w[None, :] * _load_shifted(x_base, m_base, offs_t - (K - 1) + j, mask_d, seqlen, s_xl, s_ml, HAS_MASK,
                                          s_base, s_sl, doc, HAS_SEQ_IDX)
    return acc


@triton.jit
def _grad(x_base, m_base, w_base, dy_base, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, s_dyl, bias,
          K: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr,
          s_base, s_sl, HAS_SEQ_IDX: tl.constexpr):
    """g[t] = dy[t] * silu'(pre[t]) for the rows offs_t, fp32 (BL, BD); 0 past the end (those outputs do not exist)."""
    g = tl.load(dy_base + offs_t[:, None] * s_dyl, mask=(offs_t < seqlen)[:, None] & mask_d[None, :],
                other=0.0).to(tl.float32)
    if SILU:
        pre = _pre_activation(x_base, m_base, w_base, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, bias, K, HAS_MASK,
                              s_base, s_sl, HAS_SEQ_IDX)
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
    seq_ptr, s_sb, s_sl, HAS_SEQ_IDX: tl.constexpr,
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
                          K, HAS_MASK, seq_ptr + pid_b * s_sb, s_sl, HAS_SEQ_IDX)         # (BL, BD) fp32
    if SILU:
        pre = pre * tl.sigmoid(pre)
    y_ptrs = y_ptr + pid_b * s_yb + offs_d[None, :] * s_yd + offs_t[:, None] * s_yl
    tl.store(y_ptrs, pre.to(y_ptr.dtype.element_ty), mask=(offs_t < seqlen)[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_tiles_kernel(
    x_ptr, w_ptr, bias_ptr, m_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr,
    dim, seqlen,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_mb, s_ml, s_dyb, s_dyd, s_dyl, s_dxb, s_dxd, s_dxl,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, TIME_BLOCKS: tl.constexpr,
    seq_ptr, s_sb, s_sl, HAS_SEQ_IDX: tl.constexpr,
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
    s_base = seq_ptr + pid_b * s_sb

    dw_acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for blk in range(TIME_BLOCKS):
        offs_t = (pid_s * TIME_BLOCKS + blk) * BLOCK_L + tl.arange(0, BLOCK_L)
        doc = offs_t
        if HAS_SEQ_IDX:
            doc = _doc_of(s_base, offs_t, seqlen, s_sl)                  # (BL,) the document of each row
        # The tile's own g: dbias, dw (x shifted by j - (K-1): L1 hits after _grad's loads) and dx's first term.
        g = _grad(x_base, m_base, w_base, dy_base, offs_t, mask_d, seqlen, s_xl, s_ml, s_wk, s_dyl, bias,
                  K, HAS_MASK, SILU, s_base, s_sl, HAS_SEQ_IDX)
        db_acc += tl.sum(g, axis=0)
        for j in tl.static_range(K):
            xj = _load_shifted(x_base, m_base, offs_t - (K - 1) + j, mask_d, seqlen, s_xl, s_ml, HAS_MASK,
                               s_base, s_sl, doc, HAS_SEQ_IDX)
            dw_acc += tl.where(offs_k[:, None] == j, tl.sum(g * xj, axis=0)[None, :], 0.0)
        dx = tl.load(w_base + (K - 1) * s_wk, mask=mask_d, other=0.0).to(tl.float32)[None, :] * g
        # g[t + i] for i = 1..K-1, recomputed from shifted loads (a loop, not unrolled: code size linear in K).
        for i in range(1, K):
            g = _grad(x_base, m_base, w_base, dy_base, offs_t + i, mask_d, seqlen, s_xl, s_ml, s_wk, s_dyl, bias,
                      K, HAS_MASK, SILU, s_base, s_sl, HAS_SEQ_IDX)
            if HAS_SEQ_IDX:                                               # row t + i reads x[t] only in t's document
                g = tl.where((_doc_of(s_base, offs_t + i, seqlen, s_sl) == doc)[:, None], g, 0.0)
            dx += tl.load(w_base + (K - 1 - i) * s_wk, mask=mask_d, other=0.0).to(tl.float32)[None, :] * g
        mask_t = offs_t < seqlen
        if HAS_MASK:
            keep = tl.load(m_base + offs_t * s_ml, mask=mask_t, other=0)
            dx = tl.where(keep[:, None] != 0, dx, 0.0)                    # masked inputs were zeros: no gradient
        tl.store(dx_base + offs_t[:, None] * s_dxl, dx.to(dx_ptr.dtype.element_ty),
                 mask=mask_t[:, None] & mask_d[None, :])

    # this program's share of dw (d, K) and dbias (d,): fp32 adds into the launcher's zeroed buffer
    tl.atomic_add(dw_ptr + offs_d[None, :] * K + offs_k[:, None], dw_acc, mask=(offs_k < K)[:, None] & mask_d[None, :],
                  sem="relaxed")
    tl.atomic_add(db_ptr + offs_d, db_acc, mask=mask_d, sem="relaxed")


@triton.jit
def _shift_rows(cur, other, offs_r, neg_zero, S: tl.constexpr, BL: tl.constexpr, COMPILED: tl.constexpr):
    """A (BL, BD) tile's rows moved by S (|S| <= BL): out[r] = cur[r + S] where that row is in the tile, else the
    neighbouring tile's row: other[r + S + BL] (S < 0, `other` is the tile before) or other[r + S - BL] (S > 0,
    the tile after).

    COMPILED: each row is picked by a select and a sum over rows; with every row of the tile in one thread's
    registers (the rows kernel's tile) both fold away at compile time into register moves (tl.gather would not:
    it compiles to shuffles and selects). neg_zero is -0.0, the identity of the sum: x + -0.0 == x for every x, so
    nothing is left to add (x + 0.0 is not, for x = -0.0). Under the interpreter, whose cost is per jit call
    (tl.sum is one), two gathers pick the same rows."""
    out = cur
    if S != 0:
        if COMPILED:
            for r in tl.static_range(BL):
                if r + S < 0:
                    v = tl.sum(tl.where(offs_r[:, None] == r + S + BL, other, neg_zero), axis=0)
                elif r + S >= BL:
                    v = tl.sum(tl.where(offs_r[:, None] == r + S - BL, other, neg_zero), axis=0)
                else:
                    v = tl.sum(tl.where(offs_r[:, None] == r + S, cur, neg_zero), axis=0)
                out = tl.where(offs_r[:, None] == r, v[None, :], out)
        else:
            src = tl.broadcast_to((offs_r + S)[:, None], cur.shape)
            inside = (src >= 0) & (src < BL)
            outside = tl.where(src < 0, src + BL, src - BL)
            out = tl.where(inside, tl.gather(cur, tl.where(inside, src, 0), 0),
                           tl.gather(other, tl.where(inside, 0, outside), 0))
    return out


@triton.jit
def _weight_tap(w_all, offs_k, neg_zero, j: tl.constexpr, COMPILED: tl.constexpr):
    """Tap j of the (BK, BD) weight tile as (1, BD): a select and a sum when compiled (folded, hoisted out of the
    loop), a gather under the interpreter (see _shift_rows)."""
    if COMPILED:
        return tl.sum(tl.where(offs_k[:, None] == j, w_all, neg_zero), axis=0)[None, :]
    else:
        return tl.gather(w_all, tl.full((1, w_all.shape[1]), j, tl.int32), 0)


@triton.jit
def _sigmoid(x, COMPILED: tl.constexpr):
    """1 / (1 + exp(-x)) in fp32. Compiled: the approximate exp and division (ex2.approx.ftz, div.approx: a few
    ulp) in 4 instructions instead of tl.sigmoid's ~16, whose range handling (denormal exponents, divisors past
    2^126) changes nothing here; the interpreter has no libdevice and takes tl.sigmoid."""
    if COMPILED:
        return libdevice.fast_dividef(1.0, 1.0 + libdevice.fast_expf(-x))
    else:
        return tl.sigmoid(x)


@triton.jit
def _keep_rows(m_base, offs_t, seqlen, s_ml, HAS_MASK: tl.constexpr):
    """(BL,) bool: False at masked (left-padding) rows; True everywhere without a mask."""
    if HAS_MASK:
        return tl.load(m_base + offs_t * s_ml, mask=(offs_t >= 0) & (offs_t < seqlen), other=0) != 0
    else:
        return offs_t == offs_t


@triton.jit
def _load_rows(base, m_base, offs_t, mask_d, seqlen, s_l, s_ml, HAS_MASK: tl.constexpr):
    """Rows offs_t (BL,) of a (b, d, l) operand at the program's channels, (BL, BD) in its dtype; rows outside
    [0, l) and masked rows (HAS_MASK) are 0."""
    valid = (offs_t >= 0) & (offs_t < seqlen)
    if HAS_MASK:
        valid = valid & _keep_rows(m_base, offs_t, seqlen, s_ml, HAS_MASK)
    return tl.load(base + offs_t[:, None] * s_l, mask=valid[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _rows_in_document(s_base, offs_t, seqlen, s_sl, K: tl.constexpr):
    """(behind, ahead), (BL,) int32 each: how many of the K-1 rows before, and after, each row offs_t belong to its
    document. With non-decreasing seq_idx a document is one run of rows, so the row s steps back (ahead) is in it
    exactly when s <= behind (ahead): one compare per shift instead of a row of seq_idx kept per shift."""
    doc = _doc_of(s_base, offs_t, seqlen, s_sl)
    behind = tl.zeros_like(offs_t)
    ahead = tl.zeros_like(offs_t)
    for s in tl.static_range(1, K):
        behind += (_doc_of(s_base, offs_t - s, seqlen, s_sl) == doc).to(tl.int32)
        ahead += (_doc_of(s_base, offs_t + s, seqlen, s_sl) == doc).to(tl.int32)
    return behind, ahead


@triton.jit
def _conv_bwd_rows_kernel(
    x_ptr, w_ptr, bias_ptr, m_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr,
    dim, seqlen, seg_len,
    s_xb, s_xd, s_xl, s_wd, s_wk, s_mb, s_ml, s_dyb, s_dyd, s_dyl, s_dxb, s_dxd, s_dxl,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, SILU: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    PREFETCH: tl.constexpr, COMPILED: tl.constexpr,
    seq_ptr, s_sb, s_sl, HAS_SEQ_IDX: tl.constexpr,
):
    """One program: BLOCK_D channels of one batch element over seg_len time steps, walked forward BLOCK_L rows at
    a time. Each tile's g = dy * silu'(pre) is computed once; the shifted copies that pre, dw and dx need come
    from the tile and its neighbour (x: the tile before, carried; g: the tile after, so dx is written one tile
    behind) by register moves, never by loads or recomputation. With HAS_SEQ_IDX, each shifted row is zeroed
    where it belongs to another document than the row it meets: each tile reads how many of its rows' K-1
    neighbours on either side share their document (_rows_in_document), and a shift by s keeps the rows where
    that count is >= s. The tile's data itself still moves only in registers."""
    pid_s = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_L)
    offs_d = tl.max_contiguous(pid_d * BLOCK_D + tl.arange(0, BLOCK_D), VEC)
    offs_k = tl.arange(0, BLOCK_K)
    mask_d = offs_d < dim
    # -0.0 made from its bits (Triton's frontend turns a literal -0.0 into +0.0): see _shift_rows
    neg_zero = tl.full((1,), -2147483648, tl.int32).to(tl.float32, bitcast=True)

    w_all = tl.load(w_ptr + offs_d[None, :] * s_wd + offs_k[:, None] * s_wk,
                    mask=(offs_k < K)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)     # (BK, BD)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
    x_base = x_ptr + pid_b * s_xb + offs_d[None, :] * s_xd
    dy_base = dy_ptr + pid_b * s_dyb + offs_d[None, :] * s_dyd
    dx_base = dx_ptr + pid_b * s_dxb + offs_d[None, :] * s_dxd
    m_base = m_ptr + pid_b * s_mb
    s_base = seq_ptr + pid_b * s_sb

    seg_start = pid_s * seg_len
    seg_end = tl.minimum(seg_start + seg_len, seqlen)
    # The tile before the segment: its last K-1 rows are the first tile's x halo.
    x_prev = _load_rows(x_base, m_base, seg_start - BLOCK_L + offs_r, mask_d, seqlen, s_xl, s_ml, HAS_MASK)
    x_prev = x_prev.to(tl.float32)
    g_prev = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    keep_prev = _keep_rows(m_base, seg_start - BLOCK_L + offs_r, seqlen, s_ml, HAS_MASK)
    ahead_prev = offs_r        # (read only with HAS_SEQ_IDX; the tile before the segment writes no dx)
    dw_acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # PREFETCH: each iteration loads the next tile before it works on the one loaded by the iteration before (its
    # loads are in flight during the arithmetic; ~35 more registers per thread). One tile more than the segment holds (seg_len is a multiple of BLOCK_L):
    # the last iteration computes the g rows after the segment that its last dx rows need (0 past the end of the
    # sequence, where dy is 0) and writes the last tile's dx. A ragged last segment runs the same count, its rows
    # past the end masked.
    x_next = x_prev
    dy_next = x_prev
    if PREFETCH:
        x_next = _load_rows(x_base, m_base, seg_start + offs_r, mask_d, seqlen, s_xl, s_ml, HAS_MASK)
        dy_next = _load_rows(dy_base, m_base, seg_start + offs_r, mask_d, seqlen, s_dyl, s_ml, False)
    t0 = seg_start
    while t0 <= seg_start + seg_len:    # (a while loop: Triton's interpreter cannot range() over a run-time bound)
        offs_t = t0 + offs_r
        if PREFETCH:
            x = x_next.to(tl.float32)                                                        # (BL, BD)
            g = dy_next.to(tl.float32)
            x_next = _load_rows(x_base, m_base, offs_t + BLOCK_L, mask_d, seqlen, s_xl, s_ml, HAS_MASK)
            dy_next = _load_rows(dy_base, m_base, offs_t + BLOCK_L, mask_d, seqlen, s_dyl, s_ml, False)
        else:
            x = _load_rows(x_base, m_base, offs_t, mask_d, seqlen, s_xl, s_ml, HAS_MASK).to(tl.float32)
            g = _load_rows(dy_base, m_base, offs_t, mask_d, seqlen, s_dyl, s_ml, False).to(tl.float32)
        behind = offs_r
        ahead = offs_r
        if HAS_SEQ_IDX:
            behind, ahead = _rows_in_document(s_base, offs_t, seqlen, s_sl, K)   # (BL,) each
        if SILU:
            pre = bias[None, :] + _weight_tap(w_all, offs_k, neg_zero, K - 1, COMPILED) * x
            for j in tl.static_range(K - 1):
                xs = _shift_rows(x, x_prev, offs_r, neg_zero, j - (K - 1), BLOCK_L, COMPILED)
                if HAS_SEQ_IDX:
                    xs = tl.where((behind >= K - 1 - j)[:, None], xs, 0.0)
                pre += _weight_tap(w_all, offs_k, neg_zero, j, COMPILED) * xs
            sig = _sigmoid(pre, COMPILED)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        # dw[j] += sum_t g[t] x[t - (K-1) + j] and dbias += sum_t g[t] over the segment's own tiles (all but the
        # last iteration's; rows past the end of the sequence have g = 0). Compiled: one fused multiply-add per row
        # into the accumulator (the rows' products are not summed first).
        if t0 < seg_start + seg_len:
            db_acc += tl.sum(g, axis=0)
            for j in tl.static_range(K):
                xs = _shift_rows(x, x_prev, offs_r, neg_zero, j - (K - 1), BLOCK_L, COMPILED)
                if HAS_SEQ_IDX:
                    xs = tl.where((behind >= K - 1 - j)[:, None], xs, 0.0)
                if COMPILED:
                    for r in tl.static_range(BLOCK_L):
                        g_r = tl.sum(tl.where(offs_r[:, None] == r, g, neg_zero), axis=0)
                        xs_r = tl.sum(tl.where(offs_r[:, None] == r, xs, neg_zero), axis=0)
                        dw_acc += tl.where(offs_k[:, None] == j, (g_r * xs_r)[None, :], neg_zero)
                else:
                    dw_acc += tl.where(offs_k[:, None] == j, tl.sum(g * xs, axis=0)[None, :], 0.0)
        # dx of the tile before: dx[t] = sum_{s<K} w[K-1-s] g[t + s] (with HAS_SEQ_IDX: the rows t + s of t's document)
        offs_p = offs_t - BLOCK_L
        dx = _weight_tap(w_all, offs_k, neg_zero, K - 1, COMPILED) * g_prev
        for s in tl.static_range(1, K):
            gs = _shift_rows(g_prev, g, offs_r, neg_zero, s, BLOCK_L, COMPILED)
            if HAS_SEQ_IDX:
                gs = tl.where((ahead_prev >= s)[:, None], gs, 0.0)
            dx += _weight_tap(w_all, offs_k, neg_zero, K - 1 - s, COMPILED) * gs
        dx = tl.where(keep_prev[:, None], dx, 0.0)                      # masked inputs were zeros: no gradient
        tl.store(dx_base + offs_p[:, None] * s_dxl, dx.to(dx_ptr.dtype.element_ty),
                 mask=((offs_p >= seg_start) & (offs_p < seg_end))[:, None] & mask_d[None, :])
        x_prev = x
        g_prev = g
        keep_prev = _keep_rows(m_base, offs_t, seqlen, s_ml, HAS_MASK)
        ahead_prev = ahead
        t0 += BLOCK_L

    # this program's share of dw (d, K) and dbias (d,): fp32 adds into the launcher's zeroed buffer
    tl.atomic_add(dw_ptr + offs_d[None, :] * K + offs_k[:, None], dw_acc, mask=(offs_k < K)[:, None] & mask_d[None, :],
                  sem="relaxed")
    tl.atomic_add(db_ptr + offs_d, db_acc, mask=mask_d, sem="relaxed")


def _tile(x: torch.Tensor, wide: int, narrow: int) -> tuple[int, int]:
    """(BLOCK_L, BLOCK_D): `wide` along x's contiguous axis (coalesced, vectorised), `narrow` along the other."""
    _, dim, seqlen = x.shape
    if channels_contiguous(x):
        return min(narrow, triton.next_power_of_2(seqlen)), min(wide, triton.next_power_of_2(dim))
    return min(wide, triton.next_power_of_2(seqlen)), min(narrow, triton.next_power_of_2(dim))


def fwd_config(x: torch.Tensor) -> dict:
    block_l, block_d = _tile(x, 128, 32)
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, num_warps=NUM_WARPS)


def bwd_tiles_config(x: torch.Tensor, k: int) -> dict:
    block_l, block_d = _tile(x, 64, 32)
    time_blocks = max(1, min(triton.cdiv(x.shape[2], block_l), BWD_SEGMENT // block_l))
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(k), TIME_BLOCKS=time_blocks,
                num_warps=NUM_WARPS)


def bwd_rows_config(x: torch.Tensor, k: int, warps: int = ROWS_WARPS, segment: int = ROWS_SEGMENT,
                    prefetch: bool = ROWS_PREFETCH, block_l: Optional[int] = None) -> dict:
    """The rows kernel's tile: BLOCK_D = ROWS_VEC channels per thread across all the warps' threads (so that each
    thread holds whole columns of the tile: the row shifts are register moves), narrower for small d; BLOCK_L =
    `block_l` rows (default 4; 16 under the interpreter, whose cost is per tile, not per element), raised to the
    smallest power of two >= K - 1 (a shift reaches one neighbouring tile at most); SEG_LEN = `segment` rounded to
    whole tiles, at most the sequence."""
    block_d = min(ROWS_VEC * 32 * warps, triton.next_power_of_2(x.shape[1]))
    if block_l is None:
        block_l = 16 if triton_interpreting() else 4
    block_l = max(block_l, triton.next_power_of_2(k - 1))
    seg_len = max(block_l, min(segment, triton.cdiv(x.shape[2], block_l) * block_l) // block_l * block_l)
    return dict(BLOCK_L=block_l, BLOCK_D=block_d, BLOCK_K=triton.next_power_of_2(k), VEC=ROWS_VEC,
                PREFETCH=prefetch, SEG_LEN=seg_len, num_warps=max(1, min(warps, block_d // (ROWS_VEC * 32))))


def _mask_arg(mask, x):
    """The mask as uint8 (a view of the bool storage), or x as a never-read placeholder; and its strides."""
    if mask is None:
        return x, 0, 0
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def _seq_arg(seq_idx, x):
    """seq_idx (b, l) int32 and its strides, or x as a never-read placeholder (HAS_SEQ_IDX=False)."""
    if seq_idx is None:
        return x, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def conv_fwd(x, weight, bias, mask, silu: bool, seq_idx=None) -> torch.Tensor:
    """Launch the forward (seq_idx: (b, l) int32 documents, kernels/documents.py, or None). Returns y (b, d, l) in
    x's dtype and dim order."""
    batch, dim, seqlen = x.shape
    y = empty_like_order(x)
    if y.numel() == 0:
        return y
    cfg = fwd_config(x)
    m, s_mb, s_ml = _mask_arg(mask, x)
    seq, s_sb, s_sl = _seq_arg(seq_idx, x)
    grid = (triton.cdiv(seqlen, cfg["BLOCK_L"]), triton.cdiv(dim, cfg["BLOCK_D"]), batch)
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, m, y,
        dim, seqlen,
        x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), s_mb, s_ml,
        y.stride(0), y.stride(1), y.stride(2),
        K=weight.shape[1], HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu, **cfg,
        seq_ptr=seq, s_sb=s_sb, s_sl=s_sl, HAS_SEQ_IDX=seq_idx is not None,
    )
    return y


BWD_KERNELS = ("auto", "rows", "tiles")


def conv_bwd(x, weight, bias, mask, dy, silu: bool, kernel: str = "auto", seq_idx=None, **config):
    """Launch the backward: one kernel, which also sums the weight and bias gradients (fp32 atomics into one
    zeroed buffer). kernel: "rows" (channels-contiguous x, the model's layout), "tiles" (any layout), or "auto";
    config overrides the chosen kernel's tile (bench/bench_conv.py's sweep); seq_idx: (b, l) int32 or None.

    Returns dx (x's dtype and dim order) and dwb: fp32 (d * K + d,), dweight (d, K) then dbias (d,) (see
    `split_weight_grads`)."""
    batch, dim, seqlen = x.shape
    k = weight.shape[1]
    dx = empty_like_order(x)
    dwb = torch.zeros(dim * (k + 1), device=x.device, dtype=torch.float32)
    if dx.numel() == 0:
        return dx, dwb
    if kernel == "auto":
        kernel = "rows" if channels_contiguous(x) else "tiles"
    m, s_mb, s_ml = _mask_arg(mask, x)
    args = (x, weight, bias if bias is not None else weight, m, dy, dx, dwb[:dim * k], dwb[dim * k:])
    strides = (x.stride(0), x.stride(1), x.stride(2), weight.stride(0), weight.stride(1), s_mb, s_ml,
               dy.stride(0), dy.stride(1), dy.stride(2), dx.stride(0), dx.stride(1), dx.stride(2))
    seq, s_sb, s_sl = _seq_arg(seq_idx, x)
    flags = dict(K=k, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu,
                 seq_ptr=seq, s_sb=s_sb, s_sl=s_sl, HAS_SEQ_IDX=seq_idx is not None)
    if kernel == "rows":
        cfg = bwd_rows_config(x, k, **config)
        seg_len = cfg.pop("SEG_LEN")
        grid = (triton.cdiv(seqlen, seg_len), triton.cdiv(dim, cfg["BLOCK_D"]), batch)
        _conv_bwd_rows_kernel[grid](*args, dim, seqlen, seg_len, *strides, **flags, **cfg,
                                    COMPILED=not triton_interpreting())
    elif kernel == "tiles":
        cfg = dict(bwd_tiles_config(x, k), **config)
        grid = (triton.cdiv(seqlen, cfg["BLOCK_L"] * cfg["TIME_BLOCKS"]), triton.cdiv(dim, cfg["BLOCK_D"]), batch)
        _conv_bwd_tiles_kernel[grid](*args, dim, seqlen, *strides, **flags, **cfg)
    else:
        raise ValueError(f"kernel must be one of {BWD_KERNELS}, got {kernel!r}")
    return dx, dwb


def split_weight_grads(dwb, weight, bias):
    """conv_bwd's fp32 buffer -> dweight (d, K) in weight's dtype and dbias (d,) in bias's dtype (None without a
    bias): views of the buffer when the dtypes are fp32 (no copy, no launch)."""
    dim, k = weight.shape
    dweight = dwb[:dim * k].view(dim, k).to(weight.dtype)
    return dweight, (dwb[dim * k:].to(bias.dtype) if bias is not None else None)


# ---------------------------------------------------------------- torch custom ops (one graph node each)

@torch.library.custom_op("mamba_trainer::causal_conv1d_fwd", mutates_args=())
def causal_conv1d_fwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], silu: bool, seq_idx: Optional[torch.Tensor] = None,
                         ) -> torch.Tensor:
    return conv_fwd(x, weight, bias, mask, silu, seq_idx)


@causal_conv1d_fwd_op.register_fake
def _(x, weight, bias, mask, silu, seq_idx=None):
    return empty_like_order(x)


@torch.library.custom_op("mamba_trainer::causal_conv1d_bwd", mutates_args=())
def causal_conv1d_bwd_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         mask: Optional[torch.Tensor], dy: torch.Tensor, silu: bool,
                         seq_idx: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return conv_bwd(x, weight, bias, mask, dy, silu, seq_idx=seq_idx)


@causal_conv1d_bwd_op.register_fake
def _(x, weight, bias, mask, dy, silu, seq_idx=None):
    return empty_like_order(x), weight.new_empty(weight.shape[0] * (weight.shape[1] + 1), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, silu, seq_idx = inputs
    ctx.save_for_backward(x, weight, bias, mask, seq_idx)
    ctx.silu = silu


def _backward(ctx, dy):
    x, weight, bias, mask, seq_idx = ctx.saved_tensors
    if seq_idx is None:
        dx, dwb = causal_conv1d_bwd_op(x, weight, bias, mask, dy, ctx.silu)
    else:
        dx, dwb = causal_conv1d_bwd_op(x, weight, bias, mask, dy, ctx.silu, seq_idx)
    dweight, dbias = split_weight_grads(dwb, weight, bias)
    return dx, dweight, dbias, None, None, None


causal_conv1d_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def causal_conv1d_triton(x, weight, bias=None, activation="silu", mask=None, seq_idx=None):
    """Fused Triton causal conv1d (+ SiLU); semantics of kernels/causal_conv.py's reference (conv_state is filled
    by the entry point). x (b, d, l) any strides, CUDA (or CPU under TRITON_INTERPRET=1); seq_idx (b, l) int32 or
    None. Returns y in x's dtype and dim order."""
    if x.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"the Triton conv needs CUDA tensors (got {x.device.type}); set TRITON_INTERPRET=1 to "
                           "run it on the CPU, or use backend='torch'")
    if seq_idx is None:                                 # the op as it was: one document per row
        return causal_conv1d_fwd_op(x, weight, bias, mask, activation == "silu")
    return causal_conv1d_fwd_op(x, weight, bias, mask, activation == "silu", seq_idx)


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
