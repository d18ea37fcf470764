"""Kernels: one entry point per operation (selective scan, state update, the Mamba-1 block's decoding step, causal
conv1d, add+RMSNorm, LM-head loss), each with its PyTorch reference beside it and its backend chosen in one place."""
from .causal_conv import causal_conv1d, causal_conv1d_update
from .decode_step import block_step, mixer_step
from .loss import linear_cross_entropy
from .norm import add_rms_norm
from .selective_scan import BACKENDS, available_backends, resolve_backend, selective_scan
from .state_update import selective_state_update

__all__ = ["selective_scan", "selective_state_update", "mixer_step", "block_step", "causal_conv1d",
           "causal_conv1d_update", "add_rms_norm", "linear_cross_entropy", "available_backends", "resolve_backend",
           "BACKENDS"]
