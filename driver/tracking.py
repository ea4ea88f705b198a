"""Per-step metrics to ``metrics.jsonl`` and TensorBoard, one record per optimiser step or evaluation.

A resumed run passes ``resume_step``: records of later steps (written by the attempt that was interrupted after
its last checkpoint) are removed from ``metrics.jsonl`` and purged from TensorBoard, so every step appears once.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from r2ec.checkpoint import write_text_atomic


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool = True, resume_step: int | None = None):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self.dropped = 0
        if resume_step is not None:
            self.dropped = _truncate_after(self.path, resume_step)
        elif self.path.exists():  # a fresh run in a used folder: keep the old log aside, never mix two runs
            self.path.rename(self.path.with_suffix(f".jsonl.{int(self.path.stat().st_mtime)}"))
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, float | int | str]) -> None:
        record = {"step": step, **metrics}
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _truncate_after(path: Path, step: int) -> int:
    """Keep the records of steps <= ``step`` (an unreadable last line, cut by a crash, goes too). Atomic."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            keep = json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped


def reduce_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Combine learner ranks' metrics by name: losses (``loss*``, parts of one globally normalised sum) and counts
    (``num_*``, e.g. the step's sampled tokens) are added up, alarms and times (``alarm*``, ``time*``) take the worst
    rank, everything else is a mean over ranks (each rank holds the same number of chains)."""
    out: dict[str, float] = {}
    for key in per_rank[0]:
        vals = [m[key] for m in per_rank]
        if key.startswith("loss") or key.startswith("num_"):
            out[key] = sum(vals)
        elif key.startswith("alarm") or key.startswith("time"):
            out[key] = max(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out
