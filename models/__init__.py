"""Mamba-1 language model: config, layers, recurrent cache, HF/mamba_ssm checkpoint format."""
from .config import MambaConfig
from .mamba import MambaBlock, MambaCache, MambaLanguageModel, RMSNorm, SelectiveSSM

__all__ = ["MambaConfig", "MambaLanguageModel", "MambaBlock", "SelectiveSSM", "RMSNorm", "MambaCache"]
