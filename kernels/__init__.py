"""Kernels: one entry point per operation, several backends each (see selective_scan.py, causal_conv.py)."""
from .causal_conv import causal_conv1d, causal_conv1d_update
from .selective_scan import BACKENDS, available_backends, resolve_backend, selective_scan
from .state_update import selective_state_update

__all__ = ["selective_scan", "selective_state_update", "causal_conv1d", "causal_conv1d_update",
           "available_backends", "resolve_backend", "BACKENDS"]
