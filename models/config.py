"""The model config: one description of a language model (models/lm.py), and the family presets users type.

    ModelConfig    width, depth, vocabulary, the layer pattern (one letter per layer: models/layers LAYERS) and
                   each layer kind's settings. Every language model is built from one (family "hybrid": any
                   pattern, saved in the project's own format).
    MambaConfig    family "mamba1": the pattern "M" * n_layer with Mamba-1 settings (Gu & Dao, state-spaces/mamba);
                   also the settings of every M layer of a ModelConfig. Saved in the HF Mamba format.
    Mamba2Config   family "mamba2": the pattern "2" * n_layer with Mamba-2 settings (Dao & Gu 2024); also the
                   settings of every 2 layer. Saved in the HF Mamba2 format.

MambaConfig and Mamba2Config are presets of ModelConfig (to_model_config()): a model made from one keeps it as its
`config` (what the checkpoint formats write) and builds its layers from the ModelConfig it stands for.
Field names follow mamba_ssm (d_model, n_layer, ssm_cfg keys); models/formats/ maps them to and from HF's names.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from kernels import BACKENDS
from kernels.ssd import SSD_BACKENDS

from .layers import LAYERS


@dataclass
class MambaConfig:
    family: ClassVar[str] = "mamba1"    # the model family (models/registry.py); not a field, never saved
    d_model: int                        # width of the residual stream
    n_layer: int                        # number of Mamba blocks
    vocab_size: int                     # tokens the tokenizer can produce (before padding)
    pad_vocab_size_multiple: int = 8    # embedding rows are padded up to a multiple of this (faster matmuls)
    d_state: int = 16                   # N: SSM state size per channel
    d_conv: int = 4                     # width of the depthwise causal convolution
    expand: int = 2                     # d_inner = expand * d_model
    dt_rank: int | str = "auto"         # rank of the delta projection; "auto" = ceil(d_model / 16)
    dt_min: float = 0.001               # initial delta is drawn log-uniformly in [dt_min, dt_max] ...
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4         # ... and floored at this value
    conv_bias: bool = True              # bias in the depthwise conv1d
    bias: bool = False                  # bias in in_proj and out_proj
    norm_epsilon: float = 1e-5          # RMSNorm epsilon
    tie_embeddings: bool = True         # the LM head shares the token embedding matrix
    residual_in_fp32: bool = True       # keep the residual stream in fp32 under low-precision weights/autocast
    scan_backend: str = "auto"          # selective-scan backend: "auto", "ref", "chunked" or "triton" (kernels/)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "d_conv", "expand"):
            _check_int(name, getattr(self, name), minimum=1)
        if self.dt_rank != "auto":
            _check_int("dt_rank", self.dt_rank, minimum=1, extra=' or "auto"')
        for name in ("dt_min", "dt_max", "norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"MambaConfig.{name} must be a finite number > 0, got {value!r}")
        if self.dt_max < self.dt_min:
            raise ValueError(f"MambaConfig.dt_max must be >= dt_min ({self.dt_min}), got {self.dt_max!r}")
        floor = self.dt_init_floor
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not floor >= 0 or math.isinf(floor):
            raise ValueError(f"MambaConfig.dt_init_floor must be a finite number >= 0, got {floor!r}")
        for name in ("conv_bias", "bias", "tie_embeddings", "residual_in_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MambaConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.scan_backend not in BACKENDS:
            raise ValueError(f"MambaConfig.scan_backend must be one of {', '.join(BACKENDS)}, "
                             f"got {self.scan_backend!r}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else self.dt_rank

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def shape_dict(self) -> dict:
        """The fields that decide the tensors' shapes (a checkpoint must agree on all of them)."""
        return {"d_model": self.d_model, "n_layer": self.n_layer, "vocab_size": self.vocab_size,
                "d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
                "dt_rank": self.resolved_dt_rank, "tie_embeddings": self.tie_embeddings}

    def to_model_config(self) -> "ModelConfig":
        """The ModelConfig this preset stands for: one layer kind repeated n_layer times, with these settings."""
        return _preset_model_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MambaConfig":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"MambaConfig got unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
        missing = [name for name in ("d_model", "n_layer", "vocab_size") if name not in d]
        if missing:
            raise ValueError(f"MambaConfig needs the field(s) {missing}")
        return cls(**d)


def _check_int(name, value, minimum, extra=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"MambaConfig.{name} must be an integer >= {minimum}{extra}, got {value!r}")


@dataclass
class Mamba2Config:
    """The shape and initialisation of a Mamba-2 language model (Dao & Gu, "Transformers are SSMs"; mamba_ssm's
    Mamba2 mixer inside MambaLMHeadModel). Defaults are mamba_ssm's. models/formats/hf_mamba2.py maps the fields to
    and from HF transformers' Mamba2Config (hidden_size, num_heads, head_dim, n_groups, ...)."""
    family: ClassVar[str] = "mamba2"
    d_model: int                        # width of the residual stream
    n_layer: int                        # number of Mamba-2 blocks
    vocab_size: int                     # tokens the tokenizer can produce (before padding)
    pad_vocab_size_multiple: int = 16   # embedding rows are padded up to a multiple of this (mamba2 releases: 16)
    d_state: int = 128                  # N: SSM state size per head channel
    d_conv: int = 4                     # width of the depthwise causal convolution over x, B and C
    expand: int = 2                     # d_inner = expand * d_model
    headdim: int = 64                   # P: channels per head; nheads = d_inner / headdim
    ngroups: int = 1                    # G: groups of B and C, each shared by nheads / ngroups heads
    A_init_range: tuple[float, float] = (1.0, 16.0)   # A = -U(A_init_range) per head at init
    dt_min: float = 0.001               # initial dt is drawn log-uniformly in [dt_min, dt_max] ...
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4         # ... and floored at this value
    dt_limit: tuple[float, float] = (0.0, math.inf)   # dt is clamped to [min, max] after softplus
    chunk_size: int = 256               # tokens per chunk of the chunked SSD scan (the math does not depend on it)
    conv_bias: bool = True              # bias in the depthwise conv1d
    bias: bool = False                  # bias in in_proj and out_proj
    norm_epsilon: float = 1e-5          # epsilon of the RMSNorms (the blocks' and the gated one in the mixer)
    tie_embeddings: bool = True         # the LM head shares the token embedding matrix
    residual_in_fp32: bool = True       # keep the residual stream in fp32 under low-precision weights/autocast
    scan_backend: str = "auto"          # SSD backend: "auto", "ref", "chunked" or "triton" (kernels/ssd.py)

    def __post_init__(self):
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "d_conv", "expand",
                     "headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Mamba2Config.{name} must be an integer >= 1, got {value!r}")
        for name in ("dt_min", "dt_max", "norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
                raise ValueError(f"Mamba2Config.{name} must be a finite number > 0, got {value!r}")
        if self.dt_max < self.dt_min:
            raise ValueError(f"Mamba2Config.dt_max must be >= dt_min ({self.dt_min}), got {self.dt_max!r}")
        if not isinstance(self.dt_init_floor, (int, float)) or not self.dt_init_floor >= 0:
            raise ValueError(f"Mamba2Config.dt_init_floor must be a number >= 0, got {self.dt_init_floor!r}")
        self.A_init_range = tuple(self.A_init_range)
        if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"Mamba2Config.A_init_range must be (low, high) with 0 < low <= high, "
                             f"got {self.A_init_range!r}")
        self.dt_limit = tuple(float(v) for v in self.dt_limit)
        if len(self.dt_limit) != 2 or not 0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise ValueError(f"Mamba2Config.dt_limit must be (min, max) with 0 <= min <= max, got {self.dt_limit!r}")
        for name in ("conv_bias", "bias", "tie_embeddings", "residual_in_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"Mamba2Config.{name} must be True or False, got {getattr(self, name)!r}")
        if self.scan_backend not in SSD_BACKENDS:
            raise ValueError(f"Mamba2Config.scan_backend must be one of {', '.join(SSD_BACKENDS)}, "
                             f"got {self.scan_backend!r}")
        if self.d_inner % self.headdim:
            divisors = [h for h in (16, 32, 64, 128) if self.d_inner % h == 0]
            raise ValueError(f"Mamba2Config.headdim {self.headdim} does not divide d_inner = expand * d_model = "
                             f"{self.d_inner}; allowed: a divisor of {self.d_inner}"
                             + (f" (e.g. {', '.join(map(str, divisors))})" if divisors else ""))
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba2Config.ngroups {self.ngroups} does not divide the number of heads "
                             f"nheads = d_inner / headdim = {self.nheads}; allowed: a divisor of {self.nheads}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the causal conv: x, B and C together."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        """in_proj's output: [z, x, B, C, dt]."""
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    def shape_dict(self) -> dict:
        """The fields that decide the tensors' shapes (a checkpoint must agree on all of them)."""
        return {k: getattr(self, k) for k in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand",
                                               "headdim", "ngroups", "conv_bias", "bias", "tie_embeddings")}

    def to_model_config(self) -> "ModelConfig":
        """The ModelConfig this preset stands for: one layer kind repeated n_layer times, with these settings."""
        return _preset_model_config(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Mamba2Config":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"Mamba2Config got unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
        missing = [name for name in ("d_model", "n_layer", "vocab_size") if name not in d]
        if missing:
            raise ValueError(f"Mamba2Config needs the field(s) {missing}")
        return cls(**d)


# ---- the model config ---------------------------------------------------------------------------------------------

LAYER_SYMBOLS = {letter: layer.description for letter, layer in LAYERS.items()}
ATTENTION_SYMBOLS = tuple(letter for letter, layer in LAYERS.items() if layer.has_kv_cache)  # layers with a KV cache


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
class ModelConfig:
    """A language model whose layers follow a layer pattern: Mamba-1, Mamba-2, attention and MLP layers in any order.

    "M" * n is the Mamba-1 model, "2" * n the Mamba-2 one, "T" * n a Llama-style transformer (RoPE, RMSNorm, SwiGLU,
    no biases), and any mix a hybrid (e.g. "MMMAMMMM": Jamba's / NVIDIA's Mamba-Hybrid's ~1:7 attention share). The
    Mamba layers take their own settings (d_state, expand, ...) from the `mamba1` and `mamba2` dicts, checked by
    MambaConfig / Mamba2Config; the attention settings are checked only when the pattern has attention layers."""
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
    rope_scaling: dict | None = None    # None, or Llama 3's frequency scaling (models/layers/attention.py
                                        # rope_frequencies): {"rope_type": "llama3", "factor", "low_freq_factor",
                                        # "high_freq_factor", "original_max_position_embeddings"}
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
            _check_model_int(name, getattr(self, name))
        check_pattern(self.pattern, self.n_layer)
        for name in ("n_kv_heads", "head_dim", "d_ff"):
            if getattr(self, name) is not None:
                _check_model_int(name, getattr(self, name), extra=" or null")
        if any(s in ATTENTION_SYMBOLS for s in self.pattern):
            if self.n_heads % self.kv_heads:
                raise ValueError(f"ModelConfig.n_kv_heads {self.kv_heads} must divide n_heads {self.n_heads} "
                                 f"(each key/value head serves n_heads / n_kv_heads query heads)")
            if self.head_dim is None and self.d_model % self.n_heads:
                raise ValueError(f"ModelConfig: n_heads {self.n_heads} does not divide d_model {self.d_model}; "
                                 f"choose another n_heads or give head_dim")
            if self.rope and self.resolved_head_dim % 2:
                raise ValueError(f"ModelConfig: RoPE needs an even head_dim, got {self.resolved_head_dim}")
        for name in ("rope_theta", "init_std", "norm_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"ModelConfig.{name} must be a finite number > 0, got {value!r}")
        for name in ("rope", "tie_embeddings", "residual_in_fp32"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ModelConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            check_rope_scaling(self.rope_scaling)
        for name in ("mamba1", "mamba2"):
            if not isinstance(getattr(self, name), dict):
                raise ValueError(f"ModelConfig.{name} must be a dict of fields, got {getattr(self, name)!r}")
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
        return max(1, sum(LAYERS[s].residual_branches for s in self.pattern))

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
            raise ValueError(f"ModelConfig.{name} must not set {clash}: they are the whole model's fields")
        return {**own, **shared}

    def to_model_config(self) -> "ModelConfig":
        """Itself: the one config every preset stands for."""
        return self

    def shape_dict(self) -> dict:
        """The fields that decide the tensors' shapes (a checkpoint must agree on all of them)."""
        return {"d_model": self.d_model, "n_layer": self.n_layer, "vocab_size": self.vocab_size,
                "pattern": self.pattern, "n_heads": self.n_heads, "n_kv_heads": self.kv_heads,
                "head_dim": self.resolved_head_dim, "d_ff": self.resolved_d_ff, "mamba1": self.mamba1,
                "mamba2": self.mamba2, "tie_embeddings": self.tie_embeddings}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        if unknown:
            raise ValueError(f"ModelConfig got unknown field(s) {unknown}; allowed: {', '.join(allowed)}")
        missing = [name for name in ("d_model", "n_layer", "vocab_size", "pattern") if name not in d]
        if missing:
            raise ValueError(f"ModelConfig needs the field(s) {missing}")
        return cls(**d)


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling) -> None:
    """ValueError unless `scaling` is Llama 3's RoPE scaling dict with every number it needs (> 0)."""
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        raise ValueError(f"ModelConfig.rope_scaling must be null or {{'rope_type': 'llama3', "
                         f"{', '.join(repr(k) + ': ...' for k in ROPE_SCALING_KEYS)}}}, got {scaling!r}")
    for key in ROPE_SCALING_KEYS:
        value = scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise ValueError(f"ModelConfig.rope_scaling[{key!r}] must be a finite number > 0, got {value!r}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"ModelConfig.rope_scaling: high_freq_factor {scaling['high_freq_factor']} must exceed "
                         f"low_freq_factor {scaling['low_freq_factor']}")


def _check_model_int(name, value, extra=""):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be an integer >= 1{extra}, got {value!r}")


HybridConfig = ModelConfig     # the name of family "hybrid" (checkpoints, configs/hybrid.py)

# the fields a preset shares with the whole model; the rest are its layers' settings
_MODEL_FIELDS = ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "norm_epsilon", "tie_embeddings",
                 "residual_in_fp32", "scan_backend")


def _preset_model_config(preset) -> ModelConfig:
    """The ModelConfig of a MambaConfig ("M" * n_layer) or a Mamba2Config ("2" * n_layer)."""
    letter, settings = {"mamba1": ("M", "mamba1"), "mamba2": ("2", "mamba2")}[preset.family]
    fields = preset.to_dict()
    shared = {name: fields.pop(name) for name in _MODEL_FIELDS}
    # the embedding's init (N(0, 0.02), mamba_ssm's) is init_std's default
    return ModelConfig(pattern=letter * preset.n_layer, **shared, **{settings: fields})
