"""The coefficients of the training-memory estimate (training/memory.py's docstring says how each was measured or
derived), shared by the Mamba-1 estimate there and the per-layer ones of training/memory_mamba2.py and
training/memory_hybrid.py. Imports nothing.
"""

STATE_BYTES_PER_PARAM = 17.85
FROZEN_BYTES_PER_PARAM = 6.0
LOGIT_BYTES = 14.1
ACT_BYTES_PER_D_INNER = 22.5
CKPT_BYTES_PER_D_MODEL = 3.54
CKPT_RECOMPUTE_BYTES_PER_D_INNER = 7.2
BACKEND_ACT_FACTOR = {"triton": 1.0, "chunked": 1.47, "ref": 3.0}
# Allocator fragmentation (peak reserved / peak allocated was 1.02-1.2 in the measurements).
OVERHEAD = 1.10
