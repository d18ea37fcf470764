"""The selective scan in pure PyTorch, fast on CPUs and usable on GPUs without Triton.

Same equations as kernels/reference.py (b: batch, d: d_inner, l: length, n: d_state, T: steps per chunk):

    dA_t = exp(delta_t * A)            every exponent is delta_t * A <= 0: never the exp of a cumulative sum
    h_t  = dA_t * h_{t-1} + delta_t * B_t * u_t
    y_t  = <h_t, C_t> + D * u_t;   y_t = y_t * silu(z_t)

How it is split: the sequence is cut into chunks of T steps. Inside a chunk everything that does not depend on the
previous state is computed at once as (b, T, n, d) tensors (dA, delta*B*u, C*dy: one broadcast op each); only the
recurrence itself, one in-place multiply-add per step on a (b, n, d) slice, runs in order; y and the gradients of
B, C and delta*u are small batched matmuls over the chunk. Across chunks the state is carried sequentially.
Working memory is three (b, T, n, d) buffers whatever L is. The forward keeps only the state at each chunk start
(l/T states per channel); the backward (a hand-written autograd Function) recomputes each chunk's states from
there, runs the adjoint recurrence dh_t = C_t dy_t + dA_{t+1} dh_{t+1} in reverse time, and forms every input's
gradient from it. State and arithmetic are fp32 whatever the input dtype.

Packed rows (seq_idx, kernels/documents.py): the decay of a document's first step is multiplied by zero,
dA_t := 0, so h_t = delta_t B_t u_t as if h_{t-1} were 0. The backward recomputes the same zeroed decays, so the
adjoint stops at the boundary too (its coefficient dA_{t+1} is zero there) and nothing flows through the decay
there. Without seq_idx nothing of this runs.

Layout: channels-last, (b, l, d) with d innermost, so every broadcast runs along long contiguous rows. The model's
z and the gradients arriving from its (b, l, d) projections are transposed views of such storage, so converting
them is free; y and the input gradients are returned as (b, d, l) views of (b, l, d) storage.

Within-chunk formulations measured (this 2-core AVX-512 CPU, one thread, CPU time of the forward over a whole
(b 4, L 512, d 512, n 16) sequence, the training benchmark's per-layer shape; same results to 2e-6):
                                             T = 8      T = 16     T = 32
    small sequential inner loop (this file)  16.5 ms    19.0 ms    19.6 ms
    log-depth doubling (Hillis-Steele)       68.7 ms    101.7 ms   133.5 ms   log2(T) passes over the chunk
    masked segment-sum (exp of differences   703 ms     2555 ms    4908 ms    a (T, T) decay matrix per (b, n, d):
      of within-chunk cumulative log-decays)                                  T times the work of the loop
The loop wins because Mamba-1's decay differs per state channel: the matmul-friendly segment-sum form of Mamba-2
has no shared (T, T) matrix to multiply with here, and the per-step op on 32K-64K contiguous floats costs ~10 us,
little more than its memory traffic. Chunk length T = 4..32 was within 10% (see _chunk_len). Earlier versions:
a time-major (T, b, d, n) layout fed by strided (b, d, l) slices was 1.7x slower (strided broadcasts and the
matvec over n = 16); recomputing the transposes and softplus in the backward cost another 10%.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Elements per (b, T, n, d) working buffer: T = budget // (b * n * d), clamped to [8, 64]. On a CPU about an L2
# cache's worth (T = 4..32 measured within 10% of each other at the bench shapes); on a GPU, where each op is a
# kernel launch, chunks as long as memory comfortably allows. T >= 8 keeps the saved chunk-start states (l/T per
# channel and state) well below the l * d_state a full history would take.
_CHUNK_ELEMENTS = {"cpu": 1 << 19, "cuda": 1 << 24}
_MIN_CHUNK, _MAX_CHUNK = 8, 64
_TRANSPOSE_BLOCK = 32        # channels per block when copying (b, c, l) to (b, l, c) on the CPU


def _chunk_len(seqlen: int, batch: int, d_inner: int, d_state: int, chunk_size: int | None,
               device_type: str = "cpu") -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
        return min(chunk_size, max(seqlen, 1))
    budget = _CHUNK_ELEMENTS.get(device_type, _CHUNK_ELEMENTS["cpu"])
    chunk = min(_MAX_CHUNK, max(_MIN_CHUNK, budget // max(batch * d_inner * d_state, 1)))
    return min(chunk, max(seqlen, 1))


def _channels_last(x):
    """(b, c, l) -> (b, l, c) fp32 contiguous. Free when x is already a transposed view of (b, l, c) storage, as
    the gradients flowing back through the model's (b, l, d) projections are. Otherwise copied in blocks of
    channels: one strided copy with power-of-two rows thrashes the cache (29 ms for 4 x 1024 x 1024 on this CPU;
    3 ms in blocks of 32)."""
    xt = x.transpose(1, 2)
    if xt.is_contiguous():
        return xt.float()
    out = torch.empty(xt.shape, dtype=torch.float32, device=x.device)
    if x.device.type != "cpu":
        return out.copy_(xt)
    for c0 in range(0, x.shape[1], _TRANSPOSE_BLOCK):
        out[:, :, c0:c0 + _TRANSPOSE_BLOCK].copy_(xt[:, :, c0:c0 + _TRANSPOSE_BLOCK])
    return out


def _gate_view(z):
    """z (b, d, l) -> (b, l, d) fp32 for the elementwise gate only: a strided view is fine as long as d is the
    contiguous dimension (the model's z is half of its in_proj output's rows), so no copy is made then."""
    zt = z.transpose(1, 2)
    return zt.float() if zt.stride(-1) == 1 else _channels_last(z)


def _delta_bld(delta, delta_bias, delta_softplus):
    """delta (b, d, l) -> (b, l, d) fp32 with the bias and softplus applied, as the recurrence uses it."""
    delta = _channels_last(delta)
    if delta_bias is not None:
        delta = delta + delta_bias.float()
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def _scan_forward(u, delta, At, B, C, h, chunk, save_states, keep=None):
    """The recurrence over all chunks, in channels-last layout.

    Args:
        u, delta: (b, l, d) fp32 (delta already softplus'ed)
        At: (n, d) fp32, A transposed;  B, C: (b, l, n) fp32
        h: (b, n, d) fp32 state before the first step; updated in place to the last state
        chunk: steps per chunk;  save_states: keep the state at each chunk start (for the backward)
        keep: (b, l) fp32, 0 at a document's first step and 1 elsewhere, or None (one document per row)
    Returns:
        ys: (b, l, d) fp32, <h_t, C_t> without the D skip or the z gate
        states: (num_chunks, b, n, d) fp32 chunk-start states, or None
    """
    batch, seqlen, d_inner = u.shape
    d_state = At.shape[0]
    num_chunks = -(-seqlen // chunk)
    du = delta * u                                                           # (b, l, d)
    ys = u.new_empty(batch, seqlen, d_inner)
    dA = u.new_empty(batch, chunk, d_state, d_inner)                         # (b, T, n, d)
    hs = torch.empty_like(dA)                                                # delta B u, then h in place
    a_t, h_t = dA.unbind(1), hs.unbind(1)                                    # per-step (b, n, d) views, made once
    states = u.new_empty(num_chunks, batch, d_state, d_inner) if save_states else None
    for c in range(num_chunks):
        t0 = c * chunk
        T = min(chunk, seqlen - t0)
        if states is not None:
            states[c].copy_(h)
        torch.mul(delta[:, t0:t0 + T, None, :], At, out=dA[:, :T])           # (b, T, n, d)
        torch.exp(dA[:, :T], out=dA[:, :T])
        if keep is not None:
            dA[:, :T] *= keep[:, t0:t0 + T, None, None]                      # a document's first step: h_{t-1} := 0
        torch.mul(B[:, t0:t0 + T, :, None], du[:, t0:t0 + T, None, :], out=hs[:, :T])
        prev = h
        for t in range(T):                                                   # h_t = dA_t h_{t-1} + delta_t B_t u_t
            prev = h_t[t].addcmul_(a_t[t], prev)
        h.copy_(prev)
        ys[:, t0:t0 + T] = torch.matmul(C[:, t0:t0 + T, None, :], hs[:, :T]).squeeze(2)   # (b, T, 1, d) -> (b, T, d)
    return ys, states


def _keep(seq_idx):
    """(b, l) fp32: 0 where a new document starts (seq_idx differs from the step before), 1 elsewhere."""
    keep = torch.ones(seq_idx.shape, dtype=torch.float32, device=seq_idx.device)
    keep[:, 1:] = (seq_idx[:, 1:] == seq_idx[:, :-1]).float()
    return keep


def _epilogue(ys, u, D, z):
    """y = (ys + D * u) * silu(z), all (b, l, d) fp32."""
    y = ys
    if D is not None:
        y = torch.addcmul(ys, u, D.float())
    if z is not None:
        y = y * F.silu(z)
    return y.clone() if y is ys else y                                       # never the saved ys itself


class _ChunkedScan(torch.autograd.Function):
    """Forward saves the (channels-last, fp32) inputs, the chunk-start states and the pre-gate output; backward
    recomputes each chunk's states and decays from them."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, initial_state, keep, delta_softplus, chunk):
        batch, d_inner, _ = u.shape
        u_, delta_ = _channels_last(u), _delta_bld(delta, delta_bias, delta_softplus)       # (b, l, d)
        B_, C_ = _channels_last(B), _channels_last(C)                                      # (b, l, n)
        h = (u_.new_zeros(batch, A.shape[1], d_inner) if initial_state is None
             else initial_state.float().transpose(1, 2).contiguous())                      # (b, n, d)
        ys, states = _scan_forward(u_, delta_, A.float().t().contiguous(), B_, C_, h, chunk, save_states=True,
                                   keep=keep)
        y = _epilogue(ys, u_, D, None if z is None else _gate_view(z)).to(u.dtype)    # (b, l, d)
        ctx.save_for_backward(u_, delta_, A, B_, C_, D, z, states, ys, keep)
        ctx.dtypes = [None if t is None else t.dtype for t in (u, delta, B, C, delta_bias)]
        ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
        ctx.has_bias, ctx.has_h0 = delta_bias is not None, initial_state is not None
        return y.transpose(1, 2), h.transpose(1, 2)                                        # (b, d, l), (b, d, n)

    @staticmethod
    def backward(ctx, dy, dh_last):
        u_, delta_, A, B_, C_, D, z, states, ys, keep = ctx.saved_tensors
        chunk = ctx.chunk
        batch, seqlen, d_inner = u_.shape
        d_state = A.shape[1]
        At = A.float().t().contiguous()                                      # (n, d)
        dy = _channels_last(dy)                                              # (b, l, d)

        # Epilogue: y = (ys + D u) * silu(z).
        grad_D = grad_z = None
        if z is not None:
            z_ = _gate_view(z)
            pre = ys if D is None else torch.addcmul(ys, u_, D.float())
            grad_z = torch.ops.aten.silu_backward(dy * pre, z_)
            dy = dy * F.silu(z_)                                             # d loss / d pre
        if D is not None:
            grad_D = (dy * u_).sum(dim=(0, 1))
            grad_u = dy * D.float()                                          # (b, l, d)
        else:
            grad_u = torch.zeros_like(u_)

        # Reverse-time scan over chunks, each one recomputed from its saved start state.
        num_chunks = states.shape[0]
        du = delta_ * u_                                                     # (b, l, d)
        dA = u_.new_empty(batch, chunk, d_state, d_inner)                    # (b, T, n, d)
        hs = torch.empty_like(dA)
        dh = torch.empty_like(dA)
        a_t, h_t, g_t = dA.unbind(1), hs.unbind(1), dh.unbind(1)             # per-step (b, n, d) views
        carry = (u_.new_zeros(batch, d_state, d_inner) if dh_last is None
                 else dh_last.float().transpose(1, 2).contiguous())         # d loss / d h at the chunk's end
        grad_B = u_.new_empty(batch, seqlen, d_state)                        # (b, l, n)
        grad_C = u_.new_empty(batch, seqlen, d_state)
        grad_du = u_.new_empty(batch, seqlen, d_inner)                       # d loss / d(delta * u), (b, l, d)
        grad_dlog = u_.new_empty(batch, seqlen, d_inner)                     # d loss / d delta through the decay
        grad_At = torch.zeros_like(At)                                       # (n, d)
        for c in reversed(range(num_chunks)):
            t0 = c * chunk
            T = min(chunk, seqlen - t0)
            sl = slice(t0, t0 + T)
            a, hc, g = dA[:, :T], hs[:, :T], dh[:, :T]
            h0 = states[c]                                                   # (b, n, d)
            torch.mul(delta_[:, sl, None, :], At, out=a)
            torch.exp(a, out=a)
            if keep is not None:
                a *= keep[:, sl, None, None]
            torch.mul(B_[:, sl, :, None], du[:, sl, None, :], out=hc)
            prev = h0
            for t in range(T):
                prev = h_t[t].addcmul_(a_t[t], prev)
            # Adjoint: dh_t = C_t dy_t + dA_{t+1} dh_{t+1}; the carry brings it in from the next chunk.
            torch.mul(C_[:, sl, :, None], dy[:, sl, None, :], out=g)
            g_t[T - 1].add_(carry)
            for t in range(T - 2, -1, -1):
                g_t[t].addcmul_(a_t[t + 1], g_t[t + 1])
            carry = a_t[0] * g_t[0]
            grad_C[:, sl] = torch.matmul(hc, dy[:, sl, :, None]).squeeze(-1)              # (b, T, n)
            grad_B[:, sl] = torch.matmul(g, du[:, sl, :, None]).squeeze(-1)
            grad_du[:, sl] = torch.matmul(B_[:, sl, None, :], g).squeeze(2)               # (b, T, d)
            # d loss / d(delta_t A) = dh_t * h_{t-1} * dA_t, formed in place in dh (h_{t-1}: hs one step back)
            g[:, 1:].mul_(hc[:, :T - 1])
            g_t[0].mul_(h0)
            g.mul_(a)
            torch.mul(g, At, out=a)                                                        # dA is spent
            torch.sum(a, dim=2, out=grad_dlog[:, sl])
            g.mul_(delta_[:, sl, None, :])
            grad_At += g.sum(dim=(0, 1))

        grad_delta = torch.addcmul(grad_dlog, grad_du, u_)                   # (b, l, d)
        grad_u.addcmul_(grad_du, delta_)
        if ctx.delta_softplus:
            grad_delta.mul_(-torch.expm1(-delta_))                           # softplus' = sigmoid = 1 - exp(-softplus)
        grad_bias = grad_delta.sum(dim=(0, 1)) if ctx.has_bias else None
        grad_h0 = carry.transpose(1, 2) if ctx.has_h0 else None
        u_dtype, delta_dtype, B_dtype, C_dtype, bias_dtype = ctx.dtypes

        def back(grad, dtype):                                               # (b, l, c) -> (b, c, l) view
            return None if grad is None else grad.to(dtype).transpose(1, 2)

        return (back(grad_u, u_dtype), back(grad_delta, delta_dtype), grad_At.t().to(A.dtype),
                back(grad_B, B_dtype), back(grad_C, C_dtype), None if grad_D is None else grad_D.to(D.dtype),
                None if grad_z is None else grad_z.to(z.dtype).transpose(1, 2),
                None if grad_bias is None else grad_bias.to(bias_dtype), grad_h0, None, None, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, initial_state=None, chunk_size=None, seq_idx=None):
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
        seq_idx: (b, l) int or None; the document index of each token (kernels/documents.py)
    Returns:
        y: (b, d, l) in u's dtype; with return_last_state also h_L: (b, d, n) fp32 (the last document's)
    """
    batch, d_inner, seqlen = u.shape
    chunk = _chunk_len(seqlen, batch, d_inner, A.shape[1], chunk_size, u.device.type)
    keep = None if seq_idx is None else _keep(seq_idx)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        y, h_last = _ChunkedScan.apply(*inputs, keep, delta_softplus, chunk)
    else:                                                                    # inference: nothing to save
        u_ = _channels_last(u)
        h = (u_.new_zeros(batch, A.shape[1], d_inner) if initial_state is None
             else initial_state.float().transpose(1, 2).contiguous())                      # (b, n, d)
        ys, _ = _scan_forward(u_, _delta_bld(delta, delta_bias, delta_softplus), A.float().t().contiguous(),
                              _channels_last(B), _channels_last(C), h, chunk, save_states=False, keep=keep)
        y = _epilogue(ys, u_, D, None if z is None else _gate_view(z)).to(u.dtype).transpose(1, 2)
        h_last = h.transpose(1, 2)
    return (y, h_last) if return_last_state else y
