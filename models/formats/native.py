"""The project's own checkpoint format, for models no published format describes (hybrids, our transformer).

A directory holds:
    config.json         {"format": "mamba-trainer", "format_version": 1, "family": "hybrid",
                         "pattern": "MMMAMMMM...", "config": {every ModelConfig field}, "dtype": "bfloat16",
                         "eos_token_id": 0}
    model.safetensors   the state dict under our parameter names (models/layers/); no lm_head.weight when the head
                        is tied to the embedding
    tokenizer.json      written beside them by the trainer (utils/tokenizer.py)

Loading is strict, as for the HF formats: an unknown format version, a family other than asked for, an unknown or
missing config field, and any missing, unexpected or misshapen tensor is a ValueError that names the file and what
is wrong. Pure Mamba-1 / Mamba-2 models keep their HF formats; only the hybrid family is written here.
"""
from __future__ import annotations

from ..config import ModelConfig
from .files import weights_dtype

FORMAT = "mamba-trainer"
FORMAT_VERSION = 1


def is_native(d: dict) -> bool:
    """Whether a config.json dict is in this format (else it is one of the HF / mamba_ssm formats)."""
    return d.get("format") == FORMAT


def config_from_native(d: dict, file, scan_backend: str = "auto") -> ModelConfig:
    """The model config a native config.json dict describes; ValueError naming `file` when it cannot."""
    if d.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {d.get('format_version')!r} is not one this code reads "
                         f"({FORMAT_VERSION})")
    family = d.get("family")
    if family != ModelConfig.family:
        raise ValueError(f"{file}: family {family!r} is not stored in the {FORMAT!r} format (only "
                         f"{ModelConfig.family!r}; mamba1 and mamba2 use the HF formats)")
    fields = d.get("config")
    if not isinstance(fields, dict):
        raise ValueError(f"{file}: 'config' must be an object of {family} config fields")
    try:
        config = ModelConfig.from_dict({**fields, "scan_backend": scan_backend})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None
    if d.get("pattern") not in (None, config.pattern):
        raise ValueError(f"{file}: 'pattern' {d['pattern']!r} differs from config.pattern {config.pattern!r}")
    return config


def native_header(model, eos_token_id: int | None = None) -> dict:
    """The config.json of `model` in this format."""
    fields = model.config.to_dict()
    fields.pop("scan_backend")            # a choice of the machine that loads it, not of the model
    if fields["rope_scaling"] is None:    # written only when set (Llama 3 RoPE): an unscaled model's file stays
        del fields["rope_scaling"]        # what the code before the field wrote, and that code still reads it
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "family": model.config.family,
            "pattern": model.config.pattern, "config": fields, "dtype": weights_dtype(model),
            "eos_token_id": eos_token_id}
