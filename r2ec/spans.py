"""Phases with wall-clock start and end, for the step timeline (``r2ec timeline RUN_DIR``).

Each actor (a rollout worker, a learner rank, the driver) records what it did in a step as spans
``(actor, phase, start, end)``: seconds since the epoch (``time.time()``) on the actor's host, measured with the
monotonic clock the phase's duration metric already uses (``time.perf_counter``) and placed on the wall clock once,
when the recorder is made. The driver writes them to ``<output_dir>/timeline.jsonl``. On several hosts the rows are
as aligned as the hosts' clocks (NTP keeps them within milliseconds; phases last seconds).

Imports nothing but the standard library.
"""

from __future__ import annotations

import time

Span = tuple[str, str, float, float]  # (actor, phase, start, end): wall-clock seconds on the actor's host


class SpanRecorder:
    """The spans one actor records; ``take`` hands them over and starts a new list."""

    def __init__(self, actor: str):
        self.actor = actor
        self._offset = time.time() - time.perf_counter()  # perf_counter -> wall clock
        self._spans: list[Span] = []

    def mark(self, phase: str, start: float, end: float) -> None:
        """A phase that ran from ``start`` to ``end`` (``time.perf_counter()`` readings)."""
        self._spans.append((self.actor, phase, start + self._offset, end + self._offset))

    def take(self) -> list[Span]:
        out, self._spans = self._spans, []
        return out
