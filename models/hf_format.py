"""Checkpoint directories in the two formats published Mamba models come in, and the one we write.

Mamba-2 (model_type "mamba2", or ssm_cfg {"layer": "Mamba2"}) goes through the same files and checks here; only its
config fields differ, mapped in models/hf_format_mamba2.py.

Read:
  * HF transformers (MambaForCausalLM): config.json (model_type "mamba", hidden_size, state_size, ...; vocab_size is
    the PADDED size, i.e. the embedding's row count) + model.safetensors | pytorch_model.bin | sharded *.index.json.
  * original mamba_ssm (state-spaces/mamba-130m ... 2.8b): config.json (d_model, n_layer, vocab_size before padding,
    pad_vocab_size_multiple, ssm_cfg) + pytorch_model.bin with keys backbone.embedding.weight, backbone.layers...
Write: the HF format, which transformers loads as it is; two extra keys (pad_vocab_size_multiple,
unpadded_vocab_size) keep our unpadded vocabulary size, and transformers ignores them.

Loading is strict: any missing or unexpected tensor, or a shape that does not match the config, is a ValueError;
so is a file that cannot be read as what its name says (cut short, overwritten, bit rot), naming the file.
(Our own checkpoints carry a manifest of checksums that training/checkpoint.py verifies before loading.)
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import MambaConfig
from .mamba import MambaLanguageModel

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"

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


# ---- config ---------------------------------------------------------------------------------------------------------

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


def detect_family(d: dict) -> str:
    """"mamba2" for an HF Mamba2 config (model_type "mamba2") or a mamba_ssm one with ssm_cfg.layer "Mamba2",
    else "mamba1" (whose reader then rejects anything that is not Mamba-1)."""
    if "model_type" in d or "hidden_size" in d:
        return "mamba2" if d.get("model_type") == "mamba2" else "mamba1"
    layer = (d.get("ssm_cfg") or {}).get("layer", "Mamba1") if isinstance(d.get("ssm_cfg") or {}, dict) else None
    return "mamba2" if layer == "Mamba2" else "mamba1"


def _family_mismatch(d: dict, found: str, family: str) -> str:
    if "model_type" in d or "hidden_size" in d:
        what = f"config.json has model_type {d.get('model_type', 'mamba')!r}"
    else:
        what = f"config.json: ssm_cfg.layer is {(d.get('ssm_cfg') or {}).get('layer', 'Mamba1')!r}"
    wanted = {"mamba1": "Mamba-1 ('mamba' / 'Mamba1')", "mamba2": "Mamba-2 ('mamba2' / 'Mamba2')"}[family]
    return (f"{what}: a {found} checkpoint, but family {family!r} was asked for, which loads only {wanted} "
            f"checkpoints; use family {found!r} (train.py --family {found}) or a {family} checkpoint")


def read_config(path: Path, scan_backend: str = "auto", family: str | None = None):
    """Returns (config, "hf" or "mamba_ssm") from path/config.json: a MambaConfig or a Mamba2Config as the file
    says; with `family`, a checkpoint of another family is a ValueError naming both."""
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a model directory "
                                f"(it holds: {_listing(path)})")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON (damaged?): {err}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file} must hold a JSON object")
    found = detect_family(d)
    if family is not None and found != family:
        raise ValueError(_family_mismatch(d, found, family))
    if found == "mamba2":
        from . import hf_format_mamba2 as m2
        if "hidden_size" in d or "model_type" in d:
            return m2.config_from_hf(d, scan_backend), "hf"
        return m2.config_from_mamba_ssm(d, scan_backend), "mamba_ssm"
    if "hidden_size" in d or "model_type" in d:
        return config_from_hf(d, scan_backend), "hf"
    if "d_model" in d:
        return config_from_mamba_ssm(d, scan_backend), "mamba_ssm"
    raise ValueError(f"{file} is neither an HF Mamba config (hidden_size, num_hidden_layers, ...) nor a mamba_ssm "
                     f"one (d_model, n_layer, ...); its keys: {sorted(d)}")


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


# ---- weights --------------------------------------------------------------------------------------------------------

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, on the CPU: safetensors first, then pytorch_model.bin; single or sharded."""
    for single, index, load in ((SAFETENSORS_NAME, SAFETENSORS_INDEX, _load_safetensors),
                                (BIN_NAME, BIN_INDEX, _load_bin)):
        if (path / single).is_file():
            return load(path / single)
        if (path / index).is_file():
            return _load_sharded(path, index, load)
    raise FileNotFoundError(f"{path} has no weights: looked for {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, {BIN_NAME}, "
                            f"{BIN_INDEX} (it holds: {_listing(path)})")


def _load_safetensors(file):
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file, damaged or cut short ({err})") from None


def _load_bin(file):
    # weights_only: a pickle from the internet must not run code
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        raise ValueError(f"{file}: not a readable PyTorch file, damaged or cut short ({err})") from None


def _load_sharded(path, index_name, load):
    try:
        weight_map = json.loads((path / index_name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path / index_name} is not a shard index with a 'weight_map': {err}") from err
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (path / s).is_file()]
    if absent:
        raise FileNotFoundError(f"{path / index_name} names shard file(s) that are missing: {absent}")
    state_dict = {}
    for shard in shards:
        state_dict.update(load(path / shard))
    not_found = sorted(set(weight_map) - set(state_dict))
    if not_found:
        raise ValueError(f"{path / index_name} lists tensors that its shards do not hold: {_few(not_found)}")
    return state_dict


def _to_our_names(state_dict):
    """Rename checkpoint keys to ours (mamba_ssm and early HF files call the embedding 'embedding')."""
    out = {}
    for key, tensor in state_dict.items():
        if key == "backbone.embedding.weight":
            key = "backbone.embeddings.weight"
        out[key] = tensor
    return out


def _check_state_dict(state_dict, model, path):
    """Raise ValueError naming every missing/unexpected key and every shape mismatch; drop a tied lm_head copy."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
        head, emb = state_dict.get("lm_head.weight"), state_dict.get("backbone.embeddings.weight")
        if head is not None and emb is not None and head.shape == emb.shape:
            if not torch.equal(head, emb.to(head.dtype)):
                raise ValueError(f"{path}: the config ties the LM head to the embedding, but lm_head.weight differs "
                                 f"from backbone.embeddings.weight (set tie_word_embeddings false if it is separate)")
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs config {expected[k]}"
             for k in sorted(set(expected) & set(state_dict)) if tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {_few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches {_few(wrong)}")
    if problems:
        raise ValueError(f"{path}: the weights do not match config.json: " + "; ".join(problems))
    return state_dict


# ---- load / save ----------------------------------------------------------------------------------------------------

def load_pretrained(path, device=None, dtype=None, scan_backend="auto", family=None) -> MambaLanguageModel:
    """Build a language model (Mamba-1 or Mamba-2, as config.json says) from an HF or mamba_ssm directory.

    Args:
        path: the directory
        device: where the model goes (default CPU)
        dtype: torch dtype (or its name, e.g. "bfloat16") of the parameters; default float32
        scan_backend: see MambaConfig.scan_backend (Mamba2Config.scan_backend for Mamba-2)
        family: "mamba1" or "mamba2" to accept only that family, or None for whichever the directory holds
    Returns:
        the model, in eval mode
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist" if not path.exists()
                                else f"{path} is a file; from_pretrained expects a model directory")
    dtype = _as_dtype(dtype)
    config, _ = read_config(path, scan_backend, family)
    state_dict = _to_our_names(read_state_dict(path))
    return build_with_weights(config, state_dict, path, device, dtype)


def build_with_weights(config, state_dict, path, device=None, dtype=None):
    """config's model (any family) holding exactly state_dict (checked strictly, names the file at `path`), on
    `device` in `dtype`, in eval mode. Built on the meta device: no time or memory spent on an init that the
    checkpoint overwrites."""
    from .registry import build_model
    with torch.device("meta"):
        model = build_model(config)
    state_dict = _check_state_dict(state_dict, model, path)
    if config.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict["backbone.embeddings.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    model.to(device=device if device is not None else "cpu", dtype=dtype)
    return model.eval()


def save_pretrained(model: MambaLanguageModel, path, eos_token_id: int | None = None):
    """Write path/config.json (HF MambaConfig) and path/model.safetensors (no lm_head.weight when tied, as
    transformers expects). Each file is written beside its final name and then renamed, so a crash never leaves
    a half-written file under the real name."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state_dict["lm_head.weight"]
    tmp = path / (SAFETENSORS_NAME + ".tmp")
    save_file(state_dict, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / SAFETENSORS_NAME)
    if model.config.family == "mamba2":
        from .hf_format_mamba2 import config_to_hf as mamba2_config_to_hf
        hf_config = mamba2_config_to_hf(model.config, eos_token_id)
    else:
        hf_config = config_to_hf(model.config, eos_token_id)
    hf_config["dtype"] = str(model.backbone.embeddings.weight.dtype).removeprefix("torch.")
    tmp = path / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(hf_config, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_NAME)


def _as_dtype(dtype):
    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (float32, bfloat16, float16), "
                         f"got {dtype!r}")
    return resolved


def _few(items, n=8):
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" ... ({len(items) - n} more)" if len(items) > n else "")


def _listing(path):
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return "nothing readable"
    return _few(names) if names else "nothing"
