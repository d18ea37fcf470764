"""MambaConfig: the shape and initialisation of a Mamba-1 language model (Gu & Dao, state-spaces/mamba).

Field names follow mamba_ssm (d_model, n_layer, ssm_cfg keys); models/hf_format.py maps them to and from the
names of HF transformers' MambaConfig (hidden_size, num_hidden_layers, state_size, ...).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from kernels import BACKENDS


@dataclass
class MambaConfig:
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
