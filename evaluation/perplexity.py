"""How well a model predicts a corpus: loss, perplexity and bits per byte over whole documents, and the loss by
position within long documents (length generalisation).

Bits per byte is the number that compares models with different tokenizers: the summed loss of every token of
the text (nats), over ln 2, over the UTF-8 bytes of that text. A tokenizer with longer tokens has fewer, harder
tokens; the total information per byte of text does not depend on how it was cut.

Each document is scored as [end-of-text] + tokens(text): the end-of-text token that precedes a document in
training is its first token's context, and every token of the text is scored once (no end-of-text after it).

A budget of tokens (evaluate.py --max_tokens, the trainer's --eval_tokens) cuts the longest documents to an equal
share of it, at a token boundary of their text (cap_tokens): bits per byte then counts the bytes of what was scored.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from .scoring import Scorer, Scores, total_nll

FULL_CONTEXT_PASS = 16384    # full context: tokens per parallel pass by default (longer documents go on a decoding
                             # step per token: exact, but far slower than a pass)


@dataclass
class CorpusScore:
    documents: int
    tokens: int              # tokens scored (every token of every document's text)
    bytes: int               # UTF-8 bytes of those texts
    loss: float              # mean loss per token, nats
    perplexity: float        # exp(loss)
    bits_per_byte: float     # total loss / ln 2 / bytes
    bits_per_token: float    # loss / ln 2

    def to_dict(self) -> dict:
        return asdict(self)


def document_tokens(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """[eot] + tokens of each text: what a document is scored as."""
    return [[tokenizer.eot_id, *ids] for ids in tokenizer.encode_batch(list(texts))]


def cap_tokens(tokenizer, texts: Sequence[str], max_tokens: int) -> list[str]:
    """The texts cut so that at most max_tokens of their tokens are scored in all.

    Every document gets an equal share; one shorter than its share stays whole and leaves the rest to the others
    (the share is the largest L with sum(min(tokens_i, L)) <= max_tokens). A longer one is cut at the start of its
    token L + 1, and keeps at most L tokens when its cut text is tokenised again. With more texts than max_tokens,
    only the first max_tokens are kept (one token each at least)."""
    texts = list(texts)[:max_tokens]
    encodings = tokenizer.backend.encode_batch(texts, add_special_tokens=False)      # ids with character offsets
    lengths = [len(e.ids) for e in encodings]
    if sum(lengths) <= max_tokens:
        return texts
    left, share = max_tokens, 0
    for k, n in enumerate(sorted(lengths)):
        others = len(lengths) - k                        # this document and the longer ones
        if n * others > left:
            share = left // others
            break
        left -= n
    cut = []
    for text, enc, n in zip(texts, encodings, lengths):
        if n <= share:
            cut.append(text)
            continue
        keep = share
        while len(tokenizer.encode(text[:enc.offsets[keep][0]])) > share:    # a merge across the cut: one less
            keep -= 1
        cut.append(text[:enc.offsets[keep][0]])
    return cut


def corpus_score(nats: float, tokens: int, n_bytes: int, documents: int) -> CorpusScore:
    """The corpus figures from the summed loss (nats) of `tokens` tokens over `n_bytes` bytes of text."""
    if tokens == 0 or n_bytes == 0:
        raise ValueError("nothing was scored: the documents hold no tokens")
    loss = nats / tokens
    return CorpusScore(documents=documents, tokens=tokens, bytes=n_bytes, loss=loss,
                       perplexity=math.exp(loss) if loss < 700 else math.inf,
                       bits_per_byte=nats / math.log(2) / n_bytes, bits_per_token=loss / math.log(2))


def summarise(scores: Sequence[Scores], texts: Sequence[str]) -> CorpusScore:
    """The corpus figures from the scores of each document (document_tokens order) and the texts."""
    return corpus_score(total_nll(scores), sum(len(s.nll) for s in scores),
                        sum(len(t.encode("utf-8")) for t in texts), len(texts))


def scorable(tokenizer, texts: Sequence[str]) -> tuple[list[list[int]], list[str]]:
    """(document_tokens, texts) of the documents with at least one token to score (a text of only ignored
    characters has none)."""
    docs = document_tokens(tokenizer, texts)
    keep = [i for i, d in enumerate(docs) if len(d) > 1]
    return [docs[i] for i in keep], [texts[i] for i in keep]


def evaluate_corpus(scorer: Scorer, tokenizer, texts: Sequence[str]) -> CorpusScore:
    """Score whole documents (see the module doc) and summarise them."""
    docs, texts = scorable(tokenizer, texts)
    return summarise(scorer.score(docs), texts)


# ---- loss by position --------------------------------------------------------------------------------------------

@dataclass
class PositionLoss:
    length: int              # positions scored per document: tokens 1 .. length after the end-of-text token
    documents: int           # documents at least that long
    edges: list[int]         # bucket b holds positions edges[b] .. edges[b + 1] - 1 (1-based: the token's index)
    loss: list[float]        # mean loss of each bucket, over its positions and the documents

    def to_dict(self) -> dict:
        return asdict(self)


def bucket_edges(length: int, buckets: int) -> list[int]:
    """buckets + 1 increasing edges from 1 to length + 1, as equal as whole positions allow (fewer buckets when
    length < buckets)."""
    buckets = min(buckets, length)
    return sorted({1 + (k * length) // buckets for k in range(buckets + 1)})


def long_documents(tokenizer, texts: Sequence[str], length: int) -> list[list[int]]:
    """The first length + 1 tokens ([eot] + text) of every document with at least that many."""
    return [d[:length + 1] for d in document_tokens(tokenizer, texts) if len(d) > length]


def loss_by_position(scorer: Scorer, sequences: Sequence[Sequence[int]], length: int, buckets: int) -> PositionLoss:
    """The mean loss in position buckets over sequences of length + 1 tokens each (long_documents)."""
    if not sequences:
        raise ValueError(f"no document has {length} tokens or more")
    scores = scorer.score(sequences)
    nll = np.stack([s.nll for s in scores])                       # (documents, length), position j at index j - 1
    edges = bucket_edges(length, buckets)
    means = [float(nll[:, lo - 1:hi - 1].mean()) for lo, hi in zip(edges[:-1], edges[1:])]
    return PositionLoss(length=length, documents=len(sequences), edges=edges, loss=means)


def plot_by_position(curves: dict[str, PositionLoss], path, trained_length: int | None = None,
                     title: str = "Loss by position") -> None:
    """A PNG of each model's loss per position bucket (x: the bucket's middle position), with the training length
    marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, curve in curves.items():
        mids = [(lo + hi - 1) / 2 for lo, hi in zip(curve.edges[:-1], curve.edges[1:])]
        ax.plot(mids, curve.loss, marker=".", label=f"{name} ({curve.documents} docs)")
    if trained_length is not None:
        ax.axvline(trained_length, color="grey", linestyle="--", linewidth=1, label=f"training length {trained_length}")
    ax.set_xlabel("position in the document (tokens)")
    ax.set_ylabel("mean loss (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
