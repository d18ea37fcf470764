"""Checkpoints: the one module that knows their format, writes them atomically and finds them again.

A run directory (checkpoints/<run_name>/) holds step folders and best/:

    step_000500/   config.json + model.safetensors   (model.save_pretrained: HF MambaForCausalLM format)
                   tokenizer files                    (tokenizer.save)
                   train_config.json                  (the resolved TrainConfig)
                   training_state.pt                  (optimizer, step, scaler, RNG states, sampler positions;
                                                       plain types and tensors only: loads with weights_only=True)
                   manifest.json                      (every file's size and CRC-32: training/manifest.py)
                   COMPLETE                           (written last, holds the manifest's checksum: a folder
                                                       without it is ignored)
    best/          the same, for the lowest validation loss so far: a real copy, not a link, so damage to
                   one file never takes both (it costs one more checkpoint of disk)
    metrics.jsonl, loss.png

Writing: everything goes into a hidden temporary folder beside the target, every file is fsynced, the manifest
is written, the marker is written and fsynced last, then the folder is renamed into place (a rename within one filesystem is atomic)
and the parent directory fsynced. A crash (kill -9, power loss) at any moment leaves either the old state or
the new one; a failed write (full disk) raises, deletes its temporary folder and leaves every earlier
checkpoint as it was. Only complete folders count; the newest `keep_last` of them are kept, plus best/.

Reading: a checkpoint is verified against its manifest before use (sizes, then checksums). Looking for the
newest one skips a damaged folder with a message naming the file and the reason and takes the next intact one;
a damaged folder asked for by name raises CheckpointDamaged (a ValueError) naming the file.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .manifest import MANIFEST, MARKER, CheckpointDamaged, checkpoint_bytes, read_manifest, verify, write_manifest

STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
BEST = "best"
ADAPTER_CONFIG = "adapter_config.json"    # models/lora.py: a LoRA checkpoint holds an adapter, not weights
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
    """A plain HF-format model folder, or a LoRA adapter folder (PEFT format)."""
    return ((path / "config.json").is_file() and any((path / f).is_file() for f in WEIGHT_FILES)) \
        or (path / ADAPTER_CONFIG).is_file()


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


def write_atomic_dir(target: Path, fill: Callable[[Path], None], expect: dict | None = None) -> Path:
    """Create folder `target` atomically: fill(tmp) writes the files, then fsync, manifest, marker, rename.

    If target exists it is replaced only after the new folder is complete. If fill or any write raises,
    the temporary folder is removed and the exception propagates; target is untouched. `expect`: a manifest
    file table the new folder must match (a copy of another checkpoint), else OSError and nothing replaced.
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
        marker = write_manifest(tmp)
        if expect is not None and read_manifest_unchecked(tmp) != expect:
            raise OSError(f"the copy in {tmp} does not match its source's manifest")
        with open(tmp / MARKER, "w") as f:
            f.write(marker)
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
                    keep_last: int = 2, best: bool = False, write_step: bool = True,
                    save_weights: Callable[[Path], None] | None = None) -> list[Path]:
    """Write step_<step>/ (and best/ if `best`) atomically, then prune old complete step folders.

    Args:
        run_dir: the run directory
        step: optimizer steps done
        model: the unwrapped LanguageModel (not the DDP/compiled wrapper)
        tokenizer: utils.tokenizer.Tokenizer
        train_config: the resolved TrainConfig as a dict
        training_state: plain types and tensors (see Trainer.training_state)
        keep_last: complete step folders to keep (>= 2)
        best: also write best/
        write_step: write step_<step>/ (False: only best/)
        save_weights: writes the weights into a folder; None = model.save_pretrained (LoRA: the adapter)
    Returns:
        the folders written
    """
    if keep_last < 2:
        raise ValueError(f"keep_last must be at least 2, got {keep_last}")
    run_dir = Path(run_dir)

    def fill(tmp: Path) -> None:
        (save_weights or model.save_pretrained)(tmp)
        tokenizer.save(tmp)
        with open(tmp / TRAIN_CONFIG_FILE, "w") as f:
            json.dump(train_config, f, indent=2)
        torch.save(training_state, tmp / STATE_FILE)

    written = []
    if write_step:
        written.append(write_atomic_dir(run_dir / step_dir_name(step), fill))
    if best:
        if written:   # a real copy (never a hard link: damage to one must not be damage to both), checked
            src = written[0]                       # against the step folder's manifest before it counts
            written.append(write_atomic_dir(run_dir / BEST, lambda tmp: _copy_files(src, tmp),
                                            expect=read_manifest(src)))
        else:
            written.append(write_atomic_dir(run_dir / BEST, fill))
    prune(run_dir, keep_last)
    return written


def needed_bytes(run_dir: Path, model, training_state: dict) -> int:
    """About how many bytes one checkpoint takes: the last one written, else the tensors it will hold."""
    done = [p for _, p in list_step_dirs(run_dir) if is_complete(p)]
    if done:
        return checkpoint_bytes(done[-1])
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensors(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensors(v) for v in obj)
        return 0
    return total + tensors(training_state)


def describe_failed_save(run_dir: Path, step: int, err: OSError, model, training_state: dict) -> str:
    """One sentence: what failed, how much space a checkpoint needs and how much is free, what is intact."""
    run_dir = Path(run_dir)
    need = needed_bytes(run_dir, model, training_state)
    where = next((p for p in (run_dir, *run_dir.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:,.1f} MiB free there"
    except OSError:
        free = "free space unknown"
    prev = find_latest_checkpoint(run_dir, log=lambda m: None) if run_dir.is_dir() else None
    reason = f"{err.strerror or err}" + (f": {err.filename}" if getattr(err, "filename", None) else "")
    return (f"could not write the checkpoint of step {step} in {run_dir} ({reason}); a checkpoint needs about "
            f"{need / 2**20:,.1f} MiB ({free}, and write permission); the previous one "
            f"({prev if prev else 'none yet'}) is intact")


def _copy_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.name in (MARKER, MANIFEST) or not f.is_file():
            continue
        shutil.copyfile(f, dst / f.name)


def read_manifest_unchecked(folder: Path) -> dict:
    """The file table of a manifest just written (no marker yet to check it against)."""
    with open(Path(folder) / MANIFEST) as f:
        return json.load(f)["files"]


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


INFERENCE_SKIP = (STATE_FILE, TRAIN_CONFIG_FILE)   # files generation never reads: not verified for it


def damage(path: Path, skip: tuple[str, ...] = ()) -> str | None:
    """Why the complete checkpoint at `path` cannot be used (naming the file), or None when it is intact."""
    try:
        verify(path, skip=skip)
    except CheckpointDamaged as err:
        return str(err)
    return None


def _candidates_in_run(run_dir: Path, log: Callable[[str], None]) -> list[Path]:
    """Complete checkpoints of a run, newest step first, then best/ (not verified yet)."""
    out = []
    for step, p in reversed(list_step_dirs(run_dir)):
        if is_complete(p):
            out.append(p)
        else:
            log(f"checkpoint: skipping {p}: incomplete (no {MARKER} marker; the run stopped while writing it)")
    best = run_dir / BEST
    return out + ([best] if is_complete(best) else [])


def _first_intact(candidates: list[Path], log: Callable[[str], None], skip: tuple[str, ...]) -> Path | None:
    for p in candidates:
        why = damage(p, skip)
        if why is None:
            return p
        log(f"warning: skipping the damaged checkpoint {p}: {why}")
    return None


def _newest_in_run(run_dir: Path, log: Callable[[str], None], skip: tuple[str, ...] = ()) -> Path | None:
    return _first_intact(_candidates_in_run(run_dir, log), log, skip)


def find_latest_checkpoint(path: str | Path, log: Callable[[str], None] = _log,
                           for_inference: bool = False) -> Path | None:
    """The newest complete, intact checkpoint at `path` (verified against its manifest).

    Args:
        path: a checkpoint folder (returned as is if complete, or if it is a plain HF-format model folder),
            a run directory (its newest complete step folder), or a folder of runs such as checkpoints/
            (the most recently completed checkpoint of any run)
        log: where to say which incomplete or damaged folders were skipped
        for_inference: verify only what generation reads (not the optimizer state)
    Returns:
        the folder, or None if there is no complete, intact checkpoint there
    Raises:
        FileNotFoundError if path does not exist; ValueError if path is itself an incomplete checkpoint;
        CheckpointDamaged (a ValueError) if path is itself a damaged one
    """
    skip = INFERENCE_SKIP if for_inference else ()
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist")
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is a file; give a checkpoint folder or a run directory")
    if is_complete(path):
        verify(path, skip=skip)
        return path
    if _is_ours(path) and not list_step_dirs(path):
        raise ValueError(f"checkpoint {str(path)!r} is incomplete (no {MARKER} marker: the run stopped while "
                         f"writing it); use an earlier one in {str(path.parent)!r}")
    if _has_weights(path):
        return path                       # a plain HF-format model folder
    own = _candidates_in_run(path, log)
    if own:
        return _first_intact(own, log, skip)
    # a folder of runs: the most recently completed intact checkpoint of any of them
    runs = [c for d in sorted(path.iterdir()) if d.is_dir() for c in _candidates_in_run(d, log)]
    runs.sort(key=lambda p: (p / MARKER).stat().st_mtime_ns, reverse=True)
    return _first_intact(runs, log, skip)


def load_training_state(ckpt_dir: Path) -> dict:
    """The training state of a checkpoint, loaded with weights_only=True (no code runs from the file)."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist: {str(ckpt_dir)!r} holds weights only, "
                                f"so it can start a run (--init_from) but not resume one")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as err:
        raise CheckpointDamaged(f"{path}: not a readable training state, damaged or cut short ({err})") from None


def load_train_config(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / TRAIN_CONFIG_FILE
    try:
        with open(path) as f:
            out = json.load(f)
    except (ValueError, OSError) as err:
        raise CheckpointDamaged(f"{path}: not readable JSON, damaged ({err})") from None
    if not isinstance(out, dict):
        raise CheckpointDamaged(f"{path}: damaged (not a JSON object)")
    return out


def load_model_and_tokenizer(path: str | Path, device=None, dtype=None, scan_backend: str = "auto",
                             verified: bool = False):
    """Load the newest complete, intact checkpoint at `path` (see find_latest_checkpoint) for inference.

    Args:
        verified: `path` is a checkpoint folder that find_latest_checkpoint returned (do not verify again)
    Returns:
        (model, tokenizer, checkpoint folder)
    Raises:
        FileNotFoundError, ValueError (CheckpointDamaged included) with a message naming the folder or file
    """
    from models import load_pretrained

    ckpt = Path(path) if verified else find_latest_checkpoint(path, for_inference=True)
    if ckpt is None:
        raise FileNotFoundError(f"no complete, intact checkpoint under {str(path)!r}")
    if (ckpt / ADAPTER_CONFIG).is_file():     # a LoRA checkpoint: its base + the adapter, merged
        from .finetune import load_lora_checkpoint
        model, tokenizer = load_lora_checkpoint(ckpt)
        model.config.scan_backend = scan_backend
        return model.to(device=device or "cpu", dtype=dtype), tokenizer, ckpt
    model = load_pretrained(ckpt, device=device, dtype=dtype, scan_backend=scan_backend)   # any family
    tokenizer = load_tokenizer(ckpt)
    return model, tokenizer, ckpt


def load_tokenizer(ckpt: Path):
    """The tokenizer saved in a checkpoint; CheckpointDamaged naming the file when it cannot be read."""
    from utils.tokenizer import Tokenizer
    try:
        return Tokenizer.load(ckpt)
    except FileNotFoundError:
        raise
    except Exception as err:      # tokenizers raises its own Exception subclass for a malformed file
        raise CheckpointDamaged(f"{Path(ckpt) / 'tokenizer.json'}: not a readable tokenizer, damaged "
                                f"({str(err).splitlines()[0][:200] if str(err) else type(err).__name__})") from None


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
