"""HF Llama checkpoints (LlamaForCausalLM) in and out: a pattern of "T" layers is the Llama architecture.

A Llama folder holds config.json (model_type "llama") + model.safetensors, a sharded model.safetensors.index.json
or pytorch_model.bin, and usually tokenizer.json. It loads as a ModelConfig with pattern "T" * n_layer:

    config.json                    ModelConfig                  tensors (per layer i)
    hidden_size                    d_model                      model.embed_tokens  -> backbone.embeddings
    num_hidden_layers              n_layer, pattern "T" * n     model.layers.i.input_layernorm
    num_attention_heads            n_heads                                         -> backbone.layers.i.norm
    num_key_value_heads            n_kv_heads (GQA)             model.layers.i.self_attn.{q,k,v,o}_proj
    head_dim                       head_dim                                        -> backbone.layers.i.mixer.*
    intermediate_size              d_ff                         model.layers.i.post_attention_layernorm
    rms_norm_eps                   norm_epsilon                                    -> backbone.layers.i.mlp_norm
    rope_theta / rope_parameters   rope_theta, rope_scaling     model.layers.i.mlp.{gate,up,down}_proj
    tie_word_embeddings            tie_embeddings                                  -> backbone.layers.i.mlp.*
    vocab_size                     vocab_size, exactly          model.norm -> backbone.norm_f; lm_head as is
                                   (pad_vocab_size_multiple 1)

The math needs no permutation: models/layers/attention.py rotates with HF's "rotate half" layout, scales by 1/sqrt(e),
and the norms are RMSNorm with the epsilon inside the root (tests/test_llama.py checks the logits against
transformers'). What the model cannot compute is refused in one line naming the setting: biases, an activation
other than SiLU, RoPE scaling other than Llama 3's, sliding windows. Writing goes the other way: a model of T
layers only, the vocabulary cut to its real size (padding rows never reach transformers), tied or untied head.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import ModelConfig
from ..lm import LanguageModel
from .files import CONFIG_NAME, as_dtype, build_with_weights, read_state_dict, write_tensors

FORMAT = "llama"
MODEL_TYPE = "llama"
DEFAULT_ROPE_THETA = 10000.0     # LlamaConfig's
DEFAULT_RMS_NORM_EPS = 1e-6      # LlamaConfig's
DEFAULT_MAX_POSITIONS = 8192     # written out; no effect on default or Llama 3 RoPE (only "dynamic" scaling reads it)

# per-layer tensor names: HF Llama's -> ours (models/layers/transformer.TransformerLayer)
_LAYER_NAMES = {
    "input_layernorm.weight": "norm.weight",
    "self_attn.q_proj.weight": "mixer.q_proj.weight",
    "self_attn.k_proj.weight": "mixer.k_proj.weight",
    "self_attn.v_proj.weight": "mixer.v_proj.weight",
    "self_attn.o_proj.weight": "mixer.o_proj.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "backbone.embeddings.weight",
                 "model.norm.weight": "backbone.norm_f.weight", "lm_head.weight": "lm_head.weight"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def is_llama(d: dict) -> bool:
    """Whether a config.json dict describes an HF Llama model."""
    return d.get("model_type") == MODEL_TYPE


# ---- config ---------------------------------------------------------------------------------------------------------

def _rope_settings(d: dict, file) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's rope_parameters or 4.x's rope_theta + rope_scaling."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    theta = params.get("rope_theta", d.get("rope_theta", DEFAULT_ROPE_THETA))
    kind = (scaling or params).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ValueError(f"{file}: RoPE scaling {kind!r} is not supported; only none ('default') and 'llama3' are")
    source = scaling or params
    return theta, {"rope_type": "llama3", **{k: source.get(k) for k in ("factor", "low_freq_factor",
                                                                          "high_freq_factor",
                                                                          "original_max_position_embeddings")}}


def config_from_llama(d: dict, file, scan_backend: str = "auto") -> ModelConfig:
    """The ModelConfig of an HF Llama config.json dict; ValueError (one line naming `file`) for what our model
    cannot compute."""
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                           "vocab_size") if k not in d]
    if missing:
        raise ValueError(f"{file}: a Llama config.json without {missing}")
    refused = [f"{k} true" for k in ("attention_bias", "mlp_bias") if d.get(k)]
    if d.get("hidden_act", "silu") != "silu":
        refused.append(f"hidden_act {d['hidden_act']!r}")
    if d.get("sliding_window") is not None:
        refused.append(f"sliding_window {d['sliding_window']}")
    if refused:
        raise ValueError(f"{file}: Llama with {', '.join(refused)} is not supported; supported: no biases, SiLU, "
                         f"full causal attention")
    theta, scaling = _rope_settings(d, file)
    n_layer = d["num_hidden_layers"]
    if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
        raise ValueError(f"{file}: num_hidden_layers must be an integer >= 1, got {n_layer!r}")
    try:
        return ModelConfig(
            d_model=d["hidden_size"], n_layer=n_layer, vocab_size=d["vocab_size"], pattern="T" * n_layer,
            pad_vocab_size_multiple=1, n_heads=d["num_attention_heads"],
            n_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=d.get("head_dim"),
            rope=True, rope_theta=float(theta), rope_scaling=scaling, d_ff=d["intermediate_size"],
            init_std=d.get("initializer_range", 0.02), norm_epsilon=d.get("rms_norm_eps", DEFAULT_RMS_NORM_EPS),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)), scan_backend=scan_backend)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None


def config_to_llama(config: ModelConfig, dtype: torch.dtype, eos_token_id: int | None = None) -> dict:
    """config.json of a LlamaForCausalLM computing what `config`'s model computes (written by transformers 5's
    names, with 4.x's rope_theta / rope_scaling beside them)."""
    check_exportable(config)
    scaling = config.rope_scaling
    rope = {"rope_type": "default", "rope_theta": config.rope_theta} if scaling is None else \
        {**scaling, "rope_theta": config.rope_theta}
    positions = DEFAULT_MAX_POSITIONS if scaling is None else \
        int(scaling["original_max_position_embeddings"] * scaling["factor"])
    out = {
        "architectures": ["LlamaForCausalLM"], "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size, "hidden_size": config.d_model, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.kv_heads,
        "head_dim": config.resolved_head_dim, "intermediate_size": config.resolved_d_ff, "hidden_act": "silu",
        "rms_norm_eps": config.norm_epsilon, "rope_parameters": rope, "rope_theta": config.rope_theta,
        "max_position_embeddings": positions, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings, "initializer_range": config.init_std, "use_cache": True,
        # written out so that transformers' defaults (1 and 2) never stop generation at a foreign token
        "bos_token_id": None, "eos_token_id": eos_token_id, "pad_token_id": eos_token_id,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if scaling is not None:
        out["rope_scaling"] = dict(scaling)
    return out


def check_exportable(config: ModelConfig) -> None:
    """ValueError unless config's model is a Llama: T layers only, with RoPE."""
    if set(config.pattern) != {"T"} or not config.rope:
        raise ValueError(f"only a transformer (pattern of T layers with RoPE) saves as Llama; this model has "
                         f"pattern {config.pattern!r}{'' if config.rope else ' without RoPE'}")


# ---- tensors --------------------------------------------------------------------------------------------------------

def to_our_names(state_dict: dict, file) -> dict:
    """HF Llama tensor names -> ours; ValueError naming the tensors that are neither."""
    out, unknown = {}, []
    for key, tensor in state_dict.items():
        layer = _LAYER_KEY.fullmatch(key)
        if key in _GLOBAL_NAMES:
            out[_GLOBAL_NAMES[key]] = tensor
        elif layer and layer.group(2) in _LAYER_NAMES:
            out[f"backbone.layers.{layer.group(1)}.{_LAYER_NAMES[layer.group(2)]}"] = tensor
        elif not key.endswith("rotary_emb.inv_freq"):     # older files stored the RoPE frequencies; we compute them
            unknown.append(key)
    if unknown:
        raise ValueError(f"{file}: tensors a Llama checkpoint does not have: {', '.join(sorted(unknown)[:8])}"
                         + (f" ... ({len(unknown) - 8} more)" if len(unknown) > 8 else ""))
    return out


def to_llama_names(state_dict: dict) -> dict:
    """Our tensor names -> HF Llama's; ValueError for tensors a Llama has no place for (unmerged LoRA adapters)."""
    ours = {v: k for k, v in _GLOBAL_NAMES.items()}
    layer_ours = {v: k for k, v in _LAYER_NAMES.items()}
    out, extra = {}, []
    for key, tensor in state_dict.items():
        layer = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", key)
        if key in ours:
            out[ours[key]] = tensor
        elif layer and layer.group(2) in layer_ours:
            out[f"model.layers.{layer.group(1)}.{layer_ours[layer.group(2)]}"] = tensor
        else:
            extra.append(key)
    if extra:
        raise ValueError(f"tensors a Llama checkpoint has no place for: {', '.join(sorted(extra)[:4])}"
                         f"{' ...' if len(extra) > 4 else ''} "
                         f"(merge LoRA adapters first: models.lora.merge_and_unload)")
    return out


# ---- load / save ----------------------------------------------------------------------------------------------------

def read_llama_config(path, scan_backend: str = "auto") -> tuple[ModelConfig, dict]:
    """(our config, the config.json dict) of a Llama folder."""
    file = Path(path) / CONFIG_NAME
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON (damaged?): {err}") from None
    if not isinstance(d, dict) or not is_llama(d):
        raise ValueError(f"{file} is not a Llama config.json (model_type {MODEL_TYPE!r})")
    return config_from_llama(d, file, scan_backend), d


def stored_dtype(d: dict) -> torch.dtype:
    """The dtype config.json names (transformers 5's "dtype", 4.x's "torch_dtype"), else fp32."""
    name = d.get("dtype") or d.get("torch_dtype")
    return as_dtype(name if isinstance(name, str) and name != "auto" else None)


def load_llama(path, device=None, dtype=None, scan_backend: str = "auto",
               config: ModelConfig | None = None) -> LanguageModel:
    """A LanguageModel of T layers holding a Llama folder's weights, in eval mode.

    dtype: the parameters' dtype; None = the one config.json names (dtype / torch_dtype), else fp32.
    """
    path = Path(path)
    found, d = read_llama_config(path, scan_backend)
    config = found if config is None else config
    dtype = stored_dtype(d) if dtype is None else as_dtype(dtype)
    state_dict = to_our_names(read_state_dict(path), path)
    return build_with_weights(config, state_dict, path, device, dtype)


def save_llama(model: LanguageModel, path, eos_token_id: int | None = None) -> None:
    """Write path/config.json + path/model.safetensors that transformers' LlamaForCausalLM opens with the same
    logits. The vocabulary is cut to its real size (config.vocab_size): padding rows are never a token there.
    Each file is written beside its final name and then renamed."""
    config = model.spec             # the ModelConfig of any family: a Mamba preset is refused by its pattern
    check_exportable(config)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_embeddings:
        del state_dict["lm_head.weight"]
    for key in ("backbone.embeddings.weight", "lm_head.weight"):
        if key in state_dict:
            state_dict[key] = state_dict[key][:config.vocab_size].contiguous()
    tensors = to_llama_names(state_dict)
    header = config_to_llama(config, model.backbone.embeddings.weight.dtype, eos_token_id)
    write_tensors(tensors, path, header)
