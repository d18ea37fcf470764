"""Model-size presets per family: config fields by name. `python -m configs.model_sizes` prints their real sizes.

Mamba-1 (MambaConfig): medium and large are the shapes of the published mamba-130m (768 x 24) and mamba-370m
(1024 x 48). Mamba-2 (Mamba2Config), the same size names: medium and large are mamba2-130m and mamba2-370m
(768 x 24 and 1024 x 48, d_state 128, headdim 64, expand 2, ngroups 1). Counts here are smaller than the names say
because our default vocabulary (16384) is smaller than GPT-NeoX's (50280).
"""
from __future__ import annotations

import torch

from models import DEFAULT_FAMILY, MambaConfig, build_model
from models.registry import check_family, config_class

DEFAULT_VOCAB_SIZE = 16384

MODEL_SIZES = {
    "tiny": dict(d_model=64, n_layer=2),       # tests and smoke runs: a training step takes milliseconds on a CPU
    "small": dict(d_model=512, n_layer=24),    # ~50M: a laptop CPU or any GPU
    "medium": dict(d_model=768, n_layer=24),   # mamba-130m's shape
    "large": dict(d_model=1024, n_layer=48),   # mamba-370m's shape
}

# Mamba-2 (Mamba2Config defaults: expand 2, d_conv 4, ngroups 1). chunk_size only sets how the SSD scan is cut
# (the math does not depend on it): 64 is the fastest on CPUs (BENCHMARKS.md), 256 is mamba_ssm's for GPUs.
MAMBA2_SIZES = {
    "tiny": dict(d_model=64, n_layer=2, d_state=32, headdim=16, chunk_size=64),       # 8 heads; CPU smoke runs
    "small": dict(d_model=512, n_layer=24, d_state=128, headdim=64),                  # 16 heads; ~50M
    "medium": dict(d_model=768, n_layer=24, d_state=128, headdim=64),                 # mamba2-130m's shape
    "large": dict(d_model=1024, n_layer=48, d_state=128, headdim=64),                 # mamba2-370m's shape
}
MODEL_SIZES_BY_FAMILY = {"mamba1": MODEL_SIZES, "mamba2": MAMBA2_SIZES}


def model_config(size: str, vocab_size: int = DEFAULT_VOCAB_SIZE, family: str = DEFAULT_FAMILY,
                 **overrides) -> MambaConfig:
    """The config of preset `size` of `family` ("mamba1": MambaConfig, "mamba2": Mamba2Config), with `vocab_size`
    and any field of that config in `overrides`."""
    if check_family(family) == "hybrid":          # widths and named layer patterns: configs/hybrid.py
        from .hybrid import hybrid_config
        return hybrid_config(size, vocab_size, **overrides)
    sizes = MODEL_SIZES_BY_FAMILY[family]
    if size not in sizes:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(sizes)}")
    return config_class(family)(**{**sizes[size], "vocab_size": vocab_size, **overrides})


def count_parameters(config) -> int:
    """Parameters of a model with `config` (the tied embedding counted once), without allocating it."""
    with torch.device("meta"):
        return build_model(config).num_parameters()


def table(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """A Markdown table of the presets: shape and parameter count at `vocab_size`."""
    lines = [f"| preset | d_model | n_layer | d_inner | d_state | dt_rank | parameters (vocab {vocab_size}) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in MODEL_SIZES:
        cfg = model_config(name, vocab_size)
        n = count_parameters(cfg)
        lines.append(f"| {name} | {cfg.d_model} | {cfg.n_layer} | {cfg.d_inner} | {cfg.d_state} | "
                     f"{cfg.resolved_dt_rank} | {n:,} ({n / 1e6:.1f}M) |")
    return "\n".join(lines)


def table_mamba2(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """The Mamba-2 presets as a Markdown table."""
    lines = [f"| preset (--family mamba2) | d_model | n_layer | d_inner | heads x headdim | d_state | "
             f"parameters (vocab {vocab_size}) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in MAMBA2_SIZES:
        cfg = model_config(name, vocab_size, family="mamba2")
        n = count_parameters(cfg)
        lines.append(f"| {name} | {cfg.d_model} | {cfg.n_layer} | {cfg.d_inner} | {cfg.nheads} x {cfg.headdim} | "
                     f"{cfg.d_state} | {n:,} ({n / 1e6:.1f}M) |")
    return "\n".join(lines)


def table_hybrid(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """The hybrid presets (size x named pattern) as a Markdown table: layers, total and non-embedding counts."""
    from .hybrid import HYBRID_SIZES, PATTERNS
    lines = [f"| --family hybrid --model_size / --pattern | layers | parameters (vocab {vocab_size}) | "
             f"non-embedding |", "|---|---|---:|---:|"]
    for size in HYBRID_SIZES:
        for name in PATTERNS:
            cfg = model_config(size, vocab_size, family="hybrid", pattern=name)
            n = count_parameters(cfg)
            emb = cfg.padded_vocab_size * cfg.d_model
            shown = cfg.pattern if len(cfg.pattern) <= 24 else cfg.pattern[:21] + "..."
            lines.append(f"| {size} / {name} | `{shown}` ({cfg.n_layer}) | {n:,} ({n / 1e6:.1f}M) | "
                         f"{n - emb:,} ({(n - emb) / 1e6:.1f}M) |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    print()
    print(table_mamba2())
    print()
    print(table_hybrid())
