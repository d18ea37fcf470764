"""The model families, in one table: family name -> (config class, language-model class).

A family is chosen by name (TrainConfig.family, `python train.py --family mamba2`) or by the config object's type,
never by sniffing attributes. Adding a family is one new model file and one row here.
"""
from __future__ import annotations

from .config import Mamba2Config, MambaConfig
from .mamba import MambaLanguageModel
from .mamba2 import Mamba2LanguageModel
from .hybrid import HybridLanguageModel
from .hybrid_config import HybridConfig

FAMILIES = {
    "mamba1": (MambaConfig, MambaLanguageModel),      # Gu & Dao 2023, models/mamba.py
    "mamba2": (Mamba2Config, Mamba2LanguageModel),    # Dao & Gu 2024 (SSD), models/mamba2.py
    "hybrid": (HybridConfig, HybridLanguageModel),    # any layer pattern of M / 2 / A / F / T, models/hybrid.py
}
DEFAULT_FAMILY = "mamba1"


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is unknown; allowed: {', '.join(FAMILIES)}")
    return family


def config_class(family: str):
    return FAMILIES[check_family(family)][0]


def model_class(family: str):
    return FAMILIES[check_family(family)][1]


def build_model(config):
    """A freshly initialised language model of config's family (MambaConfig, Mamba2Config or HybridConfig)."""
    return model_class(config.family)(config)


def load_pretrained(path, device=None, dtype=None, scan_backend="auto", family=None):
    """Load a checkpoint directory of any family (HF Mamba, mamba_ssm, HF Llama or our own format); with `family`,
    only that one (another family is a ValueError naming both)."""
    from .formats import llama
    from .hf_format import load_pretrained as load
    from .native_format import load_native
    config, fmt = read_config(path, scan_backend=scan_backend, family=family)
    if fmt == "mamba-trainer":
        return load_native(path, device=device, dtype=dtype, scan_backend=scan_backend, config=config)
    if fmt == llama.FORMAT:
        return llama.load_llama(path, device=device, dtype=dtype, scan_backend=scan_backend, config=config)
    return load(path, device=device, dtype=dtype, scan_backend=scan_backend, family=family)


def read_config(path, scan_backend="auto", family=None):
    """(config, format) of a checkpoint directory: format "hf" / "mamba_ssm" (models/hf_format.py),
    "mamba-trainer" (models/native_format.py, the hybrid family) or "llama" (models/formats/llama.py, the hybrid
    family with T layers). With `family`, another family is a ValueError naming both."""
    import json
    from pathlib import Path

    from . import hf_format
    from .formats import llama
    from .native_format import FORMAT, config_from_native, is_native
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist" if not path.exists()
                                else f"{path} is a file; a model directory was expected")
    file = path / hf_format.CONFIG_NAME
    try:
        header = json.loads(file.read_text()) if file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None                        # hf_format.read_config names the damage
    if isinstance(header, dict) and is_native(header):
        config = config_from_native(header, file, scan_backend)
        if family is not None and config.family != family:
            raise ValueError(f"{file}: a {config.family} checkpoint (pattern {config.pattern!r}), but family "
                             f"{family!r} was asked for; use family {config.family!r} (train.py --family "
                             f"{config.family}) or a {family} checkpoint")
        return config, FORMAT
    if isinstance(header, dict) and llama.is_llama(header):
        config = llama.config_from_llama(header, file, scan_backend)
        if family not in (None, config.family):
            raise ValueError(f"{file}: a Llama checkpoint, which loads as family 'hybrid' (pattern of T layers), "
                             f"but family {family!r} was asked for; use train.py --family hybrid")
        return config, llama.FORMAT
    if family == "hybrid":
        found, _ = hf_format.read_config(path, scan_backend)
        raise ValueError(f"{file}: a {found.family} checkpoint (HF format), but family 'hybrid' was asked for; "
                         f"use family {found.family!r} (train.py --family {found.family})")
    return hf_format.read_config(path, scan_backend, family)
