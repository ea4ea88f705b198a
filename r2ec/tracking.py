"""Per-step metrics to ``metrics.jsonl`` and TensorBoard, one record per optimiser step or evaluation."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsWriter:
    def __init__(self, out_dir: Path, tensorboard: bool = True):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tensorboard"))

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


def reduce_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Combine learner ranks' metrics: losses are parts of one globally normalised sum (added up), alarms take
    the worst rank, everything else is a mean over ranks (each rank holds the same number of chains)."""
    out: dict[str, float] = {}
    for key in per_rank[0]:
        vals = [m[key] for m in per_rank]
        if key.startswith("loss"):
            out[key] = sum(vals)
        elif key.startswith("alarm") or key.startswith("time"):
            out[key] = max(vals)
        else:
            out[key] = sum(vals) / len(vals)
    return out
