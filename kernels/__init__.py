"""Selective-scan kernels: one entry point, several backends (see selective_scan.py)."""
from .selective_scan import BACKENDS, available_backends, resolve_backend, selective_scan
from .state_update import selective_state_update

__all__ = ["selective_scan", "selective_state_update", "available_backends", "resolve_backend", "BACKENDS"]
