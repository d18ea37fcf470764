"""The corpus walk: which files are read, which are skipped and why, and how bytes become text blocks.

Every regular file under the root ends up in exactly one `FileRecord`: loaded (with its character and token
counts) or skipped with a reason. Folders skipped as a whole (hidden, VCS, build, virtual environments) get one
record each instead of one per file inside them.

Text is produced as *pieces*: blocks of at most PIECE_CHARS characters, cut at a line start where possible. The cut
points depend only on the text, never on how it was read, so the streaming and in-memory loaders tokenise exactly
the same pieces and produce the same tokens.
"""
import codecs
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from utils.readers import (VALIDATE_MAX_BYTES, Skip, file_type, html_to_text, read_pdf, validate_structured)

PIECE_CHARS = 1 << 16       # at most this many characters per piece: a big file is many pieces, encoded in parallel
BLOCK_BYTES = 1 << 20       # read size for big files (bounded memory)
SMALL_FILE_BYTES = 2 << 20  # files up to this size are read in one go; bigger ones block by block
SNIFF_BYTES = 1 << 16       # binary detection looks at this much of the head (git looks at 8000 bytes)
MAX_BAD_FRACTION = 0.05     # more replaced characters than this -> "undecodable"

# Folders skipped by default: VCS, caches, dependencies, build outputs. Hidden folders are skipped too.
SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", ".bzr", "CVS", "__pycache__", "node_modules", "bower_components", ".venv", "venv",
    "env", ".env", ".tox", ".nox", ".mypy_cache", ".pytest_cache", ".ruff_cache", ".ipynb_checkpoints",
    "site-packages", "dist-packages", "build", "dist", "target", ".gradle", ".idea", ".vscode", ".eggs",
})


@dataclass
class FileRecord:
    """What happened to one file (or one skipped folder, or one HF dataset): a row of the stats."""
    path: str                    # relative to the corpus root, posix separators ("dir/" for folders)
    type: str                    # "python", "pdf", "markdown", ... ; "directory"; "hf_dataset"; "unknown"
    status: str = "loaded"       # "loaded" or "skipped"
    reason: str | None = None    # why it was skipped (None when loaded)
    chars: int = 0               # characters of text taken from it
    tokens: int = 0              # tokens it produced, end-of-text tokens included
    bytes: int = 0               # size on disk
    documents: int = 0           # documents (end-of-text separated) it produced: 1 per file, rows for datasets
    encoding: str | None = None  # how the bytes were decoded ("utf-8", "utf-16", "cp1252", "pdf", ...)
    replacements: int = 0        # undecodable byte sequences replaced by U+FFFD
    note: str | None = None      # anything else worth knowing (invalid JSON kept as text, bad PDF pages)

    def skip(self, reason: str) -> "FileRecord":
        self.status, self.reason = "skipped", reason
        self.chars = self.tokens = self.documents = 0
        return self

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CorpusFile:
    """A regular file found by the walk, with a supported type (what the fingerprint covers)."""
    path: Path        # as reached (may go through a symlink)
    rel: str          # relative to the root, posix
    family: str       # "text", "code", "structured", "pdf"
    type: str
    size: int
    mtime_ns: int


@dataclass
class Walk:
    files: list[CorpusFile] = field(default_factory=list)      # to be read
    skipped: list[FileRecord] = field(default_factory=list)    # decided by the walk alone


def walk(root: Path, include_hidden: bool = False, skip_dirs: Iterable[str] = SKIP_DIRS,
         exclude: Iterable[str] = (), suffixes: Iterable[str] | None = None) -> Walk:
    """Walks `root` recursively in sorted order, following symlinks but never twice into the same folder.

    Args:
        root: folder (or single file) to walk.
        include_hidden: also read dot-files and dot-folders (except VCS folders).
        skip_dirs: folder names skipped as a whole.
        exclude: extra folder names skipped as a whole.
        suffixes: if given, only files with these extensions are read (the built-in corpus: .py .rst .txt).
    Returns:
        Walk: files to read, and records for everything skipped without reading it.
    """
    root = Path(root)
    out = Walk()
    skip_dirs = set(skip_dirs) | set(exclude)
    suffixes = None if suffixes is None else {s.lower() for s in suffixes}
    seen_dirs: dict[tuple[int, int], str] = {}
    seen_files: dict[tuple[int, int], str] = {}

    def visit_file(path: Path, rel: str, st: os.stat_result):
        if not stat.S_ISREG(st.st_mode):
            kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "device"
            out.skipped.append(FileRecord(rel, "unknown", bytes=0).skip(f"unsupported type (not a regular file: {kind})"))
            return
        ident = (st.st_dev, st.st_ino)
        ft = file_type(path)
        if ident in seen_files:
            out.skipped.append(FileRecord(rel, ft[1] if ft else "unknown", bytes=st.st_size).skip(
                f"duplicate (same file as {seen_files[ident]})"))
            return
        seen_files[ident] = rel
        if ft is None:
            suffix = path.suffix.lower() or "no extension"
            out.skipped.append(FileRecord(rel, "unknown", bytes=st.st_size).skip(f"unsupported type ({suffix})"))
            return
        if suffixes is not None and path.suffix.lower() not in suffixes:
            out.skipped.append(FileRecord(rel, ft[1], bytes=st.st_size).skip(
                f"not selected (only {' '.join(sorted(suffixes))})"))
            return
        out.files.append(CorpusFile(path, rel, ft[0], ft[1], st.st_size, st.st_mtime_ns))

    def visit_dir(path: Path, rel: str, st: os.stat_result):
        ident = (st.st_dev, st.st_ino)
        if ident in seen_dirs:
            out.skipped.append(FileRecord(rel + "/", "directory").skip(
                f"symlink loop (already walked as {seen_dirs[ident] or '.'}/)"))
            return
        seen_dirs[ident] = rel
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            out.skipped.append(FileRecord(rel + "/", "directory").skip(f"unreadable ({e.strerror or e})"))
            return
        for entry in entries:
            child_rel = f"{rel}/{entry.name}" if rel else entry.name
            child = Path(entry.path)
            try:
                st_child = child.stat()  # follows symlinks
            except OSError as e:
                reason = "broken symlink" if entry.is_symlink() else (e.strerror or str(e))
                out.skipped.append(FileRecord(child_rel, "unknown").skip(f"unreadable ({reason})"))
                continue
            hidden = entry.name.startswith(".")
            if stat.S_ISDIR(st_child.st_mode):
                if entry.name in skip_dirs or (hidden and not include_hidden) or (child / "pyvenv.cfg").exists():
                    why = "hidden folder" if hidden and entry.name not in skip_dirs else "VCS/build/dependency folder"
                    if (child / "pyvenv.cfg").exists():
                        why = "virtual environment"
                    out.skipped.append(FileRecord(child_rel + "/", "directory").skip(f"{why} (skipped by default)"))
                    continue
                visit_dir(child, child_rel, st_child)
            elif hidden and not include_hidden:
                out.skipped.append(FileRecord(child_rel, "unknown", bytes=st_child.st_size).skip(
                    "hidden file (skipped by default)"))
            else:
                visit_file(child, child_rel, st_child)

    st = root.stat()
    if stat.S_ISDIR(st.st_mode):
        visit_dir(root, "", st)
    else:
        visit_file(root, root.name, st)
    return out


# ----------------------------------------------------------------------------------------------- decoding

CONTROL_BYTES = bytes([*range(0, 8), 11, *range(14, 27), *range(28, 32)])  # not \t \n \f \r ESC
CONTROL_CHARS = dict.fromkeys([*CONTROL_BYTES, *range(0x7F, 0xA0)])         # str.translate table deleting them


def sniff(head: bytes) -> str:
    """Encoding to try from the first bytes of a file: a BOM, a UTF-16 NUL pattern, or "auto" (UTF-8, then
    cp1252). Raises Skip("binary ...") for NUL bytes or many control characters, whatever the extension."""
    for bom, enc in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                     (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16")):
        if head.startswith(bom):
            return enc
    if b"\x00" in head:
        half = max(1, len(head) // 2)
        even, odd = head[0::2].count(0), head[1::2].count(0)
        # UTF-16 without a BOM: mostly-ASCII text has a NUL in every other byte.
        if odd > 0.3 * half and even < 0.02 * half:
            return "utf-16-le"
        if even > 0.3 * half and odd < 0.02 * half:
            return "utf-16-be"
        raise Skip("binary (contains NUL bytes)")
    if len(head) - len(head.translate(None, CONTROL_BYTES)) > 0.1 * len(head):
        raise Skip("binary (control characters)")
    return "auto"


def _counts(text: str) -> tuple[int, int, int]:
    """(characters, U+FFFD replacements, non-ASCII characters) of decoded text."""
    return len(text), text.count("\ufffd"), len(text) - len(text.encode("ascii", "ignore"))


def _decode_bytes(data: bytes, encoding: str) -> tuple[str, int, int, int]:
    try:
        text = data.decode(encoding)
        chars, _, non_ascii = _counts(text)
        return text, chars, 0, non_ascii  # valid: a U+FFFD in the file itself is not a replacement
    except UnicodeDecodeError:
        text = data.decode(encoding, errors="replace")
        return (text, *_counts(text))


def _scan(path: Path, encoding: str) -> tuple[None, int, int, int]:
    """Like _decode_bytes for a big file, block by block, without keeping the text."""
    for errors in ("strict", "replace"):
        dec = codecs.getincrementaldecoder(encoding)(errors)
        chars = bad = non_ascii = 0
        try:
            with open(path, "rb") as f:
                while True:
                    block = f.read(BLOCK_BYTES)
                    c, b, n = _counts(dec.decode(block, final=not block))
                    chars, non_ascii = chars + c, non_ascii + n
                    bad += b if errors == "replace" else 0
                    if not block:
                        return None, chars, bad, non_ascii
        except UnicodeDecodeError:
            continue
    raise AssertionError("errors='replace' cannot raise")


def decode_file(path: Path, info: dict) -> Iterator[str]:
    """Decoded text of a file, in blocks (bounded memory for big files).

    UTF-8 first (a BOM or a UTF-16 NUL pattern picks that codec instead); a file whose invalid UTF-8 sequences
    outnumber its valid non-ASCII characters is latin-1 family and is decoded as cp1252. Raises Skip before
    yielding for binary, empty or undecodable files. Sets info["encoding"] and info["replacements"].
    """
    with open(path, "rb") as f:
        head = f.read(SMALL_FILE_BYTES + 1)
    if not head:
        raise Skip("empty")
    small = len(head) <= SMALL_FILE_BYTES
    sniffed = sniff(head[:SNIFF_BYTES])
    for enc in (["utf-8", "cp1252"] if sniffed == "auto" else [sniffed]):
        text, chars, bad, non_ascii = _decode_bytes(head, enc) if small else _scan(path, enc)
        if not (enc == "utf-8" and bad > non_ascii - bad):
            break
    if bad > MAX_BAD_FRACTION * chars:
        raise Skip(f"undecodable ({bad} of {chars} characters invalid as {enc})")
    # Binary data can pass as BOM-less UTF-16 or cp1252; decoded text has (almost) no control characters.
    sample = text[:SNIFF_BYTES] if small else head[:SNIFF_BYTES].decode(enc, errors="replace")
    if len(sample) - len(sample.translate(CONTROL_CHARS)) > 0.1 * len(sample):
        raise Skip(f"binary (control characters when decoded as {enc})")
    info["encoding"], info["replacements"] = enc, bad
    if small:
        return iter((text,))

    def blocks():
        dec = codecs.getincrementaldecoder(enc)("replace")
        with open(path, "rb") as f:
            while True:
                block = f.read(BLOCK_BYTES)
                text = dec.decode(block, final=not block)
                if text:
                    yield text
                if not block:
                    return
    return blocks()


def split_pieces(blocks: Iterable[str], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Re-cuts a stream of text blocks into pieces of at most `piece_chars` characters.

    A cut goes after the last newline that is followed by a non-space character in the second half of the window
    (so BPE pre-tokens, which never span such a point, are unchanged), else at the last space, else anywhere. The
    cuts depend only on the text, never on the incoming block boundaries.
    """
    buf = ""
    for block in blocks:
        buf += block
        while len(buf) > piece_chars:
            window = buf[:piece_chars + 1]
            lo = piece_chars // 2
            cut = -1
            pos = window.rfind("\n", lo, piece_chars)
            while pos != -1:
                if not window[pos + 1].isspace():
                    cut = pos + 1
                    break
                pos = window.rfind("\n", lo, pos)
            if cut == -1:
                sp = window.rfind(" ", lo, piece_chars)
                cut = sp if sp > 0 else piece_chars
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def read_file(f: CorpusFile, rec: FileRecord) -> Iterator[str]:
    """Pieces of one corpus file. Raises Skip (before yielding) when it cannot be used; sets rec's encoding,
    replacements and note (the caller counts characters and tokens)."""
    info: dict = {}
    if f.size == 0:
        raise Skip("empty")
    try:
        if f.family == "pdf":
            blocks = read_pdf(f.path, info)
            info["encoding"] = "pdf"
        else:
            blocks = decode_file(f.path, info)
            if f.type == "html":
                blocks = iter((html_to_text("".join(blocks)),))
            elif f.family == "structured" and f.type in ("json", "jsonl", "toml", "xml") \
                    and f.size <= VALIDATE_MAX_BYTES:
                text = "".join(blocks)
                problem = validate_structured(f.type, text)
                if problem:
                    info["note"] = f"{problem}; kept as plain text"
                blocks = iter((text,))
    except OSError as e:
        raise Skip(f"unreadable ({e.strerror or e})") from e
    rec.encoding, rec.replacements = info.get("encoding"), info.get("replacements", 0)
    notes = [n for n in (info.get("note"), f"{rec.replacements} undecodable byte sequences replaced"
                         if rec.replacements else None) if n]
    rec.note = "; ".join(notes) or None
    if f.family == "pdf":
        rec.note = rec.note or f"{info['pages']} pages"

    def pieces():
        yield from split_pieces(blocks)
        if f.family == "pdf" and "note" in info:  # bad pages are known only once all pages were read
            rec.note = f"{info['pages']} pages; {info['note']}"
    return pieces()
