"""Language models: Mamba-1 and Mamba-2 (config, layers, recurrent cache), the family table, checkpoint formats."""
from .config import Mamba2Config, MambaConfig
from .mamba import MambaBlock, MambaCache, MambaLanguageModel, RMSNorm, SelectiveSSM
from .mamba2 import Mamba2Block, Mamba2LanguageModel, Mamba2Mixer
from .hybrid import HybridCache, HybridLanguageModel
from .hybrid_config import HybridConfig
from .registry import DEFAULT_FAMILY, FAMILIES, build_model, load_pretrained

__all__ = ["MambaConfig", "MambaLanguageModel", "MambaBlock", "SelectiveSSM", "RMSNorm", "MambaCache",
           "Mamba2Config", "Mamba2LanguageModel", "Mamba2Block", "Mamba2Mixer", "FAMILIES", "DEFAULT_FAMILY",
           "build_model", "load_pretrained",
           "HybridConfig", "HybridLanguageModel", "HybridCache"]
