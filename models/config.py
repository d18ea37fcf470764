"""MambaConfig: the shape and initialisation of a Mamba-1 language model (Gu & Dao, state-spaces/mamba).

Field names follow mamba_ssm (d_model, n_layer, ssm_cfg keys); models/hf_format.py maps them to and from the
names of HF transformers' MambaConfig (hidden_size, num_hidden_layers, state_size, ...).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

from kernels import BACKENDS


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
    Mamba2 mixer inside MambaLMHeadModel). Defaults are mamba_ssm's. models/hf_format_mamba2.py maps the fields to
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
        from kernels.ssd import SSD_BACKENDS
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
