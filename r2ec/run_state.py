"""What the driver saves next to the learner's DeepSpeed shards, and how a run is checked and restored from it.

The driver's part of a checkpoint (see r2ec/checkpoint.py for the folder layout):
- ``trainer_state.json``: the step, the sampler (epoch, position), the driver's RNG states (python, numpy, torch),
  the rollout seed rule, the item table's version (the step of its last full encoding), the best validation
  NDCG@10 so far, the learner world size, the config hash and the compatibility record;
- ``item_table.safetensors``: the table H_V (V, d) float32 as the driver holds it after the step, plus the row
  updates of the step (``updates_idx`` (U,), ``updates`` (U, d)), which the learner ranks apply at the next step;
- ``config.json``: the full config.

Rollouts need no state of their own: the sampling seed of step k is ``rollout_seed(run.seed, k)`` and the
rollout engines receive the learner's weights after loading, so the same steps are sampled again.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import torch

from r2ec.checkpoint import CONFIG, ITEM_TABLE, TRAINER_STATE, CheckpointError, Compat, catalogue_sha256
from r2ec.config import Config

FORMAT_VERSION = 1


def rollout_seed(run_seed: int, step: int) -> int:
    """The sampling seed of training step ``step`` (chunks derive their own from it, see driver.chunk_seed)."""
    return run_seed * 1_000_003 + step


def capture_rng() -> dict[str, Any]:
    """This process's RNG states, JSON-serialisable."""
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, state, gauss = random.getstate()
    return {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    import numpy as np

    version, py, gauss = state["python"]
    random.setstate((version, tuple(py), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))


def compat_of(cfg: Config, item_ids: list[str], hidden_size: int | None,
              train_split_sha256: str | None) -> Compat:
    lora = cfg.model.lora
    return Compat(base_model=cfg.model.name_or_path, catalogue_sha256=catalogue_sha256(item_ids),
                  num_items=len(item_ids),
                  lora=({"r": lora.r, "alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
                        if lora.enabled else None),
                  hidden_size=hidden_size or 0, train_split_sha256=train_split_sha256)


def write_driver_state(folder: Path, cfg: Config, state: dict[str, Any], table: torch.Tensor,
                       updates: tuple[torch.Tensor, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({"h_items": table.float().contiguous(), "updates_idx": updates[0].long().contiguous(),
               "updates": updates[1].float().contiguous()}, str(folder / ITEM_TABLE))
    (folder / CONFIG).write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    (folder / TRAINER_STATE).write_text(json.dumps({"format": FORMAT_VERSION, **state}, indent=2) + "\n")


def read_driver_state(folder: Path) -> tuple[dict[str, Any], torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(trainer state, item table, pending updates). The folder was verified against its manifest already."""
    from safetensors.torch import load_file

    path = folder / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from e
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format {state.get('format')!r}, this version reads {FORMAT_VERSION}")
    try:
        t = load_file(str(folder / ITEM_TABLE))
        return state, t["h_items"], (t["updates_idx"], t["updates"])
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"{folder / ITEM_TABLE}: unreadable ({e})") from e


def check_compatible(cfg: Config, state: dict[str, Any], item_ids: list[str], train_split_sha256: str,
                     folder: Path) -> list[str]:
    """Refuse a checkpoint this run cannot continue (CheckpointError saying what differs); return the names of
    other settings that differ from the checkpoint's config (allowed, e.g. lr, max_steps, worker counts)."""
    saved = Compat(**state["compat"])
    mine = compat_of(cfg, item_ids, saved.hidden_size, train_split_sha256)
    diff = mine.differences(saved)
    if diff:
        raise CheckpointError(f"{folder} cannot continue this run; it differs in: " + "; ".join(diff))
    old = json.loads((folder / CONFIG).read_text())
    new = cfg.model_dump(mode="json")
    return sorted(_changed(old, new))


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _changed(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]
