"""The selective scan as fused Triton kernels, forward and backward (backend "triton").

Same equations as kernels/reference.py (b: batch, d: d_inner, l: length, n: d_state):

    delta_t = softplus(delta_t + delta_bias)
    h_t     = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t          (d, n)
    y_t     = (<h_t, C_t> + D * u_t) * silu(z_t)

How the work is split. One program owns one batch element and a block of BLOCK_D channels (one warp), and keeps
their (n, BLOCK_D) state in fp32 registers for the whole sequence. It walks the sequence in chunks of BLOCK_L steps:
each chunk's u, delta, z (BLOCK_L, BLOCK_D) and B, C (BLOCK_L, n) tiles are loaded, the chunk's transition pairs
(exp(delta * A), delta * B * u) form a (BLOCK_L, n, BLOCK_D) register tile, and `tl.associative_scan` over time
composes them. The tile is laid out with channels across lanes and time and n inside each thread, so the scan
over time never leaves the thread and the sum over n for y crosses only a few lanes (a channel's n is split over 4
lanes at d_state 16, see _config). The next chunk's loads are issued before this chunk's arithmetic. The state of
every step exists only in registers. Softplus, the D skip and the z gate happen in the same pass; y is the only
(b, d, l) tensor written.

Layout. Every (b, d, l) and (b, n, l) operand is addressed through its own three strides, and y and the input
gradients are allocated in their input's stride order. The model passes transposed views of its token-major
(b, l, ·) activations (z and B, C are column slices of wider rows), so nothing is copied on either side; Triton
specialises a stride of 1, so whichever axis is contiguous gets the vectorised loads.

Backward. The forward (when a gradient is needed) also writes the state at the start of every segment of
SEG_CHUNKS chunks, (b, segments, d, n) fp32. The adjoint recurrence runs backwards in time,

    g_t = C_t * dy'_t + dA_{t+1} * g_{t+1}          (dy' = dy * silu(z), the gradient of <h_t, C_t>)

and a single program walking the whole sequence leaves the GPU mostly idle (b * d / 8 one-warp programs). So the
sequence is cut into parts of whole segments, enough for about TARGET_PROGRAMS programs, which run in parallel:

1. `_scan_bwd_carry_kernel`: what each part hands to the part before it, as an affine map of what it receives. With
   r the gradient flowing into h_{t-1} through step t, walking [s, e) backwards gives r <- dA_t (q_t + r), so

       r_out = sum_t exp(A * sum_{s<=j<=t} delta_j) * q_t  +  exp(A * sum_{s<=j<e} delta_j) * r_in

   one exp per element, no recurrence and no states: it reads delta, z, dy and C only.
2. `_scan_bwd_kernel`: each part starts from dlast pushed through the later parts' maps, then walks its segments in
   reverse. For each it first runs the forward through the segment from the saved state, keeping each chunk's first
   state in a small per-program scratch buffer (it stays in L2); then it walks the segment's chunks in reverse,
   recomputes the chunk's states with the same scan, and runs the adjoint as a two-component reverse associative
   scan whose coefficient for step t is dA_{t+1}, made from a second load of delta shifted by one step (register
   tiles cannot be shifted along time). Every gradient then comes from g_t and h_t at the same step
   (g_t * dA_t * h_{t-1} = g_t * (h_t - delta_t B_t u_t)).

dB and dC are summed over the program's channels in registers and written as one fp32 partial per channel block
(8 channels at d_state 16; a transient (d/8, b, n, l) buffer each), which the launcher sums; dA, dD and d(delta_bias)
are summed over the program's steps and added across programs with fp32 atomics. No per-channel copy of B or C and no
L*n tensor is ever written.

Packed rows (seq_idx (b, l) int32, kernels/documents.py; HAS_SEQ_IDX, a constexpr, so that without it the kernels
compile exactly as before). At a document's first step the decay is zeroed, dA_t := 0, so h_t = delta_t B_t u_t:
the forward's in-chunk scan and every recomputation of it in the backward see the same zero. In the adjoint the
coefficient of step t is dA_{t+1}, zeroed where t + 1 starts a document, and the carry into the chunk before is
zeroed where the chunk's first step starts one; g * (h_t - x_t) is then 0 at a document's first step by itself.
Pass 1 counts a step's term only while the step is in the document open before its part (seq_idx[t] ==
seq_idx[s - 1], monotone indices), and the second pass passes a later part's incoming carry through only when no
document starts inside that part. Each chunk reads seq_idx at t and t - 1 (t + 1 too in the backward): the loads
of a (BL,) int32 row.

Timed on the H200 (2026-12-02, bench/scan_sweep.py, notes/scan_sweep_2026-12-02_flip.txt): forward+backward at
(8, 2048, 1536, 16) bf16 in the model's token-major layout 2.70 ms (c35aaa8: 3.58; mamba_ssm 2.42 in its contiguous
layout), 2.27 ms on contiguous operands. What moved it: the adjoint's reverse scan is written as flip, forward scan,
flip (Triton 3.6 lowered `reverse=True` over the in-register time axis with ~600 warp shuffles per chunk), and pass 1
skips each segment's last chunk. A register cap (maxnreg 168 or 128) and two warps per program measured slower.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .backends import triton_interpreting

LOG2E = tl.constexpr(1.4426950408889634)   # exp(x) = 2^(x log2 e): exp2 is one instruction

# Block sizes, chosen on the H100 at (batch 8, L 2048, d_inner 1536, d_state 16), bf16 (BENCHMARKS.md, scan-gpu).
CHUNK_LEN = 8                # time steps per chunk (BLOCK_L): one scan over a (BLOCK_L, n, BLOCK_D) register tile
SEG_CHUNKS = 8               # chunks per segment: the forward saves the state every SEG_CHUNKS * BLOCK_L steps
TARGET_PROGRAMS = 8192       # the backward splits the sequence into parts until about this many programs run
# (chunk, n) elements one thread holds per tile (a larger tile spreads a channel over lanes), and warps per program.
# 32 at chunk 8 and d_state 16: four lanes per channel, eight channels per one-warp program; more elements per
# thread spilled in the backward, fewer left too few channels per program to pay for the sums over them.
FWD_PER_THREAD, FWD_WARPS = 32, 1
BWD_PER_THREAD, BWD_WARPS = 32, 1
BWD_MAXNREG = None           # a register cap for the backward (None: the compiler's choice, 255 at d_state 16)


@triton.jit
def _softplus(x):
    # log(1 + e^x) with torch's threshold: above 20 the result is x to fp32 precision.
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _affine_combine(a1, b1, a2, b2):
    # Step (a1, b1) then step (a2, b2): h -> a2 * (a1 * h + b1) + b2.
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _chunk_states(delta, u, B, A2, h0, reset, HAS_SEQ_IDX: tl.constexpr):
    """A chunk's transitions and states, as the forward makes them (the backward recomputes exactly these).

    delta, u: (BL, BD); B: (BL, BN); A2 = A * log2(e): (BN, BD); h0: (BN, BD) the state before the chunk.
    reset: (BL,) bool, True where a document starts (read only with HAS_SEQ_IDX): there dA = 0, so h_{t-1} drops.
    Returns dA = exp(delta A) and x = delta B u, both (BL, BN, BD), and the states h_t of the chunk (BL, BN, BD).
    """
    dA = tl.exp2(delta[:, None, :] * A2[None, :, :])
    if HAS_SEQ_IDX:
        dA = tl.where(reset[:, None, None], 0.0, dA)
    x = B[:, :, None] * (delta * u)[:, None, :]
    a_cum, x_cum = tl.associative_scan((dA, x), 0, _affine_combine)
    return dA, x, a_cum * h0[None, :, :] + x_cum


@triton.jit
def _doc_starts(seq_base, t, seqlen, s_sl):
    """seq_idx at steps t and t - 1 (BL,) int32, equal (0) where t - 1 or t is outside [0, l): compare them with
    `!=` for the steps where a new document starts. Returned uncompared so that a prefetch does not wait on them."""
    inside = (t >= 1) & (t < seqlen)
    return tl.load(seq_base + t * s_sl, mask=inside, other=0), tl.load(seq_base + (t - 1) * s_sl, mask=inside, other=0)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, seq_ptr,
    y_ptr, last_ptr, seg_ptr,
    dim, seqlen, dstate, n_chunks, n_segs,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl,
    s_zb, s_zd, s_zl, s_yb, s_yd, s_yl, s_sb, s_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    SAVE_SEGS: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)         # offsets past 2^31 elements in large batches
    pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]

    # Padded channels and states get A = 0 (decay 1) and B = C = 0, so their state stays 0 and adds nothing.
    A = tl.load(A_ptr + offs_n[:, None] * s_An + offs_d[None, :] * s_Ad, mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * LOG2E                                                                  # (BN, BD)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    # Every (b, d, l) and (b, n, l) operand is addressed through its own three strides, so (b, d, l) storage and
    # transposed views of (b, l, d) storage (the model's layout) are read in place.
    u_base = u_ptr + pid_b * s_ub + offs_d[None, :] * s_ud
    delta_base = delta_ptr + pid_b * s_db + offs_d[None, :] * s_dd
    z_base = z_ptr + pid_b * s_zb + offs_d[None, :] * s_zd
    y_base = y_ptr + pid_b * s_yb + offs_d[None, :] * s_yd
    B_base = B_ptr + pid_b * s_Bb + offs_n[None, :] * s_Bn
    C_base = C_ptr + pid_b * s_Cb + offs_n[None, :] * s_Cn
    state_offs = offs_n[:, None] + offs_d[None, :] * dstate                         # into (.., d, n) states

    # The loads of chunk c + 1 are issued before the arithmetic of chunk c (software pipelining by hand: each
    # program is one warp, and waiting for every chunk's loads left the GPU idle most of the time).
    t = offs_l
    mask_td = (t < seqlen)[:, None] & mask_d[None, :]
    mask_tn = (t < seqlen)[:, None] & mask_n[None, :]
    u_next = tl.load(u_base + t[:, None] * s_ul, mask=mask_td, other=0.0)
    delta_next = tl.load(delta_base + t[:, None] * s_dl, mask=mask_td, other=0.0)
    B_next = tl.load(B_base + t[:, None] * s_Bl, mask=mask_tn, other=0.0)
    C_next = tl.load(C_base + t[:, None] * s_Cl, mask=mask_tn, other=0.0)
    if HAS_Z:
        z_next = tl.load(z_base + t[:, None] * s_zl, mask=mask_td, other=0.0)
    seq_base = seq_ptr + pid_b * s_sb
    reset = offs_l < 0                                  # (no document starts: read only with HAS_SEQ_IDX)
    if HAS_SEQ_IDX:
        seq_now_next, seq_before_next = _doc_starts(seq_base, t, seqlen, s_sl)
    h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    c = 0
    while c < n_chunks:        # (a while loop: Triton's interpreter cannot range() over a run-time bound)
        if SAVE_SEGS:
            if c % SEG_CHUNKS == 0:
                # The state before this segment: (b, segments, d, n), where the backward restarts.
                tl.store(seg_ptr + (pid_b * n_segs + c // SEG_CHUNKS) * dim * dstate + state_offs, h, mask=mask_nd)
        t = c * BLOCK_L + offs_l
        mask_td = (t < seqlen)[:, None] & mask_d[None, :]
        u = u_next.to(tl.float32)                                                 # (BL, BD)
        delta = delta_next.to(tl.float32)                                         # (BL, BD)
        B = B_next.to(tl.float32)                                                 # (BL, BN)
        C = C_next.to(tl.float32)                                                 # (BL, BN)
        if HAS_Z:
            zv = z_next.to(tl.float32)
        t_next = t + BLOCK_L
        mask_td_next = (t_next < seqlen)[:, None] & mask_d[None, :]
        mask_tn_next = (t_next < seqlen)[:, None] & mask_n[None, :]
        u_next = tl.load(u_base + t_next[:, None] * s_ul, mask=mask_td_next, other=0.0)
        delta_next = tl.load(delta_base + t_next[:, None] * s_dl, mask=mask_td_next, other=0.0)
        B_next = tl.load(B_base + t_next[:, None] * s_Bl, mask=mask_tn_next, other=0.0)
        C_next = tl.load(C_base + t_next[:, None] * s_Cl, mask=mask_tn_next, other=0.0)
        if HAS_Z:
            z_next = tl.load(z_base + t_next[:, None] * s_zl, mask=mask_td_next, other=0.0)
        if HAS_SEQ_IDX:
            reset = seq_now_next != seq_before_next                               # (BL,) a document starts
            seq_now_next, seq_before_next = _doc_starts(seq_base, t_next, seqlen, s_sl)

        if HAS_BIAS:
            delta += bias[None, :]
        if SOFTPLUS:
            delta = _softplus(delta)
        delta = tl.where(mask_td, delta, 0.0)          # steps past the end: decay 1, input 0, the state holds

        _, _, hs = _chunk_states(delta, u, B, A2, h, reset, HAS_SEQ_IDX)        # (BL, BN, BD) h_t in the chunk
        y = tl.sum(hs * C[:, :, None], axis=1)                                    # (BL, BD)
        h = tl.sum(tl.where(offs_l[:, None, None] == BLOCK_L - 1, hs, 0.0), axis=0)   # (BN, BD) last step

        if HAS_D:
            y += Dv[None, :] * u
        if HAS_Z:
            y *= zv * tl.sigmoid(zv)
        tl.store(y_base + t[:, None] * s_yl, y.to(y_ptr.dtype.element_ty), mask=mask_td)
        c += 1

    tl.store(last_ptr + pid_b * dim * dstate + state_offs, h, mask=mask_nd)


@triton.jit
def _scan_bwd_carry_kernel(
    delta_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, dy_ptr, seq_ptr, loc_ptr, dsum_ptr,
    dim, seqlen, dstate, n_chunks, part_chunks, n_parts,
    s_db, s_dd, s_dl, s_Ad, s_An, s_Cb, s_Cn, s_Cl, s_zb, s_zd, s_zl, s_dyb, s_dyd, s_dyl, s_sb, s_sl,
    HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
):
    """Backward, pass 1: what each part of the sequence hands to the part before it, as an affine map of what it
    receives. Walking a part [s, e) backwards, the carry r (the gradient reaching h_{t-1} through step t) obeys
    r <- dA_t (q_t + r) with q_t = C_t dy'_t, so the part maps r_in to
        r_out = sum_t (prod_{s<=j<=t} dA_j) q_t  +  (prod_{s<=j<e} dA_j) r_in  =  loc + exp(A * sum(delta)) r_in.
    The products are exp(A * cumulative delta): one exp per element and no recurrence, so this pass needs no
    states. Writes loc (b, parts, d, n) and sum(delta) (b, parts, d). Part 0 hands nothing on and is skipped.

    With seq_idx a product that spans a document's first step is 0: step t's term counts only while t is in the
    document that was open before the part (seq_idx[t] == seq_idx[s - 1]); whether r_in passes the whole part is
    read by the second pass from seq_idx itself."""
    pid_b = tl.program_id(0).to(tl.int64)         # offsets past 2^31 elements in large batches
    pid_d = tl.program_id(1)
    part = tl.program_id(2) + 1
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]
    A = tl.load(A_ptr + offs_n[:, None] * s_An + offs_d[None, :] * s_Ad, mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    delta_base = delta_ptr + pid_b * s_db + offs_d[None, :] * s_dd
    z_base = z_ptr + pid_b * s_zb + offs_d[None, :] * s_zd
    dy_base = dy_ptr + pid_b * s_dyb + offs_d[None, :] * s_dyd
    C_base = C_ptr + pid_b * s_Cb + offs_n[None, :] * s_Cn

    c = part * part_chunks
    c_end = tl.minimum(c + part_chunks, n_chunks)
    if HAS_SEQ_IDX:
        seq_base = seq_ptr + pid_b * s_sb
        seq_open = tl.load(seq_base + (c * BLOCK_L - 1) * s_sl)       # the document open before the part
    t = c * BLOCK_L + offs_l
    mask_td = (t < seqlen)[:, None] & mask_d[None, :]
    mask_tn = (t < seqlen)[:, None] & mask_n[None, :]
    delta_next = tl.load(delta_base + t[:, None] * s_dl, mask=mask_td, other=0.0)
    dy_next = tl.load(dy_base + t[:, None] * s_dyl, mask=mask_td, other=0.0)
    C_next = tl.load(C_base + t[:, None] * s_Cl, mask=mask_tn, other=0.0)
    if HAS_Z:
        z_next = tl.load(z_base + t[:, None] * s_zl, mask=mask_td, other=0.0)
    if HAS_SEQ_IDX:
        seq_next = tl.load(seq_base + t * s_sl, mask=t < seqlen, other=0)
    dsum = tl.zeros((BLOCK_D,), dtype=tl.float32)
    loc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    while c < c_end:
        t = c * BLOCK_L + offs_l
        mask_td = (t < seqlen)[:, None] & mask_d[None, :]
        delta = delta_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        C = C_next.to(tl.float32)
        if HAS_Z:
            zv = z_next.to(tl.float32)
        t_next = t + BLOCK_L
        more = (t_next < seqlen) & (t_next < c_end * BLOCK_L)
        mask_td_next = more[:, None] & mask_d[None, :]
        mask_tn_next = more[:, None] & mask_n[None, :]
        delta_next = tl.load(delta_base + t_next[:, None] * s_dl, mask=mask_td_next, other=0.0)
        dy_next = tl.load(dy_base + t_next[:, None] * s_dyl, mask=mask_td_next, other=0.0)
        C_next = tl.load(C_base + t_next[:, None] * s_Cl, mask=mask_tn_next, other=0.0)
        if HAS_Z:
            z_next = tl.load(z_base + t_next[:, None] * s_zl, mask=mask_td_next, other=0.0)
        if HAS_SEQ_IDX:
            same_doc = seq_next == seq_open                                       # (BL,)
            seq_next = tl.load(seq_base + t_next * s_sl, mask=more, other=0)
        if HAS_BIAS:
            delta += bias[None, :]
        if SOFTPLUS:
            delta = _softplus(delta)
        delta = tl.where(mask_td, delta, 0.0)
        if HAS_Z:
            dy = dy * zv * tl.sigmoid(zv)
        dy = tl.where(mask_td, dy, 0.0)                                           # dy' (BL, BD)
        cum = dsum[None, :] + tl.cumsum(delta, 0)                                 # (BL, BD) delta from s to t
        decay = tl.exp2(cum[:, None, :] * A2[None, :, :])                         # (BL, BN, BD)
        if HAS_SEQ_IDX:
            decay = tl.where(same_doc[:, None, None], decay, 0.0)
        loc += tl.sum(decay * C[:, :, None] * dy[:, None, :], axis=0)
        dsum += tl.sum(delta, axis=0)
        c += 1
    tl.store(loc_ptr + ((pid_b * n_parts + part) * dim + offs_d[None, :]) * dstate + offs_n[:, None], loc,
             mask=mask_nd)
    tl.store(dsum_ptr + (pid_b * n_parts + part) * dim + offs_d, dsum, mask=mask_d)


@triton.jit
def _adjoint_combine(a_late, q_late, a_early, q_early):
    # Reverse scan of g_t = q_t + a_t g_{t+1}: a segment [i, j] is (a, q) with g_i = q + a * g_{j+1}. The scan runs
    # from the end of the chunk backwards, so the accumulated (later) segment comes first.
    return a_early * a_late, q_early + a_early * q_late


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dy_ptr, seq_ptr, seg_ptr, dlast_ptr, loc_ptr,
    dsum_ptr, scratch_ptr, du_ptr, ddelta_ptr, dz_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dbias_ptr,
    dim, seqlen, dstate, n_chunks, n_segs, part_segs, n_parts,
    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Ad, s_An, s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_zb, s_zd, s_zl,
    s_dyb, s_dyd, s_dyl, s_gub, s_gud, s_gul, s_gdb, s_gdd, s_gdl, s_gzb, s_gzd, s_gzl, s_sb, s_sl,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, SEG_CHUNKS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)         # offsets past 2^31 elements in large batches
    pid_d = tl.program_id(1)
    part = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    mask_d = offs_d < dim
    mask_n = offs_n < dstate
    mask_nd = mask_n[:, None] & mask_d[None, :]

    A = tl.load(A_ptr + offs_n[:, None] * s_An + offs_d[None, :] * s_Ad, mask=mask_nd, other=0.0).to(tl.float32)
    A2 = A * LOG2E                                                                  # (BN, BD)
    if HAS_D:
        Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    u_base = u_ptr + pid_b * s_ub + offs_d[None, :] * s_ud
    delta_base = delta_ptr + pid_b * s_db + offs_d[None, :] * s_dd
    z_base = z_ptr + pid_b * s_zb + offs_d[None, :] * s_zd
    dy_base = dy_ptr + pid_b * s_dyb + offs_d[None, :] * s_dyd
    B_base = B_ptr + pid_b * s_Bb + offs_n[None, :] * s_Bn
    C_base = C_ptr + pid_b * s_Cb + offs_n[None, :] * s_Cn
    du_base = du_ptr + pid_b * s_gub + offs_d[None, :] * s_gud
    ddelta_base = ddelta_ptr + pid_b * s_gdb + offs_d[None, :] * s_gdd
    dz_base = dz_ptr + pid_b * s_gzb + offs_d[None, :] * s_gzd
    # dB, dC partial sums of this channel block: (channel blocks, b, n, l) fp32.
    grad_tn = (pid_d * tl.num_programs(0) + pid_b) * dstate * seqlen + offs_n[None, :] * seqlen
    state_offs = offs_n[:, None] + offs_d[None, :] * dstate
    # This program's scratch: the state before each chunk of the segment being processed (L2-resident).
    scratch = scratch_ptr + ((part * tl.num_programs(0) + pid_b) * tl.num_programs(1) + pid_d) \
        * SEG_CHUNKS * BLOCK_N * BLOCK_D + offs_n[:, None] * BLOCK_D + offs_d[None, :] - pid_d * BLOCK_D

    # carry = dA_{s+1} * g_{s+1} for the step s just before the chunk being processed: the gradient reaching the
    # chunk's last state from later steps. At the end of the sequence it is the last state's own gradient; at the
    # end of this part, the later parts' maps (pass 1) applied to that, last part first.
    if HAS_DLAST:
        carry = tl.load(dlast_ptr + pid_b * dim * dstate + state_offs, mask=mask_nd, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    seq_base = seq_ptr + pid_b * s_sb
    later = n_parts - 1
    while later > part:
        pofs = (pid_b * n_parts + later) * dim
        loc = tl.load(loc_ptr + pofs * dstate + state_offs, mask=mask_nd, other=0.0)
        dsum = tl.load(dsum_ptr + pofs + offs_d, mask=mask_d, other=0.0)
        through = tl.exp2(dsum[None, :] * A2) * carry
        if HAS_SEQ_IDX:
            # what reaches the part's end crosses it only when no document starts inside it, [s, e)
            s = later * part_segs * SEG_CHUNKS * BLOCK_L
            e = tl.minimum(s + part_segs * SEG_CHUNKS * BLOCK_L, seqlen)
            if tl.load(seq_base + (e - 1) * s_sl) != tl.load(seq_base + (s - 1) * s_sl):
                through = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        carry = loc + through
        later -= 1

    dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    seg_first = part * part_segs
    seg = tl.minimum(seg_first + part_segs, n_segs) - 1
    while seg >= seg_first:
        # 1. Forward through the segment from its saved first state, keeping each chunk's first state. The last
        # chunk's own states are not needed here (pass 2 recomputes them), only the state before it.
        c_first = seg * SEG_CHUNKS
        c_end = tl.minimum(c_first + SEG_CHUNKS, n_chunks)
        h = tl.load(seg_ptr + (pid_b * n_segs + seg) * dim * dstate + state_offs, mask=mask_nd, other=0.0)
        c = c_first
        t = c * BLOCK_L + offs_l
        more = (t < seqlen) & (t < (c_end - 1) * BLOCK_L)
        mask_td = more[:, None] & mask_d[None, :]
        mask_tn = more[:, None] & mask_n[None, :]
        u_next = tl.load(u_base + t[:, None] * s_ul, mask=mask_td, other=0.0)
        delta_next = tl.load(delta_base + t[:, None] * s_dl, mask=mask_td, other=0.0)
        B_next = tl.load(B_base + t[:, None] * s_Bl, mask=mask_tn, other=0.0)
        reset = offs_l < 0                              # (no document starts: read only with HAS_SEQ_IDX)
        if HAS_SEQ_IDX:
            seq_now_next, seq_before_next = _doc_starts(seq_base, t, seqlen, s_sl)
        while c < c_end - 1:
            tl.store(scratch + (c - c_first) * BLOCK_N * BLOCK_D, h)
            t = c * BLOCK_L + offs_l
            mask_td = (t < seqlen)[:, None] & mask_d[None, :]
            u = u_next.to(tl.float32)
            delta = delta_next.to(tl.float32)
            B = B_next.to(tl.float32)
            t_next = t + BLOCK_L
            more = (t_next < seqlen) & (t_next < (c_end - 1) * BLOCK_L)
            mask_td_next = more[:, None] & mask_d[None, :]
            mask_tn_next = more[:, None] & mask_n[None, :]
            u_next = tl.load(u_base + t_next[:, None] * s_ul, mask=mask_td_next, other=0.0)
            delta_next = tl.load(delta_base + t_next[:, None] * s_dl, mask=mask_td_next, other=0.0)
            B_next = tl.load(B_base + t_next[:, None] * s_Bl, mask=mask_tn_next, other=0.0)
            if HAS_SEQ_IDX:
                reset = seq_now_next != seq_before_next
                seq_now_next, seq_before_next = _doc_starts(seq_base, t_next, seqlen, s_sl)
            if HAS_BIAS:
                delta += bias[None, :]
            if SOFTPLUS:
                delta = _softplus(delta)
            delta = tl.where(mask_td, delta, 0.0)
            _, _, hs = _chunk_states(delta, u, B, A2, h, reset, HAS_SEQ_IDX)
            h = tl.sum(tl.where(offs_l[:, None, None] == BLOCK_L - 1, hs, 0.0), axis=0)
            c += 1
        tl.store(scratch + (c_end - 1 - c_first) * BLOCK_N * BLOCK_D, h)
        tl.debug_barrier()

        # 2. Backward through the segment's chunks, last first (chunk c - 1's loads issued before c's arithmetic).
        c = c_end - 1
        t = c * BLOCK_L + offs_l
        mask_td = (t < seqlen)[:, None] & mask_d[None, :]
        mask_tn = (t < seqlen)[:, None] & mask_n[None, :]
        mask_td1 = (t + 1 < seqlen)[:, None] & mask_d[None, :]
        u_next = tl.load(u_base + t[:, None] * s_ul, mask=mask_td, other=0.0)
        delta_next = tl.load(delta_base + t[:, None] * s_dl, mask=mask_td, other=0.0)
        delta1_next = tl.load(delta_base + (t + 1)[:, None] * s_dl, mask=mask_td1, other=0.0)
        dy_next = tl.load(dy_base + t[:, None] * s_dyl, mask=mask_td, other=0.0)
        B_next = tl.load(B_base + t[:, None] * s_Bl, mask=mask_tn, other=0.0)
        C_next = tl.load(C_base + t[:, None] * s_Cl, mask=mask_tn, other=0.0)
        if HAS_Z:
            z_next = tl.load(z_base + t[:, None] * s_zl, mask=mask_td, other=0.0)
        reset_after = offs_l < 0                        # (read only with HAS_SEQ_IDX)
        if HAS_SEQ_IDX:
            seq_now_next, seq_before_next = _doc_starts(seq_base, t, seqlen, s_sl)
            seq_after_next, seq_at_next = _doc_starts(seq_base, t + 1, seqlen, s_sl)
        while c >= c_first:
            t = c * BLOCK_L + offs_l
            mask_td = (t < seqlen)[:, None] & mask_d[None, :]
            mask_tn = (t < seqlen)[:, None] & mask_n[None, :]
            mask_td1 = (t + 1 < seqlen)[:, None] & mask_d[None, :]
            h0 = tl.load(scratch + (c - c_first) * BLOCK_N * BLOCK_D)                    # (BN, BD)
            u = u_next.to(tl.float32)                                                     # (BL, BD)
            delta_raw = delta_next.to(tl.float32)
            delta1 = delta1_next.to(tl.float32)                                           # delta_{t+1}
            dy = dy_next.to(tl.float32)
            B = B_next.to(tl.float32)                                                     # (BL, BN)
            C = C_next.to(tl.float32)
            if HAS_Z:
                zv = z_next.to(tl.float32)
            t_next = t - BLOCK_L
            more = (t_next >= c_first * BLOCK_L)
            mask_td_next = more[:, None] & mask_d[None, :]
            mask_tn_next = more[:, None] & mask_n[None, :]
            u_next = tl.load(u_base + t_next[:, None] * s_ul, mask=mask_td_next, other=0.0)
            delta_next = tl.load(delta_base + t_next[:, None] * s_dl, mask=mask_td_next, other=0.0)
            delta1_next = tl.load(delta_base + (t_next + 1)[:, None] * s_dl, mask=mask_td_next, other=0.0)
            dy_next = tl.load(dy_base + t_next[:, None] * s_dyl, mask=mask_td_next, other=0.0)
            B_next = tl.load(B_base + t_next[:, None] * s_Bl, mask=mask_tn_next, other=0.0)
            C_next = tl.load(C_base + t_next[:, None] * s_Cl, mask=mask_tn_next, other=0.0)
            if HAS_Z:
                z_next = tl.load(z_base + t_next[:, None] * s_zl, mask=mask_td_next, other=0.0)
            if HAS_SEQ_IDX:
                # a document starts at t (reset) or at t + 1 (reset_after: the adjoint's coefficient dA_{t+1} is 0)
                reset = seq_now_next != seq_before_next
                reset_after = seq_after_next != seq_at_next
                seq_now_next, seq_before_next = _doc_starts(seq_base, t_next, seqlen, s_sl)
                seq_after_next, seq_at_next = _doc_starts(seq_base, t_next + 1, seqlen, s_sl)
            if HAS_BIAS:
                delta_raw += bias[None, :]
                delta1 += bias[None, :]
            if SOFTPLUS:
                delta = _softplus(delta_raw)
                delta1 = _softplus(delta1)
            else:
                delta = delta_raw
            delta = tl.where(mask_td, delta, 0.0)
            delta1 = tl.where(mask_td1, delta1, 0.0)

            # The chunk's states again, exactly as the forward made them.
            _, x, hs = _chunk_states(delta, u, B, A2, h0, reset, HAS_SEQ_IDX)   # (BL, BN, BD) each

            # Through the gate: y = y_pre * silu(z), y_pre = <h, C> + D u.
            if HAS_Z:
                y_pre = tl.sum(hs * C[:, :, None], axis=1)
                if HAS_D:
                    y_pre += Dv[None, :] * u
                sig = tl.sigmoid(zv)
                dz = dy * y_pre * sig * (1.0 + zv * (1.0 - sig))
                tl.store(dz_base + t[:, None] * s_gzl, dz.to(dz_ptr.dtype.element_ty), mask=mask_td)
                dy = dy * zv * sig
            dy = tl.where(mask_td, dy, 0.0)                                       # dy' (BL, BD)
            # dC now, so that of h_t only h_t - x_t = dA_t h_{t-1} stays live (registers are the limit here).
            dC = tl.sum(hs * dy[:, None, :], axis=2)                              # (BL, BN)
            hs -= x

            # Adjoint states g_t = dL/dh_t = C_t dy'_t + dA_{t+1} g_{t+1}, from the chunk's end backwards. Each
            # step's coefficient is the *next* step's decay, made from delta_{t+1}; the last step's is folded
            # into carry already, so it is 1.
            decay_next = tl.exp2(delta1[:, None, :] * A2[None, :, :])              # (BL, BN, BD) dA_{t+1}
            if HAS_SEQ_IDX:
                decay_next = tl.where(reset_after[:, None, None], 0.0, decay_next)
            decay_next = tl.where(offs_l[:, None, None] == BLOCK_L - 1, 1.0, decay_next)
            q = C[:, :, None] * dy[:, None, :]                                    # (BL, BN, BD)
            # A reverse scan as a forward scan between two flips: flipping an axis held in registers is free,
            # while Triton 3.6 lowers reverse=True with ~600 warp shuffles per chunk here (sm_90 SASS).
            a_cum, q_cum = tl.associative_scan((tl.flip(decay_next, 0), tl.flip(q, 0)), 0, _adjoint_combine)
            a_cum = tl.flip(a_cum, 0)
            q_cum = tl.flip(q_cum, 0)
            g = q_cum + a_cum * carry[None, :, :]                                 # (BL, BN, BD)
            delta0 = tl.sum(tl.where(offs_l[:, None] == 0, delta, 0.0), axis=0)   # (BD,) the chunk's first delta
            carry = tl.exp2(delta0[None, :] * A2) * tl.sum(tl.where(offs_l[:, None, None] == 0, g, 0.0), axis=0)
            if HAS_SEQ_IDX:
                reset0 = tl.sum(tl.where(offs_l == 0, reset.to(tl.int32), 0), axis=0)     # the chunk starts one
                carry = tl.where(reset0 != 0, 0.0, carry)

            # Per-step gradients. g * (h_t - x_t) = g_t * dA_t * h_{t-1}: the part that flows through the decay.
            gh = g * hs                                                           # (BL, BN, BD)
            gB = tl.sum(g * B[:, :, None], axis=1)                                # (BL, BD)
            ddelta = gB * u + tl.sum(gh * A[None, :, :], axis=1)
            du = gB * delta
            if HAS_D:
                du += Dv[None, :] * dy
                dD_acc += tl.sum(dy * u, axis=0)
            if SOFTPLUS:
                ddelta *= tl.sigmoid(delta_raw)
            ddelta = tl.where(mask_td, ddelta, 0.0)
            dbias_acc += tl.sum(ddelta, axis=0)
            dA_acc += tl.sum(gh * delta[:, None, :], axis=0)
            tl.store(du_base + t[:, None] * s_gul, du.to(du_ptr.dtype.element_ty), mask=mask_td)
            tl.store(ddelta_base + t[:, None] * s_gdl, ddelta.to(ddelta_ptr.dtype.element_ty), mask=mask_td)

            # dB, dC: summed over this program's channels here, over channel blocks by the launcher.
            dB = tl.sum(g * (delta * u)[:, None, :], axis=2)                       # (BL, BN)
            tl.store(dB_ptr + grad_tn + t[:, None], dB, mask=mask_tn)
            tl.store(dC_ptr + grad_tn + t[:, None], dC, mask=mask_tn)
            c -= 1
        tl.debug_barrier()             # the next segment overwrites the scratch
        seg -= 1

    tl.atomic_add(dA_ptr + state_offs, dA_acc, mask=mask_nd)
    if HAS_D:
        tl.atomic_add(dD_ptr + offs_d, dD_acc, mask=mask_d)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + offs_d, dbias_acc, mask=mask_d)


def _config(dim: int, dstate: int, seqlen: int, per_thread: int, warps: int) -> dict:
    """Block sizes. One thread owns one channel's (chunk, n) tile, or a slice of it when the tile is larger than
    per_thread elements, so that the scan over time and the sum over n stay inside the thread (or a few lanes);
    a program is `warps` warps of such threads."""
    block_n = triton.next_power_of_2(dstate)
    # Shorter chunks for large n, so that a channel's tile fits a warp (the forward and backward must agree on it).
    block_l = min(CHUNK_LEN, triton.next_power_of_2(max(seqlen, 1)), max(1, 1024 // block_n))
    lanes_per_channel = max(1, min(32, block_n * block_l // per_thread))
    block_d = max(1, min(warps * 32 // lanes_per_channel, triton.next_power_of_2(dim)))
    return dict(BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=block_l,
                num_warps=max(1, min(warps, block_d * lanes_per_channel // 32)))


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


def _seq_arg(seq_idx, u):
    """seq_idx (b, l) int32 and its strides, or u as a never-read placeholder (HAS_SEQ_IDX=False)."""
    if seq_idx is None:
        return u, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_segs, seq_idx=None):
    """Launch the forward (seq_idx: (b, l) int32 or None, see kernels/documents.py). Returns y (b, d, l) in u's dtype and memory layout, the last state (b, d, n) fp32, the
    segment-start states (b, segments, d, n) fp32 (None unless save_segs) and the block config."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    cfg = _config(dim, dstate, seqlen, FWD_PER_THREAD, FWD_WARPS)
    n_chunks = triton.cdiv(seqlen, cfg["BLOCK_L"])
    n_segs = triton.cdiv(n_chunks, SEG_CHUNKS)
    y = torch.empty_like(u)                    # u's stride order: (b, l, d) storage in, (b, l, d) storage out
    last = torch.empty(batch, dim, dstate, device=u.device, dtype=torch.float32)
    segs = torch.empty(batch, n_segs, dim, dstate, device=u.device, dtype=torch.float32) if save_segs else last
    zz = z if z is not None else u
    seq, s_sb, s_sl = _seq_arg(seq_idx, u)
    grid = (batch, triton.cdiv(dim, cfg["BLOCK_D"]))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, seq,
        y, last, segs,
        dim, seqlen, dstate, n_chunks, n_segs,
        *_strides(u), *_strides(delta), A.stride(0), A.stride(1), *_strides(B), *_strides(C), *_strides(zz),
        *_strides(y), s_sb, s_sl,
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        SAVE_SEGS=save_segs, SEG_CHUNKS=SEG_CHUNKS, HAS_SEQ_IDX=seq_idx is not None, **cfg,
    )
    return y, last, (segs if save_segs else None), cfg


def _num_parts(programs: int, n_segs: int) -> int:
    """Parts of the sequence the backward runs in parallel: enough programs to fill the GPU (TARGET_PROGRAMS),
    whole segments each."""
    wanted = max(1, min(n_segs, triton.cdiv(TARGET_PROGRAMS, max(programs, 1))))
    return triton.cdiv(n_segs, triton.cdiv(n_segs, wanted))


def _scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, segs, dy, dlast, seq_idx=None):
    """Launch the backward. Returns the gradients of (u, delta, A, B, C, D, z, delta_bias), None where absent;
    du, ddelta and dz in the memory layout of u, delta and z."""
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    cfg = _config(dim, dstate, seqlen, BWD_PER_THREAD, BWD_WARPS)
    n_chunks = triton.cdiv(seqlen, cfg["BLOCK_L"])
    n_segs = segs.shape[1]
    du = torch.empty_like(u)
    ddelta = torch.empty_like(delta)
    dz = torch.empty_like(z) if z is not None else None
    f32 = dict(device=u.device, dtype=torch.float32)
    dA = torch.zeros(dim, dstate, **f32)
    # One partial dB and dC per channel block, summed below. (With fp32 atomics into one (b, n, l) buffer the H100's
    # forward+backward took 3.61 ms against 3.21: every channel block adds to the same addresses at the same time.)
    n_dblocks = triton.cdiv(dim, cfg["BLOCK_D"])
    dB = torch.empty(n_dblocks, batch, dstate, seqlen, **f32)
    dC = torch.empty(n_dblocks, batch, dstate, seqlen, **f32)
    dD = torch.zeros(dim, **f32) if D is not None else None
    dbias = torch.zeros(dim, **f32) if delta_bias is not None else None
    n_parts = _num_parts(batch * n_dblocks, n_segs)
    part_segs = triton.cdiv(n_segs, n_parts)
    zz = z if z is not None else u
    seq, s_sb, s_sl = _seq_arg(seq_idx, u)
    flags = dict(HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
                 HAS_SEQ_IDX=seq_idx is not None)
    loc = torch.empty(batch, n_parts, dim, dstate, **f32)
    dsum = torch.empty(batch, n_parts, dim, **f32)
    if n_parts > 1:
        _scan_bwd_carry_kernel[(batch, n_dblocks, n_parts - 1)](
            delta, A, C, zz, delta_bias if delta_bias is not None else A, dy, seq, loc, dsum,
            dim, seqlen, dstate, n_chunks, part_segs * SEG_CHUNKS, n_parts,
            *_strides(delta), A.stride(0), A.stride(1), *_strides(C), *_strides(zz), *_strides(dy), s_sb, s_sl,
            **flags, **cfg,
        )
    grid = (batch, n_dblocks, n_parts)
    scratch = torch.empty(n_parts * batch * n_dblocks * SEG_CHUNKS * cfg["BLOCK_N"] * cfg["BLOCK_D"], **f32)
    dzz = dz if dz is not None else du
    _scan_bwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, zz, delta_bias if delta_bias is not None else A, dy, seq,
        segs, dlast if dlast is not None else A, loc, dsum, scratch,
        du, ddelta, dzz, dA, dB, dC, dD if dD is not None else dA, dbias if dbias is not None else dA,
        dim, seqlen, dstate, n_chunks, n_segs, part_segs, n_parts,
        *_strides(u), *_strides(delta), A.stride(0), A.stride(1), *_strides(B), *_strides(C), *_strides(zz),
        *_strides(dy), *_strides(du), *_strides(ddelta), *_strides(dzz), s_sb, s_sl,
        HAS_D=D is not None, HAS_DLAST=dlast is not None, SEG_CHUNKS=SEG_CHUNKS, **flags, **cfg,
        **({} if BWD_MAXNREG is None else dict(maxnreg=BWD_MAXNREG)),
    )
    return (du, ddelta, dA.to(A.dtype), dB.sum(0).to(B.dtype), dC.sum(0).to(C.dtype),
            dD.to(D.dtype) if D is not None else None, dz,
            dbias.to(delta_bias.dtype) if delta_bias is not None else None)


# ---------------------------------------------------------------- autograd: a torch custom op pair
#
# The forward and backward launchers are registered as torch custom ops, with fake (meta) versions that give every
# output's shape and strides, so that torch.compile keeps a model that calls the scan in one graph (no graph break)
# and schedules the kernels itself. Eager calls go through the same ops.

def _num_segs(dim: int, dstate: int, seqlen: int) -> int:
    cfg = _config(dim, dstate, seqlen, FWD_PER_THREAD, FWD_WARPS)
    return triton.cdiv(triton.cdiv(seqlen, cfg["BLOCK_L"]), SEG_CHUNKS)


@torch.library.custom_op("mamba_trainer::selective_scan_fwd", mutates_args=())
def selective_scan_fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                          delta_softplus: bool, save_segs: bool, seq_idx: Optional[torch.Tensor] = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (u's layout), the last state (b, d, n) fp32 and the segment-start states the backward restarts from
    ((b, segments, d, n) fp32; an empty tensor unless save_segs). seq_idx: (b, l) int32 documents, or None."""
    y, last, segs, _ = _scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_segs, seq_idx)
    return y, last, segs if segs is not None else last.new_empty(0)


@selective_scan_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_segs, seq_idx=None):
    batch, dim, seqlen = u.shape
    dstate = A.shape[1]
    last = u.new_empty(batch, dim, dstate, dtype=torch.float32)
    segs = (u.new_empty(batch, _num_segs(dim, dstate, seqlen), dim, dstate, dtype=torch.float32) if save_segs
            else u.new_empty(0, dtype=torch.float32))
    return torch.empty_like(u), last, segs


@torch.library.custom_op("mamba_trainer::selective_scan_bwd", mutates_args=())
def selective_scan_bwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: Optional[torch.Tensor], z: Optional[torch.Tensor], delta_bias: Optional[torch.Tensor],
                          delta_softplus: bool, segs: torch.Tensor, dy: torch.Tensor,
                          dlast: Optional[torch.Tensor], seq_idx: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    """The gradients of (u, delta, A, B, C) and, where given, of D, z, delta_bias (in that order)."""
    du, ddelta, dA, dB, dC, dD, dz, dbias = _scan_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, segs,
                                                      dy, dlast, seq_idx)
    return [du, ddelta, dA, dB, dC] + [g for g in (dD, dz, dbias) if g is not None]


@selective_scan_bwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, segs, dy, dlast, seq_idx=None):
    grads = [torch.empty_like(u), torch.empty_like(delta), torch.empty_like(A),
             B.new_empty(B.shape), C.new_empty(C.shape)]
    return grads + [torch.empty_like(t) for t in (D, z, delta_bias) if t is not None]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, save_segs, seq_idx = inputs
    ctx.delta_softplus = delta_softplus
    ctx.present = (D is not None, z is not None, delta_bias is not None)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[2], seq_idx)


def _backward(ctx, dy, dlast, _dsegs):
    u, delta, A, B, C, D, z, delta_bias, segs, seq_idx = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(u)
    grads = iter(selective_scan_bwd_op(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, segs, dy,
                                       dlast.contiguous() if dlast is not None else None, seq_idx))
    du, ddelta, dA, dB, dC = (next(grads) for _ in range(5))
    dD, dz, dbias = (next(grads) if present else None for present in ctx.present)
    return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None


selective_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, seq_idx=None):
    """Fused Triton selective scan; the signature and semantics of kernels/reference.py's selective_scan_ref.

    Args:
        u, delta: (b, d, l) fp32, bf16 or fp16 (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1)
        A: (d, n) fp32;  B, C: (b, n, l);  D, delta_bias: (d,) or None;  z: (b, d, l) or None
        seq_idx: (b, l) int32 or None; the document index of each token (kernels/documents.py)
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state also the last state (b, d, n) fp32 (the last document's)
    """
    if u.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"the Triton scan needs CUDA tensors (got {u.device.type}); set TRITON_INTERPRET=1 to "
                           "run it on the CPU, or use backend='chunked'")
    if A.shape[1] > 256:
        raise ValueError(f"the Triton scan supports d_state 1 to 256, got {A.shape[1]}; use backend='chunked'")
    batch, dim, seqlen = u.shape
    if batch == 0 or dim == 0 or seqlen == 0:           # nothing to scan: no kernel launch on an empty grid
        y = u.new_zeros(u.shape)
        last = u.new_zeros(batch, dim, A.shape[1], dtype=torch.float32)
        return (y, last) if return_last_state else y
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (u, delta, A, B, C, D, z, delta_bias))
    if seq_idx is None:                                 # the op as it was: one document per row
        y, last, _ = selective_scan_fwd_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, needs_grad)
    else:
        y, last, _ = selective_scan_fwd_op(u, delta, A, B, C, D, z, delta_bias, delta_softplus, needs_grad,
                                           seq_idx.to(torch.int32))
    return (y, last) if return_last_state else y
