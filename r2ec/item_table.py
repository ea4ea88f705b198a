"""The item table H_V: one row per catalogue item, the final hidden state of the item's prompt (R2ec's item side).

Who holds it. The driver holds the reference copy (``driver.run_state.RunState.items``): it validates against it,
checkpoints it, and hands it to the learner ranks. Every learner rank holds its own copy on its device
(``LearnerWorker.items``): rewards and the item term's candidates are computed against it. The rollout engines hold
none: they only encode rows when the driver asks for a full re-encoding.

How it changes.
- A full encoding (``refresh``): every row re-encoded with the current weights, by the rollout engines, at the start
  of a run, every ``recpo.refresh_every`` steps and before every validation (model.item_table ``trained``, the
  paper's; a ``frozen`` table is encoded once and never changes). Every copy is replaced.
- Row updates (``write_back`` / ``apply``): the item term encodes each relabelled chain's target with gradient, so
  in step k each learner rank writes fresh rows for its own targets into its own copy.

Why row updates reach the learner ranks one step late. Within step k a rank sees only the rows it re-encoded
itself; the driver collects every rank's rows (``StepResult.table_updates``), writes them into its copy at once and
keeps them ``pending``; they travel to every rank in step k + 1's ``TrainShard`` and are applied before that step's
rewards. So the driver's copy is always current, and between two steps every copy agrees again. A full encoding
clears what is pending (the new rows contain it).

Imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def _no_rows(width: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(0, dtype=torch.long), torch.zeros(0, width, device=device)


@dataclass
class ItemTable:
    rows: torch.Tensor  # (V, d) float32
    version: int = 0  # the step whose weights last encoded every row (0: the initial weights)
    pending: tuple[torch.Tensor, torch.Tensor] = field(default=None)  # type: ignore[assignment]
    # pending: (U,) long row indices and (U, d) float32 rows re-encoded in the last step, not yet on every rank

    def __post_init__(self) -> None:
        if self.rows.dim() != 2:
            raise ValueError(f"an item table is (V, d), got {tuple(self.rows.shape)}")
        if self.pending is None:
            self.pending = _no_rows(self.rows.shape[1])

    @property
    def width(self) -> int:
        return int(self.rows.shape[1])

    def refresh(self, rows: torch.Tensor, step: int) -> None:
        """Every row re-encoded with the weights after ``step``; nothing is pending any more."""
        if tuple(rows.shape) != tuple(self.rows.shape):
            raise ValueError(f"a refresh must keep the table's shape {tuple(self.rows.shape)}, got {tuple(rows.shape)}")
        self.rows, self.version, self.pending = rows, step, _no_rows(self.width)

    def write_back(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """The driver's side: the rows the learner ranks re-encoded this step go into the table now and stay pending
        until every rank has applied them (next step's shards)."""
        self.apply(idx, rows)
        self.pending = (idx, rows)

    def apply(self, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """Overwrite rows ``idx`` (U,) with ``rows`` (U, d), on this copy's device."""
        if idx.numel():
            self.rows[idx.to(self.rows.device)] = rows.to(self.rows.device, self.rows.dtype)
