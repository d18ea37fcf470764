"""Token shards on disk: flat uint16/uint32 arrays (np.memmap) plus a JSON manifest with checksums.

Layout of a prepared folder (cache/prepared/<key>/):
    tokens.tmp   all tokens in corpus order while preparing (removed once split)
    train.bin    training tokens        (dtype in the manifest; uint16 when the vocabulary fits, else uint32)
    val.bin      validation tokens
    manifest.json, stats.json, tokenizer.json (+ tokenizer_meta.json, tokenizer_config.json)
"""
import hashlib
import json
from pathlib import Path

import numpy as np

SPLIT_BLOCK = 1 << 15    # train/val split granularity in tokens (see split_train_val)
COPY_TOKENS = 1 << 22    # tokens copied per step when splitting (16 MB of uint32): bounded memory


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class TokenWriter:
    """Appends token arrays to a flat binary file; `truncate` drops everything after a position (used to take
    back a document that turned out to be unusable half-way)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype = Path(path), np.dtype(dtype)
        self.file = open(self.path, "wb")
        self.n_tokens = 0

    def write(self, ids) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype}: {arr.min()}..{arr.max()}")
        arr.astype(self.dtype).tofile(self.file)
        self.n_tokens += arr.size

    def truncate(self, n_tokens: int) -> None:
        self.file.seek(n_tokens * self.dtype.itemsize)
        self.file.truncate()
        self.n_tokens = n_tokens

    def close(self) -> None:
        self.file.close()


def open_tokens(path: Path, dtype: str | np.dtype, n_tokens: int) -> np.ndarray:
    """Read-only memmap of a token file (an empty array for an empty file: np.memmap refuses size 0)."""
    path, dtype = Path(path), np.dtype(dtype)
    size = path.stat().st_size
    if size != n_tokens * dtype.itemsize:
        raise ValueError(f"{path} holds {size} bytes, the manifest says {n_tokens} tokens of {dtype}")
    if n_tokens == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def is_val_block(i: int, val_fraction: float) -> bool:
    """Block i goes to validation when the running count floor(i * f) steps up: exactly a fraction f of the
    blocks, spread evenly through the corpus (not just its alphabetical tail)."""
    return int((i + 1) * val_fraction) > int(i * val_fraction)


def split_block_size(n_tokens: int) -> int:
    """Blocks of SPLIT_BLOCK tokens, smaller for small corpora so that they still get ~100 blocks."""
    return max(1, min(SPLIT_BLOCK, n_tokens // 100))


def split_train_val(src: Path, n_tokens: int, dtype: np.dtype, val_fraction: float, train_path: Path,
                    val_path: Path) -> tuple[int, int, int]:
    """Splits a token file into train and validation files, block by block, deterministically.

    Args:
        src: flat token file of n_tokens ids in corpus order.
        val_fraction: fraction of blocks sent to validation (0 = no validation tokens).
    Returns:
        (train tokens, val tokens, block size)
    """
    block = split_block_size(n_tokens)
    itemsize = np.dtype(dtype).itemsize
    n_train = n_val = 0
    # Plain reads, not a memmap: mapped pages would count toward this process's RSS for the whole file.
    with open(src, "rb") as fsrc, open(train_path, "wb") as ftrain, open(val_path, "wb") as fval:
        # Runs of consecutive blocks with the same destination are copied in steps of at most COPY_TOKENS.
        n_blocks = -(-n_tokens // block)
        i = 0
        while i < n_blocks:
            to_val = val_fraction > 0 and is_val_block(i, val_fraction)
            j = i + 1
            while j < n_blocks and (val_fraction > 0 and is_val_block(j, val_fraction)) == to_val \
                    and (j - i) * block < COPY_TOKENS:
                j += 1
            count = min(j * block, n_tokens) - i * block
            fsrc.seek(i * block * itemsize)
            (fval if to_val else ftrain).write(fsrc.read(count * itemsize))
            if to_val:
                n_val += count
            else:
                n_train += count
            i = j
    return n_train, n_val, block


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_json(path: Path, obj) -> None:
    """Writes JSON via a temporary file and a rename, so a crash never leaves half a manifest."""
    tmp = Path(path).with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def verify_shards(directory: Path, manifest: dict) -> str | None:
    """None if train.bin / val.bin match the manifest (sizes and sha256), else what is wrong."""
    for split in ("train", "val"):
        entry = manifest[split]
        path = Path(directory) / entry["file"]
        if not path.is_file():
            return f"{entry['file']} is missing"
        if path.stat().st_size != entry["tokens"] * np.dtype(manifest["dtype"]).itemsize:
            return f"{entry['file']} has the wrong size"
        if file_checksum(path) != entry["sha256"]:
            return f"{entry['file']} checksum differs"
    return None
