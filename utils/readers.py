"""One small reader per format family: which files we read, and how each turns into text.

Every reader returns an iterator of text blocks (a file is never held whole unless it is small) and raises
`Skip(reason)` before yielding anything when the file cannot be used. Plain text, code and structured files share
one decoder (`corpus.decode_file`); PDFs go through pypdf page by page; HTML is reduced to its visible text.
"""
import json
import logging
import tomllib
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

# Format families and the file types in each: extension (lower case, with dot) -> type name shown in the stats.
TEXT_TYPES = {
    ".txt": "text", ".text": "text", ".log": "text", ".md": "markdown", ".markdown": "markdown", ".mdx": "markdown",
    ".rst": "rst", ".tex": "tex", ".bib": "tex", ".org": "org", ".adoc": "asciidoc", ".asciidoc": "asciidoc",
    ".textile": "textile", ".wiki": "wiki", ".srt": "subtitles", ".vtt": "subtitles",
    ".html": "html", ".htm": "html", ".xhtml": "html",
}
CODE_TYPES = {
    ".py": "python", ".pyi": "python", ".pyx": "python", ".ipynb": "jupyter",
    ".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".jsx": "javascript",
    ".ts": "typescript", ".tsx": "typescript", ".mts": "typescript", ".cts": "typescript",
    ".java": "java", ".c": "c", ".h": "c", ".cc": "c++", ".cpp": "c++", ".cxx": "c++", ".hpp": "c++",
    ".hh": "c++", ".hxx": "c++", ".cu": "cuda", ".cuh": "cuda", ".cs": "c#", ".go": "go", ".rs": "rust",
    ".rb": "ruby", ".php": "php", ".kt": "kotlin", ".kts": "kotlin", ".swift": "swift", ".scala": "scala",
    ".sc": "scala", ".sh": "shell", ".bash": "shell", ".zsh": "shell", ".fish": "shell", ".ps1": "powershell",
    ".bat": "batch", ".cmd": "batch", ".sql": "sql", ".r": "r", ".lua": "lua", ".pl": "perl", ".pm": "perl",
    ".hs": "haskell", ".ml": "ocaml", ".mli": "ocaml", ".ex": "elixir", ".exs": "elixir", ".erl": "erlang",
    ".clj": "clojure", ".dart": "dart", ".jl": "julia", ".m": "objective-c", ".mm": "objective-c",
    ".f90": "fortran", ".f": "fortran", ".vue": "vue", ".svelte": "svelte", ".css": "css", ".scss": "css",
    ".less": "css", ".groovy": "groovy", ".gradle": "groovy", ".proto": "protobuf", ".zig": "zig", ".nim": "nim",
    ".cmake": "cmake", ".mk": "make", ".asm": "assembly", ".s": "assembly", ".vim": "vim", ".el": "lisp",
    ".lisp": "lisp", ".scm": "lisp", ".tf": "terraform", ".sol": "solidity",
}
STRUCTURED_TYPES = {
    ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml",
    ".xml": "xml", ".svg": "xml", ".csv": "csv", ".tsv": "csv", ".ini": "ini", ".cfg": "ini", ".conf": "ini",
    ".properties": "ini",
}
PDF_TYPES = {".pdf": "pdf"}
# Files people keep without an extension that are plainly text.
NAMED_TYPES = {
    "makefile": "make", "gnumakefile": "make", "dockerfile": "docker", "containerfile": "docker",
    "rakefile": "ruby", "gemfile": "ruby", "jenkinsfile": "groovy", "vagrantfile": "ruby", "procfile": "text",
    "readme": "text", "license": "text", "licence": "text", "copying": "text", "authors": "text",
    "changelog": "text", "changes": "text", "news": "text", "notice": "text", "todo": "text",
}

# Structured files are trained on as written (configs with comments are still good text); parsing them only tells
# the user when one is malformed. Bigger files are not parsed (it would hold them whole in memory).
VALIDATE_MAX_BYTES = 16 << 20


class Skip(Exception):
    """The file cannot be used; str(self) is the reason shown in the stats."""


def file_type(path: Path) -> tuple[str, str] | None:
    """(family, type) for a path, from its extension or well-known name; None = unsupported type."""
    suffix = path.suffix.lower()
    for family, table in (("text", TEXT_TYPES), ("code", CODE_TYPES), ("structured", STRUCTURED_TYPES),
                          ("pdf", PDF_TYPES)):
        if suffix in table:
            return family, table[suffix]
    name = path.name.lower()
    stem = name.split(".")[0]
    if name in NAMED_TYPES or (suffix in ("", ".md", ".txt", ".rst") and stem in NAMED_TYPES):
        return "text", NAMED_TYPES.get(name, NAMED_TYPES.get(stem, "text"))
    return None


def read_pdf(path: Path, info: dict) -> Iterator[str]:
    """Text of a PDF, one block per page (pages joined by a blank line).

    Raises Skip before yielding if the PDF is corrupt, encrypted with a password, or has no text layer.
    Sets info["pages"], and info["note"] when some pages could not be read.
    """
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    # pypdf logs every repaired xref at WARNING; a corrupt file is reported once, in the stats.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    try:
        reader = PdfReader(str(path))
        if reader.is_encrypted:
            # Many PDFs are encrypted only against editing, with an empty user password: those read fine.
            try:
                ok = reader.decrypt("")
            except Exception as e:  # pypdf raises several types for unsupported ciphers
                raise Skip(f"encrypted PDF ({type(e).__name__}: {e})") from e
            if not ok:
                raise Skip("encrypted PDF (needs a password)")
        n_pages = len(reader.pages)
    except Skip:
        raise
    except (PdfReadError, OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        raise Skip(f"corrupt PDF ({type(e).__name__}: {e})") from e
    info["pages"] = n_pages
    if n_pages == 0:
        raise Skip("corrupt PDF (no pages)")

    # Extract the first page with text eagerly, so that a PDF with no text at all is skipped before yielding.
    def page_text(i):
        try:
            return reader.pages[i].extract_text() or ""
        except Exception:  # pypdf raises many types on a damaged page; it must not lose the others
            info.setdefault("bad_pages", []).append(i + 1)
            return ""

    first, i = "", 0
    while i < n_pages and not first.strip():
        first = page_text(i)
        i += 1
    if not first.strip():
        raise Skip("empty (PDF has no extractable text: scanned images?)" if not info.get("bad_pages")
                   else "corrupt PDF (no page could be read)")

    def pages():
        yield first
        for j in range(i, n_pages):
            text = page_text(j)
            if text:
                yield "\n\n" + text
        if info.get("bad_pages"):
            info["note"] = f"unreadable pages skipped: {info['bad_pages'][:20]}"
    return pages()


class _VisibleText(HTMLParser):
    """Collects the text a browser would show: no tags, no script/style, block elements on their own lines."""
    BLOCKS = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "section", "article",
              "header", "footer", "table", "ul", "ol", "blockquote", "title"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.hidden = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript", "template"):
            self.hidden += 1
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript", "template"):
            self.hidden = max(0, self.hidden - 1)
        elif tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Visible text of an HTML document, with runs of blank lines squeezed."""
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).splitlines()]
    out, blank = [], False
    for line in lines:
        if line.strip() or not blank:
            out.append(line)
        blank = not line.strip()
    return "\n".join(out).strip() + "\n"


def validate_structured(kind: str, text: str) -> str | None:
    """None if `text` parses as `kind`; otherwise a short description of the first error."""
    try:
        if kind == "json":
            json.loads(text)
        elif kind == "jsonl":
            for n, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"line {n}: {e.msg}") from e
        elif kind == "toml":
            tomllib.loads(text)
        elif kind == "xml":
            ET.fromstring(text)
    except json.JSONDecodeError as e:
        return f"invalid JSON (line {e.lineno} column {e.colno}: {e.msg})"
    except ValueError as e:  # jsonl above, and tomllib.TOMLDecodeError
        return f"invalid {kind.upper()} ({e})"
    except ET.ParseError as e:
        return f"invalid XML ({e})"
    return None
