"""Packed rows: several documents in one row of a batch, told apart by `seq_idx`.

    seq_idx: (batch, seqlen) int32, the document index of each token, non-decreasing along a row (0,0,0,1,1,2,...)

A new document starts at t where seq_idx[b, t] != seq_idx[b, t-1]. There every sequence kernel starts afresh: the
scans reset their state to zero (as if h_{t-1} = 0) and the causal conv's window does not reach back across the
boundary (inputs of other documents count as zero padding). seq_idx=None is one document per row, today's path,
at no extra cost.

The kernels read the boundary in two ways, both exact for non-decreasing indices: a step resets where its index
differs from the step before; a conv tap or a run of steps stays inside the document where the indices at its two
ends are equal. That is why non-decreasing rows are required. It is checked here for tensors on the CPU; on a GPU
the check would cost a host synchronisation per layer, so there it is the caller's contract (the data path builds
seq_idx by cumulative sums, non-decreasing by construction).
"""
from __future__ import annotations

import torch


def check_seq_idx(seq_idx: torch.Tensor | None, batch: int, seqlen: int) -> torch.Tensor | None:
    """seq_idx as the kernels read it, (batch, seqlen) int32 (converted from another integer dtype), or None.
    Raises ValueError with what was wrong and what is allowed."""
    if seq_idx is None:
        return None
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise ValueError(f"seq_idx must be an integer tensor (int32), got {seq_idx.dtype}")
    if tuple(seq_idx.shape) != (batch, seqlen):
        raise ValueError(f"seq_idx must have shape (batch, seqlen) = ({batch}, {seqlen}), got {tuple(seq_idx.shape)}")
    if seq_idx.device.type == "cpu" and seqlen > 1 and bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along each row (one contiguous run of tokens per document)")
    return seq_idx.to(torch.int32)


def seq_idx_from_lengths(lengths: list[list[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch, sum of a row's lengths) int32 from each row's document lengths, e.g. [[3, 2]] -> [[0, 0, 0, 1, 1]].
    Every row must hold the same number of tokens."""
    rows = [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row)) for row in lengths]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"every row must hold the same number of tokens, got {[len(r) for r in rows]}")
    return torch.stack(rows).to(device=device, dtype=torch.int32)


def seq_idx_from_separators(input_ids: torch.Tensor, separator_id: int) -> torch.Tensor:
    """(batch, seqlen) int32 from a window of a token stream whose documents end with `separator_id` (end-of-text):
    a token's index is the number of separators before it, so a separator closes its document and the next token
    starts a new one, e.g. [a, b, EOT, c, EOT, d] -> [0, 0, 0, 1, 1, 2]. A cumulative sum on input_ids' device:
    non-decreasing by construction, no host synchronisation (a CUDA graph can capture it)."""
    is_separator = (input_ids == separator_id).to(torch.int32)
    return (torch.cumsum(is_separator, dim=1, dtype=torch.int32) - is_separator).to(torch.int32)
