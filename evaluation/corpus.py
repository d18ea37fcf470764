"""The documents of a corpus to evaluate on, read the way the trainer reads them (utils/dataset.py's sources): a
folder or a single file (--data_dir: PDF, text, code, ... through the corpus walk), a HuggingFace dataset
(--hf_dataset: every non-empty row of the text field), or the built-in corpus (the Python standard library's
.py/.rst/.txt files) when neither is given. A document is its whole text, as one string."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from utils.dataset import DirSource, HFSource, builtin_corpus_root
from utils.errors import DataError
from utils.readers import Skip


@dataclass
class Corpus:
    label: str                 # "builtin", the folder's name, "hf-<name>"
    documents: list[str]       # whole texts, in the source's order
    skipped: int               # selected files or rows with no readable text (binary, empty, unreadable)


def evenly(total: int, count: int | None) -> Callable[[int], bool]:
    """Selects `count` of `total` items spread evenly (all of them when count is None or >= total)."""
    if count is None or count >= total:
        return lambda i: True
    picked = {(k * total) // count for k in range(count)}
    return picked.__contains__


def read_corpus(data_dir: str | None = None, hf_dataset: str | None = None, text_field: str = "text",
                max_documents: int | None = None, show_progress: bool = False) -> Corpus:
    """The documents of a corpus (at most max_documents, spread evenly over it).

    Raises:
        DataError: both or a missing source, or nothing readable in it
    """
    if data_dir is not None and hf_dataset is not None:
        raise DataError("give --data_dir or --hf_dataset, not both")
    if data_dir is not None and not Path(data_dir).exists():
        raise DataError(f"--data_dir {data_dir!r} does not exist; give a folder or a file of documents, or leave "
                        f"it out to use the built-in corpus")
    if hf_dataset is not None:
        source = HFSource(hf_dataset, text_field)
        total = len(source.ds)
    else:
        source = DirSource(builtin_corpus_root() if data_dir is None else Path(data_dir), builtin=data_dir is None)
        total = len(source.walked.files)
    documents, skipped = [], 0
    select = evenly(total, max_documents)
    bar = tqdm(total=min(total, max_documents or total), desc="reading", unit="doc", file=sys.stderr, leave=False,
               disable=not show_progress)
    for _, pieces, _ in source.documents(select):
        bar.update(1)
        try:
            text = "".join(pieces) if pieces is not None else ""
        except (Skip, OSError):                # a file that fails while it is read
            text = ""
        if text.strip():
            documents.append(text)
        else:
            skipped += 1
    bar.close()
    if not documents:
        where = f"--hf_dataset {hf_dataset!r} (field {text_field!r})" if hf_dataset is not None else \
            f"--data_dir {data_dir!r}" if data_dir is not None else "the built-in corpus"
        raise DataError(f"{where} holds no readable text to evaluate on ({total} file(s) or row(s) looked at); "
                        f"give a folder or file of text documents")
    return Corpus(source.label(), documents, skipped)
