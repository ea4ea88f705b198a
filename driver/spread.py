"""Load-balanced spreading of a call across the rollout workers.

A batch is cut into chunks (:func:`chunk_slices`) and each chunk goes to whichever worker finishes first
(``ray.wait``), so a slow worker takes fewer chunks. A worker that dies on the way is handed to the caller's recovery
and its chunk goes back to the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from driver.remote import ClusterError, WorkerDied, get


def chunk_slices(n: int, size: int) -> list[slice]:
    """``range(n)`` cut into consecutive slices of ``size`` (the last one shorter)."""
    return [slice(lo, min(n, lo + size)) for lo in range(0, n, size)]


def spread(workers: list, incarnation: list[int], method: str, chunks: Sequence[tuple], what: str, timeout: float,
           recover: Callable[[dict[int, str], str], None]) -> tuple[list, list[int]]:
    """Run ``method(*chunk)`` for every chunk on the least-busy of ``workers`` (rollout worker actors); the results in
    chunk order and the index of the worker that computed each.

    ``workers`` and ``incarnation`` are the owner's lists (``System.rollouts`` and the count of replacements per
    worker), read again at every call: a worker that dies is replaced in them by ``recover({index: reason}, what)``
    (``System._recover``) and its chunk goes back to the queue; chunks already done by others are kept, so every
    chunk is computed and counted once."""
    import ray

    results: list = [None] * len(chunks)
    computed_by = [-1] * len(chunks)
    pending: dict = {}  # ref -> (worker, chunk, the worker's incarnation when the chunk was sent)
    todo = list(range(len(chunks)))
    idle = list(range(len(workers)))
    while todo or pending:
        while todo and idle:
            w, j = idle.pop(0), todo.pop(0)
            pending[getattr(workers[w], method).remote(*chunks[j])] = (w, j, incarnation[w])
        done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
        if not done:
            stuck = sorted({w for w, _, _ in pending.values()})
            raise ClusterError(f"rollout worker(s) {stuck} did not finish {what} within {timeout:g}s")
        ref = done[0]
        w, j, sent_to = pending.pop(ref)
        try:
            results[j] = get(ref, timeout, f"rollout worker {w} ({what})", [f"rollout worker {w}"])
            computed_by[j] = w
        except WorkerDied as e:
            todo.insert(0, j)  # its seed is fixed by the driver: the same result wherever it runs next
            # A recovery in between (a sync finds dead workers itself) may have replaced this one already.
            if sent_to == incarnation[w]:
                recover({w: e.reason}, what)
        idle.append(w)
    return results, computed_by
