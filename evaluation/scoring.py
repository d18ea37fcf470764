"""Per-token loss of token sequences: each token's negative log-likelihood given the tokens before it, in one of two
readings of a sequence longer than a window.

  full context (stride None): the first `window` tokens in one parallel pass that fills the model's cache (the
      recurrent state of the Mamba layers, the KV cache of attention layers), then each later token as one decoding
      step on that cache (inference.Decoder: a CUDA graph on a GPU). Every token's loss conditions on the whole
      sequence before it: the recurrent families carry their state across the window's end, exactly.
  sliding windows (stride S): independent parallel passes over `window` tokens, each ending S tokens after the
      last and scoring only the tokens not scored yet, each with at least window - S + 1 tokens of context (the
      first window scores all of its own). The same as full context when a sequence fits one window, or when the
      model looks no further back than window - S + 1 tokens.

Sequence i's tokens t_0 .. t_{n-1} give n - 1 scores, of t_1 .. t_{n-1}: t_0 is context only (a document is scored
after the end-of-text token that precedes it in training). Rows of different lengths share a batch right-padded:
the models are causal, so what follows a row's last token never changes its scores.

The head is taken over the model's final hidden states a few positions at a time, so the (b, l, v) logits of a
window are never held at once. Scores are over the first config.vocab_size logits: the rows the embedding is padded
with are no tokens (a model whose logits are all equal scores log(vocab_size) per token).

Shape letters: b rows of a batch, l positions, d model width, v vocabulary.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from inference import Decoder

HEAD_BYTES = 1 << 28         # fp32 logits held at once while taking the head (256 MiB)
LENGTH_STEP = 256            # decoders (their KV caches) are built for lengths rounded up to this, to be reused


@dataclass
class Scores:
    """The scores of one sequence of n tokens."""
    nll: np.ndarray          # (n - 1,) float64: -log p(t_j | t_<j) in nats, j = 1 .. n - 1
    greedy: np.ndarray       # (n - 1,) bool: t_j is the most likely token there


def check_window(window: int, stride: int | None) -> None:
    """ValueError unless window >= 1 and, when given, 1 <= stride <= window."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1, got {window!r}")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window):
        raise ValueError(f"stride must be an integer in [1, window={window}], got {stride!r}")


def sliding_pieces(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """The passes that score a sequence of n tokens with sliding windows.

    Returns:
        (a, p, q) per pass: it reads tokens [a, q - 1) (at most `window` of them) and scores tokens [p, q), so
        that the pieces' [p, q) cover 1 .. n - 1 once each, in order
    """
    pieces, p = [], 1
    while p < n:
        q = min(n, 1 + window) if p == 1 else min(n, p + stride)
        pieces.append((max(0, q - 1 - window), p, q))
        p = q
    return pieces


class Scorer:
    """Scores token sequences under a model (any family), in batches.

    Args:
        model: a language model in eval mode (models/), on any device
        window: tokens per parallel pass (memory grows with it; for an attention layer quadratically)
        stride: None = full context (see the module doc); else sliding windows advancing by this many tokens
        batch_size: rows per pass
        show_progress: a tqdm bar over the tokens scored (on stderr)
    """

    def __init__(self, model, window: int, stride: int | None = None, batch_size: int = 8,
                 show_progress: bool = False):
        check_window(window, stride)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model, self.window, self.stride, self.batch_size = model, window, stride, batch_size
        self.show_progress = show_progress
        self.device = model.lm_head.weight.device
        self.vocab = model.config.vocab_size
        self._decoders: dict[int, Decoder] = {}

    # ---- the head --------------------------------------------------------------------------------------------------

    def _token_scores(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden (b, l, d), targets (b, l) long -> nll (b, l) fp32 and greedy (b, l) bool, a few positions at a
        time."""
        b, l, _ = hidden.shape
        step = max(1, HEAD_BYTES // (4 * self.vocab * b))
        nll = torch.empty(b, l, dtype=torch.float32, device=hidden.device)
        greedy = torch.empty(b, l, dtype=torch.bool, device=hidden.device)
        for s in range(0, l, step):
            logits = self.model.lm_head(hidden[:, s:s + step])[..., :self.vocab].float()       # (b, c, v)
            t = targets[:, s:s + step, None]                                                  # (b, c, 1)
            nll[:, s:s + step] = (torch.logsumexp(logits, -1) - logits.gather(-1, t)[..., 0])
            greedy[:, s:s + step] = logits.argmax(-1) == t[..., 0]
        return nll, greedy

    def _step_scores(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (b, v') of one step, targets (b,) -> nll (b,) fp32, greedy (b,) bool."""
        logits = logits[:, :self.vocab].float()
        nll = torch.logsumexp(logits, -1) - logits.gather(-1, targets[:, None])[:, 0]
        return nll, logits.argmax(-1) == targets

    # ---- scoring ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, sequences: Sequence[Sequence[int]]) -> list[Scores]:
        """The Scores of each sequence (each of at least 2 tokens), in the order given."""
        for i, s in enumerate(sequences):
            if len(s) < 2:
                raise ValueError(f"sequence {i} has {len(s)} token(s); a score needs a context token and one more")
        total = sum(len(s) - 1 for s in sequences)
        bar = tqdm(total=total, desc="scoring", unit="tok", unit_scale=True, file=sys.stderr, leave=False,
                   disable=not self.show_progress)
        try:
            if self.stride is None:
                return self._score_full(sequences, bar)
            return self._score_sliding(sequences, bar)
        finally:
            bar.close()

    def _batch(self, rows: Sequence[Sequence[int]], length: int) -> torch.Tensor:
        """(b, length) long on the model's device, each row right-padded with its last token."""
        ids = torch.empty(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
            ids[i, len(r):] = r[-1]
        return ids.to(self.device)

    def _decoder(self, batch_size: int, length: int) -> Decoder:
        """A decoder for batch_size rows of up to `length` tokens, kept for reuse (one captured graph at a time)."""
        held = self._decoders.get(batch_size)
        if held is None or held.max_length < length:
            self._decoders.clear()
            self._decoders[batch_size] = Decoder(self.model, batch_size,
                                                 max_length=-(-length // LENGTH_STEP) * LENGTH_STEP)
        return self._decoders[batch_size]

    def _score_full(self, sequences, bar) -> list[Scores]:
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))   # similar lengths together
        out: list[Scores | None] = [None] * len(sequences)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            rows = [sequences[i] for i in idx]
            n = len(rows[0])                                                  # the longest row of the batch
            ids = self._batch(rows, n)                                        # (b, n)
            first = min(self.window, n)
            nll = torch.empty(len(rows), n - 1, dtype=torch.float32, device=self.device)
            greedy = torch.empty(len(rows), n - 1, dtype=torch.bool, device=self.device)
            if first == n:                                                    # one parallel pass
                hidden = self.model.hidden_states(ids[:, :n - 1])             # (b, n - 1, d)
                nll[:], greedy[:] = self._token_scores(hidden, ids[:, 1:])
                bar.update(sum(len(r) - 1 for r in rows))
            else:                                                             # a pass, then one step per token
                decoder = self._decoder(len(rows), n)
                decoder.cache.seqlen_offset = 0                               # the pass overwrites every state
                hidden = self.model.hidden_states(ids[:, :first], cache=decoder.cache)   # (b, first, d)
                nll[:, :first], greedy[:, :first] = self._token_scores(hidden, ids[:, 1:first + 1])
                bar.update(first * len(rows))
                for t in range(first, n - 1):                                 # token t in, t + 1 scored
                    nll[:, t], greedy[:, t] = self._step_scores(decoder.step(ids[:, t]), ids[:, t + 1])
                    bar.update(sum(1 for r in rows if len(r) - 1 > t))
            nll, greedy = nll.double().cpu().numpy(), greedy.cpu().numpy()
            for row, i in enumerate(idx):
                k = len(sequences[i]) - 1
                out[i] = Scores(nll[row, :k].copy(), greedy[row, :k].copy())
        return out

    def _score_sliding(self, sequences, bar) -> list[Scores]:
        out = [Scores(np.empty(len(s) - 1), np.empty(len(s) - 1, dtype=bool)) for s in sequences]
        pieces = [(i, a, p, q) for i, s in enumerate(sequences) for a, p, q in sliding_pieces(len(s), self.window,
                                                                                             self.stride)]
        pieces.sort(key=lambda x: -(x[3] - 1 - x[1]))                        # longest reads first
        for start in range(0, len(pieces), self.batch_size):
            batch = pieces[start:start + self.batch_size]
            reads = [sequences[i][a:q - 1] for i, a, p, q in batch]
            targets = [sequences[i][a + 1:q] for i, a, p, q in batch]
            length = len(reads[0])
            hidden = self.model.hidden_states(self._batch(reads, length))    # (b, length, d)
            nll, greedy = self._token_scores(hidden, self._batch(targets, length))
            nll, greedy = nll.double().cpu().numpy(), greedy.cpu().numpy()
            for row, (i, a, p, q) in enumerate(batch):
                # the read position of token j's prediction is j - 1 - a; score index j - 1
                out[i].nll[p - 1:q - 1] = nll[row, p - 1 - a:q - 1 - a]
                out[i].greedy[p - 1:q - 1] = greedy[row, p - 1 - a:q - 1 - a]
                bar.update(q - p)
        return out


def total_nll(scores: Sequence[Scores]) -> float:
    """The summed loss in nats (fsum: the same total whatever the order)."""
    return math.fsum(float(s.nll.sum()) for s in scores)
