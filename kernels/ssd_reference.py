"""The SSD scan's sequential reference (the spec every backend of kernels/ssd.py is tested against) and the dt
processing and skip/gate steps the backends share. The equations are in kernels/ssd.py's docstring.

Imports nothing of the project: the entry point (kernels/ssd.py) and the chunked scan (kernels/ssd_chunked.py)
import it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf)):
    """dt (b, l, h) or (b, h) -> clamp(softplus(dt + dt_bias), dt_limit) in fp32 (each step only when asked)."""
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = dt_limit
    if lo > 0.0 or hi < math.inf:
        dt = dt.clamp(min=lo, max=hi)
    return dt


def document_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, l) document indices -> (b, l) bool, True where a new document starts: seq_idx_t != seq_idx_{t-1}.
    Never at t = 0: the first token continues the initial state."""
    starts = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                 initial_states=None, return_final_states=False, chunk_size=None, seq_idx=None):
    """The spec: the recurrence one step at a time, in fp32; y cast back to x's dtype once. Signature of ssd_scan
    (chunk_size is ignored)."""
    batch, seqlen, nheads, headdim = x.shape
    ngroups = B.shape[2]
    dtype_in = x.dtype
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)                        # (b, l, h) fp32
    xf = x.float()
    Bh = B.float().repeat_interleave(nheads // ngroups, dim=2)                 # (b, l, h, n)
    Ch = C.float().repeat_interleave(nheads // ngroups, dim=2)
    dA = torch.exp(dt * A.float())                                             # (b, l, h)
    if seq_idx is not None:
        # a new document: the previous state is multiplied by 0 (forgotten), not decayed
        dA = dA.masked_fill(document_starts(seq_idx)[:, :, None], 0.0)
    state = (torch.zeros(batch, nheads, headdim, B.shape[-1], device=x.device, dtype=torch.float32)
             if initial_states is None else initial_states.float())           # (b, h, p, n)
    ys = []
    for t in range(seqlen):
        dBx = (dt[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]    # (b, h, p, n)
        state = dA[:, t, :, None, None] * state + dBx
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))              # (b, h, p)
    y = torch.stack(ys, dim=1) if ys else xf.new_zeros(xf.shape)               # (b, l, h, p)
    y = _skip_and_gate(y, xf, D, z)
    y = y.to(dtype_in)
    return (y, state) if return_final_states else y


def _skip_and_gate(y, xf, D, z):
    """y + D * x, then * silu(z); all fp32. D: (h,) or (h, p)."""
    if D is not None:
        Df = D.float()
        y = y + xf * (Df[:, None] if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    return y
