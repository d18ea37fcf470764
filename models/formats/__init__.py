"""Checkpoint formats, outside the model: each imports the model (models/lm.py) and its config; the model, its
layers and the config never import a format. This package decides which format a directory is in and which format
a model is saved in, and registers load / save with the model at import (LanguageModel.from_pretrained /
save_pretrained), so that users keep both.

    hf_mamba.py    Mamba-1: HF transformers' MambaForCausalLM and original mamba_ssm configs  (family mamba1)
    hf_mamba2.py   Mamba-2: HF transformers' Mamba2ForCausalLM and mamba_ssm's Mamba2 configs (family mamba2)
    native.py      the project's own format, for any layer pattern                          (family hybrid)
    llama.py       HF transformers' LlamaForCausalLM in, and out for a pattern of T layers  (family hybrid)
    files.py       the tensors in and out of a directory, strictly checked; atomic writes
"""
from __future__ import annotations

import json
from pathlib import Path

from ..lm import CheckpointIO, LanguageModel, register_checkpoint_io
from . import hf_mamba, hf_mamba2, llama
from .files import (CONFIG_NAME, as_dtype, build_with_weights, listing, read_state_dict, to_our_names,
                    weights_dtype, write_checkpoint)
from .native import FORMAT as NATIVE_FORMAT, config_from_native, is_native, native_header

# family -> (reader of an HF config.json, of a mamba_ssm one, writer of the HF one)
_HF_FAMILIES = {
    "mamba1": (hf_mamba.config_from_hf, hf_mamba.config_from_mamba_ssm, hf_mamba.config_to_hf),
    "mamba2": (hf_mamba2.config_from_hf, hf_mamba2.config_from_mamba_ssm, hf_mamba2.config_to_hf),
}


def detect_family(d: dict) -> str:
    """"mamba2" for an HF Mamba2 config (model_type "mamba2") or a mamba_ssm one with ssm_cfg.layer "Mamba2",
    else "mamba1" (whose reader then rejects anything that is not Mamba-1)."""
    if _is_hf(d):
        return "mamba2" if d.get("model_type") == "mamba2" else "mamba1"
    layer = (d.get("ssm_cfg") or {}).get("layer", "Mamba1") if isinstance(d.get("ssm_cfg") or {}, dict) else None
    return "mamba2" if layer == "Mamba2" else "mamba1"


def _is_hf(d: dict) -> bool:
    return "model_type" in d or "hidden_size" in d


def _family_mismatch(d: dict, found: str, family: str) -> str:
    if _is_hf(d):
        what = f"config.json has model_type {d.get('model_type', 'mamba')!r}"
    else:
        what = f"config.json: ssm_cfg.layer is {(d.get('ssm_cfg') or {}).get('layer', 'Mamba1')!r}"
    wanted = {"mamba1": "Mamba-1 ('mamba' / 'Mamba1')", "mamba2": "Mamba-2 ('mamba2' / 'Mamba2')"}[family]
    return (f"{what}: a {found} checkpoint, but family {family!r} was asked for, which loads only {wanted} "
            f"checkpoints; use family {found!r} (train.py --family {found}) or a {family} checkpoint")


def read_config(path, scan_backend: str = "auto", family: str | None = None):
    """(config, format) of a checkpoint directory: format "hf" / "mamba_ssm" (a MambaConfig or Mamba2Config, as
    the file says), "mamba-trainer" (native.py: a ModelConfig) or "llama" (llama.py: a ModelConfig of T layers).
    With `family`, a checkpoint of another family is a ValueError naming both."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist" if not path.exists()
                                else f"{path} is a file; a model directory was expected")
    file = path / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a model directory (it holds: {listing(path)})")
    try:
        d = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON (damaged?): {err}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file} must hold a JSON object")
    if is_native(d):
        config = config_from_native(d, file, scan_backend)
        if family is not None and config.family != family:
            raise ValueError(f"{file}: a {config.family} checkpoint (pattern {config.pattern!r}), but family "
                             f"{family!r} was asked for; use family {config.family!r} (train.py --family "
                             f"{config.family}) or a {family} checkpoint")
        return config, NATIVE_FORMAT
    if llama.is_llama(d):
        config = llama.config_from_llama(d, file, scan_backend)
        if family not in (None, config.family):
            raise ValueError(f"{file}: a Llama checkpoint, which loads as family 'hybrid' (pattern of T layers), "
                             f"but family {family!r} was asked for; use train.py --family hybrid")
        return config, llama.FORMAT
    found = detect_family(d)
    if family == "hybrid":
        raise ValueError(f"{file}: a {found} checkpoint (HF format), but family 'hybrid' was asked for; "
                         f"use family {found!r} (train.py --family {found})")
    if family is not None and found != family:
        raise ValueError(_family_mismatch(d, found, family))
    from_hf, from_mamba_ssm, _ = _HF_FAMILIES[found]
    if _is_hf(d):
        return from_hf(d, scan_backend), "hf"
    if "d_model" in d:
        return from_mamba_ssm(d, scan_backend), "mamba_ssm"
    raise ValueError(f"{file} is neither an HF Mamba config (hidden_size, num_hidden_layers, ...) nor a mamba_ssm "
                     f"one (d_model, n_layer, ...); its keys: {sorted(d)}")


def load_pretrained(path, device=None, dtype=None, scan_backend="auto", family=None) -> LanguageModel:
    """Build the language model a checkpoint directory holds, in any format read_config knows.

    Args:
        path: the directory
        device: where the model goes (default CPU)
        dtype: torch dtype (or its name, e.g. "bfloat16") of the parameters; default float32 (a Llama folder: the
            dtype its config.json names)
        scan_backend: the scan backend the model asks for (the configs' scan_backend)
        family: "mamba1", "mamba2" or "hybrid" to accept only that family, or None for whichever it holds
    Returns:
        the model, in eval mode
    """
    config, fmt = read_config(path, scan_backend, family)
    if fmt == llama.FORMAT:        # its own tensor names, and the dtype its config.json names when none is asked
        return llama.load_llama(path, device=device, dtype=dtype, scan_backend=scan_backend, config=config)
    dtype = as_dtype(dtype)
    return build_with_weights(config, to_our_names(read_state_dict(Path(path))), Path(path), device, dtype)


def save_pretrained(model: LanguageModel, path, eos_token_id: int | None = None) -> None:
    """Write `model` in its family's format: config.json + model.safetensors that transformers' MambaForCausalLM
    (mamba1) or Mamba2ForCausalLM (mamba2) loads, or the project's own format (hybrid, whatever the pattern: it
    keeps every ModelConfig field). A pattern of T layers goes out as Llama through llama.save_llama
    (python -m training.export_llama)."""
    family = model.config.family
    if family in _HF_FAMILIES:
        header = {**_HF_FAMILIES[family][2](model.config, eos_token_id), "dtype": weights_dtype(model)}
    else:
        header = native_header(model, eos_token_id)
    write_checkpoint(model, path, header)


register_checkpoint_io(CheckpointIO(load=load_pretrained, save=save_pretrained))

__all__ = ["read_config", "load_pretrained", "save_pretrained", "detect_family", "CONFIG_NAME"]
