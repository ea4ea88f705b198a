"""What the driver saves next to the learner's DeepSpeed shards, and how a run is checked and restored from it.

The driver's part of a checkpoint (see r2ec/checkpoint.py for the folder layout):
- ``trainer_state.json``: the step and its ``phase`` (``warmup`` or ``recpo``) with the run's ``warmup_steps``, the
  sampler (epoch, position), the driver's RNG states (python, numpy, torch), the rollout seed rule, the item table's
  version (the step of its last full encoding), the best validation NDCG@10 so far, the learner world size, the
  config hash and the compatibility record;
- ``item_table.safetensors``: the table H_V (V, d) float32 as the driver holds it after the step, plus the row
  updates of the step (``updates_idx`` (U,), ``updates`` (U, d)), which the learner ranks apply at the next step;
- ``config.json``: the full config.

Rollouts need no state of their own: the sampling seed of step k is ``rollout_seed(run.seed, k)`` and the
rollout engines receive the learner's weights after loading, so the same steps are sampled again. The exception is
``rollout.async``: the rollout of step k + 1, sampled during step k, is saved with step k (``ahead.safetensors`` and
``ahead.json``, driver/pipeline.py), since the weights that sampled it are gone once step k is trained.

Steps are numbered globally: 1..W are warm-up steps (W = ``warmup.steps``), W+1.. RecPO steps. A checkpoint can be
continued with another ``warmup.steps`` only while no step it holds changes phase (``check_phase``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r2ec.checkpoint import CONFIG, ITEM_TABLE, TRAINER_STATE, CheckpointError, Compat, catalogue_sha256
from r2ec.config import Config
from r2ec.item_table import ItemTable
from r2ec.protocol import Rollout
from r2ec.rng import rng_state, set_rng_state

FORMAT_VERSION = 1


def phase_of(step: int, warmup_steps: int) -> str:
    """``warmup`` for global steps 1..warmup_steps, ``recpo`` after."""
    return "warmup" if step <= warmup_steps else "recpo"


def rollout_seed(run_seed: int, step: int) -> int:
    """The sampling seed of training step ``step`` (chunks derive their own from it, see driver.chunk_seed)."""
    return run_seed * 1_000_003 + step


def compat_of(cfg: Config, item_ids: list[str], hidden_size: int | None,
              train_split_sha256: str | None) -> Compat:
    lora = cfg.model.lora
    return Compat(base_model=cfg.model.name_or_path, catalogue_sha256=catalogue_sha256(item_ids),
                  num_items=len(item_ids),
                  lora=({"r": lora.r, "alpha": lora.alpha, "target_modules": sorted(lora.target_modules)}
                        if lora.enabled else None),
                  hidden_size=hidden_size or 0, train_split_sha256=train_split_sha256,
                  item_table=cfg.model.item_table + ("-centred" if cfg.model.center_items else ""))


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


def check_phase(cfg: Config, state: dict[str, Any], folder: Path) -> None:
    """Refuse a checkpoint whose finished steps would change phase under this run's ``warmup.steps``: another value
    is allowed only while the checkpoint is inside the warm-up both values share (checkpoints written before the
    warm-up existed count as ``warmup_steps`` 0)."""
    old, new, step = int(state.get("warmup_steps", 0)), cfg.warmup.steps, int(state["step"])
    if old != new and step > min(old, new):
        raise CheckpointError(
            f"{folder} cannot continue this run: warmup.steps is {new} here but {old} in the checkpoint, which is at "
            f"step {step}, past step {min(old, new)} where the warm-up of one of them ends, so finished steps would "
            f"change phase; set warmup.steps={old} or start over in another run.output_dir")


# ---------------------------------------------------------------------------------------------- rollout.async
AHEAD_TENSORS, AHEAD_JSON = "ahead.safetensors", "ahead.json"


@dataclass
class Ahead:
    """A step's inputs and its rollout, sampled one step early."""

    step: int  # the global step that trains on it
    prompts: list[list[int]]  # B user prompts
    earlier: torch.Tensor  # (B, H) long: every earlier item of each user, -1 padded
    target: torch.Tensor  # (B,) long
    rollout: Rollout  # B x G chains, sampled with the weights of version step - 2


def save_ahead(folder: Path, ahead: Ahead) -> None:
    """The waiting rollout into a checkpoint folder: tensors as safetensors, token ids and scalars as JSON."""
    from safetensors.torch import save_file

    r = ahead.rollout
    save_file({"logp": r.logp.float().contiguous(), "logp_mask": r.logp_mask.float().contiguous(),
               "appended_marker": r.appended_marker.to(torch.uint8).contiguous(), "h_T": r.h_T.float().contiguous(),
               "earlier": ahead.earlier.long().contiguous(), "target": ahead.target.long().contiguous()},
              str(folder / AHEAD_TENSORS))
    (folder / AHEAD_JSON).write_text(json.dumps({
        "step": ahead.step, "prompts": ahead.prompts, "chain_ids": r.chain_ids, "weight_version": r.weight_version,
        "timings": r.timings}) + "\n")


def load_ahead(folder: Path) -> Ahead | None:
    """The rollout a checkpoint holds for its next step (None when it holds none: a synchronous run's, or the last
    step's)."""
    from safetensors.torch import load_file

    if not (folder / AHEAD_JSON).is_file():
        return None
    meta = json.loads((folder / AHEAD_JSON).read_text())
    t = load_file(str(folder / AHEAD_TENSORS))
    rollout = Rollout(meta["chain_ids"], t["logp"], t["logp_mask"], t["appended_marker"].bool(), t["h_T"],
                      int(meta["weight_version"]), dict(meta["timings"]))
    B = len(meta["prompts"])
    if not B or len(rollout) % B or t["target"].shape[0] != B or t["earlier"].shape[0] != B:
        raise ValueError(f"{folder / AHEAD_JSON}: {B} prompts do not match the saved rollout's {len(rollout)} chains "
                         f"and {t['target'].shape[0]} targets")
    return Ahead(int(meta["step"]), meta["prompts"], t["earlier"], t["target"], rollout)


# ---------------------------------------------------------------------------------------------- the driver's run
@dataclass
class RunState:
    """The driver's side of a run between steps (the learner ranks hold the weights and optimiser)."""

    items: ItemTable  # the reference copy of the item table (r2ec/item_table.py says who holds the others)
    step: int = 0
    best: dict | None = None  # {"step", "metric", "value"} of the best validation so far
    ahead: Ahead | None = None  # rollout.async: the next step's inputs and rollout (driver.pipeline), checkpointed

    def write_back(self, results) -> None:
        """The rows the learner ranks re-encoded this step (StepResults): into the table, and pending for the next."""
        self.items.write_back(torch.cat([r.table_updates_idx for r in results]),
                              torch.cat([r.table_updates for r in results]))


@dataclass
class Resumed:
    folder: Path
    state: dict
    table: torch.Tensor
    updates: tuple[torch.Tensor, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def best_key(cfg: Config) -> str:
    return "ndcg@10" if 10 in cfg.eval.ks else f"ndcg@{max(cfg.eval.ks)}"


def find_checkpoint(cfg: Config, out_dir: Path, resume: str, item_ids: list[str], train_sha: str,
                    log) -> Resumed | None:
    from r2ec import checkpoint as ck

    folder = ck.find_resume(out_dir, resume, log)
    if folder is None:
        existing = ck.list_checkpoints(ck.checkpoint_root(out_dir))
        if resume == "none" and existing:
            raise ck.CheckpointError(
                f"{ck.checkpoint_root(out_dir)} already holds checkpoints ({existing[-1].name} newest): continue "
                f"with --resume auto, or give this run another run.output_dir")
        if resume == "auto" and existing:
            raise ck.CheckpointError(f"no complete checkpoint under {ck.checkpoint_root(out_dir)} verifies (see "
                                     f"above); fix or move them, or start over in another run.output_dir")
        return None
    state, table, updates = read_driver_state(folder)
    changed = check_compatible(cfg, state, item_ids, train_sha, folder)
    check_phase(cfg, state, folder)
    log(f"resume: {folder} (step {state['step']}) in the {phase_of(int(state['step']), cfg.warmup.steps)} phase; "
        f"settings changed since: {', '.join(changed) or 'none'}")
    return Resumed(folder, state, table, updates)


def restore(system, cfg: Config, resumed: Resumed, sampler, log) -> RunState:
    """Learner shards (re-sharded through DeepSpeed's universal format when the world size changed), sampler,
    RNG, item table. The rollout engines still hold the initial weights: the training loop broadcasts the loaded
    ones before it first uses them (driver.steps.sync_rollouts)."""
    import shutil

    from r2ec import checkpoint as ck

    learner_dir = resumed.folder / ck.LEARNER
    universal_dir = None
    if system.load_universal:
        from learner.universal import to_universal

        universal_dir = resumed.folder.parent / f".universal-{resumed.folder.name}"
        log(f"resume: learner world size {resumed.state['learner_world_size']} -> "
            f"{cfg.cluster.learner.num_workers}: converting to DeepSpeed's universal checkpoint")
        universal_dir = to_universal(learner_dir, universal_dir)
    system.load_checkpoint(str(learner_dir), str(universal_dir) if universal_dir else None)
    if universal_dir is not None:
        shutil.rmtree(universal_dir, ignore_errors=True)
    sampler.load_state_dict(resumed.state["sampler"])
    set_rng_state(resumed.state["rng"])
    s = resumed.state
    return RunState(items=ItemTable(resumed.table.clone(), s["item_table_version"], resumed.updates),
                    step=resumed.step, best=s["best"], ahead=load_ahead(resumed.folder))


def save(system, cfg: Config, run: RunState, sampler, best: bool, compat: Compat, log) -> Path:
    from r2ec import checkpoint as ck

    t0 = time.perf_counter()
    tmp = ck.stage(cfg.run.output_dir, run.step)
    system.save_checkpoint(str(tmp / ck.LEARNER))
    state = {
        "step": run.step, "phase": phase_of(run.step, cfg.warmup.steps), "warmup_steps": cfg.warmup.steps,
        "sampler": sampler.state_dict(), "rng": rng_state(),
        "rollout_seed": {"rule": "run.seed * 1000003 + step", "next": rollout_seed(cfg.run.seed, run.step + 1)},
        "item_table_version": run.items.version, "best": run.best,
        "learner_world_size": cfg.cluster.learner.num_workers, "config_hash": cfg.hash(),
        "compat": {**compat.__dict__, "hidden_size": run.items.width},
    }
    write_driver_state(tmp, cfg, state, run.items.rows, run.items.pending)
    if run.ahead is not None:  # rollout.async: the rollout sampled for the next step (driver.pipeline)
        save_ahead(tmp, run.ahead)
    final = ck.commit(tmp, run.step)
    if best:
        ck.mark_best(cfg.run.output_dir, run.step)
    ck.prune(cfg.run.output_dir, cfg.run.keep_checkpoints, log)
    log(f"checkpoint: {final} ({time.perf_counter() - t0:.1f}s)")
    return final
