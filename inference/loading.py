"""Opening a checkpoint for inference, shared by the scripts (generate.py, evaluate.py): the device and dtype to
run on, and the model + tokenizer of the newest complete checkpoint at a path, with bad input reported as a
UsageError (one line for the user, exit code 2) instead of a traceback."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from training.checkpoint import find_latest_checkpoint, load_model_and_tokenizer
from utils.errors import DataError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UsageError(Exception):
    """Bad input from the user: printed in one line, exit code 2."""


def resolve_device(name: str) -> tuple[torch.device, torch.dtype]:
    """The device and default dtype; UsageError if the device is unknown or absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return device, torch.bfloat16 if bf16 else torch.float32


def describe_dir(path: Path, limit: int = 12) -> str:
    """What a folder holds, in a few words, for the "no checkpoint found" message."""
    if not path.exists():
        return "it does not exist"
    if not path.is_dir():
        return "it is a file"
    entries = sorted(path.iterdir())
    if not entries:
        return "it is empty"
    names = []
    for e in entries[:limit]:
        if e.is_dir():
            inner = sorted(c.name for c in e.iterdir())
            names.append(f"{e.name}/ ({', '.join(inner[:6]) + (', ...' if len(inner) > 6 else '') or 'empty'})")
        else:
            names.append(e.name)
    more = f" and {len(entries) - limit} more" if len(entries) > limit else ""
    return "it holds: " + "; ".join(names) + more


def load_for_inference(checkpoint: str | Path, device: torch.device, dtype: torch.dtype):
    """The model (in eval mode) and tokenizer of the newest complete checkpoint at `checkpoint`: a folder of runs,
    a run folder, a step folder, an HF-format folder with a tokenizer, or a LoRA checkpoint (base + adapter).

    Returns:
        (model, tokenizer, checkpoint folder)
    Raises:
        UsageError with one line saying what is wrong and what to do
    """
    path = Path(checkpoint)
    skipped = []      # what find_latest_checkpoint passed over, said once here instead of as loose warnings
    try:
        ckpt = find_latest_checkpoint(path, log=skipped.append, for_inference=True)
    except FileNotFoundError as err:
        raise UsageError(f"{err}: train a model with `python train.py`, or pass --checkpoint DIR") from None
    except ValueError as err:   # a step folder without its COMPLETE marker, or a damaged one (CheckpointDamaged)
        raise UsageError(str(err)) from None
    # "warning: skipping the damaged checkpoint DIR: FILE: why" -> "FILE: why"
    damaged = [m.split(": ", 2)[-1] for m in skipped if m.startswith("warning: skipping the damaged")]
    if ckpt is None and damaged:
        raise UsageError(f"no intact checkpoint in {str(path)!r}: " + "; ".join(damaged))
    for message in skipped:
        print(message, file=sys.stderr)
    if ckpt is None:
        raise UsageError(f"no checkpoint found in {str(path)!r}: looked for step_*/ or best/ folders with a COMPLETE "
                         f"marker (in it or in run folders inside it) and for config.json + model weights; "
                         f"{describe_dir(path)}. Train one with `python train.py`, or pass --checkpoint DIR.")
    try:
        model, tokenizer, ckpt = load_model_and_tokenizer(ckpt, device=device, dtype=dtype, verified=True)
    except (FileNotFoundError, ValueError, DataError) as err:   # DataError is a ValueError; named for the reader
        raise UsageError(f"cannot load the checkpoint {str(ckpt)!r}: {err}") from None
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UsageError(f"the tokenizer in {str(ckpt)!r} has {tokenizer.vocab_size} tokens but the model only "
                         f"{model.config.vocab_size}: they do not belong together")
    return model.eval(), tokenizer, ckpt
