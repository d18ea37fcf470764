"""Selective-scan kernels: one entry point, several backends (see selective_scan.py)."""
from .selective_scan import BACKENDS, available_backends, resolve_backend, selective_scan

__all__ = ["selective_scan", "available_backends", "resolve_backend", "BACKENDS"]
