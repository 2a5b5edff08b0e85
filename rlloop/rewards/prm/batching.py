"""How PRM scoring work is cut up: micro-batches under a token budget, and shares for several replicas.

Pure functions on lengths (no torch, no Ray), so the packing rules are tested on their own.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence


def pack_by_token_budget(
    lengths: Sequence[int], max_batch_tokens: int | None, max_rows: int | None = None
) -> list[list[int]]:
    """Row indices of each micro-batch, longest rows first.

    A right-padded batch costs `max(length in batch) * rows` tokens of compute and memory, so rows are
    sorted by length (longest first: an out-of-memory shows on the first batch, not the last) and packed
    greedily while that product stays <= `max_batch_tokens`; `max_rows` caps the rows of a batch too.
    A row longer than the budget on its own still gets scored, alone. `max_batch_tokens=None` packs by
    `max_rows` only (the fixed batch size). Every index appears in exactly one batch.
    """
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens={max_batch_tokens}: must be >= 1 (or None)")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows={max_rows}: must be >= 1 (or None)")
    # stable sort: rows of equal length keep their input order (deterministic batches)
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0  # the longest row of `current`: its first, since rows arrive longest first
    for i in order:
        rows = len(current) + 1
        fits_rows = max_rows is None or rows <= max_rows
        fits_tokens = max_batch_tokens is None or max(width, lengths[i]) * rows <= max_batch_tokens
        if current and not (fits_rows and fits_tokens):
            batches.append(current)
            current, width = [], 0
        current.append(i)
        width = max(width, lengths[i])
    if current:
        batches.append(current)
    return batches


def split_balanced(weights: Sequence[float], parts: int) -> list[list[int]]:
    """Indices of `weights` split into at most `parts` shares of near-equal total weight.

    Longest-processing-time greedy: heaviest item first, each to the currently lightest share (within
    4/3 of the best split). Each share lists its indices in input order; empty shares are dropped, so
    fewer items than parts gives one share per item.
    """
    if parts < 1:
        raise ValueError(f"parts={parts}: must be >= 1")
    shares: list[list[int]] = [[] for _ in range(parts)]
    heap = [(0.0, p) for p in range(parts)]  # (load, share index): ties go to the lower index
    for i in sorted(range(len(weights)), key=lambda i: -weights[i]):
        load, p = heapq.heappop(heap)
        shares[p].append(i)
        heapq.heappush(heap, (load + float(weights[i]), p))
    return [sorted(s) for s in shares if s]
