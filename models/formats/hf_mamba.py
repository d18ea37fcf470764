"""Mamba-1 checkpoint configs: HF transformers' MambaForCausalLM and original mamba_ssm (state-spaces/mamba-130m ...
2.8b), to and from MambaConfig. The weights need no renaming (our parameter names are transformers'; mamba_ssm calls
the embedding `embedding`: files.to_our_names).

  * HF transformers: config.json (model_type "mamba", hidden_size, state_size, ...; vocab_size is the PADDED size,
    i.e. the embedding's row count) + model.safetensors | pytorch_model.bin | sharded *.index.json.
  * original mamba_ssm: config.json (d_model, n_layer, vocab_size before padding, pad_vocab_size_multiple, ssm_cfg)
    + pytorch_model.bin with keys backbone.embedding.weight, backbone.layers...
Written: the HF format, which transformers loads as it is; two extra keys (pad_vocab_size_multiple,
unpadded_vocab_size) keep our unpadded vocabulary size, and transformers ignores them.
"""
from __future__ import annotations

from ..config import MambaConfig

# mamba_ssm ssm_cfg keys that only steer initialisation or kernel choice, not the math of a trained model
_SSM_CFG_IGNORED = {"dt_init", "dt_scale", "use_fast_path", "layer_idx", "layer"}
_SSM_CFG_FIELDS = {"d_state": "d_state", "d_conv": "d_conv", "expand": "expand", "dt_rank": "dt_rank",
                   "dt_min": "dt_min", "dt_max": "dt_max", "dt_init_floor": "dt_init_floor",
                   "conv_bias": "conv_bias", "bias": "bias"}
# HF MambaConfig key -> (our field, HF default)
_HF_FIELDS = {"state_size": ("d_state", 16), "conv_kernel": ("d_conv", 4), "expand": ("expand", 2),
              "time_step_rank": ("dt_rank", "auto"), "time_step_min": ("dt_min", 0.001),
              "time_step_max": ("dt_max", 0.1), "time_step_floor": ("dt_init_floor", 1e-4),
              "use_conv_bias": ("conv_bias", True), "use_bias": ("bias", False),
              "layer_norm_epsilon": ("norm_epsilon", 1e-5), "tie_word_embeddings": ("tie_embeddings", True),
              "residual_in_fp32": ("residual_in_fp32", True)}


def config_to_hf(config: MambaConfig, eos_token_id: int | None = None) -> dict:
    """Our config as an HF MambaConfig dict (config.json of a MambaForCausalLM)."""
    return {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": config.d_state,
        "expand": config.expand,
        "intermediate_size": config.d_inner,
        "conv_kernel": config.d_conv,
        "use_bias": config.bias,
        "use_conv_bias": config.conv_bias,
        "hidden_act": "silu",
        "time_step_rank": config.resolved_dt_rank,
        "time_step_scale": 1.0,
        "time_step_min": config.dt_min,
        "time_step_max": config.dt_max,
        "time_step_floor": config.dt_init_floor,
        "time_step_init_scheme": "random",
        "layer_norm_epsilon": config.norm_epsilon,
        "residual_in_fp32": config.residual_in_fp32,
        # init-only in transformers, but some versions apply it to loaded weights too (out_proj / sqrt(n_layer))
        "rescale_prenorm_residual": False,
        "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings,
        "use_cache": True,
        # written out so transformers' defaults (token 0 for all three) never stop generation by accident
        "bos_token_id": None,
        "eos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
        "pad_vocab_size_multiple": config.pad_vocab_size_multiple,
        "unpadded_vocab_size": config.vocab_size,
    }


def config_from_hf(d: dict, scan_backend: str = "auto") -> MambaConfig:
    """MambaConfig from an HF MambaForCausalLM config.json dict."""
    if d.get("model_type", "mamba") != "mamba":
        raise ValueError(f"config.json has model_type {d['model_type']!r}; only Mamba-1 ('mamba') checkpoints "
                         f"load as Mamba-1 (Mamba-2 loads as family 'mamba2'; FalconMamba and hybrids do not load)")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json has hidden_act {d['hidden_act']!r}; Mamba-1 uses 'silu'")
    _require(d, ("hidden_size", "num_hidden_layers", "vocab_size"), "an HF Mamba config.json")
    fields = {ours: d.get(hf, default) for hf, (ours, default) in _HF_FIELDS.items()}
    fields["expand"] = _as_int("expand", fields["expand"])
    if fields["dt_rank"] != "auto":
        fields["dt_rank"] = _as_int("time_step_rank", fields["dt_rank"])
    if "unpadded_vocab_size" in d:   # written by us: restore the tokenizer's size and the padding rule
        vocab, multiple = d["unpadded_vocab_size"], d.get("pad_vocab_size_multiple", 1)
    else:                            # vocab_size is the embedding's row count: no further padding
        vocab, multiple = d["vocab_size"], 1
    config = MambaConfig(d_model=d["hidden_size"], n_layer=d["num_hidden_layers"], vocab_size=vocab,
                         pad_vocab_size_multiple=multiple, scan_backend=scan_backend, **fields)
    if config.padded_vocab_size != d["vocab_size"]:
        raise ValueError(f"config.json: vocab_size {d['vocab_size']} does not match unpadded_vocab_size {vocab} "
                         f"padded to a multiple of {multiple} ({config.padded_vocab_size})")
    return config


def config_from_mamba_ssm(d: dict, scan_backend: str = "auto") -> MambaConfig:
    """MambaConfig from an original mamba_ssm config.json dict (d_model, n_layer, ssm_cfg, ...)."""
    _require(d, ("d_model", "n_layer", "vocab_size"), "a mamba_ssm config.json")
    ssm_cfg = dict(d.get("ssm_cfg") or {})
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        raise ValueError(f"config.json: ssm_cfg.layer is {ssm_cfg['layer']!r}; only 'Mamba1' loads here")
    if d.get("attn_layer_idx"):
        raise ValueError(f"config.json: attn_layer_idx {d['attn_layer_idx']} makes a hybrid attention model; "
                         f"only pure Mamba-1 loads here")
    if d.get("d_intermediate", 0):
        raise ValueError(f"config.json: d_intermediate {d['d_intermediate']} adds MLP layers; "
                         f"only pure Mamba-1 (d_intermediate 0) loads here")
    if not d.get("rms_norm", True):
        raise ValueError("config.json: rms_norm is false (LayerNorm); only the released RMSNorm variant loads here")
    unknown = sorted(set(ssm_cfg) - set(_SSM_CFG_FIELDS) - _SSM_CFG_IGNORED)
    if unknown:
        raise ValueError(f"config.json: unknown ssm_cfg key(s) {unknown}; known: {sorted(_SSM_CFG_FIELDS)}")
    fields = {_SSM_CFG_FIELDS[k]: v for k, v in ssm_cfg.items() if k in _SSM_CFG_FIELDS}
    return MambaConfig(d_model=d["d_model"], n_layer=d["n_layer"], vocab_size=d["vocab_size"],
                       pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
                       tie_embeddings=d.get("tie_embeddings", True),
                       residual_in_fp32=d.get("residual_in_fp32", True), scan_backend=scan_backend, **fields)


def _require(d, keys, what):
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"config.json looks like {what} but lacks {missing}")


def _as_int(name, value):
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"config.json: {name} must be an integer, got {value!r}")
    return value
