"""HybridConfig: a language model whose layers are chosen one by one by a layer pattern (models/hybrid.py).

The pattern has one symbol per layer; the symbols and the layer each one builds are the table LAYER_SYMBOLS
(models/hybrid.py holds the matching symbol -> class table):

    M   Mamba-1 block (models/mamba.py)           2   Mamba-2 block (models/mamba2.py)
    A   causal self-attention (models/attention.py)
    F   SwiGLU MLP                                T   transformer block: attention then a SwiGLU MLP

"M" * n is today's Mamba-1 model, "T" * n a Llama-style transformer (RoPE, RMSNorm, SwiGLU, no biases), and any
mix a hybrid (e.g. "MMMAMMMM": Jamba's / NVIDIA's Mamba-Hybrid's ~1:7 attention share). The Mamba layers take their
own settings (d_state, expand, ...) from the `mamba1` and `mamba2` dicts, checked by MambaConfig / Mamba2Config.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from .config import Mamba2Config, MambaConfig

LAYER_SYMBOLS = {"M": "Mamba-1", "2": "Mamba-2", "A": "attention", "F": "SwiGLU MLP",
                 "T": "attention + SwiGLU MLP"}
ATTENTION_SYMBOLS = ("A", "T")     # layers that carry a KV cache
MLP_SYMBOLS = ("F", "T")


def describe_symbols() -> str:
    return ", ".join(f"{s} ({name})" for s, name in LAYER_SYMBOLS.items())


def check_pattern(pattern, n_layer: int | None = None) -> str:
    """The pattern as a string; ValueError naming the allowed symbols (and the depth) when it is not one."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"the layer pattern must be a non-empty string of symbols, one per layer "
                         f"({describe_symbols()}), got {pattern!r}")
    unknown = sorted(set(pattern) - set(LAYER_SYMBOLS))
    if unknown:
        raise ValueError(f"layer pattern {pattern!r} has unknown symbol(s) {', '.join(map(repr, unknown))}; "
                         f"allowed: {describe_symbols()}")
    if n_layer is not None and len(pattern) != n_layer:
        raise ValueError(f"layer pattern {pattern!r} has {len(pattern)} symbols but n_layer is {n_layer}; "
                         f"give one symbol per layer ({describe_symbols()})")
    return pattern


@dataclass
class HybridConfig:
    family: ClassVar[str] = "hybrid"    # models/registry.py; not a field, never saved
    d_model: int                        # width of the residual stream
    n_layer: int                        # number of layers = len(pattern)
    vocab_size: int                     # tokens the tokenizer can produce (before padding)
    pattern: str                        # one symbol per layer (LAYER_SYMBOLS)
    pad_vocab_size_multiple: int = 16   # embedding rows are padded up to a multiple of this
    # --- attention (A and T layers)
    n_heads: int = 8                    # query heads
    n_kv_heads: int | None = None       # key/value heads (grouped-query attention); None = n_heads (multi-head)
    head_dim: int | None = None         # channels per head; None = d_model // n_heads
    rope: bool = True                   # rotary position embeddings; False = no positions at all (NoPE)
    rope_theta: float = 10000.0         # RoPE base
    rope_scaling: dict | None = None    # None, or Llama 3's frequency scaling (models/attention.rope_frequencies):
                                        # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
                                        #  "original_max_position_embeddings"}
    # --- MLP (F and T layers)
    d_ff: int | None = None             # SwiGLU hidden width; None = 8/3 d_model rounded up to a multiple of 64
    # --- Mamba layers (M and 2): fields of MambaConfig / Mamba2Config besides the shared ones
    mamba1: dict = field(default_factory=dict)
    mamba2: dict = field(default_factory=dict)
    # --- shared
    init_std: float = 0.02              # N(0, init_std) for attention/MLP matrices and the embedding (GPT-2)
    norm_epsilon: float = 1e-5          # RMSNorm epsilon
    tie_embeddings: bool = True         # the LM head shares the token embedding matrix
    residual_in_fp32: bool = True       # keep the residual stream in fp32
    scan_backend: str = "auto"          # backend of the selective scan (M) and the SSD scan (2): kernels/

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "n_heads"):
            _check_int(name, getattr(self, name))
        check_pattern(self.pattern, self.n_layer)
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), extra=" or null")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"HybridConfig.n_kv_heads {self.kv_heads} must divide n_heads {self.n_heads} "
                             f"(each key/value head serves n_heads / n_kv_heads query heads)")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(f"HybridConfig: n_heads {self.n_heads} does not divide d_model {self.d_model}; "
                             f"choose another n_heads or give head_dim")
        if self.rope and self.resolved_head_dim % 2:
            raise ValueError(f"HybridConfig: RoPE needs an even head_dim, got {self.resolved_head_dim}")
        for name in ("rope_theta", "init_std", "norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"HybridConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("rope", "tie_embeddings", "residual_in_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"HybridConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        for name in ("mamba1", "mamba2"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"HybridConfig.{name} must be a dict of fields, got {getattr(self, name)!r}")
        # the Mamba settings are checked by their own configs (and only the layers present need them)
        if "M" in self.pattern:
            self.mamba1_config()
        if "2" in self.pattern:
            self.mamba2_config()

    # ---- derived ------------------------------------------------------------------------------------------------

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff if self.d_ff is not None else -(-8 * self.d_model // 3 // 64) * 64

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    @property
    def n_residual_branches(self) -> int:
        """Residual adds of attention/MLP sublayers in the stack: their output projections start at
        init_std / sqrt(this), GPT-2's 1/sqrt(2 n_layer) for a transformer."""
        return max(1, sum(2 if s == "T" else 1 for s in self.pattern))

    @property
    def d_inner(self) -> int:
        """d_inner of the Mamba layers (start-up summaries); d_model for a model without any."""
        if "M" in self.pattern:
            return self.mamba1_config().d_inner
        if "2" in self.pattern:
            return self.mamba2_config().d_inner
        return self.d_model

    def _shared(self) -> dict:
        return dict(d_model=self.d_model, n_layer=self.n_layer, vocab_size=self.vocab_size,
                    pad_vocab_size_multiple=self.pad_vocab_size_multiple, norm_epsilon=self.norm_epsilon,
                    tie_embeddings=self.tie_embeddings, residual_in_fp32=self.residual_in_fp32,
                    scan_backend=self.scan_backend)

    def mamba1_config(self) -> MambaConfig:
        """The MambaConfig the M layers are built from (n_layer = the whole stack's, for the released init)."""
        return MambaConfig.from_dict(self._sub("mamba1"))

    def mamba2_config(self) -> Mamba2Config:
        return Mamba2Config.from_dict(self._sub("mamba2"))

    def _sub(self, name) -> dict:
        own, shared = getattr(self, name), self._shared()
        clash = sorted(set(own) & set(shared))
        if clash:
            raise ValueError(f"HybridConfig.{name} must not set {clash}: they are the whole model's fields")
        return {**own, **shared}

    def shape_dict(self) -> dict:
        """The fields that decide the tensors' shapes (a checkpoint must agree on all of them)."""
        return {"d_model": self.d_model, "n_layer": self.n_layer, "vocab_size": self.vocab_size,
                "pattern": self.pattern, "n_heads": self.n_heads, "n_kv_heads": self.kv_heads,
                "head_dim": self.resolved_head_dim, "d_ff": self.resolved_d_ff, "mamba1": self.mamba1,
                "mamba2": self.mamba2, "tie_embeddings": self.tie_embeddings}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HybridConfig":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"HybridConfig got unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
        missing = [name for name in ("d_model", "n_layer", "vocab_size", "pattern") if name not in d]
        if missing:
            raise ValueError(f"HybridConfig needs the field(s) {missing}")
        return cls(**d)


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling) -> None:
    """ValueError unless `scaling` is Llama 3's RoPE scaling dict with every number it needs (> 0)."""
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise ValueError(f"HybridConfig.rope_scaling must be null or {{'rope_type': 'llama3', "
                         f"{', '.join(repr(k) + ': ...' for k in ROPE_SCALING_KEYS)}}}, got {scaling!r}")
    for key in ROPE_SCALING_KEYS:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"HybridConfig.rope_scaling[{key!r}] must be a finite number > 0, got {value!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"HybridConfig.rope_scaling: high_freq_factor {scaling['high_freq_factor']} must exceed "
                         f"low_freq_factor {scaling['low_freq_factor']}")


def _check_int(name, value, extra=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"HybridConfig.{name} must be an integer >= 1{extra}, got {value!r}")
