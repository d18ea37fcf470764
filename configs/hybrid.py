"""Hybrid-family presets as data: widths per size and named layer patterns (python train.py --family hybrid).

A size sets the width, the heads and a depth counted in Mamba-layer units; a named pattern turns that depth into
one symbol per layer (models/config.LAYER_SYMBOLS). A transformer block (T: attention + MLP, ~12 d^2
parameters) is about two Mamba-1 blocks (~6.2 d^2 at expand 2), so "transformer" uses depth / 2 layers and the
named patterns of one size land within ~6% of the pure-Mamba model's parameters, except "alternating" (an A layer,
~4 d^2, replaces every other M: ~84%). `python -m configs.model_sizes` prints every count. medium + "transformer" is
GPT-2-124M's shape (768 wide, 12 blocks, 12 heads, MLP 2048 SwiGLU = GPT-2's 3072 GELU in parameters) as a
Llama-style Transformer++ (RoPE, RMSNorm, SwiGLU, no biases); medium + "mamba" is mamba-130m's shape.

A pattern given as symbols instead of a name sets the depth itself (n_layer = its length).
"""
from __future__ import annotations

from models.config import LAYER_SYMBOLS, HybridConfig, check_pattern, describe_symbols

HYBRID_SIZES = {
    #          width, depth (Mamba-layer units), heads, kv heads; Mamba-2 settings as configs/model_sizes.py
    "tiny":   dict(d_model=64, depth=4, n_heads=4, n_kv_heads=2, mamba2=dict(d_state=32, headdim=16, chunk_size=64)),
    "small":  dict(d_model=512, depth=24, n_heads=8, n_kv_heads=8, mamba2=dict(d_state=128, headdim=64)),
    "medium": dict(d_model=768, depth=24, n_heads=12, n_kv_heads=12, mamba2=dict(d_state=128, headdim=64)),
    "large":  dict(d_model=1024, depth=48, n_heads=16, n_kv_heads=16, mamba2=dict(d_state=128, headdim=64)),
}


def spaced(depth: int, mamba: str, every: int = 8) -> str:
    """depth layers of `mamba` with one attention layer ("A") per `every`, evenly spaced, never first or last:
    each attention layer sits in the middle of its share of the stack (depth 24: layers 4, 12 and 20)."""
    if depth < 3:
        raise ValueError(f"a hybrid with attention neither first nor last needs depth >= 3, got {depth}")
    n_attn = max(1, round(depth / every))
    where = {int((i + 0.5) * depth / n_attn) for i in range(n_attn)}
    return "".join("A" if i in where else mamba for i in range(depth))


PATTERNS = {
    "mamba":       lambda depth: "M" * depth,                           # today's Mamba-1 model
    "mamba2":      lambda depth: "2" * depth,                           # today's Mamba-2 model
    "transformer": lambda depth: "T" * max(1, depth // 2),             # the baseline (Transformer++)
    "alternating": lambda depth: ("MA" * depth)[:depth],               # M A M A ...
    "hybrid":      lambda depth: spaced(depth, "M"),                    # ~1:7 attention : Mamba-1
    "hybrid2":     lambda depth: spaced(depth, "2"),                    # ~1:7 attention : Mamba-2
}
DEFAULT_PATTERN = "hybrid"


def resolve_pattern(pattern: str | None, depth: int) -> str:
    """A pattern name (PATTERNS) at `depth`, or a string of symbols as it is; ValueError naming both choices."""
    pattern = DEFAULT_PATTERN if pattern is None else pattern
    if pattern in PATTERNS:
        return PATTERNS[pattern](depth)
    if isinstance(pattern, str) and pattern and set(pattern) <= set(LAYER_SYMBOLS):
        return pattern
    raise ValueError(f"pattern {pattern!r} is neither a preset ({', '.join(PATTERNS)}) nor a string of layer "
                     f"symbols, one per layer: {describe_symbols()}")


def hybrid_config(size: str, vocab_size: int, pattern: str | None = None, **overrides) -> HybridConfig:
    """The HybridConfig of size `size` with `pattern` (a name or symbols) and any HybridConfig field in overrides."""
    if size not in HYBRID_SIZES:
        raise ValueError(f"unknown model size {size!r}; choose one of {', '.join(HYBRID_SIZES)}")
    fields = dict(HYBRID_SIZES[size])
    layers = check_pattern(resolve_pattern(pattern, fields.pop("depth")))
    fields.update(vocab_size=vocab_size, pattern=layers, n_layer=len(layers))
    fields.update(overrides)
    return HybridConfig(**fields)
