"""Training batches from a token array: fixed windows of seq_len + 1 tokens, packed across documents.

Window g of the whole run (counted over all ranks) is fully determined by (seed, g): epoch e = g // n_windows
draws a random offset in [0, seq_len) and a permutation of the windows from a generator seeded with (seed, e).
So the sampler's whole state is one integer, `position`, and a restored sampler yields exactly the batches the
original would have. Under DDP, each step takes the next world_size * batch_size windows; rank r gets the r-th
slice of batch_size (disjoint across ranks).
"""
from typing import Iterator

import numpy as np
import torch


class ResumeMismatch(ValueError):
    """A saved sampler state does not fit this run's data (a resume with other data, seq_len or --pack)."""


class BatchSampler:
    """Random windows of a (n,) token array; next_batch() -> x, y: (batch_size, seq_len) int64, y = x shifted.

    Args:
        tokens: (n,) integer array (np.memmap of the train split), n >= seq_len + 1.
        seq_len: tokens per input row.
        batch_size: rows per batch on this rank.
        seed: fixes the order of windows (with the position, the whole stream).
        rank, world_size: this process's slice of every global batch (DDP).
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        n = len(tokens)
        if n < seq_len + 1:
            raise ValueError(f"the training split has {n} tokens; one sequence needs seq_len + 1 = {seq_len + 1}. "
                             "Use a smaller seq_len or a bigger corpus")
        self.tokens, self.seq_len, self.batch_size = tokens, seq_len, batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        # Largest epoch offset that still leaves room for one window; the window count is the same every epoch.
        self.max_offset = min(seq_len - 1, n - (seq_len + 1))
        self.n_windows = (n - 1 - seq_len - self.max_offset) // seq_len + 1
        self.position = 0          # windows handed out so far, all ranks together
        self._cached_epoch = None  # (epoch, offset, permutation)

    @property
    def epoch(self) -> int:
        return self.position // self.n_windows

    def _epoch(self, e: int) -> tuple[int, np.ndarray]:
        if self._cached_epoch is None or self._cached_epoch[0] != e:
            rng = np.random.default_rng([self.seed, e])
            offset = int(rng.integers(0, self.max_offset + 1))
            self._cached_epoch = (e, offset, rng.permutation(self.n_windows))
        return self._cached_epoch[1], self._cached_epoch[2]

    def window_starts(self, first: int, count: int) -> np.ndarray:
        """Token offsets of global windows first .. first + count - 1."""
        starts = np.empty(count, dtype=np.int64)
        for i, g in enumerate(range(first, first + count)):
            e, k = divmod(g, self.n_windows)
            offset, perm = self._epoch(e)
            starts[i] = offset + perm[k] * self.seq_len
        return starts

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns x, y: (batch_size, seq_len) int64 CPU tensors; y[:, t] is the token after x[:, t]."""
        starts = self.window_starts(self.position + self.rank * self.batch_size, self.batch_size)
        self.position += self.batch_size * self.world_size
        return _gather(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        """Small JSON-able state; load_state_dict(state) continues the stream exactly."""
        return {"seed": self.seed, "position": self.position, "seq_len": self.seq_len, "n_tokens": len(self.tokens),
                "batch_size": self.batch_size, "rank": self.rank, "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        """Restores seed and position. The token array and seq_len must be the ones the state was saved with
        (positions count global windows, so a different batch_size or world_size still never repeats data)."""
        for key, mine in (("seq_len", self.seq_len), ("n_tokens", len(self.tokens))):
            if state[key] != mine:
                raise ResumeMismatch(f"sampler state was saved with {key}={state[key]}, this sampler has {mine}: the "
                                 "data or seq_len changed since the checkpoint, so the stream cannot be resumed")
        self.seed, self.position = int(state["seed"]), int(state["position"])
        self._cached_epoch = None


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(seq_len + 1)                 # (b, seq_len + 1)
    rows = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()     # (b, seq_len) each


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic evaluation batches: non-overlapping windows spread evenly over the whole split, at most
    max_batches batches of batch_size rows (the last may be smaller). Same input -> same batches, always.

    Raises:
        ValueError (at the call, not at the first next()): the split is shorter than one window.
    """
    if seq_len < 1 or batch_size < 1 or (max_batches is not None and max_batches < 1):
        raise ValueError(f"seq_len, batch_size and max_batches must be positive, got {seq_len}, {batch_size}, "
                         f"{max_batches}")
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the validation split has {len(tokens)} tokens; one sequence needs seq_len + 1 = "
                         f"{seq_len + 1}. Use a smaller seq_len, a larger val_fraction or a bigger corpus")
    count = n_windows if max_batches is None else min(n_windows, max_batches * batch_size)
    # Spacing >= 1 window, so the rounded indices are distinct.
    starts = np.linspace(0, n_windows - 1, count).round().astype(np.int64) * seq_len

    def batches():
        for i in range(0, count, batch_size):
            yield _gather(tokens, starts[i:i + batch_size], seq_len)
    return batches()


class ExampleSampler:
    """Random batches of example indices (chat conversations, preference pairs), one epoch after another.

    Epoch e is a permutation of range(n) drawn from a generator seeded with (seed, e); the state is one position
    (examples handed out so far, all ranks together), so a restored sampler continues exactly. Under DDP rank r
    takes the r-th slice of batch_size of every step's world_size * batch_size examples. `unit` names what is
    sampled ("examples", or the packed rows of --pack), so that a state resumes only over the same unit.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 unit: str = "examples"):
        if n < 1 or batch_size < 1:
            raise ValueError(f"n and batch_size must be positive, got {n}, {batch_size}")
        self.n, self.batch_size, self.seed, self.unit = n, batch_size, int(seed), unit
        self.rank, self.world_size = rank, world_size
        self.position = 0
        self._cached = None     # (epoch, permutation)

    def next_indices(self) -> list[int]:
        first = self.position + self.rank * self.batch_size
        out = []
        for g in range(first, first + self.batch_size):
            e, k = divmod(g, self.n)
            if self._cached is None or self._cached[0] != e:
                self._cached = (e, np.random.default_rng([self.seed, e]).permutation(self.n))
            out.append(int(self._cached[1][k]))
        self.position += self.batch_size * self.world_size
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position, "n_examples": self.n, "batch_size": self.batch_size,
                "rank": self.rank, "world_size": self.world_size, "unit": self.unit}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("unit", "examples")       # states from before --pack sampled examples
        if saved != self.unit:
            raise ResumeMismatch(f"sampler state was saved over {saved}, this run samples {self.unit}: resume with "
                                 f"the --pack and seq_len the checkpoint was trained with")
        if state["n_examples"] != self.n:
            raise ResumeMismatch(f"sampler state was saved with {state['n_examples']} examples, this data has {self.n}: "
                             "the data changed since the checkpoint, so the stream cannot be resumed")
        self.seed, self.position = int(state["seed"]), int(state["position"])
        self._cached = None
