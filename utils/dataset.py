"""prepare_dataset: documents -> tokenizer -> token shards in cache/prepared/<key>/, reused while unchanged.

Two loaders produce the same tokens:
  in-memory  reads every document once, trains the BPE on it and tokenises it from memory (small corpora);
  streaming  a file at a time, in two passes (BPE training, then tokenising), memory bounded by one batch of
             text whatever the corpus size. Chosen automatically when the corpus is larger than memory_budget.
Both cut documents into the same pieces (corpus.split_pieces) and encode them in batches on all cores.
"""
import ctypes
import fcntl
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from configs.model_sizes import DEFAULT_VOCAB_SIZE
from utils import hf_datasets
from utils.corpus import PIECE_CHARS, CorpusFile, FileRecord, Walk, read_file, split_pieces, walk
from utils.errors import DataError
from utils.readers import Skip
from utils.shards import (TokenWriter, file_checksum, open_tokens, read_json, split_train_val, token_dtype,
                          verify_shards, write_json)
from utils.stats import compute_totals
from utils.tokenizer import Tokenizer, check_vocab_size

FORMAT = 1                    # bump when the prepared layout or the tokenisation rules change
DEFAULT_VAL_FRACTION = 0.01
MEMORY_BUDGET = 1 << 30       # corpora bigger than this (bytes on disk) are streamed
BATCH_CHARS = 1 << 20         # characters tokenised per encode_batch call (sets the streaming working set)
TRAIN_MAX_CHARS = 1 << 28     # the BPE is trained on at most ~256M characters, spread evenly over the corpus
BUILTIN_SUFFIXES = (".py", ".rst", ".txt")
PLACEHOLDERS = {"README.md", ".gitkeep", ".gitignore"}   # an otherwise empty data/ counts as empty
# glibc keeps memory freed by the tokenizer's worker threads; without handing it back after each batch, the RSS of
# a streaming run creeps up with the corpus size although nothing stays allocated (measured: BENCHMARKS.md).
_GLIBC = ctypes.CDLL(None) if sys.platform == "linux" and platform.libc_ver()[0] == "glibc" else None


@dataclass
class PreparedData:
    """A prepared corpus. train_tokens / val_tokens: (n,) read-only np.memmap of uint16 or uint32 ids."""
    dir: Path
    tokenizer: Tokenizer
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    manifest: dict
    stats: list[dict]         # one record per file / skipped folder / dataset (corpus.FileRecord fields)
    reused: bool              # True when the shards were already there and still match the corpus

    @property
    def totals(self) -> dict:
        return self.manifest["totals"]


# --------------------------------------------------------------------------------------------------- sources

class DirSource:
    """A folder (or one file) of documents; the built-in corpus is the standard library's folder."""

    def __init__(self, root: Path, builtin: bool = False):
        self.root, self.builtin = Path(root).absolute(), builtin
        self.walked: Walk = walk(self.root, suffixes=BUILTIN_SUFFIXES if builtin else None)
        self.total_bytes = sum(f.size for f in self.walked.files)
        self.progress_total, self.progress_unit = self.total_bytes, "B"

    def describe_counts(self) -> str:
        """The file counts as the statistics give them: found = to read + skipped without reading."""
        files = [r for r in self.walked.skipped if r.type != "directory"]
        found = len(self.walked.files) + len(files)
        return (f"{found:,} files found, {len(self.walked.files):,} of them to read "
                f"({self.total_bytes / 1e6:.1f} MB), {len(files):,} skipped without reading")

    def identity(self) -> dict:
        ident = {"kind": "builtin" if self.builtin else "dir", "path": str(self.root)}
        if self.builtin:
            ident["python"] = sys.version.split()[0]
        return ident

    def label(self) -> str:
        return "builtin" if self.builtin else (self.root.name or "root")

    def fingerprint(self) -> list[list]:
        """[rel, size, mtime_ns] per readable file: cheap (stat only); sha256 comes in at preparation."""
        return [[f.rel, f.size, f.mtime_ns] for f in self.walked.files]

    def sha256_of(self, rel: str) -> str:
        return file_checksum(self.root / rel if self.root.is_dir() else self.root)

    def skipped(self) -> list[FileRecord]:
        return [FileRecord(**r.to_dict()) for r in self.walked.skipped]

    def documents(self, select: Callable[[int], bool] = lambda i: True
                  ) -> Iterator[tuple[FileRecord, Iterator[str] | None, int]]:
        """(record, pieces or None if skipped, progress step) per file, in walk order."""
        f: CorpusFile
        for i, f in enumerate(self.walked.files):
            if not select(i):
                continue
            rec = FileRecord(f.rel, f.type, bytes=f.size)
            try:
                yield rec, read_file(f, rec), f.size
            except Skip as e:
                rec.skip(str(e))
                yield rec, None, f.size


class HFSource:
    """A HuggingFace dataset: every non-empty row of text_field is a document; one stats record in all."""

    def __init__(self, spec: str, text_field: str):
        self.spec, self.text_field = spec, text_field
        self.ds, self.description = hf_datasets.load(spec, text_field)
        self.files = hf_datasets.data_files(spec)
        self.local = Path(spec).expanduser().exists()
        self.total_bytes = sum(os.path.getsize(c["filename"]) for c in self.ds.cache_files)
        self.progress_total, self.progress_unit = len(self.ds), "rows"

    def identity(self) -> dict:
        spec = str(Path(self.spec).expanduser().absolute()) if self.local else self.spec
        return {"kind": "hf", "spec": spec, "text_field": self.text_field}

    def label(self) -> str:
        return "hf-" + (Path(self.spec).name if self.local else self.spec)

    def fingerprint(self) -> list[list]:
        paths = self.files if self.files is not None else (
            sorted(p for p in Path(self.spec).expanduser().rglob("*") if p.is_file()) if self.local
            else [Path(c["filename"]) for c in self.ds.cache_files])
        out = []
        for p in paths:
            st = p.stat()
            out.append([str(p), st.st_size, st.st_mtime_ns])
        return out

    def sha256_of(self, path: str) -> str:
        return file_checksum(Path(path))

    def skipped(self) -> list[FileRecord]:
        return []

    def documents(self, select: Callable[[int], bool] = lambda i: True
                  ) -> Iterator[tuple[FileRecord, Iterator[str] | None, int]]:
        rec = FileRecord(self.spec, "hf_dataset", bytes=self.total_bytes, encoding="utf-8")
        counters: dict = {}
        for i, text in enumerate(hf_datasets.iter_texts(self.ds, self.text_field, counters)):
            if select(i):
                yield rec, split_pieces((text,)), 1
        empty = counters.get("empty_rows", 0)
        rec.note = self.description + (f"; {empty} empty or non-text rows skipped" if empty else "")


# --------------------------------------------------------------------------------------------------- encoding

class Encoder:
    """Tokenises documents in batches of pieces (BATCH_CHARS characters) and appends them, each followed by the
    end-of-text token, to a TokenWriter. Counts characters, tokens and documents into each document's record;
    a document that fails half-way or has no text is taken back out of the token file."""

    def __init__(self, tokenizer: Tokenizer, writer: TokenWriter, batch_chars: int = BATCH_CHARS):
        self.tok, self.writer, self.batch_chars = tokenizer, writer, batch_chars
        self.pending: list[tuple[FileRecord, str | None]] = []   # (record, piece); piece None = end of document
        self.pending_chars = 0
        self.doc_first = None      # index in pending of the current document's first piece
        self.doc_start = None      # token position of the current document, once part of it is written
        self.doc_tokens = 0        # tokens of the current document written so far

    def add(self, rec: FileRecord, pieces: Iterator[str]) -> None:
        """Queues one document (its pieces, then end-of-text), encoding whenever a batch is full."""
        self.doc_first, self.doc_start, self.doc_tokens = len(self.pending), None, 0
        has_text, chars = False, 0
        try:
            for piece in pieces:
                has_text = has_text or not piece.isspace()
                chars += len(piece)
                self.pending.append((rec, piece))
                self.pending_chars += len(piece)
                if self.pending_chars >= self.batch_chars:
                    self.flush()
        except OSError as e:   # the file vanished or the disk failed mid-read: drop what it gave
            self._take_back(rec, f"unreadable ({e.strerror or e})")
            return
        if not has_text:
            self._take_back(rec, "empty" if chars == 0 else "empty (whitespace only)")
            return
        rec.chars += chars
        rec.documents += 1
        self.pending.append((rec, None))
        self.doc_first = None

    def _take_back(self, rec: FileRecord, reason: str) -> None:
        if self.doc_start is not None:      # part of it was written already: cut the file back
            self.writer.truncate(self.doc_start)
            del self.pending[:]
        else:
            del self.pending[self.doc_first:]
        self.pending_chars = sum(len(p) for _, p in self.pending if p)
        rec.tokens -= self.doc_tokens
        self.doc_first = None
        if rec.type != "hf_dataset":       # a dataset's record is shared by its rows: one bad row is not all
            rec.skip(reason)

    def flush(self) -> None:
        if not self.pending:
            return
        texts = [p for _, p in self.pending if p is not None]
        encoded = iter(self.tok.encode_batch(texts))
        parts: list[np.ndarray] = []
        position = self.writer.n_tokens
        eot = np.array([self.tok.eot_id], dtype=np.int64)
        for i, (rec, piece) in enumerate(self.pending):
            if i == self.doc_first and self.doc_start is None:
                self.doc_start = position
            ids = np.asarray(next(encoded), dtype=np.int64) if piece is not None else eot
            parts.append(ids)
            position += len(ids)
            rec.tokens += len(ids)
            if self.doc_first is not None and i >= self.doc_first:
                self.doc_tokens += len(ids)
        self.writer.write(np.concatenate(parts))
        self.pending, self.pending_chars = [], 0
        del encoded, parts
        if _GLIBC is not None:
            _GLIBC.malloc_trim(0)
        if self.doc_first is not None:
            self.doc_first = 0   # the current document continues in the next batch


# --------------------------------------------------------------------------------------------------- preparing

def builtin_corpus_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_empty_dir(root: Path) -> bool:
    """True when a folder holds no documents: nothing but placeholder files (the repo's data/README.md)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(not (Path(dirpath) == root and f in PLACEHOLDERS) and not f.startswith(".") for f in filenames):
            return False
    return True


def _tokenizer_identity(tokenizer: Tokenizer | None, vocab_size: int) -> dict:
    """What decides the tokens on the tokenizer's side: its content, never where it was loaded from (a run resumed
    with the tokenizer saved in its checkpoint reuses the data prepared with the same tokenizer)."""
    if tokenizer is None:       # a BPE to be trained on the corpus: the corpus and the size decide its content
        return {"bpe_vocab_size": vocab_size}
    return {"sha256": tokenizer.fingerprint(), "eot_token": tokenizer.eot_token}


def _prepared_key(source, identity: dict) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source.label())[:40] + "-" + digest


def _prepared_with_same_tokenizer(cache_dir: Path, source, identity: dict, tokenizer: Tokenizer) -> Path | None:
    """An up-to-date folder where this corpus was prepared with a tokenizer of the same content as `tokenizer`
    under another key: the BPE a first run trained (keyed by its requested size) is the tokenizer its checkpoints
    carry, so --resume and --init_from find the tokens it made."""
    label = _prepared_key(source, identity).rsplit("-", 1)[0]
    for folder in sorted(cache_dir.glob(f"{glob.escape(label)}-*")):
        if not re.fullmatch(re.escape(label) + r"-[0-9a-f]{16}", folder.name) \
                or not (folder / "manifest.json").is_file():
            continue        # not a prepared folder (a lock file, one being written or replaced)
        with open(cache_dir / f"{folder.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                manifest = read_json(folder / "manifest.json")
                made_by, same_rest = manifest["tokenizer"], manifest["identity"]
            except (OSError, ValueError, KeyError):
                continue
            if ({**same_rest, "tokenizer": None} == {**identity, "tokenizer": None}
                    and made_by.get("sha256") == tokenizer.fingerprint()
                    and made_by.get("eot_token") == tokenizer.eot_token
                    and _stale_reason(folder, source) is None):
                return folder
    return None


def _even_selection(total: int, budget: int) -> Callable[[int], bool]:
    """Picks items i with the running count floor(i * r) stepping up, r = budget / total: an even spread."""
    ratio = min(1.0, budget / max(1, total))
    if ratio >= 1.0:
        return lambda i: True
    return lambda i: int((i + 1) * ratio) > int(i * ratio)


def _same_corpus(source, old_files: list[list]) -> str | None:
    """None if the source still has the files recorded in the manifest (a changed mtime with the same sha256
    counts as unchanged); otherwise what changed."""
    now = source.fingerprint()
    old_names = [f[0] for f in old_files]
    now_names = [f[0] for f in now]
    if old_names != now_names:
        added, removed = set(now_names) - set(old_names), set(old_names) - set(now_names)
        return f"files changed ({len(added)} added, {len(removed)} removed)" if added or removed \
            else "file order changed"
    for (name, size, mtime), old in zip(now, old_files):
        if size != old[1]:
            return f"{name} changed size"
        if mtime != old[2] and source.sha256_of(name) != old[3]:
            return f"{name} changed"
    return None


def prepare_dataset(data_dir: str | Path | None = None, hf_dataset: str | None = None, text_field: str = "text",
                    tokenizer: str | Tokenizer | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    val_fraction: float = DEFAULT_VAL_FRACTION, cache_dir: str | Path = "cache/prepared",
                    streaming: bool | None = None, show_progress: bool = True, memory_budget: int = MEMORY_BUDGET,
                    force: bool = False, log: Callable[[str], None] = print) -> PreparedData:
    """Tokenises a corpus once into cache_dir/<key>/ and returns it memory-mapped; reuses it while unchanged.

    Args:
        data_dir: folder (or file) of documents; None or a folder holding no documents -> the built-in corpus
            (the Python standard library's .py/.rst/.txt files), announced through `log`.
        hf_dataset: instead of data_dir: a save_to_disk folder, local json/jsonl/csv/parquet/txt, or a hub name.
        text_field: the dataset column holding the text.
        tokenizer: None = train a byte-level BPE of `vocab_size` on the corpus; a name/path of an HF tokenizer;
            or a Tokenizer (e.g. the one saved in a checkpoint being fine-tuned).
        val_fraction: share of tokens held out for validation, in evenly spread blocks (0 <= f < 1).
        cache_dir: where prepared folders live (never inside data_dir).
        streaming: True = a file at a time, False = all in memory, None = stream when the corpus on disk is
            larger than memory_budget bytes.
        force: re-prepare even if an up-to-date prepared folder exists.
    Returns:
        PreparedData (train_tokens / val_tokens: (n,) memmaps; stats: one record per file).
    Raises:
        DataError: bad arguments, a missing folder, an unknown tokenizer or dataset field, or no usable text.
    """
    if data_dir is not None and hf_dataset is not None:
        raise DataError("give data_dir or hf_dataset, not both")
    if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be a number from 0 (no validation) up to but excluding 1, "
                        f"got {val_fraction!r}")
    if tokenizer is None:
        check_vocab_size(vocab_size)
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_pretrained(str(tokenizer))     # loaded first: its content keys the folder
    cache_dir = Path(cache_dir)

    # -- the source
    if hf_dataset is not None:
        source = HFSource(str(hf_dataset), text_field)
        log(f"Corpus: HF dataset {hf_dataset} ({source.description})")
    else:
        builtin = data_dir is None
        if data_dir is not None:
            data_dir = Path(data_dir).expanduser()
            if not data_dir.exists():
                raise DataError(f"data_dir {str(data_dir)!r} does not exist; put your documents in a folder "
                                "(e.g. data/) and pass it, or leave data_dir out to use the built-in corpus")
            if data_dir.is_dir() and _is_empty_dir(data_dir):
                raise DataError(f"data_dir {str(data_dir)!r} holds no documents (placeholder and hidden files do not "
                                "count); put your documents in it, or leave data_dir out to use the built-in corpus")
            if cache_dir.absolute().resolve().is_relative_to(data_dir.absolute().resolve()):
                raise DataError(f"cache_dir {str(cache_dir)!r} is inside data_dir {str(data_dir)!r}; prepared "
                                "data must live outside your documents (the default cache/prepared does)")
        source = DirSource(builtin_corpus_root() if builtin else data_dir, builtin=builtin)
        if builtin:
            log(f"Using the built-in corpus: the Python standard library's own {'/'.join(BUILTIN_SUFFIXES)} files "
                f"({source.root}: {source.describe_counts()}; no download). To train on your own documents pass "
                "--data_dir DIR (or --hf_dataset NAME_OR_PATH); PDF, text, markup, source code, JSON/YAML/CSV/XML "
                "are all read.")
        else:
            log(f"Corpus: {source.root} ({source.describe_counts()})")

    # -- the prepared folder: cache_dir/<label>-<hash of what determines the tokens>
    identity = {"format": FORMAT, "source": source.identity(), "val_fraction": val_fraction,
                "piece_chars": PIECE_CHARS, "tokenizer": _tokenizer_identity(tokenizer, vocab_size)}
    key = _prepared_key(source, identity)
    out_dir = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and not force and not (out_dir / "manifest.json").is_file():
        twin = _prepared_with_same_tokenizer(cache_dir, source, identity, tokenizer)
        if twin is not None:
            log(f"Reusing prepared data in {twin} (corpus unchanged, prepared with this same tokenizer)")
            return _load(twin, reused=True)
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)    # two processes (e.g. DDP ranks) never prepare the same folder at once
        for stale in [*cache_dir.glob(f"{key}.tmp-*"), *cache_dir.glob(f"{key}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)   # left by an interrupted run (we hold the lock)
        why = "forced" if force else _stale_reason(out_dir, source)
        if why is None:
            log(f"Reusing prepared data in {out_dir} (corpus unchanged)")
            return _load(out_dir, reused=True)
        log(f"Preparing {out_dir} ({why})")
        _prepare(source, out_dir, identity, tokenizer, vocab_size, val_fraction, streaming, memory_budget,
                 show_progress, log)
        return _load(out_dir, reused=False)


def _stale_reason(out_dir: Path, source) -> str | None:
    manifest_path = out_dir / "manifest.json"
    if not manifest_path.is_file():
        return "not prepared yet"
    try:
        manifest = read_json(manifest_path)
    except (OSError, ValueError):
        return "manifest unreadable"
    if manifest.get("format") != FORMAT:
        return "prepared by another version"
    return _same_corpus(source, manifest["source"]["files"]) or verify_shards(out_dir, manifest)


def _load(out_dir: Path, reused: bool) -> PreparedData:
    manifest = read_json(out_dir / "manifest.json")
    tok = Tokenizer.load(out_dir)
    train = open_tokens(out_dir / manifest["train"]["file"], manifest["dtype"], manifest["train"]["tokens"])
    val = open_tokens(out_dir / manifest["val"]["file"], manifest["dtype"], manifest["val"]["tokens"])
    stats = read_json(out_dir / "stats.json")["files"]
    return PreparedData(out_dir, tok, train, val, manifest, stats, reused)


def _prepare(source, out_dir: Path, identity: dict, tokenizer, vocab_size: int, val_fraction: float,
             streaming: bool | None, memory_budget: int, show_progress: bool, log) -> None:
    t0 = time.time()
    if streaming is None:
        streaming = source.total_bytes > memory_budget
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bar = lambda desc: tqdm(total=source.progress_total, unit=source.progress_unit, unit_scale=True, desc=desc,
                            disable=not show_progress, leave=False)
    select_for_bpe = _even_selection(source.total_bytes, TRAIN_MAX_CHARS)

    # -- read (in memory only) and get a tokenizer
    docs = None
    if not streaming:
        docs = []
        with bar("reading") as pbar:
            for rec, pieces, step in source.documents():
                if pieces is not None:
                    try:
                        pieces = list(pieces)
                    except OSError as e:
                        rec.skip(f"unreadable ({e.strerror or e})")
                        pieces = None
                docs.append((rec, pieces, step))
                pbar.update(step)

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = Tokenizer.from_pretrained(str(tokenizer))
    else:
        if streaming:
            def training_texts():
                for _, pieces, _ in source.documents(select_for_bpe):
                    yield from pieces or ()
        else:
            def training_texts():
                for i, (_, pieces, _) in enumerate(docs):
                    if pieces and select_for_bpe(i):
                        yield from pieces
        log(f"Training a byte-level BPE tokenizer (vocab_size {vocab_size}) on the corpus")
        tok = Tokenizer.train(training_texts(), vocab_size, show_progress=show_progress)
    dtype = token_dtype(tok.vocab_size)

    # -- tokenise into one flat file, then split
    records: list[FileRecord] = []
    writer = TokenWriter(tmp / "tokens.tmp", dtype)
    encoder = Encoder(tok, writer)
    seen = set()
    with bar("tokenising") as pbar:
        stream = source.documents() if streaming else ((rec, p and iter(p), step) for rec, p, step in docs)
        for rec, pieces, step in stream:
            if pieces is not None:
                encoder.add(rec, pieces)
            if id(rec) not in seen:
                seen.add(id(rec))
                records.append(rec)
            pbar.update(step)
        encoder.flush()
    writer.close()
    for rec in records:
        if rec.status == "loaded" and rec.documents == 0:   # a dataset whose rows were all empty
            rec.skip("empty (no non-empty text rows)")
    n_tokens = writer.n_tokens
    if n_tokens == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        reasons = sorted({r.reason for r in records if r.reason})[:5]
        raise DataError(f"no usable text in the corpus: {len(records)} files read, none loaded "
                        f"(reasons: {reasons or 'no readable files'}). "
                        "Supported: PDF, text/markup, source code, JSON/YAML/TOML/XML/CSV.")
    n_train, n_val, block = split_train_val(tmp / "tokens.tmp", n_tokens, dtype, val_fraction,
                                            tmp / "train.bin", tmp / "val.bin")
    (tmp / "tokens.tmp").unlink()
    tok.save(tmp)

    # -- stats and manifest; then the folder replaces the old one in one rename
    all_records = sorted([r.to_dict() for r in records + source.skipped()], key=lambda r: r["path"])
    shas = {f[0]: source.sha256_of(f[0]) for f in source.fingerprint()}
    files = [[name, size, mtime, shas[name]] for name, size, mtime in source.fingerprint()]
    totals = compute_totals(all_records, n_train, n_val)
    manifest = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "identity": identity,
        "source": {**source.identity(), "files": files},
        "tokenizer": {"source": tok.source, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
                      "eot_token": tok.eot_token, "sha256": tok.fingerprint()},
        "dtype": dtype.name, "val_fraction": val_fraction, "split_block": block, "streaming": streaming,
        "train": {"file": "train.bin", "tokens": n_train, "sha256": file_checksum(tmp / "train.bin")},
        "val": {"file": "val.bin", "tokens": n_val, "sha256": file_checksum(tmp / "val.bin")},
        "totals": totals, "seconds": round(time.time() - t0, 2),
    }
    write_json(tmp / "stats.json", {"files": all_records, "totals": totals})
    write_json(tmp / "manifest.json", manifest)
    old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    log(f"Prepared {n_tokens:,} tokens ({n_train:,} train, {n_val:,} validation) from {totals['loaded']} files "
        f"in {time.time() - t0:.1f}s; {totals['skipped']} files skipped")
