"""The selective scan in pure PyTorch, fast on CPUs and usable on GPUs without Triton.

Same equations as kernels/reference.py (b: batch, d: d_inner, l: length, n: d_state):

    dA_t = exp(delta_t * A)            (b, d, n)   every exponent is delta_t * A <= 0: never a cumulative sum
    h_t  = dA_t * h_{t-1} + delta_t * B_t * u_t
    y_t  = <h_t, C_t> + D * u_t;   y_t = y_t * silu(z_t)

How it is split: the sequence is cut into chunks of T steps. Inside a chunk everything that does not depend on the
previous state is computed at once, as (T, b, d, n) tensors in time-major layout (dA, delta*B*u, C*dy); only the
recurrence itself, one fused multiply-add per step on a contiguous (b, d, n) slice, runs in order. Across chunks
the state is carried sequentially. Working memory is a few (T, b, d, n) buffers whatever L is; the forward keeps
the state at each chunk start (l/T states per channel), and the backward, a hand-written autograd Function,
recomputes each chunk's states from there, runs the adjoint recurrence in reverse time, and turns it into every
input's gradient with small matmuls. The state and all arithmetic are fp32 whatever the input dtype.

What was measured (this 2-core AVX-512 CPU, 2 threads; batch 4, d_inner 1024, d_state 16, L 1024, fp32, forward;
bench/bench_scan.py and the scratch runs quoted here):
  - small sequential inner loop (what this file does): the per-step multiply-add on 64K contiguous floats is cache
    resident and costs ~20 us, so the whole sequential part is ~25 ms; the chunk-wide exp and products are
    bandwidth bound. Forward ~0.1 s, forward+backward ~0.4 s; ref: forward 0.2 s, forward+backward 4.2 s.
  - log-depth doubling scan inside the chunk (Hillis-Steele, log2 T passes of (a, b) composition over the chunk):
    log2(T) times more elementwise work than the sequential loop, and it was 2-3x slower at T = 16..64.
  - masked segment-sum form (exp of within-chunk differences of cumulative log-decays, masked to s <= t):
    because Mamba-1's decay differs per state channel the decay matrix is (T, T) per (b, d, n), T times the work
    and memory of the loop; 5-10x slower at T = 8..32, and slower still for larger T.
  - chunk size: buffers of about 1M floats (4 MB, about the L2) were best; see _chunk_len.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements per (T, b, d, n) working buffer. About the L2 cache of a server core pair; larger chunks lost to page
# faults on fresh allocations and cache misses, smaller ones to per-op overhead.
_CHUNK_ELEMENTS = 1 << 20


def _chunk_len(seqlen: int, batch: int, d_inner: int, d_state: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        return min(chunk_size, max(seqlen, 1))
    per_step = batch * d_inner * d_state
    return max(1, min(max(seqlen, 1), 256, _CHUNK_ELEMENTS // max(per_step, 1)))


def _prepare_delta(delta, delta_bias, delta_softplus):
    """delta (b, d, l) in fp32 with the bias and softplus applied, as the recurrence uses it."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _scan_forward(u, delta, A, B, C, h0, chunk, save_states):
    """The recurrence over all chunks.

    Args:
        u, delta: (b, d, l) fp32 (delta already softplus'ed)
        A: (d, n) fp32;  B, C: (b, n, l) fp32;  h0: (b, d, n) fp32 or None
        chunk: steps per chunk;  save_states: keep the state at each chunk start (for the backward)
    Returns:
        ys: (l, b, d) fp32, <h_t, C_t> without the D skip or the z gate
        h: (b, d, n) fp32, the last state
        states: (num_chunks, b, d, n) fp32 chunk-start states, or None
    """
    batch, d_inner, seqlen = u.shape
    d_state = A.shape[1]
    num_chunks = -(-seqlen // chunk)
    du = delta * u                                                           # (b, d, l)
    ys = u.new_empty(seqlen, batch, d_inner)                                 # (l, b, d)
    dA = u.new_empty(chunk, batch, d_inner, d_state)                         # (T, b, d, n)
    dbu = u.new_empty(chunk, batch, d_inner, d_state)
    hs = u.new_empty(chunk + 1, batch, d_inner, d_state)                     # hs[0] = state before the chunk
    states = u.new_empty(num_chunks, batch, d_inner, d_state) if save_states else None
    if h0 is None:
        hs[0].zero_()
    else:
        hs[0].copy_(h0)
    for c in range(num_chunks):
        t0 = c * chunk
        T = min(chunk, seqlen - t0)
        if states is not None:
            states[c].copy_(hs[0])
        a, x, h = dA[:T], dbu[:T], hs[:T + 1]
        torch.mul(delta[:, :, t0:t0 + T].permute(2, 0, 1)[..., None], A, out=a)       # (T, b, d, n)
        torch.exp(a, out=a)
        torch.mul(du[:, :, t0:t0 + T].permute(2, 0, 1)[..., None],
                  B[:, None, :, t0:t0 + T].permute(3, 0, 1, 2), out=x)                  # (T, b, d, n)
        for t in range(T):
            torch.addcmul(x[t], a[t], h[t], out=h[t + 1])
        Ct = C[:, :, t0:t0 + T].permute(2, 0, 1)[..., None]                              # (T, b, n, 1)
        torch.matmul(h[1:], Ct, out=ys[t0:t0 + T, :, :, None])                          # (T, b, d, 1)
        hs[0].copy_(h[T])
    return ys, hs[0].clone(), states


def _epilogue(ys, u, D, z):
    """y = (ys + D * u) * silu(z) in (b, d, l), fp32."""
    y = ys.permute(1, 2, 0)                                                  # (b, d, l) view
    if D is None and z is None:
        return y.clone(memory_format=torch.contiguous_format)               # never a view of the saved ys
    if D is not None:
        y = y + D.float()[None, :, None] * u
    if z is not None:
        y = y * F.silu(z.float())
    return y


class _ChunkedScan(torch.autograd.Function):
    """Forward saves the inputs, chunk-start states and the pre-gate output; backward recomputes the rest."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, chunk):
        u32, d32 = u.float(), _prepare_delta(delta, delta_bias, delta_softplus)
        h0 = None if initial_state is None else initial_state.float()
        ys, h_last, states = _scan_forward(u32, d32, A.float(), B.float(), C.float(), h0, chunk, save_states=True)
        y = _epilogue(ys, u32, D, z).to(u.dtype)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states, ys)
        ctx.delta_softplus, ctx.chunk, ctx.has_h0 = delta_softplus, chunk, initial_state is not None
        return y, h_last

    @staticmethod
    def backward(ctx, dy, dh_last):
        u, delta, A, B, C, D, z, delta_bias, states, ys = ctx.saved_tensors
        chunk = ctx.chunk
        batch, d_inner, seqlen = u.shape
        d_state = A.shape[1]
        u32 = u.float()
        d_raw = delta.float() if delta_bias is None else delta.float() + delta_bias.float()[None, :, None]
        d32 = F.softplus(d_raw) if ctx.delta_softplus else d_raw
        A32, B32, C32 = A.float(), B.float(), C.float()
        dy = dy.float()

        # Epilogue: y = (ys + D u) * silu(z).
        grad_D = grad_z = None
        du_total = torch.zeros_like(u32)                                     # (b, d, l)
        if z is not None:
            z32 = z.float()
            sz = torch.sigmoid(z32)
            pre = ys.permute(1, 2, 0)
            if D is not None:
                pre = pre + D.float()[None, :, None] * u32
            grad_z = dy * pre * sz * (1 + z32 * (1 - sz))
            dy = dy * (z32 * sz)                                             # d(pre)
        if D is not None:
            grad_D = (dy * u32).sum(dim=(0, 2))
            du_total.addcmul_(dy, D.float()[None, :, None])
        dys = dy.permute(2, 0, 1)                                            # (l, b, d) view

        # Reverse-time scan over chunks, each one recomputed from its saved start state.
        num_chunks = states.shape[0]
        du = d32 * u32                                                       # (b, d, l)
        dA = u32.new_empty(chunk, batch, d_inner, d_state)                   # (T, b, d, n)
        work = u32.new_empty(chunk, batch, d_inner, d_state)
        hs = u32.new_empty(chunk + 1, batch, d_inner, d_state)
        dh = u32.new_empty(chunk, batch, d_inner, d_state)
        carry = u32.new_zeros(batch, d_inner, d_state) if dh_last is None else dh_last.float().clone()
        grad_B = u32.new_empty(seqlen, batch, d_state)                        # (l, b, n)
        grad_C = u32.new_empty(seqlen, batch, d_state)
        grad_du = u32.new_empty(seqlen, batch, d_inner)                      # d loss / d(delta * u)
        grad_dlog = u32.new_empty(seqlen, batch, d_inner)                    # d loss / d delta via the decay
        grad_A = torch.zeros_like(A32)
        for c in reversed(range(num_chunks)):
            t0 = c * chunk
            T = min(chunk, seqlen - t0)
            a, x, h, g = dA[:T], work[:T], hs[:T + 1], dh[:T]
            d_c = delta_c = d32[:, :, t0:t0 + T].permute(2, 0, 1)                        # (T, b, d)
            du_c = du[:, :, t0:t0 + T].permute(2, 0, 1)
            B_c = B32[:, :, t0:t0 + T].permute(2, 0, 1)                                   # (T, b, n)
            C_c = C32[:, :, t0:t0 + T].permute(2, 0, 1)
            dy_c = dys[t0:t0 + T]                                                         # (T, b, d)
            torch.mul(d_c[..., None], A32, out=a)
            torch.exp(a, out=a)
            torch.mul(du_c[..., None], B_c[:, :, None, :], out=x)
            h[0].copy_(states[c])
            for t in range(T):
                torch.addcmul(x[t], a[t], h[t], out=h[t + 1])
            # Adjoint: dh_t = C_t dy_t + dA_{t+1} dh_{t+1}; the carry brings dA dh from the next chunk.
            torch.mul(dy_c[..., None], C_c[:, :, None, :], out=g)
            g[T - 1].add_(carry)
            for t in range(T - 2, -1, -1):
                g[t].addcmul_(a[t + 1], g[t + 1])
            carry = a[0] * g[0]
            torch.matmul(dy_c[:, :, None, :], h[1:], out=grad_C[t0:t0 + T, :, None, :])   # (T, b, 1, n)
            torch.matmul(du_c[:, :, None, :], g, out=grad_B[t0:t0 + T, :, None, :])
            torch.matmul(g, B_c[..., None], out=grad_du[t0:t0 + T, :, :, None])           # (T, b, d, 1)
            # d loss / d(delta_t A) = dh_t * h_{t-1} * dA_t
            torch.mul(g, h[:T], out=x)
            x.mul_(a)
            torch.mul(x, A32, out=a)                                                     # dA is spent
            torch.sum(a, dim=-1, out=grad_dlog[t0:t0 + T])
            x.mul_(delta_c[..., None])
            grad_A += x.sum(dim=(0, 1))

        grad_du_b = grad_du.permute(1, 2, 0)                                 # (b, d, l) views
        grad_delta = grad_dlog.permute(1, 2, 0) + grad_du_b * u32
        du_total.addcmul_(grad_du_b, d32)
        if ctx.delta_softplus:
            grad_delta = grad_delta * torch.sigmoid(d_raw)
        grad_bias = grad_delta.sum(dim=(0, 2)) if delta_bias is not None else None
        grad_h0 = carry if ctx.has_h0 else None
        return (du_total.to(u.dtype), grad_delta.to(delta.dtype), grad_A.to(A.dtype),
                grad_B.permute(1, 2, 0).to(B.dtype), grad_C.permute(1, 2, 0).to(C.dtype),
                None if grad_D is None else grad_D.to(D.dtype), None if grad_z is None else grad_z.to(z.dtype),
                None if grad_bias is None else grad_bias.to(delta_bias.dtype), grad_h0, None, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, chunk_size=None):
    """Chunked selective scan: parallel inside chunks, sequential across them (see the module docstring).

    Args:
        u, delta: (b, d, l), any float dtype
        A: (d, n), fp32
        B, C: (b, n, l)
        D, delta_bias: (d,) or None
        z: (b, d, l) or None; gates the output with silu(z)
        delta_softplus: apply softplus to delta + delta_bias
        return_last_state: also return the state after the last step
        initial_state: (b, d, n) or None (zeros)
        chunk_size: steps per chunk; None picks one from the shapes
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state also h_L: (b, d, n) fp32
    """
    batch, d_inner, seqlen = u.shape
    chunk = _chunk_len(seqlen, batch, d_inner, A.shape[1], chunk_size)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, h_last = _ChunkedScan.apply(*inputs, delta_softplus, chunk)
    else:                                                                    # inference: nothing to save
        ys, h_last, _ = _scan_forward(u.float(), _prepare_delta(delta, delta_bias, delta_softplus), A.float(),
                                      B.float(), C.float(), None if initial_state is None else initial_state.float(),
                                      chunk, save_states=False)
        y = _epilogue(ys, u.float(), D, z).to(u.dtype)
    return (y, h_last) if return_last_state else y
