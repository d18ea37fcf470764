"""Mamba-2 checkpoint configs: HF transformers' Mamba2ForCausalLM and mamba_ssm's MambaLMHeadModel with
ssm_cfg {"layer": "Mamba2"} (state-spaces/mamba2-130m ... 2.7b), to and from Mamba2Config.

The weights need no renaming beyond Mamba-1's (mamba_ssm calls the embedding `embedding`): both formats name the
mixer's tensors in_proj, conv1d, dt_bias, A_log, D, norm (the gated RMSNorm) and out_proj, as models/layers/mamba2.py
does. models/formats/__init__.py reads and writes the files and calls these for a Mamba-2 config.

HF's field names: hidden_size, num_hidden_layers, state_size, conv_kernel, expand, head_dim, num_heads (must equal
hidden_size * expand / head_dim), n_groups, time_step_min/max/floor, time_step_limit, chunk_size, use_bias,
use_conv_bias, layer_norm_epsilon, residual_in_fp32, tie_word_embeddings; vocab_size is the PADDED size.
"""
from __future__ import annotations

import math

from ..config import Mamba2Config

# HF Mamba2Config key -> (our field, HF default). HF's defaults are not mamba_ssm's (n_groups 8, untied head).
_HF_FIELDS = {"state_size": ("d_state", 128), "conv_kernel": ("d_conv", 4), "expand": ("expand", 2),
              "head_dim": ("headdim", 64), "n_groups": ("ngroups", 8), "time_step_min": ("dt_min", 0.001),
              "time_step_max": ("dt_max", 0.1), "time_step_floor": ("dt_init_floor", 1e-4),
              "time_step_limit": ("dt_limit", (0.0, math.inf)), "chunk_size": ("chunk_size", 256),
              "use_conv_bias": ("conv_bias", True), "use_bias": ("bias", False),
              "layer_norm_epsilon": ("norm_epsilon", 1e-5), "tie_word_embeddings": ("tie_embeddings", False),
              "residual_in_fp32": ("residual_in_fp32", True)}
# mamba_ssm Mamba2 ssm_cfg keys that only steer initialisation, kernels or parallelism, not a trained model's math
_SSM_CFG_IGNORED = {"layer", "layer_idx", "conv_init", "use_mem_eff_path", "process_group", "sequence_parallel",
                    "device", "dtype"}
_SSM_CFG_FIELDS = {"d_state", "d_conv", "expand", "headdim", "ngroups", "A_init_range", "dt_min", "dt_max",
                   "dt_init_floor", "dt_limit", "chunk_size", "bias", "conv_bias"}


def config_to_hf(config: Mamba2Config, eos_token_id: int | None = None) -> dict:
    """Our config as an HF Mamba2Config dict (config.json of a Mamba2ForCausalLM)."""
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "expand": config.expand,
        "head_dim": config.headdim,
        "num_heads": config.nheads,
        "n_groups": config.ngroups,
        "conv_kernel": config.d_conv,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "hidden_act": "silu",
        "time_step_rank": math.ceil(config.d_model / 16),     # unused by Mamba-2; HF's default, written out
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "time_step_limit": [_json_float(v) for v in config.dt_limit],
        "chunk_size": config.chunk_size,
        "layer_norm_epsilon": config.norm_epsilon,
        "residual_in_fp32": config.residual_in_fp32,
        "rescale_prenorm_residual": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        # written out so transformers' defaults (bos 0, eos 2, pad 1) never stop generation by accident
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "unpadded_vocab_size": config.vocab_size,
        "A_init_range": list(config.A_init_range),
    }


def config_from_hf(d: dict, scan_backend: str = "auto") -> Mamba2Config:
    """Mamba2Config from an HF Mamba2ForCausalLM config.json dict."""
    where = "config.json (model_type 'mamba2')"
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act is {d['hidden_act']!r}; Mamba-2 uses 'silu'")
    if d.get("norm_before_gate", False):
        raise ValueError(f"{where}: norm_before_gate is true; only the released norm_before_gate=false loads")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k not in d]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    fields = {ours: d.get(hf, default) for hf, (ours, default) in _HF_FIELDS.items()}
    for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size"):
        fields[name] = _as_int(where, name, fields[name])
    try:
        fields["dt_limit"] = tuple(_read_float(v) for v in fields["dt_limit"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: time_step_limit must be [min, max], got {fields['dt_limit']!r}") from None
    if "A_init_range" in d:
        fields["A_init_range"] = tuple(d["A_init_range"])
    num_heads = _as_int(where, "num_heads", d.get("num_heads", 128))
    inner = d["hidden_size"] * fields["expand"]
    if inner != num_heads * fields["headdim"]:
        raise ValueError(f"{where}: hidden_size * expand ({d['hidden_size']} * {fields['expand']} = {inner}) must "
                         f"equal num_heads * head_dim ({num_heads} * {fields['headdim']} = "
                         f"{num_heads * fields['headdim']})")
    if "unpadded_vocab_size" in d:   # written by us: restore the tokenizer's size and the padding rule
        vocab, multiple = d["unpadded_vocab_size"], d.get("pad_vocab_size_multiple", 1)
    else:                            # vocab_size is the embedding's row count: no further padding
        vocab, multiple = d["vocab_size"], 1
    try:
        config = Mamba2Config(d_model=d["hidden_size"], n_layer=d["num_hidden_layers"], vocab_size=vocab,
                              pad_vocab_size_multiple=multiple, scan_backend=scan_backend, **fields)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    if config.padded_vocab_size != d["vocab_size"]:
        raise ValueError(f"{where}: vocab_size {d['vocab_size']} does not match unpadded_vocab_size {vocab} "
                         f"padded to a multiple of {multiple} ({config.padded_vocab_size})")
    return config


def config_from_mamba_ssm(d: dict, scan_backend: str = "auto") -> Mamba2Config:
    """Mamba2Config from an original mamba_ssm config.json dict with ssm_cfg {"layer": "Mamba2", ...}."""
    where = "config.json (mamba_ssm, ssm_cfg.layer 'Mamba2')"
    missing = [k for k in ("d_model", "n_layer", "vocab_size") if k not in d]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    ssm_cfg = dict(d.get("ssm_cfg") or {})
    if d.get("attn_layer_idx"):
        raise ValueError(f"{where}: attn_layer_idx {d['attn_layer_idx']} makes a hybrid attention model; "
                         f"only pure Mamba-2 loads here")
    if d.get("d_intermediate", 0):
        raise ValueError(f"{where}: d_intermediate {d['d_intermediate']} adds MLP layers; only pure Mamba-2 "
                         f"(d_intermediate 0) loads here")
    if not d.get("rms_norm", True):
        raise ValueError(f"{where}: rms_norm is false (LayerNorm); only the released RMSNorm variant loads here")
    unsupported = {"rmsnorm": (True, "the gated RMSNorm"), "norm_before_gate": (False, "norm after the gate"),
                   "D_has_hdim": (False, "one D per head")}
    for key, (released, what) in unsupported.items():
        if key in ssm_cfg and ssm_cfg[key] != released:
            raise ValueError(f"{where}: ssm_cfg.{key} is {ssm_cfg[key]!r}; only the released {key}={released} "
                             f"({what}) loads here")
    d_ssm = ssm_cfg.get("d_ssm")
    if d_ssm is not None and d_ssm != ssm_cfg.get("expand", 2) * d["d_model"]:
        raise ValueError(f"{where}: ssm_cfg.d_ssm {d_ssm} is not d_inner; models with an MLP share in the mixer "
                         f"do not load here")
    unknown = sorted(set(ssm_cfg) - _SSM_CFG_FIELDS - _SSM_CFG_IGNORED - set(unsupported) - {"d_ssm"})
    if unknown:
        raise ValueError(f"{where}: unknown ssm_cfg key(s) {unknown}; known: {sorted(_SSM_CFG_FIELDS)}")
    fields = {k: v for k, v in ssm_cfg.items() if k in _SSM_CFG_FIELDS}
    try:
        return Mamba2Config(d_model=d["d_model"], n_layer=d["n_layer"], vocab_size=d["vocab_size"],
                            pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 16),
                            tie_embeddings=d.get("tie_embeddings", True),
                            residual_in_fp32=d.get("residual_in_fp32", True), scan_backend=scan_backend, **fields)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None


def _json_float(value: float):
    """inf as transformers writes it ({"__float__": "Infinity"}; plain JSON has no infinity)."""
    return {"__float__": "Infinity"} if value == math.inf else value


def _read_float(value) -> float:
    """A number, or transformers' {"__float__": "Infinity"} (also the bare Infinity Python's json reads)."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        return float(value["__float__"])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(value)
    return float(value)


def _as_int(where, name, value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
    return value
