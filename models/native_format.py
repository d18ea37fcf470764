"""The project's own checkpoint format, for models no published format describes (hybrids, our transformer).

A directory holds:
    config.json         {"format": "mamba-trainer", "format_version": 1, "family": "hybrid",
                         "pattern": "MMMAMMMM...", "config": {every HybridConfig field}, "dtype": "bfloat16",
                         "eos_token_id": 0}
    model.safetensors   the state dict under our parameter names (models/hybrid_layers.py); no lm_head.weight
                        when the head is tied to the embedding
    tokenizer.json      written beside them by the trainer (utils/tokenizer.py)

Loading is strict, as for the HF formats (models/hf_format.py): an unknown format version, a family other than
asked for, an unknown or missing config field, and any missing, unexpected or misshapen tensor is a ValueError
that names the file and what is wrong. Pure Mamba-1 / Mamba-2 models keep their HF formats; only the hybrid family
is written here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from .hf_format import CONFIG_NAME, SAFETENSORS_NAME, _as_dtype, build_with_weights, read_state_dict

FORMAT = "mamba-trainer"
FORMAT_VERSION = 1


def is_native(d: dict) -> bool:
    """Whether a config.json dict is in this format (else it is one of the HF / mamba_ssm formats)."""
    return d.get("format") == FORMAT


def config_from_native(d: dict, file, scan_backend: str = "auto"):
    """The model config a native config.json dict describes; ValueError naming `file` when it cannot."""
    from .registry import FAMILIES
    if d.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file}: format_version {d.get('format_version')!r} is not one this code reads "
                         f"({FORMAT_VERSION})")
    family = d.get("family")
    if family != "hybrid":
        raise ValueError(f"{file}: family {family!r} is not stored in the {FORMAT!r} format (only 'hybrid'; "
                         f"known families: {', '.join(FAMILIES)})")
    fields = d.get("config")
    if not isinstance(fields, dict):
        raise ValueError(f"{file}: 'config' must be an object of {family} config fields")
    try:
        config = FAMILIES[family][0].from_dict({**fields, "scan_backend": scan_backend})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{file}: {err}") from None
    if d.get("pattern") not in (None, config.pattern):
        raise ValueError(f"{file}: 'pattern' {d['pattern']!r} differs from config.pattern {config.pattern!r}")
    return config


def save_native(model, path, eos_token_id: int | None = None) -> None:
    """Write path/config.json and path/model.safetensors, each beside its final name and then renamed."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state_dict["lm_head.weight"]
    tmp = path / (SAFETENSORS_NAME + ".tmp")
    save_file(state_dict, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / SAFETENSORS_NAME)
    fields = model.config.to_dict()
    fields.pop("scan_backend")            # a choice of the machine that loads it, not of the model
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "family": model.config.family,
              "pattern": model.config.pattern, "config": fields,
              "dtype": str(model.backbone.embeddings.weight.dtype).removeprefix("torch."),
              "eos_token_id": eos_token_id}
    tmp = path / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(header, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_NAME)


def load_native(path, device=None, dtype=None, scan_backend: str = "auto", config=None):
    """Build the model a native directory holds, strictly. Returns it in eval mode."""
    from .registry import read_config
    path = Path(path)
    if config is None:
        config, fmt = read_config(path, scan_backend=scan_backend)
        if fmt != FORMAT:
            raise ValueError(f"{path / CONFIG_NAME} is not in the {FORMAT!r} format")
    dtype = _as_dtype(dtype)
    return build_with_weights(config, read_state_dict(path), path, device, dtype)
