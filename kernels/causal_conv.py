"""The one causal depthwise conv1d entry point (+ SiLU), its PyTorch reference, and the choice of backend.

    y[b, c, t] = act(bias[c] + sum_{j<k} weight[c, j] * x[b, c, t - (k - 1) + j]),   x[.., t < 0] = 0

the Mamba mixer's conv: nn.Conv1d(d, d, k, groups=d, padding=k - 1) cut to the first l outputs, then SiLU.

Packed rows (seq_idx (b, l), the document index of each token, kernels/documents.py): the window of output t takes
only inputs of t's own document, x[.., t'] with seq_idx[t'] == seq_idx[t]; inputs of other documents count as the
zero padding before a row's first token, so each document is convolved as if it stood alone.

Backends, all with the signature of `causal_conv1d` below:
    "torch"   causal_conv1d_ref here: F.conv1d in fp32 (the spec, and the CPU path)
    "triton"  kernels/triton_conv.py: one fused Triton kernel forward, one backward (CUDA, or TRITON_INTERPRET=1),
              registered as the torch custom ops mamba_trainer::causal_conv1d_fwd / _bwd (torch.compile traces them
              as one node each, no graph break)
    "auto"    triton on CUDA when Triton imports, else torch

Layout. x may have any strides. In the model it is a transposed view of the (b, l, 2 d) in_proj output, channels
contiguous; it may also be a contiguous (b, d, l) tensor. y (and the gradient of x) is allocated in the same dim
order as x (see kernels/layout.py), so that the next op reads it the way it read x.

`causal_conv1d_update` is the one-token step of decoding (PyTorch), the step SelectiveSSM.step takes today.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .backends import resolve, triton_importable
from .documents import check_seq_idx
from .layout import empty_like_order

CONV_BACKENDS = ("auto", "torch", "triton")
ACTIVATIONS = (None, "silu")


def resolve_conv_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Turn "auto" into a concrete backend for `device`; check that an explicit one can run there."""
    return resolve("conv", backend, CONV_BACKENDS, device, pytorch_path="torch")


def fill_conv_state(conv_state, x, mask=None):
    """conv_state (b, d, k) <- the last k (masked) inputs of x (b, d, l), zero-padded on the left when l < k."""
    k, l = conv_state.shape[-1], x.shape[-1]
    last = x[..., max(l - k, 0):]                                              # (b, d, min(l, k))
    if mask is not None:
        last = last.masked_fill(~mask[:, None, max(l - k, 0):], 0)
    conv_state.copy_(F.pad(last, (k - last.shape[-1], 0)))


def last_document(seq_idx, mask=None):
    """(b, l) bool: the tokens of each row's last document (and not masked): what a cache continues from."""
    last = seq_idx == seq_idx[:, -1:]
    return last if mask is None else last & mask


def _conv_within_documents(x, weight, bias, seq_idx):
    """The depthwise causal conv, each output's window cut at its document's start: (b, d, l) fp32."""
    k = weight.shape[1]
    windows = F.pad(x.float(), (k - 1, 0)).unfold(-1, k, 1)                   # (b, d, l, k): x[t - (k-1) + j]
    docs = F.pad(seq_idx, (k - 1, 0), value=-1).unfold(-1, k, 1)              # (b, l, k): their documents
    same = (docs == seq_idx[:, :, None]).float()                               # (b, l, k)
    y = torch.einsum("bdlk,blk,dk->bdl", windows, same, weight.float())
    return y if bias is None else y + bias.float()[None, :, None]


def causal_conv1d_ref(x, weight, bias=None, activation="silu", mask=None, conv_state=None, seq_idx=None):
    """The spec: F.conv1d in fp32, depthwise, padded by k - 1 on the left (with seq_idx: each window cut at its
    document's start). Signature of `causal_conv1d`."""
    batch, dim, seqlen = x.shape
    k = weight.shape[1]
    out = empty_like_order(x)                                                  # y in x's dim order
    if mask is not None:
        x = x.masked_fill(~mask[:, None, :], 0)                                # pads feed zeros to the conv
    if conv_state is not None:
        fill_conv_state(conv_state, x, None if seq_idx is None else last_document(seq_idx))
    if seq_idx is None:
        y = F.conv1d(x.float(), weight.float()[:, None, :], bias.float() if bias is not None else None,
                     padding=k - 1, groups=dim)[..., :seqlen]                  # (b, d, l) fp32
    else:
        y = _conv_within_documents(x, weight, bias, seq_idx)
    if activation == "silu":
        y = F.silu(y)
    return out.copy_(y)


def causal_conv1d(x, weight, bias=None, activation="silu", mask=None, conv_state=None, seq_idx=None,
                  backend="auto"):
    """Causal depthwise conv1d over time, with SiLU fused.

    Args:
        x: (b, d, l), any float dtype, any strides (channels-contiguous views are the model's case)
        weight: (d, k), any float dtype (the model passes conv1d.weight.squeeze(1)); k <= 16
        bias: (d,) or None
        activation: "silu" or None
        mask: (b, l) bool or None; False marks left padding, whose inputs count as zeros
        conv_state: (b, d, k) or None; if given, filled in place with the last k (masked) inputs, zero-padded on
            the left when l < k (what decoding continues from); with seq_idx, the last document's only
        seq_idx: (b, l) int32 or None; the document index of each token, non-decreasing along a row; a window
            never reaches across a document's start (kernels/documents.py). None: one document per row
        backend: "auto", "torch" or "triton"
    Returns:
        y: (b, d, l) in x's dtype and x's dim order
    """
    _check(x, weight, bias, activation, mask, conv_state)
    seq_idx = check_seq_idx(seq_idx, x.shape[0], x.shape[2])
    name = resolve_conv_backend(backend, x.device)
    if name == "torch":
        return causal_conv1d_ref(x, weight, bias, activation, mask, conv_state, seq_idx=seq_idx)
    from .triton_conv import causal_conv1d_triton
    if conv_state is not None:                                                 # prefill only: PyTorch is fine
        fill_conv_state(conv_state, x, mask if seq_idx is None else last_document(seq_idx, mask))
    return causal_conv1d_triton(x, weight, bias, activation, mask, seq_idx=seq_idx)


def causal_conv1d_update_torch(x, conv_state, weight, bias=None, activation="silu"):
    """One decoding step: conv_state (b, d, k) shifts left by one and takes x (b, d) as its last column, in place;
    returns act(sum_j conv_state[.., j] * weight[:, j] + bias) (b, d) in x's dtype (computed in fp32)."""
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    y = torch.sum(conv_state.float() * weight.float(), dim=-1)                 # (b, d)
    if bias is not None:
        y = y + bias.float()
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


def causal_conv1d_update(x, conv_state, weight, bias=None, activation="silu", backend="auto"):
    """One decoding step (see causal_conv1d_update_torch). backend: "auto" (one Triton kernel on CUDA, outside
    torch.compile, which traces and fuses the PyTorch version itself), "torch" or "triton"."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if backend == "auto":
        backend = ("triton" if x.device.type == "cuda" and triton_importable()
                   and not torch.compiler.is_compiling() else "torch")
    if resolve_conv_backend(backend, x.device) == "torch":
        return causal_conv1d_update_torch(x, conv_state, weight, bias, activation)
    from .triton_conv import causal_conv1d_update_triton
    return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)


def _check(x, weight, bias, activation, mask, conv_state):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'silu' or None, got {activation!r}")
    if x.dim() != 3:
        raise ValueError(f"x must be (batch, d, L), got shape {tuple(x.shape)}")
    batch, dim, seqlen = x.shape
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"weight must be (d={dim}, k), got {tuple(weight.shape)} (pass conv1d.weight.squeeze(1))")
    if not 1 <= weight.shape[1] <= 16:
        raise ValueError(f"conv width k must be 1 to 16, got {weight.shape[1]}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"bias must have shape ({dim},), got {tuple(bias.shape)}")
    if mask is not None and (tuple(mask.shape) != (batch, seqlen) or mask.dtype != torch.bool):
        raise ValueError(f"mask must be bool ({batch}, {seqlen}), got {mask.dtype} {tuple(mask.shape)}")
    if conv_state is not None and tuple(conv_state.shape) != (batch, dim, weight.shape[1]):
        raise ValueError(f"conv_state must have shape ({batch}, {dim}, {weight.shape[1]}), "
                         f"got {tuple(conv_state.shape)}")
