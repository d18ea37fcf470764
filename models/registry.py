"""The model families, in one table: family name -> its config class (a preset of models/config.ModelConfig).

A family is chosen by name (TrainConfig.family, `python train.py --family mamba2`) or by the config object's type,
never by sniffing attributes. Every family builds the one LanguageModel (models/lm.py); a family only says which
config users fill in and which checkpoint format it is saved in (models/formats/).
"""
from __future__ import annotations

from .config import Mamba2Config, MambaConfig, ModelConfig
from .lm import LanguageModel

FAMILIES = {
    "mamba1": MambaConfig,      # Gu & Dao 2023: "M" * n_layer
    "mamba2": Mamba2Config,     # Dao & Gu 2024 (SSD): "2" * n_layer
    "hybrid": ModelConfig,      # any layer pattern of M / 2 / A / F / T (models/layers)
}
DEFAULT_FAMILY = "mamba1"


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"model family {family!r} is unknown; allowed: {', '.join(FAMILIES)}")
    return family


def config_class(family: str):
    return FAMILIES[check_family(family)]


def build_model(config) -> LanguageModel:
    """A freshly initialised language model of `config` (a MambaConfig, Mamba2Config or ModelConfig)."""
    if not isinstance(config, tuple(FAMILIES.values())):
        raise TypeError(f"build_model takes one of {', '.join(c.__name__ for c in FAMILIES.values())}, "
                        f"got {type(config).__name__}")
    return LanguageModel(config)


# The class names of the three families before they became one model; each builds a LanguageModel from its
# family's config (and refuses another family's).

def MambaLanguageModel(config: MambaConfig) -> LanguageModel:
    return _build_family(config, MambaConfig)


def Mamba2LanguageModel(config: Mamba2Config) -> LanguageModel:
    return _build_family(config, Mamba2Config)


def HybridLanguageModel(config: ModelConfig) -> LanguageModel:
    return _build_family(config, ModelConfig)


def _build_family(config, expected) -> LanguageModel:
    if not isinstance(config, expected):
        raise TypeError(f"a {expected.family} model needs a {expected.__name__}, got {type(config).__name__}")
    return LanguageModel(config)
