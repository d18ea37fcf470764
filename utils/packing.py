"""Packing fine-tuning examples into full rows: several conversations per row, told apart by `seq_idx`.

An example of n + 1 tokens fills n positions of a row, exactly what it fills in its own padded row
(utils.finetune_data.collate): inputs ids[:-1], targets labels[1:]. So its last input predicts its own last token
and no target reaches into the next example; the tokens after an example's end (the next example's, or padding)
never become its targets. An example with more than seq_len + 1 tokens keeps the unpacked truncation rule (its
first seq_len + 1 tokens), so it fills exactly one row.

Rows are planned by first-fit decreasing: the longest example first, each into the first row with room, a new row
when none has. Ties go to the earlier example, so the plan depends on the examples alone (the seed orders the rows
when they are sampled). A tree over the rows' free space finds the first row with room in O(log rows).

    seq_idx: (b, L) int32, the example index of each token within its row (0,0,0,1,1,2,...); the padding after a
             row's last example counts as one more index, so it never joins that example.

DPO pairs pack whole: a pair's chosen and rejected side by side as two documents (chosen 2j, rejected 2j + 1), in
rows of 2 * seq_len, what the padded layout's chosen and rejected rows hold together.
"""
from __future__ import annotations

import torch

IGNORE = -100


def example_length(example, seq_len: int) -> int:
    """Row positions an example fills: its tokens less one (the last is only a target), at most seq_len."""
    return min(len(example.ids) - 1, seq_len)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity`, by first-fit decreasing.

    Within a bin the indices are in placement order (longest first); bins in the order they were opened.
    Raises ValueError for a length outside [1, capacity].
    """
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"length {n} of item {i} is outside [1, capacity={capacity}]")
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    # free[size + b] is bin b's free space (unopened bins are empty, so first-fit opens the leftmost unopened bin
    # exactly when no opened bin has room); free[k] is the largest free space under node k.
    free = [capacity] * (2 * size)
    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n, k = lengths[i], 1
        while k < size:                         # descend to the leftmost leaf with room
            k = 2 * k if free[2 * k] >= n else 2 * k + 1
        b = k - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        free[k] -= n
        k //= 2
        while k:
            free[k] = max(free[2 * k], free[2 * k + 1])
            k //= 2
    return bins


def pack_examples(examples: list, seq_len: int) -> list[list]:
    """The examples (anything with .ids, .labels) grouped into rows of at most seq_len positions."""
    lengths = [example_length(e, seq_len) for e in examples]
    return [[examples[i] for i in row] for row in first_fit_decreasing(lengths, seq_len)]


def pair_length(pair, seq_len: int) -> int:
    """Row positions a preference pair fills: its chosen and its rejected side by side."""
    return example_length(pair.chosen, seq_len) + example_length(pair.rejected, seq_len)


def pack_pairs(pairs: list, seq_len: int) -> list[list]:
    """Preference pairs (.chosen, .rejected) grouped into rows of at most 2 * seq_len positions: a row holds what
    the padded layout's two rows (chosen, rejected) hold, so every pair fits."""
    lengths = [pair_length(p, seq_len) for p in pairs]
    return [[pairs[i] for i in row] for row in first_fit_decreasing(lengths, 2 * seq_len)]


def collate_packed_pairs(rows: list[list], pad_id: int, seq_len: int):
    """x, y, seq_idx as collate_packed, each row's documents chosen 0, rejected 0, chosen 1, rejected 1, ..."""
    return collate_packed([[e for p in row for e in (p.chosen, p.rejected)] for row in rows], pad_id, seq_len)


def packing_efficiency(lengths: list[int], n_rows: int, seq_len: int) -> float:
    """Real tokens / the capacity of n_rows rows of seq_len."""
    return sum(lengths) / (n_rows * seq_len)


def padded_positions(widths: list[int], batch_size: int) -> int:
    """Row positions when rows of these widths, in this order, go batch_size to a batch, each batch padded to its
    widest row (what the collates do)."""
    return sum(len(widths[i:i + batch_size]) * max(widths[i:i + batch_size])
               for i in range(0, len(widths), batch_size))


def collate_packed(rows: list[list], pad_id: int, seq_len: int):
    """x, y: (b, L) int64 and seq_idx: (b, L) int32 from rows of examples; L = the fullest row's positions.

    Each example adds its inputs ids[:-1] to x and labels[1:] to y (cut to seq_len positions); the rest of a row
    is pad_id in x, -100 in y.
    """
    L = max(sum(example_length(e, seq_len) for e in row) for row in rows)
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), IGNORE, dtype=torch.long)
    seq_idx = torch.empty((len(rows), L), dtype=torch.int32)
    for r, row in enumerate(rows):
        t = 0
        for doc, e in enumerate(row):
            n = example_length(e, seq_len)
            x[r, t:t + n] = torch.tensor(e.ids[:n])
            y[r, t:t + n] = torch.tensor(e.labels[1:n + 1])
            seq_idx[r, t:t + n] = doc
            t += n
        seq_idx[r, t:] = len(row)                # padding: an index of its own
    return x, y, seq_idx
