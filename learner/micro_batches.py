"""How the token term splits an update's chains into micro-batches (one forward/backward each).

A unit is what one row of the forward holds: a chain (prompt + chain) or, with ``learner.pack_prompts``, a whole
group (prompt + its G chains, r2ec/packing.py). Micro-batches are consecutive units: a fixed number of them, or,
with ``learner.max_tokens_per_micro_batch``, as many as keep the padded size (units x the longest unit's length)
within the budget, so short chains share a forward and long ones do not pad each other out of memory. Order is
kept (no sorting by length): the micro-batches are the same on every run, and rows map back to chains trivially.

Pure Python.
"""

from __future__ import annotations

from collections.abc import Sequence


def plan_micro_batches(lengths: Sequence[int], per_batch: int, max_tokens: int | None) -> list[list[int]]:
    """Indices of the units of each micro-batch. ``lengths``: each unit's row length in tokens. ``per_batch``
    units each when ``max_tokens`` is None; else greedy: a unit joins the current micro-batch while
    (units + 1) x max(length) <= max_tokens, and a unit longer than the budget goes alone."""
    if per_batch < 1:
        raise ValueError(f"per_batch must be at least 1, got {per_batch}")
    if max_tokens is None:
        return [list(range(lo, min(len(lengths), lo + per_batch))) for lo in range(0, len(lengths), per_batch)]
    batches: list[list[int]] = []
    longest = 0
    for i, n in enumerate(lengths):
        if batches and (len(batches[-1]) + 1) * max(longest, n) <= max_tokens:
            batches[-1].append(i)
            longest = max(longest, n)
        else:
            batches.append([i])
            longest = n
    return batches
