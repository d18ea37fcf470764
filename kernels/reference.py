"""The selective scan, straight from the equations: the spec every fast path is tested against.

Notation (Gu & Dao, "Mamba", Algorithm 2), shapes in the mamba_ssm convention:
    b: batch, d: channels (d_inner), l: sequence length, n: state size (d_state)

    delta_t = softplus(delta_t + delta_bias)          (if delta_softplus)
    Abar_t  = exp(delta_t * A)                         (d, n)   zero-order hold for A
    Bbar_t  = delta_t * B_t                            (d, n)   Euler step for B
    h_t     = Abar_t * h_{t-1} + Bbar_t * u_t          (d, n)   the recurrence
    y_t     = <h_t, C_t> + D * u_t                     (d,)
    y_t     = y_t * silu(z_t)                          (if z is given)

Packed rows (seq_idx, the document index of each token, non-decreasing along a row): a new document starts at t
where seq_idx[t] != seq_idx[t-1], and there the state restarts from zero, h_{t-1} := 0, as if the document were
scanned on its own. The last state returned is then the last document's.

The state is carried in fp32 whatever the input dtype; y is cast back to u's dtype once, at the end.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, seq_idx=None):
    """Sequential selective scan, one time step at a time.

    Args:
        u, delta: (b, d, l)
        A: (d, n), fp32, negative real parts for a stable recurrence
        B, C: (b, n, l)
        D, delta_bias: (d,) or None
        z: (b, d, l) or None
        initial_state: (b, d, n) fp32 or None (zeros); the state before the first document
        seq_idx: (b, l) int or None; the document index of each token (see the module doc)
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state also h_L: (b, d, n) fp32
    """
    dtype_in = u.dtype
    u, delta, B, C = u.float(), delta.float(), B.float(), C.float()
    A = A.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    h = u.new_zeros(batch, d_inner, d_state) if initial_state is None else initial_state.float().clone()
    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]                                   # (b, d, 1)
        if seq_idx is not None and t > 0:
            h = h * (seq_idx[:, t] == seq_idx[:, t - 1]).float()[:, None, None]   # a new document: h_{t-1} := 0
        h = torch.exp(dt * A) * h + dt * B[:, None, :, t] * u[:, :, t, None]   # (b, d, n)
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))       # (b, d)
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, d_inner, 0)   # (b, d, l)
    if D is not None:
        y = y + D.float()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y
