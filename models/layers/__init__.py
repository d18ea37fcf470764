"""The layer kinds a layer pattern is built from: one file per kind, one letter per kind in the table below.

Every kind implements models/layers/base.Layer (forward, step, init_state, reset_parameters) and describes itself
(description, has_kv_cache, residual_branches). Adding a layer kind = one new file here and one row in LAYERS; its
settings, if it has any of its own, are a field of models/config.ModelConfig.

    M  Mamba1Layer       mamba1.py       cache: conv (b, d_in, k), SSM state (b, d_in, n) fp32
    2  Mamba2Layer       mamba2.py       cache: conv (b, conv_dim, k), SSM state (b, h, p, n) fp32
    A  AttentionLayer    attention.py    cache: keys and values, each (b, g, slots, e)
    F  MLPLayer          mlp.py          cache: nothing
    T  TransformerLayer  transformer.py  attention then MLP, each pre-norm; cache as A
"""
from .attention import AttentionLayer
from .mamba1 import Mamba1Layer
from .mamba2 import Mamba2Layer
from .mlp import MLPLayer
from .transformer import TransformerLayer

# The one table: pattern letter -> layer class.
LAYERS = {"M": Mamba1Layer, "2": Mamba2Layer, "A": AttentionLayer, "F": MLPLayer, "T": TransformerLayer}

__all__ = ["LAYERS", "Mamba1Layer", "Mamba2Layer", "AttentionLayer", "MLPLayer", "TransformerLayer"]
