"""The files of a checkpoint directory, whatever its format: tensors in (single or sharded safetensors or
pytorch_model.bin), strictly checked against the model a config describes, and files out, written atomically.

Loading is strict: any missing or unexpected tensor, or a shape that does not match the config, is a ValueError;
so is a file that cannot be read as what its name says (cut short, overwritten, bit rot), naming the file.
(Our own training checkpoints carry a manifest of checksums that training/checkpoint.py verifies before loading.)
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..lm import LanguageModel

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


# ---- read -----------------------------------------------------------------------------------------------------------

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, on the CPU: safetensors first, then pytorch_model.bin; single or
    sharded."""
    for single, index, load in ((SAFETENSORS_NAME, SAFETENSORS_INDEX, _load_safetensors),
                                (BIN_NAME, BIN_INDEX, _load_bin)):
        if (path / single).is_file():
            return load(path / single)
        if (path / index).is_file():
            return _load_sharded(path, index, load)
    raise FileNotFoundError(f"{path} has no weights: looked for {SAFETENSORS_NAME}, {SAFETENSORS_INDEX}, {BIN_NAME}, "
                            f"{BIN_INDEX} (it holds: {listing(path)})")


def _load_safetensors(file):
    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, RuntimeError, ValueError, OSError) as err:
        raise ValueError(f"{file}: not a readable safetensors file, damaged or cut short ({err})") from None


def _load_bin(file):
    # weights_only: a pickle from the internet must not run code
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        raise ValueError(f"{file}: not a readable PyTorch file, damaged or cut short ({err})") from None


def _load_sharded(path, index_name, load):
    try:
        weight_map = json.loads((path / index_name).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path / index_name} is not a shard index with a 'weight_map': {err}") from err
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (path / s).is_file()]
    if absent:
        raise FileNotFoundError(f"{path / index_name} names shard file(s) that are missing: {absent}")
    state_dict = {}
    for shard in shards:
        state_dict.update(load(path / shard))
    not_found = sorted(set(weight_map) - set(state_dict))
    if not_found:
        raise ValueError(f"{path / index_name} lists tensors that its shards do not hold: {few(not_found)}")
    return state_dict


def to_our_names(state_dict):
    """Rename checkpoint keys to ours (mamba_ssm and early HF files call the embedding 'embedding')."""
    out = {}
    for key, tensor in state_dict.items():
        if key == "backbone.embedding.weight":
            key = "backbone.embeddings.weight"
        out[key] = tensor
    return out


def check_state_dict(state_dict, model, path):
    """Raise ValueError naming every missing/unexpected key and every shape mismatch; drop a tied lm_head copy."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
        head, emb = state_dict.get("lm_head.weight"), state_dict.get("backbone.embeddings.weight")
        if head is not None and emb is not None and head.shape == emb.shape:
            if not torch.equal(head, emb.to(head.dtype)):
                raise ValueError(f"{path}: the config ties the LM head to the embedding, but lm_head.weight differs "
                                 f"from backbone.embeddings.weight (set tie_word_embeddings false if it is separate)")
            state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs config {expected[k]}"
             for k in sorted(set(expected) & set(state_dict)) if tuple(state_dict[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing tensors {few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors {few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches {few(wrong)}")
    if problems:
        raise ValueError(f"{path}: the weights do not match config.json: " + "; ".join(problems))
    return state_dict


def build_with_weights(config, state_dict, path, device=None, dtype=None):
    """config's model (any family) holding exactly state_dict (checked strictly, names the file at `path`), on
    `device` in `dtype`, in eval mode. Built on the meta device: no time or memory spent on an init that the
    checkpoint overwrites."""
    with torch.device("meta"):
        model = LanguageModel(config)
    state_dict = check_state_dict(state_dict, model, path)
    if config.tie_embeddings:
        state_dict["lm_head.weight"] = state_dict["backbone.embeddings.weight"]
    model.load_state_dict(state_dict, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.backbone.embeddings.weight
    model.to(device=device if device is not None else "cpu", dtype=dtype)
    return model.eval()


# ---- write ----------------------------------------------------------------------------------------------------------

def write_checkpoint(model, path, config_json: dict) -> None:
    """Write path/model.safetensors (the model's tensors, no lm_head.weight when tied, as transformers expects) and
    path/config.json (`config_json`), atomically (write_tensors)."""
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.spec.tie_embeddings:
        del state_dict["lm_head.weight"]
    write_tensors(state_dict, path, config_json)


def write_tensors(tensors: dict, path, config_json: dict) -> None:
    """Write path/model.safetensors (`tensors`, contiguous CPU tensors) and path/config.json (`config_json`). Each
    file is written beside its final name and then renamed, so a crash never leaves a half-written file under the
    real name."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (SAFETENSORS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / SAFETENSORS_NAME)
    tmp = path / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(config_json, indent=2) + "\n")
    os.replace(tmp, path / CONFIG_NAME)


def weights_dtype(model) -> str:
    """The parameters' dtype as config.json names it ("float32", "bfloat16", ...)."""
    return str(model.backbone.embeddings.weight.dtype).removeprefix("torch.")


# ---- helpers --------------------------------------------------------------------------------------------------------

def as_dtype(dtype):
    if dtype is None:
        return torch.float32
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype or its name (float32, bfloat16, float16), "
                         f"got {dtype!r}")
    return resolved


def few(items, n=8):
    items = list(items)
    return ", ".join(map(str, items[:n])) + (f" ... ({len(items) - n} more)" if len(items) > n else "")


def listing(path):
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return "nothing readable"
    return few(names) if names else "nothing"
