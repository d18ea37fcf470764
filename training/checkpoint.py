"""Checkpoints: the one module that knows their format, writes them atomically and finds them again.

A run directory (checkpoints/<run_name>/) holds step folders and best/:

    step_000500/   config.json + model.safetensors   (model.save_pretrained: HF MambaForCausalLM format)
                   tokenizer files                    (tokenizer.save)
                   train_config.json                  (the resolved TrainConfig)
                   training_state.pt                  (optimizer, step, scaler, RNG states, sampler positions;
                                                       plain types and tensors only: loads with weights_only=True)
                   COMPLETE                           (written last: a folder without it is ignored)
    best/          the same, for the lowest validation loss so far
    metrics.jsonl, loss.png

Writing: everything goes into a hidden temporary folder beside the target, every file is fsynced, the marker
is written and fsynced last, then the folder is renamed into place (a rename within one filesystem is atomic)
and the parent directory fsynced. A crash (kill -9, power loss) at any moment leaves either the old state or
the new one; a failed write (full disk) raises, deletes its temporary folder and leaves every earlier
checkpoint as it was. Only complete folders count; the newest `keep_last` of them are kept, plus best/.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

MARKER = "COMPLETE"
STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
BEST = "best"
_STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def _has_weights(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def _is_ours(path: Path) -> bool:
    """A folder this module writes (step_N or best, or one with our files): it counts only with its marker."""
    return bool(_STEP_RE.match(path.name)) or path.name == BEST or (path / TRAIN_CONFIG_FILE).exists() \
        or (path / STATE_FILE).exists()


# ----------------------------------------------------------------------------------------------------------
# Writing

def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic_dir(target: Path, fill: Callable[[Path], None]) -> Path:
    """Create folder `target` atomically: fill(tmp) writes the files, then fsync, marker, rename.

    If target exists it is replaced only after the new folder is complete. If fill or any write raises,
    the temporary folder is removed and the exception propagates; target is untouched.
    """
    target = Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    old = None
    try:
        fill(tmp)
        for f in sorted(tmp.rglob("*")):
            if f.is_file():
                _fsync_file(f)
        with open(tmp / MARKER, "w") as f:
            f.write("ok\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if target.exists():
            old = parent / f".old-{target.name}-{os.getpid()}"
            if old.exists():
                shutil.rmtree(old)
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(parent)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)        # put the previous folder back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def save_checkpoint(run_dir: Path, step: int, model, tokenizer, train_config: dict, training_state: dict,
                    keep_last: int = 2, best: bool = False, write_step: bool = True) -> list[Path]:
    """Write step_<step>/ (and best/ if `best`) atomically, then prune old complete step folders.

    Args:
        run_dir: the run directory
        step: optimizer steps done
        model: the unwrapped MambaLanguageModel (not the DDP/compiled wrapper)
        tokenizer: utils.tokenizer.Tokenizer
        train_config: the resolved TrainConfig as a dict
        training_state: plain types and tensors (see Trainer.training_state)
        keep_last: complete step folders to keep (>= 2)
        best: also write best/
        write_step: write step_<step>/ (False: only best/)
    Returns:
        the folders written
    """
    if keep_last < 2:
        raise ValueError(f"keep_last must be at least 2, got {keep_last}")
    run_dir = Path(run_dir)

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        with open(tmp / TRAIN_CONFIG_FILE, "w") as f:
            json.dump(train_config, f, indent=2)
        torch.save(training_state, tmp / STATE_FILE)

    written = []
    if write_step:
        written.append(write_atomic_dir(run_dir / step_dir_name(step), fill))
    if best:
        if written:   # same content: hard links cost no space or time (copies where links are unsupported)
            src = written[0]
            written.append(write_atomic_dir(run_dir / BEST, lambda tmp: _link_or_copy(src, tmp)))
        else:
            written.append(write_atomic_dir(run_dir / BEST, fill))
    prune(run_dir, keep_last)
    return written


def _link_or_copy(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name == MARKER or not f.is_file():
            continue
        try:
            os.link(f, dst / f.name)
        except OSError:   # e.g. a filesystem without hard links
            shutil.copy2(f, dst / f.name)


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete step folders; remove older ones and leftovers of crashed saves."""
    run_dir = Path(run_dir)
    steps = list_step_dirs(run_dir)
    complete = [p for s, p in steps if is_complete(p)]
    newest = _step_of(complete[-1]) if complete else -1
    for p in complete[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)
    for s, p in steps:   # an incomplete folder older than a complete one can never be resumed
        if not is_complete(p) and s < newest:
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(".tmp-*"):
        if p.is_dir() and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
    for p in run_dir.glob(".old-*"):   # a crash between the two renames of a replacement: put the old one back
        if p.is_dir() and not p.name.endswith(f"-{os.getpid()}"):
            target = run_dir / p.name[len(".old-"):].rsplit("-", 1)[0]
            if target.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.rename(p, target)


# ----------------------------------------------------------------------------------------------------------
# Finding

def _step_of(path: Path) -> int:
    return int(_STEP_RE.match(path.name).group(1))


def list_step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) for every step_N folder in run_dir, complete or not, ascending."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = [(_step_of(p), p) for p in run_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name)]
    return sorted(out)


def _newest_in_run(run_dir: Path, log: Callable[[str], None]) -> Path | None:
    steps = list_step_dirs(run_dir)
    for step, p in reversed(steps):
        if is_complete(p):
            return p
        log(f"checkpoint: skipping {p}: incomplete (no {MARKER} marker; the run stopped while writing it)")
    best = run_dir / BEST
    return best if is_complete(best) else None


def find_latest_checkpoint(path: str | Path, log: Callable[[str], None] = _log) -> Path | None:
    """The newest complete checkpoint at `path`.

    Args:
        path: a checkpoint folder (returned as is if complete, or if it is a plain HF-format model folder),
            a run directory (its newest complete step folder), or a folder of runs such as checkpoints/
            (the most recently completed checkpoint of any run)
        log: where to say which incomplete folders were skipped
    Returns:
        the folder, or None if there is no complete checkpoint there
    Raises:
        FileNotFoundError if path does not exist; ValueError if path is itself an incomplete checkpoint
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is a file; give a checkpoint folder or a run directory")
    if is_complete(path):
        return path
    if _is_ours(path) and not list_step_dirs(path):
        raise ValueError(f"checkpoint {str(path)!r} is incomplete (no {MARKER} marker: the run stopped while "
                         f"writing it); use an earlier one in {str(path.parent)!r}")
    if _has_weights(path):
        return path                       # a plain HF-format model folder
    newest = _newest_in_run(path, log)
    if newest is not None:
        return newest
    runs = [c for c in (_newest_in_run(d, log) for d in sorted(path.iterdir()) if d.is_dir()) if c is not None]
    if not runs:
        return None
    return max(runs, key=lambda p: (p / MARKER).stat().st_mtime_ns)


def load_training_state(ckpt_dir: Path) -> dict:
    """The training state of a checkpoint, loaded with weights_only=True (no code runs from the file)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {str(ckpt_dir)!r} holds weights only, "
                                f"so it can start a run (--init_from) but not resume one")
    return torch.load(path, map_location="cpu", weights_only=True)


def load_train_config(ckpt_dir: Path) -> dict:
    with open(Path(ckpt_dir) / TRAIN_CONFIG_FILE) as f:
        return json.load(f)


def load_model_and_tokenizer(path: str | Path, device=None, dtype=None, scan_backend: str = "auto"):
    """Load the newest complete checkpoint at `path` (see find_latest_checkpoint) for inference.

    Returns:
        (model, tokenizer, checkpoint folder)
    """
    from models import load_pretrained
    from utils.tokenizer import Tokenizer

    ckpt = find_latest_checkpoint(path)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {str(path)!r}")
    model = load_pretrained(ckpt, device=device, dtype=dtype, scan_backend=scan_backend)   # Mamba-1 or Mamba-2
    tokenizer = Tokenizer.load(ckpt)
    return model, tokenizer, ckpt


# ----------------------------------------------------------------------------------------------------------
# RNG states as plain types and tensors (weights_only=True cannot load numpy arrays)

def capture_rng_state() -> dict:
    py = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
