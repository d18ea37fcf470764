"""The one SSD-scan entry point (Mamba-2, "Transformers are SSMs"), its sequential reference, and the choice of
backend.

Shape letters (mamba_ssm's names): b batch, l length, h heads, p headdim, g ngroups (B and C shared by h / g heads
each), n d_state. Head i reads group i // (h / g). For each batch row and head, with state S (p, n):

    dt_t = clamp(softplus(dt_t + dt_bias), dt_limit)          (softplus only with dt_softplus; dt_bias optional)
    S_t  = exp(dt_t * A) * S_{t-1} + dt_t * x_t B_t^T          A: one scalar per head, A < 0
    y_t  = S_t C_t + D * x_t;   y_t = y_t * silu(z_t)          (D and z optional)

Packed rows (seq_idx, optional): many documents in one row, seq_idx (b, l) integer the document index of each token,
non-decreasing along a row (0, 0, 0, 1, 1, 2, ...). A new document starts wherever seq_idx_t != seq_idx_{t-1} (every
backend reads it so; the numbers themselves do not matter), and there the state restarts from zero,
S_t = dt_t * x_t B_t^T, as if S_{t-1} = 0: nothing flows across a boundary, in either direction of the gradient.
The first token continues initial_states (it has no predecessor to differ from), and the final state is the last
document's. seq_idx=None is one document per row, at no extra cost.

The decay exp(dt_t * A) is one scalar per head and step (Mamba-1 has one per channel and state), which is what lets
the chunked form below run on matmuls.

Backends, all with the signature of `ssd_scan`:
    "ref"      ssd_scan_ref (kernels/ssd_reference.py): the recurrence above, one step at a time (the spec; slow)
    "chunked"  kernels/ssd_chunked.py: the four-step chunked SSD algorithm in pure PyTorch (matmuls; CPU and GPU)
    "triton"   kernels/triton_ssd_scan.py: the same four steps as Triton kernels (forward kernels/triton_ssd.py,
               backward kernels/triton_ssd_bwd.py; CUDA, or CPU under TRITON_INTERPRET=1)
    "auto"     triton for CUDA tensors when Triton imports, chunked otherwise
This module is the only place that decides which backend runs.

`ssd_state_update` is the one-token step of decoding (PyTorch), the same equations at l = 1 on a state kept in fp32.
"""
from __future__ import annotations

import math

import torch

from .backends import resolve
from .ssd_chunked import ssd_scan_chunked
from .ssd_reference import _skip_and_gate, document_starts, process_dt, ssd_scan_ref  # noqa: F401 (re-exported)

SSD_BACKENDS = ("auto", "ref", "chunked", "triton")
DEFAULT_CHUNK_SIZE = 256


def resolve_ssd_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn "auto" into a concrete backend for `device`; an explicit one that cannot run is an error saying why."""
    return resolve("SSD", backend, SSD_BACKENDS, device, pytorch_path="chunked")


def _implementation(name: str):
    if name == "ref":
        return ssd_scan_ref
    if name == "triton":
        from .triton_ssd_scan import ssd_scan_triton     # imports Triton: only when asked for
        return ssd_scan_triton
    return ssd_scan_chunked


def ssd_scan(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
             initial_states=None, return_final_states=False, chunk_size=DEFAULT_CHUNK_SIZE, seq_idx=None,
             backend="auto"):
    """y = the SSD scan of x with per-head scalar decay (Mamba-2), in mamba_ssm's mamba_chunk_scan_combined spirit.

    Args:
        x: (b, l, h, p) any float dtype
        dt: (b, l, h) the raw time step (before dt_bias and softplus)
        A: (h,) fp32, negative (the model passes -exp(A_log))
        B, C: (b, l, g, n) with h % g == 0
        D: (h,) or (h, p) or None: skip connection y += D * x
        z: (b, l, h, p) or None: gate y *= silu(z) (the Mamba-2 model gates in its norm instead and passes None)
        dt_bias: (h,) or None
        dt_softplus: apply softplus to dt + dt_bias
        dt_limit: (min, max) clamp of dt after softplus; (0, inf) = none
        initial_states: (b, h, p, n) or None (zeros)
        return_final_states: also return the state after the last step
        chunk_size: tokens per chunk of the chunked backend (any length works, not only multiples of it)
        seq_idx: (b, l) int32 (or int64) or None: the document index of each token, non-decreasing along a row;
            the state restarts from zero where it changes (see the module doc). None: one document per row
        backend: "auto", "ref", "chunked" or "triton"
    Returns:
        y (b, l, h, p) in x's dtype; with return_final_states, (y, final_states (b, h, p, n) fp32)
    """
    _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_limit, chunk_size, seq_idx)
    name = resolve_ssd_backend(backend, x.device)
    return _implementation(name)(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                 dt_limit=tuple(dt_limit), initial_states=initial_states,
                                 return_final_states=return_final_states, chunk_size=chunk_size, seq_idx=seq_idx)


def ssd_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                     dt_limit=(0.0, math.inf)):
    """One decoding step, in place on `state`.

    Args:
        state: (b, h, p, n) fp32, updated in place
        x: (b, h, p);  dt: (b, h);  A: (h,);  B, C: (b, g, n);  D: (h,) or (h, p);  z: (b, h, p);  dt_bias: (h,)
    Returns:
        y: (b, h, p) in x's dtype
    """
    nheads = x.shape[1]
    ngroups = B.shape[1]
    dtype_in = x.dtype
    xf = x.float()
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)                        # (b, h)
    Bh = B.float().repeat_interleave(nheads // ngroups, dim=1)                 # (b, h, n)
    Ch = C.float().repeat_interleave(nheads // ngroups, dim=1)
    dA = torch.exp(dt * A.float())                                             # (b, h)
    state.mul_(dA[:, :, None, None]).add_((dt[:, :, None] * xf)[..., None] * Bh[:, :, None, :])
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)                               # (b, h, p)
    return _skip_and_gate(y, xf, D, z).to(dtype_in)


def _check_shapes(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_limit, chunk_size, seq_idx=None):
    if x.dim() != 4:
        raise ValueError(f"x must be (batch, length, nheads, headdim), got shape {tuple(x.shape)}")
    batch, seqlen, nheads, headdim = x.shape
    if B.dim() != 4 or B.shape[:2] != (batch, seqlen):
        raise ValueError(f"B must be (batch={batch}, length={seqlen}, ngroups, d_state), got {tuple(B.shape)}")
    ngroups, d_state = B.shape[2], B.shape[3]
    if nheads % ngroups != 0:
        raise ValueError(f"nheads ({nheads}) must be a multiple of ngroups ({ngroups})")
    expected = {"dt": (dt, (batch, seqlen, nheads)), "A": (A, (nheads,)), "C": (C, tuple(B.shape)),
                "z": (z, tuple(x.shape)), "dt_bias": (dt_bias, (nheads,)),
                "initial_states": (initial_states, (batch, nheads, headdim, d_state))}
    for name, (tensor, shape) in expected.items():
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")
    if D is not None and tuple(D.shape) not in ((nheads,), (nheads, headdim)):
        raise ValueError(f"D must have shape ({nheads},) or ({nheads}, {headdim}), got {tuple(D.shape)}")
    if len(dt_limit) != 2 or not 0.0 <= dt_limit[0] <= dt_limit[1]:
        raise ValueError(f"dt_limit must be (min, max) with 0 <= min <= max, got {dt_limit!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if seq_idx is not None:
        # (whether it is non-decreasing is not checked: that would wait on the GPU at every call)
        if tuple(seq_idx.shape) != (batch, seqlen):
            raise ValueError(f"seq_idx must have shape {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
        if seq_idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq_idx must be int32 (or int64), got {seq_idx.dtype}")
        if seq_idx.device != x.device:
            raise ValueError(f"seq_idx must be on x's device ({x.device}), got {seq_idx.device}")
