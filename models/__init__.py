"""Language models: one LanguageModel over a layer pattern (models/lm.py), its layers (models/layers/), its config
and the family presets (models/config.py, models/registry.py), and the checkpoint formats (models/formats/).

Importing the package registers the formats with the model, so LanguageModel.from_pretrained / save_pretrained work.
"""
from .config import HybridConfig, Mamba2Config, MambaConfig, ModelConfig
from .layers import LAYERS
from .layers.base import RMSNorm
from .lm import Cache, LanguageModel
from .registry import (DEFAULT_FAMILY, FAMILIES, HybridLanguageModel, Mamba2LanguageModel, MambaLanguageModel,
                       build_model)
from .formats import load_pretrained, read_config, save_pretrained

__all__ = ["ModelConfig", "MambaConfig", "Mamba2Config", "HybridConfig", "LanguageModel", "Cache", "LAYERS",
           "RMSNorm", "FAMILIES", "DEFAULT_FAMILY", "build_model", "load_pretrained", "save_pretrained",
           "read_config", "MambaLanguageModel", "Mamba2LanguageModel", "HybridLanguageModel"]
