"""What every layer kind shares: the interface, the pre-norm with the residual add fused in, and the kernel choice.

A layer of the stack (models/lm.py builds one per letter of the layer pattern, through the table in
models/layers/__init__.py) takes the previous layer's output h and the residual stream, and returns its own output
and the stream. As in mamba_ssm, the residual add is fused into the layer's pre-norm (kernels.add_rms_norm):

    residual = residual + h;   h = mixer(norm(residual))

which is h_{i+1} = h_i + mixer(norm(h_i)) with the stream kept in fp32 (residual_in_fp32). The interface:

    forward(h, residual, ctx, state, kernels) -> (h, residual)   (b, l, d) each; state = this layer's cache entry to
                                                                  fill (prompt prefill), or None (training)
    step(h, residual, ctx, state, kernels)    -> (h, residual)   (b, d) each, one token; state updated in place
    init_state(batch_size, slots, device, dtype) -> tuple of tensors: this layer's empty cache entry
    reset_parameters()                        the layer's initialisation (called by __init__)

ctx (models/layers/attention.AttentionContext) carries what the language model computes once for all layers: the
padding mask, the RoPE tables, the KV slots of a decoding step. kernels (ModelKernels) names the backend of every
kernel, decided once per device by the language model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from kernels import add_rms_norm


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in the weight's dtype.

    The layers call kernels.add_rms_norm with this module's weight directly, fusing the residual add (the module
    holds the parameter under the name HF checkpoints use)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x, backend="torch"):
        return add_rms_norm(x, None, self.weight, self.eps, backend=backend)[0]


@torch.no_grad()
def init_projections(in_proj: nn.Linear, out_proj: nn.Linear, n_layer: int) -> None:
    """A Mamba mixer's two projections: biases (if any) zero; out_proj PyTorch's default uniform scaled by
    1/sqrt(n_layer), GPT-2 style, since it feeds the residual stream once per layer."""
    for linear in (in_proj, out_proj):
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
    nn.init.kaiming_uniform_(out_proj.weight, a=math.sqrt(5))
    out_proj.weight.div_(math.sqrt(n_layer))


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """What the next matmul will run in: autocast's dtype when autocast is on for x's device, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def add_norm(norm: RMSNorm, h, residual, next_weight, residual_in_fp32: bool, backend: str):
    """(normed, residual): residual = residual + h (h alone for the first layer), normed = norm(residual) in the
    dtype `next_weight`'s matmul runs in; the stream kept in fp32 when residual_in_fp32."""
    residual_dtype = torch.float32 if residual_in_fp32 else norm.weight.dtype
    return add_rms_norm(h, residual, norm.weight, norm.eps, out_dtype=compute_dtype(h, next_weight),
                        residual_dtype=residual_dtype, backend=backend)


@dataclass(frozen=True)
class KernelChoice:
    """The concrete backend of each kernel of a Mamba layer for one device."""
    scan: str             # kernels.selective_scan backend (Mamba-1) or kernels.ssd backend (Mamba-2)
    conv: str             # kernels.causal_conv1d backend
    norm: str             # kernels.add_rms_norm backend
    # a Mamba-1 block's decoding step (kernels/decode_step.py): "triton_block" = two Triton kernels for all of it
    # but out_proj (add+RMSNorm, in_proj and the conv in the first); "triton" = add+RMSNorm and in_proj apart, then
    # two kernels for the mixer; "torch" = the PyTorch step
    step: str = "torch"

    @classmethod
    def for_scan(cls, scan: str) -> "KernelChoice":
        # The conv, norm and step kernels follow the scan: fused Triton kernels together, or PyTorch together.
        fused = "triton" if scan == "triton" else "torch"
        # "triton", not "triton_block": on the H200 (2026-12-02, bench/gpu_check.sh) the mixer step took 0.52 ms per
        # token at batch 1 and 0.87 at batch 64 against the block step's 0.64 and 1.55 (CUDA graph, mamba-130m).
        return cls(scan=scan, conv=fused, norm=fused, step="triton" if scan == "triton" else "torch")


REFERENCE = KernelChoice.for_scan("ref")    # every kernel in PyTorch: the spec


@dataclass(frozen=True)
class ModelKernels:
    """The concrete kernel backends of every layer kind of one model on one device (LanguageModel.kernels_for).
    A kind the pattern does not use has the reference choice."""
    mamba1: KernelChoice = REFERENCE      # M layers: selective scan, conv, norm, decoding step
    mamba2: KernelChoice = REFERENCE      # 2 layers: SSD scan, conv, norm
    norm: str = "torch"                   # add_rms_norm of attention / MLP layers and the final norm


class Layer(nn.Module):
    """The interface of a layer kind (see the module docstring); a kind subclasses it and fills in the methods.
    The class attributes describe the kind to the config and the language model."""
    description: ClassVar[str]            # what the pattern letter stands for, in words (error messages, docs)
    has_kv_cache: ClassVar[bool] = False  # its cache entry holds one slot per token (attention), not a fixed state
    residual_branches: ClassVar[int] = 1  # residual adds it makes (the GPT-2 init scales outputs by their count)

    def forward(self, h, residual, ctx, state, kernels: ModelKernels):
        raise NotImplementedError

    def step(self, h, residual, ctx, state, kernels: ModelKernels):
        raise NotImplementedError

    def init_state(self, batch_size: int, slots: int, device, dtype) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Draw every parameter afresh, as the layer's construction does."""
        raise NotImplementedError
