"""The SSD scan (Mamba-2) as Triton kernels: the forward here, the backward in triton_ssd_bwd.py, the differentiable
op that joins them (backend "triton") in triton_ssd_scan.py.

Same equations and signature as kernels/ssd.py's reference; the same four-step chunked algorithm as
kernels/ssd_chunked.py (see its docstring for the math). Shape letters: b batch, l length, c chunks of Q steps,
h heads, p headdim, g ngroups, n d_state. Four kernels, each one launch:

    1. _chunk_cumsum_kernel   dt -> clamp(softplus(dt + dt_bias)) and acum = cumsum(dt * A) within each chunk,
                              both (b, h, c, Q) fp32; steps past the end get dt = 0 (decay 1, no input).
    2. _chunk_state_kernel    S_c = sum_s x_s^T (exp(acum_Q - acum_s) dt_s) B_s: the state each chunk leaves behind
                              from its own inputs, (b, c, h, p, n) fp32; one tl.dot per block of steps.
    3. _state_passing_kernel  H_0 = initial state, H_{c+1} = exp(acum_Q of chunk c) H_c + S_c, sequential over the
                              chunks, parallel over (b, h) and blocks of the p * n state elements; H_c overwrites S_c
                              in place (the state *entering* chunk c), the last one is the final state.
    4. _chunk_scan_kernel     y_t = exp(acum_t) C_t H_c                                (state -> output, tl.dot)
                                  + sum_{s <= t} (C_t . B_s) exp(acum_t - acum_s) dt_s x_s   (within the chunk)
                                  + D x_t, then * silu(z_t);   y in x's dtype.

Packed rows (seq_idx, constexpr HAS_SEQ_IDX: without it the kernels compile to the code they were before, with
three unused arguments more): acum keeps the
real decays, and every term whose decay spans a document start is masked out instead, comparing document indices
(made 0, 1, 2, ... from the starts by the launcher, so only equality matters): within the chunk, s and t of one
document; a chunk's own state S_c, only the steps of the chunk's last document; the state entering the chunk, only
the steps of the document of the step before the chunk (of step 0 in chunk 0: the initial state is the first
document's); the state passing, exp(acum_Q) only when the chunk's last step is of the previous chunk's last step's
document (no start inside), else 0. A masked exponent is -inf (exp gives 0), never a decay times a 0/1 mask.

Numerics: the within-chunk decay is exp(acum_t - acum_s) of two cumulative sums (as in mamba_ssm's kernels); the
exponent is masked with tl.where to -inf above the diagonal and past the end (not the decay multiplied by a 0/1 mask),
so no decay is ever inf and an underflow is a clean 0: a very negative dt * A gives 0, never inf * 0 = NaN. (Unlike
the chunked path's masked segment sums, a difference of two large cumulative sums loses the absolute precision of
the larger one, fp32 eps * |acum|: harmless at Mamba's magnitudes, where acum stays within a few hundred.)
The dot operands are in x's dtype (bf16 on tensor cores for bf16 inputs) with fp32 accumulation; for fp32 inputs
the dots run in full fp32 ("ieee"), not tf32.

Backward: kernels/triton_ssd_bwd.py's Triton kernels (see its docstring). They relaunch steps 1-3 here for dt,
acum and the states (cheap), not the chunk scan; the forward saves only its inputs and, with z, the ungated y.
The earlier backward, which recomputes the forward through kernels/ssd_chunked.py and takes autograd's
vector-Jacobian product of it (torch.func.vjp), stays selectable (ssd_scan_triton(..., backward="vjp")) for
bench/bench_ssd.py's side by side.

Both halves are torch custom ops (mamba_trainer::ssd_scan_fwd / ssd_scan_bwd, and ssd_scan_bwd_vjp) with fake
implementations, so torch.compile keeps a model that calls the scan in one graph.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .backends import triton_interpreting

# Block sizes of the chunk-state and chunk-scan kernels (tl.dot needs every dimension >= 16 on the GPU).
# Untuned first choices, for the H200 sweep: BLOCK_M x BLOCK_P output tiles of steps x headdim.
BLOCK_M = 64
BLOCK_K = 64         # steps per tl.dot in the chunk-state and within-chunk loops
BLOCK_P = 64
STATE_BLOCK = 1024   # state elements (of p * n) per program of the state passing
MAX_DSTATE = 256


@triton.jit
def _softplus(x):
    # log(1 + e^x) with torch's threshold: above 20 the result is x to fp32 precision.
    return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)


@triton.jit
def _dot(a, b, dot_t: tl.constexpr, PRECISION: tl.constexpr, BF16_ROUNDTRIP: tl.constexpr):
    """tl.dot of a and b rounded to dot_t (x's dtype), fp32 accumulation.

    BF16_ROUNDTRIP (the interpreter only): Triton 3.6's interpreter multiplies bf16 operands as their raw uint16 bits,
    so there the operands are rounded to bf16 and multiplied in fp32, the same values a bf16 tensor-core dot sees."""
    a = a.to(dot_t)
    b = b.to(dot_t)
    if BF16_ROUNDTRIP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _chunk_cumsum_kernel(
    dt_ptr, A_ptr, bias_ptr, dt_out_ptr, acum_ptr,
    seqlen, nheads, chunk_size, nchunks, dt_min, dt_max,
    s_db, s_dl, s_dh,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_LIMIT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_h = tl.program_id(2)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_t = pid_c * chunk_size + offs_q
    mask_h = offs_h < nheads
    mask_q = offs_q < chunk_size
    mask_in = (mask_q & (offs_t < seqlen))[:, None] & mask_h[None, :]                # (BQ, BH), block masks only

    dt = tl.load(dt_ptr + pid_b * s_db + offs_t[:, None] * s_dl + offs_h[None, :] * s_dh, mask=mask_in,
                 other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(bias_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        dt = _softplus(dt)
    if HAS_LIMIT:
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
    dt = tl.where(mask_in, dt, 0.0)                  # past the end (and padded heads): dt = 0 after processing
    A = tl.load(A_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)
    acum = tl.cumsum(dt * A[None, :], axis=0)                                         # (BQ, BH)

    # (b, h, c, Q): every step of the chunk is written, those past the end too (dt 0, acum constant)
    out = pid_b * nheads * nchunks * chunk_size + offs_h[None, :] * nchunks * chunk_size \
        + pid_c * chunk_size + offs_q[:, None]
    mask_out = mask_q[:, None] & mask_h[None, :]
    tl.store(dt_out_ptr + out, dt, mask=mask_out)
    tl.store(acum_ptr + out, acum, mask=mask_out)


@triton.jit
def _chunk_state_kernel(
    x_ptr, B_ptr, dt_ptr, acum_ptr, states_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
    s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn, s_sb, s_sl,
    HAS_SEQ_IDX: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16_ROUNDTRIP: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
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

    chunk_base = (pid_b * nheads + pid_h) * nchunks * chunk_size + pid_c * chunk_size   # into (b, h, c, Q)
    acum_end = tl.load(acum_ptr + chunk_base + chunk_size - 1)
    x_base = x_ptr + pid_b * s_xb + pid_h * s_xh
    B_base = B_ptr + pid_b * s_Bb + pid_g * s_Bg
    if HAS_SEQ_IDX:            # only the chunk's last document reaches its end
        seq_end = tl.load(seq_ptr + pid_b * s_sb + (tl.minimum((pid_c + 1) * chunk_size, seqlen) - 1) * s_sl)
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    k = 0
    while k < chunk_size:      # (while loops: Triton's interpreter cannot range() over a run-time bound)
        offs_k = k + tl.arange(0, BLOCK_K)
        offs_t = pid_c * chunk_size + offs_k
        mask_k = (offs_k < chunk_size) & (offs_t < seqlen)
        keep = mask_k
        if HAS_SEQ_IDX:
            keep = keep & (tl.load(seq_ptr + pid_b * s_sb + offs_t * s_sl, mask=mask_k, other=-1) == seq_end)
        xT = tl.load(x_base + offs_t[None, :] * s_xl + offs_p[:, None] * s_xp,
                     mask=mask_p[:, None] & mask_k[None, :], other=0.0)                  # (BP, BK)
        Bk = tl.load(B_base + offs_t[:, None] * s_Bl + offs_n[None, :] * s_Bn,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)                  # (BK, BN)
        dt = tl.load(dt_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
        acum = tl.load(acum_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
        scale = tl.exp(tl.where(keep, acum_end - acum, float("-inf"))) * dt                   # (BK,)
        acc += _dot(xT.to(tl.float32) * scale[None, :], Bk, x_ptr.dtype.element_ty, DOT_PRECISION, BF16_ROUNDTRIP)
        k += BLOCK_K

    # (b, c, h, p, n) fp32
    out = ((pid_b * nchunks + pid_c) * nheads + pid_h) * headdim * dstate
    tl.store(states_ptr + out + offs_p[:, None] * dstate + offs_n[None, :], acc,
             mask=mask_p[:, None] & mask_n[None, :])


@triton.jit
def _state_passing_kernel(
    states_ptr, acum_ptr, init_ptr, final_ptr, seq_ptr,
    seqlen, nheads, chunk_size, nchunks, state_size, s_sb, s_sl,
    HAS_INIT: tl.constexpr, HAS_SEQ_IDX: tl.constexpr, BLOCK: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_b = pid_bh // nheads
    pid_h = pid_bh % nheads
    offs = pid_s * BLOCK + tl.arange(0, BLOCK)
    mask = offs < state_size
    if HAS_INIT:
        H = tl.load(init_ptr + pid_bh * state_size + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        H = tl.zeros((BLOCK,), dtype=tl.float32)
    acum_last = acum_ptr + pid_bh * nchunks * chunk_size + chunk_size - 1                # (b, h, c, Q)[..., Q-1]
    if HAS_SEQ_IDX:
        seq_prev = tl.load(seq_ptr + pid_b * s_sb)          # the initial state is the first document's
    c = 0
    while c < nchunks:
        ptrs = states_ptr + ((pid_b * nchunks + c) * nheads + pid_h) * state_size + offs
        S = tl.load(ptrs, mask=mask, other=0.0)
        tl.store(ptrs, H, mask=mask)                                                     # the state entering c
        a_end = tl.load(acum_last + c * chunk_size)
        if HAS_SEQ_IDX:    # a document starts in chunk c: what entered it is forgotten by its end
            seq_end = tl.load(seq_ptr + pid_b * s_sb + (tl.minimum((c + 1) * chunk_size, seqlen) - 1) * s_sl)
            a_end = tl.where(seq_end == seq_prev, a_end, float("-inf"))
            seq_prev = seq_end
        H = tl.exp(a_end) * H + S
        c += 1
    tl.store(final_ptr + pid_bh * state_size + offs, H, mask=mask)


@triton.jit
def _chunk_scan_kernel(
    x_ptr, B_ptr, C_ptr, dt_ptr, acum_ptr, states_ptr, D_ptr, z_ptr, y_ptr, y_pre_ptr, seq_ptr,
    seqlen, nheads, headdim, dstate, chunk_size, nchunks, heads_per_group,
    s_xb, s_xl, s_xh, s_xp, s_Bb, s_Bl, s_Bg, s_Bn, s_Cb, s_Cl, s_Cg, s_Cn,
    s_zb, s_zl, s_zh, s_zp, s_yb, s_yl, s_yh, s_yp, s_sb, s_sl,
    HAS_D: tl.constexpr, D_PER_CHANNEL: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ_IDX: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BF16_ROUNDTRIP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_mp = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bh = tl.program_id(2)
    pid_b = pid_bh // nheads
    pid_h = pid_bh % nheads
    pid_g = pid_h // heads_per_group
    n_pblocks = tl.cdiv(headdim, BLOCK_P)
    pid_m = pid_mp // n_pblocks
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)                                    # steps within the chunk
    offs_p = (pid_mp % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)                                                       # the whole state
    offs_tm = pid_c * chunk_size + offs_m
    mask_m = (offs_m < chunk_size) & (offs_tm < seqlen)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate
    dot_t = x_ptr.dtype.element_ty

    chunk_base = (pid_b * nheads + pid_h) * nchunks * chunk_size + pid_c * chunk_size   # into (b, h, c, Q)
    acum_m = tl.load(acum_ptr + chunk_base + offs_m, mask=mask_m, other=0.0)
    C_base = C_ptr + pid_b * s_Cb + pid_g * s_Cg
    Cm = tl.load(C_base + offs_tm[:, None] * s_Cl + offs_n[None, :] * s_Cn,
                 mask=mask_m[:, None] & mask_n[None, :], other=0.0)                     # (BM, BN)

    # state -> output: exp(acum_t) C_t H_c, H_c the state entering the chunk, (n, p) as read here
    H = tl.load(states_ptr + ((pid_b * nchunks + pid_c) * nheads + pid_h) * headdim * dstate
                + offs_p[None, :] * dstate + offs_n[:, None],
                mask=mask_n[:, None] & mask_p[None, :], other=0.0)                       # (BN, BP) fp32
    acc = _dot(Cm, H, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
    if HAS_SEQ_IDX:        # H_c reaches only the steps of the document of the step before the chunk
        seq_m = tl.load(seq_ptr + pid_b * s_sb + offs_tm * s_sl, mask=mask_m, other=-1)
        seq_prev = tl.load(seq_ptr + pid_b * s_sb + tl.maximum(pid_c * chunk_size - 1, 0) * s_sl)
        acc = acc * tl.exp(tl.where(seq_m == seq_prev, acum_m, float("-inf")))[:, None]
    else:
        acc = acc * tl.exp(acum_m)[:, None]                                               # (BM, BP)

    # within the chunk: sum over s <= t of (C_t . B_s) exp(acum_t - acum_s) dt_s x_s, blocks of BLOCK_K steps s
    x_base = x_ptr + pid_b * s_xb + pid_h * s_xh
    B_base = B_ptr + pid_b * s_Bb + pid_g * s_Bg
    k_end = tl.minimum((pid_m + 1) * BLOCK_M, chunk_size)
    k = 0
    while k < k_end:
        offs_k = k + tl.arange(0, BLOCK_K)
        offs_tk = pid_c * chunk_size + offs_k
        mask_k = (offs_k < chunk_size) & (offs_tk < seqlen)
        BT = tl.load(B_base + offs_tk[None, :] * s_Bl + offs_n[:, None] * s_Bn,
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)                  # (BN, BK)
        CB = _dot(Cm, BT, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)                          # (BM, BK)
        acum_k = tl.load(acum_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
        dt_k = tl.load(dt_ptr + chunk_base + offs_k, mask=mask_k, other=0.0)
        causal = (offs_m[:, None] >= offs_k[None, :]) & mask_m[:, None] & mask_k[None, :]
        if HAS_SEQ_IDX:    # and s, t of one document
            seq_k = tl.load(seq_ptr + pid_b * s_sb + offs_tk * s_sl, mask=mask_k, other=-1)
            causal = causal & (seq_m[:, None] == seq_k[None, :])
        decay = tl.exp(tl.where(causal, acum_m[:, None] - acum_k[None, :], float("-inf")))   # 0 above the diagonal
        W = CB * decay * dt_k[None, :]
        xk = tl.load(x_base + offs_tk[:, None] * s_xl + offs_p[None, :] * s_xp,
                     mask=mask_k[:, None] & mask_p[None, :], other=0.0)                  # (BK, BP)
        acc += _dot(W, xk, dot_t, DOT_PRECISION, BF16_ROUNDTRIP)
        k += BLOCK_K

    mask_mp = mask_m[:, None] & mask_p[None, :]
    if HAS_D:
        xm = tl.load(x_base + offs_tm[:, None] * s_xl + offs_p[None, :] * s_xp, mask=mask_mp,
                     other=0.0).to(tl.float32)
        if D_PER_CHANNEL:
            Dv = tl.load(D_ptr + pid_h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
            acc += xm * Dv[None, :]
        else:
            acc += xm * tl.load(D_ptr + pid_h).to(tl.float32)
    if HAS_Z:
        # the ungated y too (same layout as y), for the gate's backward
        tl.store(y_pre_ptr + pid_b * s_yb + pid_h * s_yh + offs_tm[:, None] * s_yl + offs_p[None, :] * s_yp,
                 acc.to(y_pre_ptr.dtype.element_ty), mask=mask_mp)
        zm = tl.load(z_ptr + pid_b * s_zb + pid_h * s_zh + offs_tm[:, None] * s_zl + offs_p[None, :] * s_zp,
                     mask=mask_mp, other=0.0).to(tl.float32)
        acc = acc * zm * tl.sigmoid(zm)
    tl.store(y_ptr + pid_b * s_yb + pid_h * s_yh + offs_tm[:, None] * s_yl + offs_p[None, :] * s_yp,
             acc.to(y_ptr.dtype.element_ty), mask=mask_mp)


# ---------------------------------------------------------------- launchers

def _config(chunk_size: int, headdim: int, dstate: int) -> dict:
    """Block sizes for a chunk of `chunk_size` steps: no block larger than needed, none below tl.dot's 16."""
    def fit(block, size):
        return max(16, min(block, triton.next_power_of_2(size)))
    # BLOCK_P stays BLOCK_P (64) below headdim 64: on the H200 (Triton 3.6, bf16) headdim 32 with 32- or 16-wide
    # blocks gave wrong outputs (relative error ~1) and, at d_state 128, an illegal address; 64-wide masked blocks
    # were right (2026-12-02, tests/test_ssd_triton.py::test_gpu_matches_chunked).
    return dict(BLOCK_M=fit(BLOCK_M, chunk_size), BLOCK_K=fit(BLOCK_K, chunk_size), BLOCK_P=BLOCK_P,
                BLOCK_N=max(16, triton.next_power_of_2(dstate)))


def _state_block(state_size: int) -> int:
    """State elements per program of the state passing (forward and backward)."""
    return min(STATE_BLOCK, triton.next_power_of_2(state_size))


def _seq_args(seq_idx, x):
    """(pointer, batch stride, step stride) of seq_idx for the kernels; x stands in for the pointer without one."""
    if seq_idx is None:
        return x, 0, 0
    return seq_idx, seq_idx.stride(0), seq_idx.stride(1)


def _ssd_states(x, dt, A, B, dt_bias, initial_states, dt_softplus, dt_min, dt_max, Q, seq_idx=None):
    """Steps 1-3 (also what the backward recomputes); seq_idx (b, l) int32 document indices or None. Returns dt
    and acum (b, h, c, Q) fp32, the states entering
    each chunk (b, c, h, p, n) fp32 and the final state (b, h, p, n) fp32."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    nchunks = triton.cdiv(seqlen, Q)
    cfg = _config(Q, headdim, dstate)
    f32 = dict(device=x.device, dtype=torch.float32)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"     # bf16/fp16 dots ignore it
    roundtrip = triton_interpreting() and x.dtype == torch.bfloat16

    # 1. processed dt and the within-chunk cumulative decay, (b, h, c, Q)
    dt_out = torch.empty(batch, nheads, nchunks, Q, **f32)
    acum = torch.empty(batch, nheads, nchunks, Q, **f32)
    has_limit = dt_min > 0.0 or dt_max < math.inf
    block_h = min(triton.next_power_of_2(nheads), max(1, 4096 // triton.next_power_of_2(Q)))
    _chunk_cumsum_kernel[(batch, nchunks, triton.cdiv(nheads, block_h))](
        dt, A, dt_bias if dt_bias is not None else A, dt_out, acum,
        seqlen, nheads, Q, nchunks, float(dt_min), float(dt_max) if has_limit else 0.0, *dt.stride(),
        HAS_BIAS=dt_bias is not None, SOFTPLUS=dt_softplus, HAS_LIMIT=has_limit,
        BLOCK_Q=triton.next_power_of_2(Q), BLOCK_H=block_h,
    )

    # 2. each chunk's own state, (b, c, h, p, n) fp32
    states = torch.empty(batch, nchunks, nheads, headdim, dstate, **f32)
    n_blocks = triton.cdiv(headdim, cfg["BLOCK_P"]) * triton.cdiv(dstate, cfg["BLOCK_N"])
    seq_ptr, s_sb, s_sl = _seq_args(seq_idx, x)
    _chunk_state_kernel[(n_blocks, nchunks, batch * nheads)](
        x, B, dt_out, acum, states, seq_ptr,
        seqlen, nheads, headdim, dstate, Q, nchunks, nheads // ngroups, *x.stride(), *B.stride(), s_sb, s_sl,
        HAS_SEQ_IDX=seq_idx is not None, DOT_PRECISION=precision, BF16_ROUNDTRIP=roundtrip,
        BLOCK_P=cfg["BLOCK_P"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"],
    )

    # 3. the states entering each chunk (in place) and the final state
    final = torch.empty(batch, nheads, headdim, dstate, **f32)
    state_size = headdim * dstate
    block = _state_block(state_size)
    _state_passing_kernel[(triton.cdiv(state_size, block), batch * nheads)](
        states, acum, initial_states if initial_states is not None else final, final, seq_ptr,
        seqlen, nheads, Q, nchunks, state_size, s_sb, s_sl,
        HAS_INIT=initial_states is not None, HAS_SEQ_IDX=seq_idx is not None, BLOCK=block,
    )
    return dt_out, acum, states, final


def _ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max, chunk_size, seq_idx):
    """Launch the four kernels. Returns y (b, l, h, p) in x's dtype, the final state (b, h, p, n) fp32, and with z
    the ungated y (what the gate's backward needs; an empty tensor without z)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, dstate = B.shape[2], B.shape[3]
    Q = max(1, min(chunk_size, seqlen))
    nchunks = triton.cdiv(seqlen, Q)
    cfg = _config(Q, headdim, dstate)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"     # bf16/fp16 dots ignore it
    roundtrip = triton_interpreting() and x.dtype == torch.bfloat16
    dt_out, acum, states, final = _ssd_states(x, dt, A, B, dt_bias, initial_states, dt_softplus, dt_min, dt_max, Q,
                                              seq_idx)

    # 4. the outputs
    y = torch.empty_like(x)
    zz = z if z is not None else x
    y_pre = torch.empty_like(x) if z is not None else x.new_empty(0)
    grid = (triton.cdiv(Q, cfg["BLOCK_M"]) * triton.cdiv(headdim, cfg["BLOCK_P"]), nchunks, batch * nheads)
    seq_ptr, s_sb, s_sl = _seq_args(seq_idx, x)
    _chunk_scan_kernel[grid](
        x, B, C, dt_out, acum, states, D if D is not None else A, zz, y, y_pre if z is not None else y, seq_ptr,
        seqlen, nheads, headdim, dstate, Q, nchunks, nheads // ngroups,
        *x.stride(), *B.stride(), *C.stride(), *zz.stride(), *y.stride(), s_sb, s_sl,
        HAS_D=D is not None, D_PER_CHANNEL=D is not None and D.dim() == 2, HAS_Z=z is not None,
        HAS_SEQ_IDX=seq_idx is not None,
        DOT_PRECISION=precision, BF16_ROUNDTRIP=roundtrip, **cfg,
    )
    return y, final, y_pre
