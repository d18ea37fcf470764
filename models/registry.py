"""The model families, in one table: family name -> (config class, language-model class).

A family is chosen by name (TrainConfig.family, `python train.py --family mamba2`) or by the config object's type,
never by sniffing attributes. Adding a family is one new model file and one row here.
"""
from __future__ import annotations

from .config import Mamba2Config, MambaConfig
from .mamba import MambaLanguageModel
from .mamba2 import Mamba2LanguageModel

FAMILIES = {
    "mamba1": (MambaConfig, MambaLanguageModel),      # Gu & Dao 2023, models/mamba.py
    "mamba2": (Mamba2Config, Mamba2LanguageModel),    # Dao & Gu 2024 (SSD), models/mamba2.py
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
    """A freshly initialised language model of config's family (MambaConfig or Mamba2Config)."""
    return model_class(config.family)(config)


def load_pretrained(path, device=None, dtype=None, scan_backend="auto", family=None):
    """Load a checkpoint directory of any family (HF or mamba_ssm format); with `family`, only that one (another
    family is a ValueError naming both)."""
    from .hf_format import load_pretrained as load
    return load(path, device=device, dtype=dtype, scan_backend=scan_backend, family=family)
