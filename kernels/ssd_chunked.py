"""The SSD scan in pure PyTorch: the four-step chunked algorithm of "Transformers are SSMs" (Dao & Gu, 2024, sec. 7).

Same equations as kernels/ssd.py's reference. Because the decay exp(dt_t * A) is one scalar per head and step, the
sequence can be cut into chunks of Q steps and everything inside a chunk written as matmuls:

    a_t      = dt_t * A  (<= 0),   acum_t = a_1 + ... + a_t within the chunk
    segsum   L[t, s] = exp(a_{s+1} + ... + a_t) for s <= t, 0 above the diagonal       (b, h, c, Q, Q)
    1. diagonal blocks:  Y_diag = ((C B^T) * L) (dt x)                     attention-like, within each chunk
    2. chunk states:     S_c    = sum_s exp(acum_Q - acum_s) dt_s x_s B_s^T  the state each chunk leaves behind
    3. across chunks:    H_c    = exp(acum_Q of chunk c-1) H_{c-1} + S_{c-1}  one (c+1, c+1) segsum matmul,
                         H_0 = initial_states; the last one is the final state
    4. state -> output:  Y_off  = exp(acum_t) C_t H_c

y = Y_diag + Y_off + D x (then * silu(z)). The segment sums are formed by a masked cumulative sum (no difference of
two large cumulative sums inside L), so a very negative dt*A gives exp(-big) = 0, never inf - inf = NaN.

Any length works: the sequence is padded at its end to a whole number of chunks with dt = 0, where the decay is
exp(0) = 1 and the input dt x = 0, so padding leaves the final state exactly as it was; the padded outputs are cut.
Packed rows (seq_idx): a new document at step t forgets the state, S_t = 0 * S_{t-1} + dt_t x_t B_t^T, which is
the recurrence with a_t = -inf (its decay exp(a_t) = 0; dt_t still scales the input). So a_t is set to -inf at each
document start and everything above holds unchanged: a segment sum that spans a start is -inf, its exp is 0, and
L, the decays to each chunk's end, exp(acum_t) and the chunk totals of step 3 all cut at the boundary. Only the
decay to the chunk's end changes form: exp(acum_Q - acum_s) would be -inf - (-inf) = NaN, so it is the sum over
k > s of a_k (a reversed cumulative sum), as the segment sums are. Autograd stays finite: exp(-inf) = 0 makes its
gradient 0, and a cumulative sum's backward never looks at its values.

Groups: B and C are (b, l, g, n) and stay per group; heads are laid out as (g, h / g) so the (Q, Q) matrix C B^T is
formed once per group and broadcast to its heads. All arithmetic is fp32; y comes back in x's dtype, the final state
in fp32. The backward is autograd's through these few large ops.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .ssd_reference import _skip_and_gate, document_starts, process_dt


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with [t, s] = a_{s+1} + ... + a_t for s <= t (0 on the diagonal), -inf above it.

    A masked cumulative sum, not cumsum(a)[t] - cumsum(a)[s]: no cancellation between two large sums."""
    T = a.shape[-1]
    x = a[..., None].expand(*a.shape, T)                                       # [..., t, s] = a_t
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=-1)
    x = x.masked_fill(~strictly_lower, 0.0)                                    # keep a_t for t > s
    out = torch.cumsum(x, dim=-2)                                              # sum over s < k <= t
    lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=a.device), diagonal=0)
    return out.masked_fill(~lower, -math.inf)


def ssd_scan_chunked(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                     initial_states=None, return_final_states=False, chunk_size=256, seq_idx=None):
    """The chunked SSD scan; signature and result of kernels.ssd.ssd_scan_ref (see kernels/ssd.py)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups, d_state = B.shape[2], B.shape[3]
    r = nheads // ngroups                                                      # heads per group
    dtype_in = x.dtype
    Q = max(1, min(chunk_size, seqlen))
    nchunks = max(1, -(-seqlen // Q))
    pad = nchunks * Q - seqlen

    xf = x.float()
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)                        # (b, l, h) fp32
    # (b, l, ...) -> (b, g, r, c, Q, ...): heads split into (group, head within group), time into (chunk, step)
    X = F.pad(xf, (0, 0, 0, 0, 0, pad)).view(batch, nchunks, Q, ngroups, r, headdim).permute(0, 3, 4, 1, 2, 5)
    dtc = F.pad(dt, (0, 0, 0, pad)).view(batch, nchunks, Q, ngroups, r).permute(0, 3, 4, 1, 2)   # (b, g, r, c, Q)
    Bc = F.pad(B.float(), (0, 0, 0, 0, 0, pad)).view(batch, nchunks, Q, ngroups, d_state).permute(0, 3, 1, 2, 4)
    Cc = F.pad(C.float(), (0, 0, 0, 0, 0, pad)).view(batch, nchunks, Q, ngroups, d_state).permute(0, 3, 1, 2, 4)
    Bc, Cc = Bc[:, :, None], Cc[:, :, None]                                    # (b, g, 1, c, Q, n)

    a = dtc * A.float().view(ngroups, r, 1, 1)                                 # (b, g, r, c, Q), <= 0
    if seq_idx is not None:
        starts = F.pad(document_starts(seq_idx), (0, pad)).view(batch, 1, 1, nchunks, Q)
        a = a.masked_fill(starts, -math.inf)                                   # the state is forgotten there
    acum = torch.cumsum(a, dim=-1)
    Xdt = X * dtc[..., None]                                                   # (b, g, r, c, Q, p)

    # 1. within each chunk: (C B^T * L) (dt x)
    CB = Cc @ Bc.transpose(-1, -2)                                             # (b, g, 1, c, Q, Q)
    L = torch.exp(segsum(a))                                                   # (b, g, r, c, Q, Q)
    Y = (CB * L) @ Xdt                                                         # (b, g, r, c, Q, p)

    # 2. the state each chunk produces from its own inputs
    if seq_idx is None:
        decay_to_end = torch.exp(acum[..., -1:] - acum)                        # (b, g, r, c, Q), <= 1
    else:
        # sum over k > s of a_k, no difference of two (possibly -inf) cumulative sums
        after = torch.flip(torch.cumsum(torch.flip(a, (-1,)), dim=-1), (-1,))    # sum over k >= s
        decay_to_end = torch.exp(F.pad(after[..., 1:], (0, 1)))
    S = (Xdt * decay_to_end[..., None]).transpose(-1, -2) @ Bc                 # (b, g, r, c, p, n)

    # 3. carry the states across chunks: H_c = sum_{k <= c} exp(a_k+1 + ... + a_c (chunk totals)) S'_k
    if initial_states is None:
        H0 = S.new_zeros(batch, ngroups, r, 1, headdim, d_state)
    else:
        H0 = initial_states.float().view(batch, ngroups, r, 1, headdim, d_state)
    S_all = torch.cat([H0, S], dim=3).flatten(-2)                              # (b, g, r, c + 1, p * n)
    chunk_decay = torch.exp(segsum(F.pad(acum[..., -1], (1, 0))))             # (b, g, r, c + 1, c + 1)
    H = (chunk_decay @ S_all).view(batch, ngroups, r, nchunks + 1, headdim, d_state)
    H_start, final = H[:, :, :, :-1], H[:, :, :, -1]                           # (b, g, r, c, p, n), (b, g, r, p, n)

    # 4. the state entering each chunk, read out by C and decayed to each step
    Y = Y + (Cc @ H_start.transpose(-1, -2)) * torch.exp(acum)[..., None]     # (b, g, r, c, Q, p)

    y = Y.permute(0, 3, 4, 1, 2, 5).reshape(batch, nchunks * Q, nheads, headdim)[:, :seqlen]   # (b, l, h, p)
    y = _skip_and_gate(y, xf, D, z).to(dtype_in)
    if return_final_states:
        return y, final.reshape(batch, nheads, headdim, d_state)
    return y
