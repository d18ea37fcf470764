"""Decoding cache per sequence for every hybrid preset at a 4k and a 32k context, computed from the cache's
tensor shapes (models/lm.py init_cache on the meta device: nothing is allocated or measured).

Conv states and KV caches in bf16, SSM states in fp32 (as decoding keeps them).
    python bench/cache_memory.py
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.hybrid import HYBRID_SIZES, PATTERNS, hybrid_config  # noqa: E402
from models import build_model  # noqa: E402

CONTEXTS = (4096, 32768)


def cache_bytes(config, context: int) -> int:
    with torch.device("meta"):
        model = build_model(config)
        cache = model.init_cache(1, dtype=torch.bfloat16, slots=context)
    return sum(t.numel() * t.element_size() for state in cache.states for t in state)


def table(vocab_size: int = 16384) -> str:
    lines = ["| preset (size / pattern) | layers | cache at 4k | cache at 32k |", "|---|---:|---:|---:|"]
    for size in HYBRID_SIZES:
        for name in PATTERNS:
            cfg = hybrid_config(size, vocab_size, name)
            mib = [cache_bytes(cfg, c) / 2**20 for c in CONTEXTS]
            lines.append(f"| {size} / {name} | {cfg.n_layer} | {mib[0]:,.1f} MiB | {mib[1]:,.1f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
