"""Growing a model's vocabulary to a tokenizer's (new special tokens such as the chat markers)."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn


@torch.no_grad()
def resize_vocab(model: nn.Module, vocab_size: int) -> bool:
    """Make room for `vocab_size` token ids in a language model of any family, keeping the padding rule
    (pad_vocab_size_multiple).

    Rows of the new ids (old vocab_size .. vocab_size - 1) are set to the mean of the old rows, deterministically:
    the same base and the same tokenizer always give the same resized model (a LoRA run relies on this to rebuild
    its base). Rows already present as padding are overwritten the same way. A tied head follows the embedding;
    an untied head gets the same treatment. Returns True when the model changed.
    """
    old = model.config
    if vocab_size <= old.vocab_size:
        return False
    new = dataclasses.replace(old, vocab_size=vocab_size)
    for name in ("embeddings", "lm_head"):
        if name == "lm_head" and old.tie_embeddings:
            continue
        layer = model.backbone.embeddings if name == "embeddings" else model.lm_head
        w = layer.weight
        grown = torch.empty(new.padded_vocab_size, w.shape[1], dtype=w.dtype, device=w.device)
        keep = min(w.shape[0], new.padded_vocab_size)
        grown[:keep] = w[:keep]
        grown[old.vocab_size:] = w[:old.vocab_size].float().mean(0).to(w.dtype)
        layer.weight = nn.Parameter(grown, requires_grad=w.requires_grad)
        if name == "embeddings":
            layer.num_embeddings = new.padded_vocab_size
        else:
            layer.out_features = new.padded_vocab_size
    if old.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
        model.lm_head.out_features = new.padded_vocab_size
    model.config = new
    model.spec = new.to_model_config()     # what the layers and the formats read (vocab_size: the Llama export)
    for layer in model.backbone.layers:    # a hybrid's layers: mixers of their own config kind, MLPs have none
        mixer = getattr(layer, "mixer", None)
        if mixer is not None and dataclasses.is_dataclass(getattr(mixer, "config", None)):
            mixer.config = dataclasses.replace(mixer.config, vocab_size=vocab_size)
    return True
