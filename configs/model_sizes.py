"""Model-size presets: MambaConfig fields by name. `python -m configs.model_sizes` prints their real sizes.

medium and large are the shapes of the published mamba-130m (768 x 24) and mamba-370m (1024 x 48); their counts
here are smaller than the names say because our default vocabulary (16384) is smaller than GPT-NeoX's (50280).
"""
from __future__ import annotations

import torch

from models import MambaConfig, MambaLanguageModel

DEFAULT_VOCAB_SIZE = 16384

MODEL_SIZES = {
    "tiny": dict(d_model=64, n_layer=2),       # tests and smoke runs: a training step takes milliseconds on a CPU
    "small": dict(d_model=512, n_layer=24),    # ~50M: a laptop CPU or any GPU
    "medium": dict(d_model=768, n_layer=24),   # mamba-130m's shape
    "large": dict(d_model=1024, n_layer=48),   # mamba-370m's shape
}


def model_config(size: str, vocab_size: int = DEFAULT_VOCAB_SIZE, **overrides) -> MambaConfig:
    """The MambaConfig of preset `size`, with `vocab_size` and any MambaConfig field in `overrides`."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(MODEL_SIZES)}")
    return MambaConfig(**{**MODEL_SIZES[size], "vocab_size": vocab_size, **overrides})


def count_parameters(config: MambaConfig) -> int:
    """Parameters of a model with `config` (the tied embedding counted once), without allocating it."""
    with torch.device("meta"):
        return MambaLanguageModel(config).num_parameters()


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


if __name__ == "__main__":
    print(table())
