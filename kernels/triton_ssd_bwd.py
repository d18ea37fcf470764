"""The SSD scan's backward (Mamba-2) as Triton kernels: every gradient of kernels/triton_ssd.py's forward.

Shape letters as in kernels/triton_ssd.py: b batch, l length, c chunks of Q steps, h heads, p headdim, g ngroups
(r = h / g heads per group), n d_state; t a step that reads (an output row), s a step that writes (an input).
Per batch row, head and chunk (acum the within-chunk cumulative sum of a = dt * A, acum_end its last value, H_c the
state entering chunk c, dY the gradient of y before the gate, dS_c that of the state chunk c leaves):

    forward                                               what the backward needs of it
    S_c = sum_s exp(acum_end - acum_s) dt_s x_s^T B_s     dx, dB, ddt from dS_c
    H_{c+1} = exp(acum_end) H_c + S_c                     dS_c = G_{c+1}, G_c = dH_c + exp(acum_end) G_{c+1}
    y_t = exp(acum_t) C_t H_c^T                           dC, dH_c = sum_t exp(acum_t) dY_t^T C_t
        + sum_{s<=t} CB[t,s] exp(acum_t - acum_s) dt_s x_s   (CB = C B^T)   dx, dC, dB (through dCB), ddt
        + D x_t

The gradient of a_k = dt_k A (da_k, then ddt_k += A da_k and dA = sum da_k dt_k) is gathered from pieces that
each kernel owns outright (no atomics, deterministic), written so that nothing cancels:
    - within the chunk, M[t,s] = CB[t,s] exp(acum_t - acum_s) dt_s (dY_t . x_s) moves with a_k for s < k <= t:
      M's row sums strictly below the diagonal enter acum_t with +, its column sums acum_s with - (kernel 5, fp32;
      M[t,t] would enter both and cancel, so it is left out), and da is their reverse cumulative sum;
    - the state -> output term enters acum_t as C_t . (its dC_t), per head (kernel 6), likewise;
    - the chunk state's exp(acum_end - acum_s) moves with a_k for s < k: da_k += sum_{s<k} dt_s u_s, with u_s the
      chunk state's part of ddt_s (kernel 4), a prefix sum, not acum_end's total minus acum_s's own term;
    - the state passing's exp(acum_end) gives acum_end exp(acum_end) sum(G_{c+1} * H_c) (kernel 3).
With very negative dt * A every decay is 0 and so is every piece, exactly (a difference of acum_end's and acum_s's
terms would leave fp32 rounding there, times |A|).

Kernels, in launch order (the forward's steps 1-3 are relaunched first for dt, acum and the states H_c, which
are cheap; the chunk scan, the forward's costly step, is not):
    1. _gate_bwd_kernel              only with z: dY = dy silu(z), dz from the saved ungated y
    2. _dstates_kernel               dH_c (b, c, h, p, n) fp32 = sum_t exp(acum_t) dY_t^T C_t
    3. _state_passing_bwd_kernel     in place: dH_c -> dS_c, backwards over chunks; d initial state; acum_end's part
    4. _dx_kernel                    dx, the direct part of ddt, dD: per head and block of steps s, over t >= s
    5. _dcb_kernel                   dCB[t,s] = sum over the group's heads of exp(acum_t - acum_s) dt_s dY_t . x_s,
                                     (b, c, g, Q, Q) fp32, and M's row and column sums per head
    6. _dc_kernel                    dC = dCB B + sum_h exp(acum_t) dY_t H_c (per group, over its heads)
    7. _db_kernel                    dB = dCB^T C + sum_h exp(acum_end - acum_s) dt_s x_s dS_c
    8. _dt_bwd_kernel                acum's gradient -> da (reverse cumsum) -> ddt, dA, d dt_bias through the
                                     softplus and dt_limit's clamp
Packed rows (seq_idx, constexpr HAS_SEQ_IDX): every decay the forward masks at a document start is masked the same
way here (kernels 2-7; see kernels/triton_ssd.py), so its gradients vanish with it: no piece of acum's gradient
then spans a start, and a_k at a document's first step (which the forward never uses) gets none.

Partial sums over blocks (dD, dA, d dt_bias; the pieces of acum's gradient) go to small fp32 buffers, one slot
per block, and are added up afterwards. Dot operands are in x's dtype (bf16 on tensor cores for bf16 inputs) with
fp32 accumulation, as in the forward; elementwise work is fp32 in registers.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .backends import triton_interpreting
from .triton_ssd import _config, _dot, _seq_args, _softplus, _ssd_states, _state_block


@triton.jit
def _gate_bwd_kernel(dy_ptr, z_ptr, y_pre_ptr, dY_ptr, dz_ptr, numel, BLOCK: tl.constexpr):
    # y = y_pre * silu(z), all (b, l, h, p) contiguous
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y_pre = tl.load(y_pre_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(z)
    tl.store(dY_ptr + offs, (dy * z * sig).to(dY_ptr.dtype.element_ty), mask=mask)
    tl.store(dz_ptr + offs, (dy * y_pre * sig * (1.0 + z * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dstates_kernel(
    dY_ptr, C_ptr, acum_ptr, dstates_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
    s_yb, s_yl, s_yh, s_yp, s_Cb, s_Cl, s_Cg, s_Cn, s_sb, s_sl,
    HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_ROUNDTRIP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dH_c[p, n] = sum_t exp(acum_t) dY_t[p] C_t[n]: the gradient of the state entering chunk c from its outputs
    pid_pn = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    pid_b = pid_bh // nheads
    pid_h = pid_bh % nheads
    pid_g = pid_h // heads_per_group
    n_pblocks = tl.cdiv(headdim, BLOCK_P)
    offs_p = (pid_pn % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = (pid_pn // n_pblocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    dot_t = dY_ptr.dtype.element_ty

    chunk_base = (pid_b * nheads + pid_h) * nchunks * chunk_size + pid_c * chunk_size   # into (b, h, c, Q)
    dY_base = dY_ptr + pid_b * s_yb + pid_h * s_yh
    C_base = C_ptr + pid_b * s_Cb + pid_g * s_Cg
    if HAS_SEQ_IDX:        # H_c reaches only the steps of the document of the step before the chunk
        seq_prev = tl.load(seq_ptr + pid_b * s_sb + tl.maximum(pid_c * chunk_size - 1, 0) * s_sl)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    k = 0
    while k < chunk_size:
        offs_k = k + tl.arange(0, BLOCK_K)
        offs_t = pid_c * chunk_size + offs_k
        mask_k = (offs_k < chunk_size) & (offs_t < seqlen)
        keep = mask_k
        if HAS_SEQ_IDX:
            keep = keep & (tl.load(seq_ptr + pid_b * s_sb + offs_t * s_sl, mask=mask_k, other=-1) == seq_prev)
        dYT = tl.load(dY_base + offs_t[None, :] * s_yl + offs_p[:, None] * s_yp,
                      mask=mask_p[:, None] & mask_k[None, :], other=0.0)                 # (BP, BK)
        Ck = tl.load(C_base + offs_t[:, None] * s_Cl + offs_n[None, :] * s_Cn,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)                  # (BK, BN)
        acum = tl.load(acum_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
        scale = tl.exp(tl.where(keep, acum, float("-inf")))                               # (BK,)
        acc += _dot(dYT.to(tl.float32) * scale[None, :], Ck, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
        k += BLOCK_K

    out = ((pid_b * nchunks + pid_c) * nheads + pid_h) * headdim * dstate                # (b, c, h, p, n)
    tl.store(dstates_ptr + out + offs_p[:, None] * dstate + offs_n[None, :], acc,
             mask=mask_p[:, None] & mask_n[None, :])


@triton.jit
def _state_passing_bwd_kernel(
    dstates_ptr, states_ptr, acum_ptr, dfinal_ptr, dinit_ptr, dend_ptr, seq_ptr,
    seqlen, nheads, chunk_size, nchunks, state_size, s_sb, s_sl,
    HAS_DFINAL: tl.constexpr, HAS_INIT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK: tl.constexpr,
):
    # Backwards over the chunks: G_c, the gradient of H_c, is dH_c + exp(acum_end_c) G_{c+1}, from G_nc = dfinal.
    # dS_c = G_{c+1} overwrites dH_c; acum_end_c's gradient through the state passing is
    # exp(acum_end_c) sum(G_{c+1} * H_c), one partial sum per block of state elements.
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_b = pid_bh // nheads
    pid_h = pid_bh % nheads
    n_sblocks = tl.num_programs(0)
    offs = pid_s * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    if HAS_DFINAL:
        G = tl.load(dfinal_ptr + pid_bh * state_size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        G = tl.zeros((BLOCK,), dtype=tl.float32)
    acum_last = acum_ptr + pid_bh * nchunks * chunk_size + chunk_size - 1                # (b, h, c, Q)[..., Q-1]
    c = nchunks - 1
    while c >= 0:
        ptr = ((pid_b * nchunks + c) * nheads + pid_h) * state_size + offs                 # (b, c, h, p * n)
        H = tl.load(states_ptr + ptr, mask=mask, other=0.0)                                 # H_c
        a_end = tl.load(acum_last + c * chunk_size)
        if HAS_SEQ_IDX:    # the forward's mask: 0 where a document starts in chunk c
            seq_end = tl.load(seq_ptr + pid_b * s_sb + (tl.minimum((c + 1) * chunk_size, seqlen) - 1) * s_sl)
            seq_prev = tl.load(seq_ptr + pid_b * s_sb + tl.maximum(c * chunk_size - 1, 0) * s_sl)
            a_end = tl.where(seq_end == seq_prev, a_end, float("-inf"))
        decay = tl.exp(a_end)
        tl.store(dend_ptr + (pid_bh * nchunks + c) * n_sblocks + pid_s, decay * tl.sum(G * H, axis=0))
        dH = tl.load(dstates_ptr + ptr, mask=mask, other=0.0)
        tl.store(dstates_ptr + ptr, G, mask=mask)                                           # dS_c
        G = dH + decay * G
        c -= 1
    if HAS_INIT:
        tl.store(dinit_ptr + pid_bh * state_size + offs, G.to(dinit_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dx_kernel(
    x_ptr, B_ptr, C_ptr, dY_ptr, dt_ptr, acum_ptr, dstates_ptr, D_ptr, dx_ptr, ddt_part_ptr, dD_part_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
    s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn, s_yb, s_yl, s_yh, s_yp, s_sb, s_sl,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BF16_ROUNDTRIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # For a block of input steps s: g_s = exp(acum_end - acum_s) dS_c B_s + sum_{t >= s} CB[t,s] exp(acum_t - acum_s)
    # dY_t, the gradient of dt_s x_s; then dx_s = dt_s g_s + D dY_s and ddt_s's direct part x_s . g_s.
    pid_mp = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    pid_b = pid_bh // nheads
    pid_h = pid_bh % nheads
    pid_g = pid_h // heads_per_group
    n_pblocks = tl.cdiv(headdim, BLOCK_P)
    pid_m = pid_mp // n_pblocks
    pid_p = pid_mp % n_pblocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                    # steps s in the chunk
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    offs_tm = pid_c * chunk_size + offs_m
    mask_m = (offs_m < chunk_size) & (offs_tm < seqlen)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    dot_t = x_ptr.dtype.element_ty

    chunk_base = (pid_b * nheads + pid_h) * nchunks * chunk_size + pid_c * chunk_size   # into (b, h, c, Q)
    acum_m = tl.load(acum_ptr + chunk_base + offs_m, mask=mask_m, other=0.0)
    dt_m = tl.load(dt_ptr + chunk_base + offs_m, mask=mask_m, other=0.0)
    acum_end = tl.load(acum_ptr + chunk_base + chunk_size - 1)
    Bm = tl.load(B_ptr + pid_b * s_Bb + pid_g * s_Bg + offs_tm[:, None] * s_Bl + offs_n[None, :] * s_Bn,
                 mask=mask_m[:, None] & mask_n[None, :], other=0.0)                     # (BM, BN)

    # through the chunk's state: exp(acum_end - acum_s) B_s dS_c^T
    dST = tl.load(dstates_ptr + ((pid_b * nchunks + pid_c) * nheads + pid_h) * headdim * dstate
                  + offs_p[None, :] * dstate + offs_n[:, None],
                  mask=mask_n[:, None] & mask_p[None, :], other=0.0)                     # (BN, BP) fp32
    acc = _dot(Bm, dST, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
    keep_m = mask_m
    if HAS_SEQ_IDX:        # only the chunk's last document reaches its end
        seq_m = tl.load(seq_ptr + pid_b * s_sb + offs_tm * s_sl, mask=mask_m, other=-1)
        seq_end = tl.load(seq_ptr + pid_b * s_sb + (tl.minimum((pid_c + 1) * chunk_size, seqlen) - 1) * s_sl)
        keep_m = keep_m & (seq_m == seq_end)
    acc = acc * tl.exp(tl.where(keep_m, acum_end - acum_m, float("-inf")))[:, None]      # (BM, BP)
    mask_mp = mask_m[:, None] & mask_p[None, :]
    xm = tl.load(x_ptr + pid_b * s_xb + pid_h * s_xh + offs_tm[:, None] * s_xl + offs_p[None, :] * s_xp,
                 mask=mask_mp, other=0.0).to(tl.float32)
    # (b, h, c, 2, p-block, Q): this p-block's part of ddt's direct term [0], and of the chunk state's share of it
    # [1] (which acum's gradient needs alone); every step of the chunk is written
    ddt_part = (((pid_b * nheads + pid_h) * nchunks + pid_c) * 2 * n_pblocks + pid_p) * chunk_size + offs_m
    tl.store(ddt_part_ptr + n_pblocks * chunk_size + ddt_part, tl.sum(acc * xm, axis=1), mask=offs_m < chunk_size)

    # within the chunk: the outputs t >= s, blocks of BLOCK_K steps t from this block's first step
    C_base = C_ptr + pid_b * s_Cb + pid_g * s_Cg
    dY_base = dY_ptr + pid_b * s_yb + pid_h * s_yh
    k = pid_m * BLOCK_M
    while k < chunk_size:
        offs_k = k + tl.arange(0, BLOCK_K)
        offs_tk = pid_c * chunk_size + offs_k
        mask_k = (offs_k < chunk_size) & (offs_tk < seqlen)
        CT = tl.load(C_base + offs_tk[None, :] * s_Cl + offs_n[:, None] * s_Cn,
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)                  # (BN, BK)
        CBT = _dot(Bm, CT, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)                         # (BM, BK): [s, t]
        acum_k = tl.load(acum_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
        causal = (offs_k[None, :] >= offs_m[:, None]) & mask_m[:, None] & mask_k[None, :]
        if HAS_SEQ_IDX:    # and s, t of one document
            seq_k = tl.load(seq_ptr + pid_b * s_sb + offs_tk * s_sl, mask=mask_k, other=-1)
            causal = causal & (seq_m[:, None] == seq_k[None, :])
        decay = tl.exp(tl.where(causal, acum_k[None, :] - acum_m[:, None], float("-inf")))
        dYk = tl.load(dY_base + offs_tk[:, None] * s_yl + offs_p[None, :] * s_yp,
                      mask=mask_k[:, None] & mask_p[None, :], other=0.0)                 # (BK, BP)
        acc += _dot(CBT * decay, dYk, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
        k += BLOCK_K

    tl.store(ddt_part_ptr + ddt_part, tl.sum(acc * xm, axis=1), mask=offs_m < chunk_size)
    dx = acc * dt_m[:, None]
    if HAS_D:
        dYm = tl.load(dY_base + offs_tm[:, None] * s_yl + offs_p[None, :] * s_yp, mask=mask_mp,
                      other=0.0).to(tl.float32)
        if D_PER_CHANNEL:
            dx += dYm * tl.load(D_ptr + pid_h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)[None, :]
        else:
            dx += dYm * tl.load(D_ptr + pid_h).to(tl.float32)
        # (b, c, m-block, h, p): sum over this block's steps of dY x
        n_mblocks = tl.cdiv(chunk_size, BLOCK_M)
        dD_row = ((pid_b * nchunks + pid_c) * n_mblocks + pid_m) * nheads + pid_h
        tl.store(dD_part_ptr + dD_row * headdim + offs_p, tl.sum(dYm * xm, axis=0), mask=mask_p)
    tl.store(dx_ptr + pid_b * s_xb + pid_h * s_xh + offs_tm[:, None] * s_xl + offs_p[None, :] * s_xp,
             dx.to(dx_ptr.dtype.element_ty), mask=mask_mp)


@triton.jit
def _dcb_kernel(
    x_ptr, B_ptr, C_ptr, dY_ptr, dt_ptr, acum_ptr, dcb_ptr, dacum_rows_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, ngroups,
    s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn, s_yb, s_yl, s_yh, s_yp, s_sb, s_sl,
    HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_ROUNDTRIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # One (BM x BK) block of (t, s) on or below the diagonal of one group's chunk: dCB[t,s] = sum over the group's
    # heads of exp(acum_t - acum_s) dt_s (dY_t . x_s), and per head the row sums (into acum_t) and minus the column
    # sums (into acum_s) of M = CB * that head's term, strictly below the diagonal (M[t,t] enters both and cancels).
    pid_ts = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bg = tl.program_id(2)
    pid_b = pid_bg // ngroups
    pid_g = pid_bg % ngroups
    n_kblocks = tl.cdiv(chunk_size, BLOCK_K)
    pid_m = pid_ts // n_kblocks
    pid_k = pid_ts % n_kblocks
    if pid_k * BLOCK_K < (pid_m + 1) * BLOCK_M:          # blocks wholly above the diagonal: nothing to do
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                # output steps t
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)                                # input steps s
        offs_n = tl.arange(0, BLOCK_N)
        offs_tm = pid_c * chunk_size + offs_m
        offs_tk = pid_c * chunk_size + offs_k
        mask_m = (offs_m < chunk_size) & (offs_tm < seqlen)
        mask_k = (offs_k < chunk_size) & (offs_tk < seqlen)
        mask_n = offs_n < dstate
        dot_t = x_ptr.dtype.element_ty
        Cm = tl.load(C_ptr + pid_b * s_Cb + pid_g * s_Cg + offs_tm[:, None] * s_Cl + offs_n[None, :] * s_Cn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)                 # (BM, BN)
        BT = tl.load(B_ptr + pid_b * s_Bb + pid_g * s_Bg + offs_tk[None, :] * s_Bl + offs_n[:, None] * s_Bn,
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)                 # (BN, BK)
        CB = _dot(Cm, BT, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)                         # (BM, BK)
        causal = (offs_m[:, None] >= offs_k[None, :]) & mask_m[:, None] & mask_k[None, :]
        if HAS_SEQ_IDX:    # and s, t of one document
            seq_m = tl.load(seq_ptr + pid_b * s_sb + offs_tm * s_sl, mask=mask_m, other=-1)
            seq_k = tl.load(seq_ptr + pid_b * s_sb + offs_tk * s_sl, mask=mask_k, other=-1)
            causal = causal & (seq_m[:, None] == seq_k[None, :])
        CB = tl.where(offs_m[:, None] > offs_k[None, :], CB, 0.0)                       # for M: strictly below
        n_mblocks = tl.cdiv(chunk_size, BLOCK_M)
        dcb = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        h = pid_g * heads_per_group
        while h < (pid_g + 1) * heads_per_group:
            chunk_base = (pid_b * nheads + h) * nchunks * chunk_size + pid_c * chunk_size
            acum_m = tl.load(acum_ptr + chunk_base + offs_m, mask=mask_m, other=0.0)
            acum_k = tl.load(acum_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
            dt_k = tl.load(dt_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
            dYx = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            p = 0
            while p < headdim:
                offs_p = p + tl.arange(0, BLOCK_P)
                mask_p = offs_p < headdim
                dYm = tl.load(dY_ptr + pid_b * s_yb + h * s_yh + offs_tm[:, None] * s_yl + offs_p[None, :] * s_yp,
                              mask=mask_m[:, None] & mask_p[None, :], other=0.0)        # (BM, BP)
                xT = tl.load(x_ptr + pid_b * s_xb + h * s_xh + offs_tk[None, :] * s_xl + offs_p[:, None] * s_xp,
                             mask=mask_p[:, None] & mask_k[None, :], other=0.0)         # (BP, BK)
                dYx += _dot(dYm, xT, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
                p += BLOCK_P
            decay = tl.exp(tl.where(causal, acum_m[:, None] - acum_k[None, :], float("-inf")))
            dcb_h = dYx * decay * dt_k[None, :]
            # (b, h, c, n_kblocks + 1 + n_mblocks slots, Q): slot pid_k this block's row sums, slot
            # n_kblocks + 1 + pid_m minus its column sums
            M = CB * dcb_h
            slots = ((pid_b * nheads + h) * nchunks + pid_c) * (n_kblocks + 1 + n_mblocks)
            tl.store(dacum_rows_ptr + (slots + pid_k) * chunk_size + offs_m, tl.sum(M, axis=1),
                     mask=offs_m < chunk_size)
            tl.store(dacum_rows_ptr + (slots + n_kblocks + 1 + pid_m) * chunk_size + offs_k, -tl.sum(M, axis=0),
                     mask=offs_k < chunk_size)
            dcb += dcb_h
            h += 1
        # (b, c, g, Q, Q) fp32
        out = dcb_ptr + ((pid_b * nchunks + pid_c) * ngroups + pid_g) * chunk_size * chunk_size
        tl.store(out + offs_m[:, None] * chunk_size + offs_k[None, :], dcb,
                 mask=(offs_m < chunk_size)[:, None] & (offs_k < chunk_size)[None, :])


@triton.jit
def _dc_kernel(
    B_ptr, C_ptr, dY_ptr, acum_ptr, states_ptr, dcb_ptr, dacum_rows_ptr, dC_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, ngroups,
    s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn, s_yb, s_yl, s_yh, s_yp, s_sb, s_sl,
    HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_ROUNDTRIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dC_t = sum_{s <= t} dCB[t,s] B_s + sum over the group's heads of exp(acum_t) dY_t H_c; per head, the state ->
    # output term's gradient of acum_t, C_t . (its part of dC_t), goes to the last slot of the row sums.
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bg = tl.program_id(2)
    pid_b = pid_bg // ngroups
    pid_g = pid_bg % ngroups
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_tm = pid_c * chunk_size + offs_m
    mask_m = (offs_m < chunk_size) & (offs_tm < seqlen)
    mask_n = offs_n < dstate
    dot_t = dY_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dcb_base = dcb_ptr + ((pid_b * nchunks + pid_c) * ngroups + pid_g) * chunk_size * chunk_size
    B_base = B_ptr + pid_b * s_Bb + pid_g * s_Bg
    k_end = tl.minimum((pid_m + 1) * BLOCK_M, chunk_size)
    k = 0
    while k < k_end:
        offs_k = k + tl.arange(0, BLOCK_K)
        offs_tk = pid_c * chunk_size + offs_k
        mask_k = (offs_k < chunk_size) & (offs_tk < seqlen)
        dcb = tl.load(dcb_base + offs_m[:, None] * chunk_size + offs_k[None, :],
                      mask=mask_m[:, None] & mask_k[None, :], other=0.0)                 # (BM, BK) fp32
        Bk = tl.load(B_base + offs_tk[:, None] * s_Bl + offs_n[None, :] * s_Bn,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)                  # (BK, BN)
        acc += _dot(dcb, Bk, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
        k += BLOCK_K

    Cm = tl.load(C_ptr + pid_b * s_Cb + pid_g * s_Cg + offs_tm[:, None] * s_Cl + offs_n[None, :] * s_Cn,
                 mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)       # (BM, BN)
    n_kblocks = tl.cdiv(chunk_size, BLOCK_K)
    n_slots = n_kblocks + 1 + tl.cdiv(chunk_size, BLOCK_M)
    keep_m = mask_m
    if HAS_SEQ_IDX:        # H_c reaches only the steps of the document of the step before the chunk
        seq_m = tl.load(seq_ptr + pid_b * s_sb + offs_tm * s_sl, mask=mask_m, other=-1)
        seq_prev = tl.load(seq_ptr + pid_b * s_sb + tl.maximum(pid_c * chunk_size - 1, 0) * s_sl)
        keep_m = keep_m & (seq_m == seq_prev)
    h = pid_g * heads_per_group
    while h < (pid_g + 1) * heads_per_group:
        chunk_base = (pid_b * nheads + h) * nchunks * chunk_size + pid_c * chunk_size
        acum_m = tl.load(acum_ptr + chunk_base + offs_m, mask=mask_m, other=0.0)
        state_base = states_ptr + ((pid_b * nchunks + pid_c) * nheads + h) * headdim * dstate
        acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        p = 0
        while p < headdim:
            offs_p = p + tl.arange(0, BLOCK_P)
            mask_p = offs_p < headdim
            dYm = tl.load(dY_ptr + pid_b * s_yb + h * s_yh + offs_tm[:, None] * s_yl + offs_p[None, :] * s_yp,
                          mask=mask_m[:, None] & mask_p[None, :], other=0.0)            # (BM, BP)
            H = tl.load(state_base + offs_p[:, None] * dstate + offs_n[None, :],
                        mask=mask_p[:, None] & mask_n[None, :], other=0.0)              # (BP, BN) fp32
            acc_h += _dot(dYm, H, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
            p += BLOCK_P
        acc_h = acc_h * tl.exp(tl.where(keep_m, acum_m, float("-inf")))[:, None]
        rows = ((pid_b * nheads + h) * nchunks + pid_c) * n_slots + n_kblocks
        tl.store(dacum_rows_ptr + rows * chunk_size + offs_m, tl.sum(acc_h * Cm, axis=1), mask=offs_m < chunk_size)
        acc += acc_h
        h += 1
    tl.store(dC_ptr + pid_b * s_Cb + pid_g * s_Cg + offs_tm[:, None] * s_Cl + offs_n[None, :] * s_Cn,
             acc.to(dC_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _db_kernel(
    x_ptr, C_ptr, dt_ptr, acum_ptr, dstates_ptr, dcb_ptr, dB_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group, ngroups,
    s_xb, s_xl, s_xh, s_xp, s_Cb, s_Cl, s_Cg, s_Cn, s_Bb, s_Bl, s_Bg, s_Bn, s_sb, s_sl,
    HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_ROUNDTRIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # dB_s = sum_{t >= s} dCB[t,s] C_t + sum over the group's heads of exp(acum_end - acum_s) dt_s x_s dS_c
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bg = tl.program_id(2)
    pid_b = pid_bg // ngroups
    pid_g = pid_bg % ngroups
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)                                    # input steps s
    offs_n = tl.arange(0, BLOCK_N)
    offs_tk = pid_c * chunk_size + offs_k
    mask_k = (offs_k < chunk_size) & (offs_tk < seqlen)
    mask_n = offs_n < dstate
    dot_t = x_ptr.dtype.element_ty

    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    dcb_base = dcb_ptr + ((pid_b * nchunks + pid_c) * ngroups + pid_g) * chunk_size * chunk_size
    C_base = C_ptr + pid_b * s_Cb + pid_g * s_Cg
    m = (pid_k * BLOCK_K // BLOCK_M) * BLOCK_M          # the first block of outputs t that reaches this block's s
    while m < chunk_size:
        offs_m = m + tl.arange(0, BLOCK_M)
        offs_tm = pid_c * chunk_size + offs_m
        mask_m = (offs_m < chunk_size) & (offs_tm < seqlen)
        dcbT = tl.load(dcb_base + offs_m[None, :] * chunk_size + offs_k[:, None],
                       mask=mask_k[:, None] & mask_m[None, :], other=0.0)                # (BK, BM) fp32: [s, t]
        Cm = tl.load(C_base + offs_tm[:, None] * s_Cl + offs_n[None, :] * s_Cn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)                  # (BM, BN)
        acc += _dot(dcbT, Cm, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
        m += BLOCK_M

    keep_k = mask_k
    if HAS_SEQ_IDX:        # only the chunk's last document reaches its end
        seq_k = tl.load(seq_ptr + pid_b * s_sb + offs_tk * s_sl, mask=mask_k, other=-1)
        seq_end = tl.load(seq_ptr + pid_b * s_sb + (tl.minimum((pid_c + 1) * chunk_size, seqlen) - 1) * s_sl)
        keep_k = keep_k & (seq_k == seq_end)
    h = pid_g * heads_per_group
    while h < (pid_g + 1) * heads_per_group:
        chunk_base = (pid_b * nheads + h) * nchunks * chunk_size + pid_c * chunk_size
        acum_k = tl.load(acum_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
        dt_k = tl.load(dt_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
        acum_end = tl.load(acum_ptr + chunk_base + chunk_size - 1)
        scale = tl.exp(tl.where(keep_k, acum_end - acum_k, float("-inf"))) * dt_k        # (BK,)
        dS_base = dstates_ptr + ((pid_b * nchunks + pid_c) * nheads + h) * headdim * dstate
        p = 0
        while p < headdim:
            offs_p = p + tl.arange(0, BLOCK_P)
            mask_p = offs_p < headdim
            xk = tl.load(x_ptr + pid_b * s_xb + h * s_xh + offs_tk[:, None] * s_xl + offs_p[None, :] * s_xp,
                         mask=mask_k[:, None] & mask_p[None, :], other=0.0)             # (BK, BP)
            dS = tl.load(dS_base + offs_p[:, None] * dstate + offs_n[None, :],
                         mask=mask_p[:, None] & mask_n[None, :], other=0.0)             # (BP, BN) fp32
            acc += _dot(xk.to(tl.float32) * scale[:, None], dS, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
            p += BLOCK_P
        h += 1
    tl.store(dB_ptr + pid_b * s_Bb + pid_g * s_Bg + offs_tk[:, None] * s_Bl + offs_n[None, :] * s_Bn,
             acc.to(dB_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


@triton.jit
def _dt_bwd_kernel(
    dt_ptr, A_ptr, bias_ptr, ddt_part_ptr, dacum_rows_ptr, dend_ptr, ddt_ptr, dA_part_ptr, dbias_part_ptr,
    seqlen, nheads, chunk_size, nchunks, n_pblocks, n_rowslots, n_endslots, dt_min, dt_max,
    s_db, s_dl, s_dh,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # acum's gradient, gathered from its pieces, -> a's (reverse cumulative sum over the chunk) -> ddt, dA, d dt_bias
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_h = tl.program_id(2)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_t = pid_c * chunk_size + offs_q
    mask_h = offs_h < nheads
    mask_q = offs_q < chunk_size
    mask_in = (mask_q & (offs_t < seqlen))[:, None] & mask_h[None, :]                # (BQ, BH)
    mask_qh = mask_q[:, None] & mask_h[None, :]

    # dt recomputed as the forward's first kernel does, keeping what its derivative needs
    raw = tl.load(dt_ptr + pid_b * s_db + offs_t[:, None] * s_dl + offs_h[None, :] * s_dh, mask=mask_in,
                  other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    dt = raw
    if SOFTPLUS:
        dt = _softplus(raw)
    pre_clamp = dt
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask_in, dt, 0.0)

    # the pieces, each (b, h, c, slot, Q) fp32 except acum_end's, (b, h, c, slot)
    bhc = (pid_b * nheads + offs_h[None, :]) * nchunks + pid_c                             # (1, BH)
    ddt = tl.zeros((BLOCK_Q, BLOCK_H), dtype=tl.float32)
    ddt_state = tl.zeros((BLOCK_Q, BLOCK_H), dtype=tl.float32)
    j = 0
    while j < n_pblocks:
        ddt += tl.load(ddt_part_ptr + (bhc * 2 * n_pblocks + j) * chunk_size + offs_q[:, None], mask=mask_qh,
                       other=0.0)
        ddt_state += tl.load(ddt_part_ptr + (bhc * 2 * n_pblocks + n_pblocks + j) * chunk_size + offs_q[:, None],
                             mask=mask_qh, other=0.0)
        j += 1
    dacum = tl.zeros((BLOCK_Q, BLOCK_H), dtype=tl.float32)
    j = 0
    while j < n_rowslots:
        dacum += tl.load(dacum_rows_ptr + (bhc * n_rowslots + j) * chunk_size + offs_q[:, None], mask=mask_qh,
                         other=0.0)
        j += 1
    dend = tl.zeros((BLOCK_H,), dtype=tl.float32)
    j = 0
    while j < n_endslots:
        dend += tl.load(dend_ptr + ((pid_b * nheads + offs_h) * nchunks + pid_c) * n_endslots + j, mask=mask_h,
                        other=0.0)
        j += 1
    dacum += tl.where(offs_q[:, None] == chunk_size - 1, dend[None, :], 0.0)

    # a_k's gradient: the reverse cumulative sum of acum's, and the chunk state's share, sum_{s < k} dt_s u_s with
    # u_s its part of ddt_s (exp(acum_end - acum_s) moves with a_k for s < k <= Q; summed directly, not as a
    # difference of acum_end's and acum_s's terms, which would cancel to fp32 rounding times |A|)
    w = dt * ddt_state
    da = tl.cumsum(dacum, axis=0, reverse=True) + tl.cumsum(w, axis=0) - w                 # (BQ, BH)
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    ddt += da * A[None, :]
    tl.store(dA_part_ptr + (pid_b * nchunks + pid_c) * nheads + offs_h, tl.sum(da * dt, axis=0), mask=mask_h)
    if HAS_LIMIT:
        ddt = tl.where((pre_clamp >= dt_min) & (pre_clamp <= dt_max), ddt, 0.0)
    if SOFTPLUS:
        ddt = ddt * tl.where(raw <= 20.0, tl.sigmoid(raw), 1.0)
    ddt = tl.where(mask_in, ddt, 0.0)
    tl.store(ddt_ptr + pid_b * s_db + offs_t[:, None] * s_dl + offs_h[None, :] * s_dh,
             ddt.to(ddt_ptr.dtype.element_ty), mask=mask_in)
    if HAS_BIAS:
        tl.store(dbias_part_ptr + (pid_b * nchunks + pid_c) * nheads + offs_h, tl.sum(ddt, axis=0), mask=mask_h)


# ---------------------------------------------------------------- launcher

def _num_warps(block_n: int) -> int:
    # (steps x d_state) tiles: at n >= 128, 4 warps spill registers in every dot kernel here (ptxas, sm_90), 8 do not
    return 8 if block_n >= 128 else 4


def ssd_bwd(x, dt, A, B, C, D, z, dt_bias, initial_states, y_pre, dt_softplus, dt_min, dt_max, chunk_size, dy,
            dfinal, seq_idx=None):
    """Every gradient of the Triton forward. All inputs contiguous; dy (b, l, h, p) in x's dtype, dfinal
    (b, h, p, n) or None; y_pre the ungated y the forward saved when z is given; seq_idx (b, l) int32 document
    indices 0, 1, 2, ... or None.

    Returns the gradients of (x, dt, A, B, C) and, where given, of D, z, dt_bias, initial_states, in that order,
    each in its input's dtype."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    Q = max(1, min(chunk_size, seqlen))
    nchunks = triton.cdiv(seqlen, Q)
    cfg = _config(Q, headdim, dstate)
    BM, BK, BP, BN = cfg["BLOCK_M"], cfg["BLOCK_K"], cfg["BLOCK_P"], cfg["BLOCK_N"]
    dots = dict(DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                BF16_ROUNDTRIP=triton_interpreting() and x.dtype == torch.bfloat16)
    f32 = dict(device=x.device, dtype=torch.float32)
    r = nheads // ngroups
    n_mblocks, n_kblocks, n_pblocks = triton.cdiv(Q, BM), triton.cdiv(Q, BK), triton.cdiv(headdim, BP)

    # the forward's dt, acum and states H_c (entering each chunk), and the final state
    dt_p, acum, states, final = _ssd_states(x, dt, A, B, dt_bias, initial_states, dt_softplus, dt_min, dt_max, Q,
                                            seq_idx)
    seq_ptr, s_sb, s_sl = _seq_args(seq_idx, x)
    packed = dict(HAS_SEQ_IDX=seq_idx is not None)

    # 1. the gate
    dz = None
    dY = dy
    if z is not None:
        dY, dz = torch.empty_like(x), torch.empty_like(z)
        block = 1024
        _gate_bwd_kernel[(triton.cdiv(dy.numel(), block),)](dy, z, y_pre, dY, dz, dy.numel(), BLOCK=block)

    # 2-3. the states' gradients: dH_c, then dS_c in place, the initial state's, acum_end's partial sums
    dstates = torch.empty(batch, nchunks, nheads, headdim, dstate, **f32)
    _dstates_kernel[(n_pblocks, nchunks, batch * nheads)](
        dY, C, acum, dstates, seq_ptr, seqlen, nheads, headdim, dstate, Q, nchunks, r, *dY.stride(), *C.stride(),
        s_sb, s_sl, **packed, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BK, num_warps=_num_warps(BN), **dots)
    state_size = headdim * dstate
    block = _state_block(state_size)
    n_endslots = triton.cdiv(state_size, block)
    dend = torch.empty(batch, nheads, nchunks, n_endslots, **f32)
    dinit = torch.empty_like(initial_states) if initial_states is not None else None
    _state_passing_bwd_kernel[(n_endslots, batch * nheads)](
        dstates, states, acum, dfinal if dfinal is not None else dend, dinit if dinit is not None else dend,
        dend, seq_ptr, seqlen, nheads, Q, nchunks, state_size, s_sb, s_sl,
        HAS_DFINAL=dfinal is not None, HAS_INIT=initial_states is not None, **packed, BLOCK=block)

    # 4. dx, ddt's direct part, dD
    dx = torch.empty_like(x)
    ddt_part = torch.empty(batch, nheads, nchunks, 2, n_pblocks, Q, **f32)
    dD_part = torch.empty(batch * nchunks * n_mblocks, nheads, headdim, **f32) if D is not None else None
    _dx_kernel[(n_mblocks * n_pblocks, nchunks, batch * nheads)](
        x, B, C, dY, dt_p, acum, dstates, D if D is not None else A, dx, ddt_part,
        dD_part if D is not None else ddt_part, seq_ptr,
        seqlen, nheads, headdim, dstate, Q, nchunks, r, *x.stride(), *B.stride(), *C.stride(), *dY.stride(),
        s_sb, s_sl, HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, **packed,
        num_warps=_num_warps(BN), **dots, **cfg)

    # 5-7. dCB per group, then dC and dB; acum's pieces: M's row sums per block of s, the state -> output term's,
    # minus M's column sums per block of t (zeros where no block writes)
    dcb = torch.empty(batch, nchunks, ngroups, Q, Q, **f32)
    n_rowslots = n_kblocks + 1 + n_mblocks
    dacum_rows = torch.zeros(batch, nheads, nchunks, n_rowslots, Q, **f32)
    _dcb_kernel[(n_mblocks * n_kblocks, nchunks, batch * ngroups)](
        x, B, C, dY, dt_p, acum, dcb, dacum_rows, seq_ptr,
        seqlen, nheads, headdim, dstate, Q, nchunks, r, ngroups,
        *x.stride(), *B.stride(), *C.stride(), *dY.stride(), s_sb, s_sl, **packed, num_warps=_num_warps(BN), **dots,
        **cfg)
    dC = torch.empty_like(C)
    _dc_kernel[(n_mblocks, nchunks, batch * ngroups)](
        B, C, dY, acum, states, dcb, dacum_rows, dC, seq_ptr, seqlen, nheads, headdim, dstate, Q, nchunks, r,
        ngroups, *B.stride(), *C.stride(), *dY.stride(), s_sb, s_sl, **packed, num_warps=_num_warps(BN), **dots,
        **cfg)
    dB = torch.empty_like(B)
    _db_kernel[(n_kblocks, nchunks, batch * ngroups)](
        x, C, dt_p, acum, dstates, dcb, dB, seq_ptr, seqlen, nheads, headdim, dstate, Q, nchunks, r, ngroups,
        *x.stride(), *C.stride(), *B.stride(), s_sb, s_sl, **packed, num_warps=_num_warps(BN), **dots, **cfg)

    # 8. dt, A, dt_bias
    ddt = torch.empty_like(dt)
    dA_part = torch.empty(batch, nchunks, nheads, **f32)
    dbias_part = torch.empty(batch, nchunks, nheads, **f32) if dt_bias is not None else dA_part
    has_limit = dt_min > 0.0 or dt_max < math.inf
    block_h = min(triton.next_power_of_2(nheads), max(1, 4096 // triton.next_power_of_2(Q)))
    _dt_bwd_kernel[(batch, nchunks, triton.cdiv(nheads, block_h))](
        dt, A, dt_bias if dt_bias is not None else A, ddt_part, dacum_rows, dend, ddt, dA_part, dbias_part,
        seqlen, nheads, Q, nchunks, n_pblocks, n_rowslots, n_endslots, float(dt_min),
        float(dt_max) if has_limit else 0.0, *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
        BLOCK_Q=triton.next_power_of_2(Q), BLOCK_H=block_h, num_warps=8 if block_h * Q >= 4096 else 4)

    grads = [dx, ddt, dA_part.sum((0, 1)).to(A.dtype), dB, dC]
    if D is not None:
        dD = dD_part.sum(0)                                                                # (h, p)
        grads.append((dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype))
    if z is not None:
        grads.append(dz)
    if dt_bias is not None:
        grads.append(dbias_part.sum((0, 1)).to(dt_bias.dtype))
    if initial_states is not None:
        grads.append(dinit)
    return grads
