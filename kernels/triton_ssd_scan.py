"""The Triton SSD scan as one differentiable op (backend "triton" of kernels/ssd.py): the forward kernels of
kernels/triton_ssd.py and the backward kernels of kernels/triton_ssd_bwd.py joined as torch custom ops with autograd.

Both halves are torch custom ops (mamba_trainer::ssd_scan_fwd / ssd_scan_bwd, and ssd_scan_bwd_vjp) with fake
implementations, so torch.compile keeps a model that calls the scan in one graph. Imports point down only: this
module imports the forward, the backward and the chunked PyTorch scan; none of them imports it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .backends import triton_interpreting
from .ssd_chunked import ssd_scan_chunked
from .ssd_reference import document_starts
from .triton_ssd import MAX_DSTATE, _ssd_fwd
from .triton_ssd_bwd import ssd_bwd


# ---------------------------------------------------------------- autograd: torch custom ops
#
# The forward op launches the kernels. Two backward ops: the Triton kernels of kernels/triton_ssd_bwd.py (the
# default), and the earlier one that recomputes through the chunked PyTorch scan and returns autograd's
# vector-Jacobian product of it ("vjp", kept for bench/bench_ssd.py's side by side). Fake (meta) versions give every
# output's shape, so torch.compile keeps a model that calls the scan in one graph.

@torch.library.custom_op("mamba_trainer::ssd_scan_fwd", mutates_args=())
def ssd_scan_fwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                    initial_states: Optional[torch.Tensor], dt_softplus: bool, dt_min: float, dt_max: float,
                    chunk_size: int, vjp_backward: bool,
                    seq_idx: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (b, l, h, p) in x's dtype, the final state (b, h, p, n) fp32, and y before the gate (empty without z)."""
    return _ssd_fwd(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max, chunk_size, seq_idx)


@ssd_scan_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max, chunk_size, vjp_backward,
      seq_idx):
    batch, _, nheads, headdim = x.shape
    y_pre = torch.empty_like(x) if z is not None else x.new_empty(0)
    return torch.empty_like(x), x.new_empty(batch, nheads, headdim, B.shape[-1], dtype=torch.float32), y_pre


@torch.library.custom_op("mamba_trainer::ssd_scan_bwd", mutates_args=())
def ssd_scan_bwd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                    initial_states: Optional[torch.Tensor], y_pre: torch.Tensor, dt_softplus: bool, dt_min: float,
                    dt_max: float, chunk_size: int, dy: torch.Tensor, dfinal: Optional[torch.Tensor],
                    seq_idx: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of (x, dt, A, B, C) and, where given, of D, z, dt_bias, initial_states (in that order),
    by the Triton backward kernels."""
    return ssd_bwd(x, dt, A, B, C, D, z, dt_bias, initial_states, y_pre, dt_softplus, dt_min, dt_max, chunk_size,
                   dy, dfinal, seq_idx)


@ssd_scan_bwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, y_pre, dt_softplus, dt_min, dt_max, chunk_size, dy, dfinal,
      seq_idx):
    return [torch.empty_like(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states) if t is not None]


@torch.library.custom_op("mamba_trainer::ssd_scan_bwd_vjp", mutates_args=())
def ssd_scan_bwd_vjp_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                        D: Optional[torch.Tensor], z: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor],
                        initial_states: Optional[torch.Tensor], dt_softplus: bool, dt_min: float, dt_max: float,
                        chunk_size: int, dy: torch.Tensor, dfinal: Optional[torch.Tensor],
                        seq_idx: Optional[torch.Tensor]) -> list[torch.Tensor]:
    """The same gradients as ssd_scan_bwd's: the forward recomputed by the chunked PyTorch scan, differentiated by
    autograd (the earlier backward, slower: fp32 matmuls and many elementwise passes)."""
    inputs = (x, dt, A, B, C, D, z, dt_bias, initial_states)
    present = [i for i, t in enumerate(inputs) if t is not None]

    def chunked(*leaves):
        args = list(inputs)
        for i, t in zip(present, leaves):
            args[i] = t
        xx, dtt, AA, BB, CC, DD, zz, bias, h0 = args
        y, final = ssd_scan_chunked(xx, dtt, AA, BB, CC, D=DD, z=zz, dt_bias=bias, dt_softplus=dt_softplus,
                                    dt_limit=(dt_min, dt_max), initial_states=h0, return_final_states=True,
                                    chunk_size=chunk_size, seq_idx=seq_idx)
        return (y, final) if dfinal is not None else y

    # torch.func.vjp, not torch.autograd.grad: a custom op's implementation runs below the autograd dispatch key,
    # where autograd records nothing; functorch's transform brings its own.
    _, vjp = torch.func.vjp(chunked, *(inputs[i] for i in present))
    return list(vjp((dy, dfinal) if dfinal is not None else dy))


@ssd_scan_bwd_vjp_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max, chunk_size, dy, dfinal, seq_idx):
    return [torch.empty_like(t) for t in (x, dt, A, B, C, D, z, dt_bias, initial_states) if t is not None]


def _setup_context(ctx, inputs, output):
    (x, dt, A, B, C, D, z, dt_bias, initial_states, dt_softplus, dt_min, dt_max, chunk_size, vjp_backward,
     seq_idx) = inputs
    ctx.args = (dt_softplus, dt_min, dt_max, chunk_size)
    ctx.vjp_backward = vjp_backward
    ctx.present = tuple(t is not None for t in (D, z, dt_bias, initial_states))
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, output[2], seq_idx)


def _backward(ctx, dy, dfinal, dy_pre):
    x, dt, A, B, C, D, z, dt_bias, initial_states, y_pre, seq_idx = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dfinal = dfinal.contiguous() if dfinal is not None else None
    if ctx.vjp_backward:
        grads = ssd_scan_bwd_vjp_op(x, dt, A, B, C, D, z, dt_bias, initial_states, *ctx.args, dy.contiguous(),
                                    dfinal, seq_idx)
    else:
        grads = ssd_scan_bwd_op(x, dt, A, B, C, D, z, dt_bias, initial_states, y_pre, *ctx.args, dy.contiguous(),
                                dfinal, seq_idx)
    grads = iter(grads)
    dx, ddt, dA, dB, dC = (next(grads) for _ in range(5))
    dD, dz, dbias, dinit = (next(grads) if present else None for present in ctx.present)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit, None, None, None, None, None, None


ssd_scan_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def ssd_scan_triton(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=(0.0, math.inf),
                    initial_states=None, return_final_states=False, chunk_size=256, seq_idx=None,
                    backward="kernels"):
    """The SSD scan with the Triton forward; signature and result of kernels.ssd.ssd_scan_ref (see kernels/ssd.py).

    Args:
        x: (b, l, h, p);  dt: (b, l, h);  A: (h,) fp32;  B, C: (b, l, g, n) with n <= 256;  D: (h,) or (h, p);
        z: (b, l, h, p);  dt_bias: (h,);  initial_states: (b, h, p, n);  seq_idx: (b, l) integer document indices
        (CUDA tensors, or CPU ones under TRITON_INTERPRET=1)
        backward: "kernels" (the Triton backward) or "vjp" (the earlier recompute through the chunked scan's
        autograd; for side-by-side benchmarks)
    Returns:
        y (b, l, h, p) in x's dtype; with return_final_states, (y, final_states (b, h, p, n) fp32)
    """
    if backward not in ("kernels", "vjp"):
        raise ValueError(f"backward must be 'kernels' or 'vjp', got {backward!r}")
    if x.device.type != "cuda" and not triton_interpreting():
        raise RuntimeError(f"the Triton SSD scan needs CUDA tensors (got {x.device.type}); set TRITON_INTERPRET=1 "
                           "to run it on the CPU, or use backend='chunked'")
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    if dstate > MAX_DSTATE:
        raise ValueError(f"the Triton SSD scan supports d_state up to {MAX_DSTATE}, got {dstate}; "
                         "use backend='chunked'")
    if batch == 0 or seqlen == 0 or nheads == 0 or headdim == 0 or dstate == 0:
        # nothing to scan: no kernel launch on an empty grid
        return ssd_scan_chunked(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                dt_limit=dt_limit, initial_states=initial_states,
                                return_final_states=return_final_states, chunk_size=chunk_size, seq_idx=seq_idx)
    # contiguous at the boundary: the kernels take strides, but the fp32 intermediates assume their own layouts
    x, dt, B, C = (t.contiguous() for t in (x, dt, B, C))
    A = A.contiguous()
    D, z, dt_bias, initial_states = (t.contiguous() if t is not None else None
                                     for t in (D, z, dt_bias, initial_states))
    if seq_idx is not None:
        # renumbered 0, 1, 2, ... from the starts (int32, contiguous): the kernels compare indices for equality,
        # which then means "no start between", whatever numbers the caller used
        seq_idx = document_starts(seq_idx).cumsum(dim=1, dtype=torch.int32)
    y, final, _ = ssd_scan_fwd_op(x, dt, A, B, C, D, z, dt_bias, initial_states, bool(dt_softplus),
                                  float(dt_limit[0]), float(dt_limit[1]), int(chunk_size), backward == "vjp",
                                  seq_idx)
    return (y, final) if return_final_states else y
