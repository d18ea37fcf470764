"""The data pipeline on a hostile corpus written here: every supported type, broken and odd files; the stats
account for every file; the text of every good file is in the tokens; streaming == in-memory; shard reuse."""
import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pypdf import PdfReader, PdfWriter

from utils.corpus import PIECE_CHARS, CorpusFile, FileRecord, read_file, split_pieces
from utils.dataset import DirSource, Encoder, _is_empty_dir, builtin_corpus_root, prepare_dataset
from utils.errors import DataError
from utils.readers import html_to_text
from utils.shards import TokenWriter, is_val_block, open_tokens
from utils.tokenizer import Tokenizer

VOCAB = 600


def make_pdf(pages: list[str]) -> bytes:
    """A minimal valid PDF with one line of Helvetica text per page (xref offsets computed)."""
    def esc(t):
        return t.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
    page_ids = [4 + 2 * i for i in range(len(pages))]
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{p} 0 R' for p in page_ids)}] /Count {len(pages)} >>".encode(),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        content = f"BT /F1 12 Tf 72 720 Td ({esc(text)}) Tj ET".encode()
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> "
                    f">> /Contents {page_ids[i] + 1} 0 R >>".encode())
        objs.append(b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, xref)
    return out


def encrypt_pdf(pdf: Path, out: Path, user_password: str) -> None:
    writer = PdfWriter(clone_from=PdfReader(pdf))
    writer.encrypt(user_password=user_password, owner_password="owner")
    writer.write(out)


CODE = {
    "a.py": "def f(x):\n    return x + 1  # python\n", "b.js": "const a = () => 42; // javascript\n",
    "c.ts": "let n: number = 3; // typescript\n", "D.java": "class D { int x = 1; } // java\n",
    "e.c": "int main(void) { return 0; } /* c */\n", "f.cpp": "#include <vector>\nstd::vector<int> v; // c++\n",
    "g.cs": "class G { } // c#\n", "h.go": "package main\nfunc main() {} // go\n",
    "i.rs": "fn main() { println!(\"rust\"); }\n", "j.rb": "puts 'ruby'\n", "k.php": "<?php echo 'php'; ?>\n",
    "l.kt": "fun main() = println(\"kotlin\")\n", "m.swift": "print(\"swift\")\n",
    "n.scala": "object N extends App { println(\"scala\") }\n", "o.sh": "#!/bin/sh\necho shell\n",
    "p.sql": "SELECT name FROM users WHERE id = 1; -- sql\n",
}
STRUCTURED = {
    "s.json": '{"key": "json value", "n": [1, 2, 3]}\n', "t.jsonl": '{"a": "jsonl line 1"}\n{"a": "line 2"}\n',
    "u.yaml": "name: yaml doc\nitems:\n  - one\n", "v.toml": "[section]\nkey = \"toml value\"\n",
    "w.xml": "<?xml version=\"1.0\"?>\n<root><item>xml text</item></root>\n", "x.csv": "a,b\n1,csv row\n",
}
TEXT = {
    "notes.txt": "Plain text notes.\nSecond line with unicode: \u00e9\u4e2d\u6587 \U0001F600\n",
    "readme.md": "# Markdown\n\nSome *emphasis* and `code`.\n", "guide.rst": "Title\n=====\n\nreStructuredText.\n",
    "paper.tex": "\\section{Intro} LaTeX text $x^2$.\n", "Makefile": "all:\n\techo make\n",
    "utf8_bom.txt": "\ufeffBOM-prefixed UTF-8 text.\n",
}
PDF_PAGES = ["First page of the report.", "Second page (with parens).", "Third and last page."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict, dict]:
    """Writes the hostile corpus. Returns (root, {rel: expected text} for good files, {rel: reason start} for
    files that must be skipped)."""
    root = tmp_path_factory.mktemp("corpus")
    good, bad = {}, {}

    def put(rel, data, text=None):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        if text is not None:
            good[rel] = text

    for rel, text in {**CODE, **{f"conf/{k}": v for k, v in STRUCTURED.items()}}.items():
        put(f"src/{rel}" if rel in CODE else rel, text, text)
    for rel, text in TEXT.items():
        put(f"docs/{rel}", text, text.lstrip("\ufeff"))
    html = ("<html><head><title>Page title</title><style>body {color: red}</style></head><body>"
            "<p>Visible paragraph.</p><script>var hidden = 1;</script><div>Second block.</div></body></html>")
    put("docs/page.html", html, html_to_text(html))
    put("docs/latin1.txt", "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade.\n".encode("latin-1"),
        "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade.\n")
    put("docs/utf16.txt", "UTF-16 text with a BOM: \u00fcber \u4e2d\n".encode("utf-16"),
        "UTF-16 text with a BOM: \u00fcber \u4e2d\n")
    put("docs/utf16le_nobom.txt", ("UTF-16-LE text without a BOM, mostly ASCII. " * 4).encode("utf-16-le"),
        "UTF-16-LE text without a BOM, mostly ASCII. " * 4)
    put("docs/mostly_utf8.txt", "valid \u00e9\u00e8\u00ea\u00eb UTF-8 \u00fc\u00f6\u00e4 with one bad byte: ".encode()
        + b"\xff" + b" end\n", "valid \u00e9\u00e8\u00ea\u00eb UTF-8 \u00fc\u00f6\u00e4 with one bad byte: \ufffd end\n")
    put("conf/broken.json", '{"key": "unterminated', '{"key": "unterminated')
    # PDFs: a 3-page one, an encrypted one, one encrypted without a user password (readable), a corrupt one.
    put("pdf/report.pdf", make_pdf(PDF_PAGES), "\n\n".join(PDF_PAGES))
    encrypt_pdf(root / "pdf/report.pdf", root / "pdf/locked.pdf", "secret")
    encrypt_pdf(root / "pdf/report.pdf", root / "pdf/owner_only.pdf", "")
    good["pdf/owner_only.pdf"] = "\n\n".join(PDF_PAGES)
    bad["pdf/locked.pdf"] = "encrypted PDF"
    put("pdf/corrupt.pdf", b"%PDF-1.7\n" + bytes(range(256)) * 20)
    bad["pdf/corrupt.pdf"] = "corrupt PDF"
    put("pdf/truncated.pdf", make_pdf(PDF_PAGES)[:300])
    bad["pdf/truncated.pdf"] = "corrupt PDF"
    # Hostile files.
    put("src/binary.py", bytes(range(256)) * 64)
    bad["src/binary.py"] = "binary"
    put("docs/empty.txt", b"")
    bad["docs/empty.txt"] = "empty"
    put("docs/blank.md", "  \n\n\t \n")
    bad["docs/blank.md"] = "empty"
    put("docs/bad_utf16.txt", b"\xff\xfe" + b"\x00\xd8" * 500)   # a UTF-16 BOM, then lone surrogates
    bad["docs/bad_utf16.txt"] = "undecodable"
    put("image.png", b"\x89PNG\r\n\x1a\n" + bytes(100))
    bad["image.png"] = "unsupported type"
    put("docs/.hidden.txt", "hidden")
    bad["docs/.hidden.txt"] = "hidden file"
    put(".git/config", "[core]\n")
    bad[".git/"] = "VCS/build/dependency folder"
    put("node_modules/pkg/index.js", "module.exports = 1;\n")
    bad["node_modules/"] = "VCS/build/dependency folder"
    put("myenv/pyvenv.cfg", "home = /usr\n")
    put("myenv/lib/x.py", "x = 1\n")
    bad["myenv/"] = "virtual environment"
    os.symlink("..", root / "src/loop")                    # src/loop -> the root: a cycle
    bad["src/loop/"] = "symlink loop"
    os.symlink(root / "missing.txt", root / "docs/dangling.txt")
    bad["docs/dangling.txt"] = "unreadable"
    os.symlink(root / "docs/notes.txt", root / "docs/notes_link.txt")
    bad["docs/notes_link.txt"] = "duplicate"
    os.mkfifo(root / "docs/pipe.txt")
    bad["docs/pipe.txt"] = "unsupported type"
    return root, good, bad


def all_tokens(data) -> np.ndarray:
    """The corpus-order token stream, rebuilt from the interleaved train/val blocks."""
    block, f = data.manifest["split_block"], data.manifest["val_fraction"]
    out, t, v = [], 0, 0
    n = len(data.train_tokens) + len(data.val_tokens)
    for i in range(-(-n // block)):
        size = min(block, n - i * block)
        if f > 0 and is_val_block(i, f):
            out.append(data.val_tokens[v:v + size]); v += size
        else:
            out.append(data.train_tokens[t:t + size]); t += size
    assert t == len(data.train_tokens) and v == len(data.val_tokens)
    return np.concatenate(out)


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    root, _, _ = corpus
    cache = tmp_path_factory.mktemp("cache")
    quiet = dict(vocab_size=VOCAB, val_fraction=0.2, show_progress=False, log=lambda s: None)
    streamed = prepare_dataset(root, cache_dir=cache / "s", streaming=True, **quiet)
    in_memory = prepare_dataset(root, cache_dir=cache / "m", streaming=False, **quiet)
    return streamed, in_memory


def test_every_file_accounted_for(corpus, prepared):
    root, good, bad = corpus
    data = prepared[0]
    records = {r["path"]: r for r in data.stats}
    # Every regular file and skipped folder under the root has exactly one record.
    assert len(records) == len(data.stats)
    for rel, text in good.items():
        r = records[rel]
        assert r["status"] == "loaded" and r["reason"] is None, (rel, r)
        assert r["chars"] == len(text) and r["tokens"] > 1 and r["documents"] == 1, (rel, r)
    for rel, reason in bad.items():
        r = records[rel]
        assert r["status"] == "skipped" and r["reason"].startswith(reason), (rel, r)
        assert r["tokens"] == 0 and r["chars"] == 0
    # Nothing else: no record for a file inside a skipped folder, none for the loop's second visit.
    assert set(records) == set(good) | set(bad)
    assert records["docs/latin1.txt"]["encoding"] == "cp1252"
    assert records["docs/utf16.txt"]["encoding"] == "utf-16"
    assert records["docs/utf16le_nobom.txt"]["encoding"] == "utf-16-le"
    assert records["docs/mostly_utf8.txt"]["replacements"] == 1
    assert "invalid JSON" in records["conf/broken.json"]["note"]
    assert records["pdf/report.pdf"]["type"] == "pdf" and "3 pages" in records["pdf/report.pdf"]["note"]
    types = {r["type"] for r in data.stats if r["status"] == "loaded"}
    assert {"python", "javascript", "typescript", "java", "c", "c++", "c#", "go", "rust", "ruby", "php", "kotlin",
            "swift", "scala", "shell", "sql", "json", "jsonl", "yaml", "toml", "xml", "csv", "text", "markdown",
            "rst", "tex", "html", "pdf", "make"} <= types
    totals = data.totals
    assert totals["loaded"] == len(good) and totals["tokens"] == len(data.train_tokens) + len(data.val_tokens)
    assert totals["documents"] == len(good)
    assert sum(r["tokens"] for r in data.stats) == totals["tokens"]


def test_text_of_every_good_file_is_in_the_tokens(corpus, prepared):
    _, good, _ = corpus
    data = prepared[0]
    tok = data.tokenizer
    stream = all_tokens(data)
    assert stream[-1] == tok.eot_id and (stream == tok.eot_id).sum() == len(good)
    documents = tok.decode(stream.tolist()).split(tok.eot_token)
    assert documents[-1] == "" and len(documents) == len(good) + 1
    for rel, text in good.items():
        assert text in documents, rel          # whole document, character for character
    assert not any("var hidden" in d or "<p>" in d for d in documents)   # HTML: visible text only


def test_streaming_and_in_memory_give_the_same_tokens(prepared):
    streamed, in_memory = prepared
    assert streamed.manifest["streaming"] and not in_memory.manifest["streaming"]
    assert streamed.tokenizer.fingerprint() == in_memory.tokenizer.fingerprint()
    assert np.array_equal(streamed.train_tokens, in_memory.train_tokens)
    assert np.array_equal(streamed.val_tokens, in_memory.val_tokens)
    assert streamed.stats == in_memory.stats
    assert streamed.train_tokens.dtype == np.uint16 and isinstance(streamed.train_tokens, np.memmap)


def test_split_is_deterministic_and_lossless(corpus, prepared, tmp_path):
    root, _, _ = corpus
    whole = prepare_dataset(root, vocab_size=VOCAB, val_fraction=0.0, cache_dir=tmp_path, show_progress=False,
                            log=lambda s: None)
    assert len(whole.val_tokens) == 0
    split = prepared[0]
    assert np.array_equal(all_tokens(split), whole.train_tokens)
    frac = len(split.val_tokens) / (len(split.val_tokens) + len(split.train_tokens))
    assert 0.1 < frac < 0.3


def test_shards_reused_until_the_corpus_changes(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"f{i}.txt").write_text(f"document number {i} " * 50)
    kw = dict(vocab_size=300, cache_dir=tmp_path / "cache", show_progress=False, log=lambda s: None)
    first = prepare_dataset(docs, **kw)
    (tmp_path / "cache" / f"{first.dir.name}.tmp-99999").mkdir()          # as left by an interrupted run
    assert not first.reused and str(first.dir).startswith(str(tmp_path / "cache"))
    assert json.loads((first.dir / "manifest.json").read_text())["train"]["sha256"]
    again = prepare_dataset(docs, **kw)
    assert again.reused and again.dir == first.dir
    assert np.array_equal(again.train_tokens, first.train_tokens)
    # A new mtime with the same content is still unchanged (checked by sha256).
    os.utime(docs / "f1.txt", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert prepare_dataset(docs, **kw).reused
    # Same size, different content: detected.
    (docs / "f1.txt").write_text("DOCUMENT NUMBER 1 " * 50)
    changed = prepare_dataset(docs, **kw)
    assert not changed.reused and changed.dir == first.dir
    assert "DOCUMENT NUMBER 1" in changed.tokenizer.decode(all_tokens(changed).tolist())
    # A new file, a removed file: detected.
    (docs / "f3.txt").write_text("a fourth document " * 20)
    added = prepare_dataset(docs, **kw)
    assert not added.reused and added.totals["loaded"] == 4
    (docs / "f0.txt").unlink()
    assert not prepare_dataset(docs, **kw).reused
    # Damaged shards are rebuilt.
    data = prepare_dataset(docs, **kw)
    assert data.reused
    with open(data.dir / "train.bin", "r+b") as f:
        f.write(b"\xff\xff")
    assert not prepare_dataset(docs, **kw).reused
    # Another tokenizer setting is another folder; old ones are not overwritten.
    other = prepare_dataset(docs, **{**kw, "vocab_size": 280})
    assert other.dir != first.dir and not other.reused
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


def test_bad_inputs_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(tmp_path / "nope", show_progress=False, log=lambda s: None)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "d" / "y.txt").write_bytes(b"\x00\x01\x02" * 10)
    with pytest.raises(DataError, match="no usable text"):
        prepare_dataset(tmp_path / "d", cache_dir=tmp_path / "c", show_progress=False, log=lambda s: None)
    with pytest.raises(DataError, match="inside data_dir"):
        prepare_dataset(tmp_path / "d", cache_dir=tmp_path / "d" / "cache", show_progress=False, log=lambda s: None)
    with pytest.raises(DataError, match="vocab_size"):
        prepare_dataset(tmp_path / "d", vocab_size=10, show_progress=False, log=lambda s: None)
    with pytest.raises(DataError, match="val_fraction"):
        prepare_dataset(tmp_path / "d", val_fraction=1.0, show_progress=False, log=lambda s: None)


def test_empty_data_dir_means_the_builtin_corpus(tmp_path):
    (tmp_path / "README.md").write_text("# Your documents go here\n")
    assert _is_empty_dir(tmp_path)
    (tmp_path / "mine.txt").write_text("my own text")
    assert not _is_empty_dir(tmp_path)
    src = DirSource(builtin_corpus_root(), builtin=True)
    suffixes = {Path(f.rel).suffix for f in src.walked.files}
    assert suffixes <= {".py", ".rst", ".txt"} and len(src.walked.files) > 500
    assert 5e6 < src.total_bytes < 200e6
    assert not any("site-packages" in f.rel or "__pycache__" in f.rel for f in src.walked.files)


def test_pieces_do_not_depend_on_read_boundaries():
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "\n", "  ", "gamma\n\n", "x" * 300, " "]
    text = "".join(rng.choice(words, size=4000))
    expected = list(split_pieces([text], piece_chars=500))
    assert "".join(expected) == text and all(len(p) <= 500 for p in expected)
    for trial in range(5):
        cuts = np.sort(rng.choice(len(text), size=20, replace=False))
        blocks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert list(split_pieces(blocks, piece_chars=500)) == expected


def test_50mb_single_line_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "huge.txt"
    # Long repeated words keep the token count (and the test time) low; the multi-byte "é" straddles the 1 MiB
    # read blocks.
    unit = " loremipsumdolorsitametconsecteturadipiscingelit\u00e9"
    n_units = 50 * 2**20 // len(unit.encode())
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(50):
            f.write(unit * (n_units // 50))
    size = path.stat().st_size
    assert size > 49 * 2**20 and b"\n" not in open(path, "rb").read(1 << 20)
    rec = FileRecord("huge.txt", "text")
    tracemalloc.start()
    n_chars = n_pieces = 0
    first = last = None
    for piece in read_file(CorpusFile(path, "huge.txt", "text", "text", size, 0), rec):
        assert len(piece) <= PIECE_CHARS
        n_chars += len(piece)
        n_pieces += 1
        first = first or piece[:len(unit)]
        last = piece
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n_chars == len(unit) * (n_units // 50) * 50 and n_pieces >= n_chars // PIECE_CHARS
    assert first == unit and last.endswith(unit) and rec.encoding == "utf-8"
    assert peak < 16 * 2**20, f"peak {peak / 2**20:.1f} MiB while reading a {size / 2**20:.0f} MiB file"
    # The same file through the whole pipeline (streaming): loaded, every character counted.
    tok = Tokenizer.train([unit * 1000], vocab_size=300)       # trained on a sample: the test times tokenising
    data = prepare_dataset(path, tokenizer=tok, cache_dir=tmp_path / "cache", streaming=True,
                           show_progress=False, log=lambda s: None)
    (r,) = data.stats
    assert r["status"] == "loaded" and r["chars"] == n_chars
    tail = data.tokenizer.decode(all_tokens(data)[-200:].tolist())
    assert tail.endswith(unit + data.tokenizer.eot_token)


def test_a_document_failing_half_way_is_taken_back(tmp_path):
    tok = Tokenizer.train(["alpha beta gamma delta " * 50], vocab_size=300)

    def failing():
        yield "alpha beta " * 20
        yield "gamma delta " * 20
        raise OSError(5, "Input/output error")

    writer = TokenWriter(tmp_path / "t.bin", np.uint16)
    enc = Encoder(tok, writer, batch_chars=100)          # tiny batches: the failing file is partly written
    recs = [FileRecord(f"f{i}", "text") for i in range(4)]
    enc.add(recs[0], iter(["alpha " * 30]))
    enc.add(recs[1], failing())
    enc.add(recs[2], iter([" \n\t "]))
    enc.add(recs[3], iter(["delta gamma " * 10, "beta"]))
    enc.flush()
    writer.close()
    ids = open_tokens(tmp_path / "t.bin", "uint16", writer.n_tokens).tolist()
    assert tok.decode(ids) == "alpha " * 30 + tok.eot_token + "delta gamma " * 10 + "beta" + tok.eot_token
    assert recs[1].status == "skipped" and recs[1].reason.startswith("unreadable") and recs[1].tokens == 0
    assert recs[2].reason == "empty (whitespace only)"
    assert recs[0].tokens + recs[3].tokens == len(ids) and recs[3].chars == 124
