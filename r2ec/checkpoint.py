"""Checkpoint folders: layout, atomic commit, integrity manifest, ``latest`` / ``best`` markers, safe loading.

A checkpoint of step k is the folder ``<run.output_dir>/checkpoints/step-<k:08d>/``::

    learner/ds/...                 DeepSpeed's sharded checkpoint, every learner rank's own files
                                   (``engine.save_checkpoint(<ckpt>/learner, tag="ds")``)
    learner/rng-rank<r>.json       each learner rank's RNG states (python, numpy, torch)
    trainer_state.json             step, sampler position and epoch, driver RNG states, rollout seed base, item
                                   table version, best validation score, learner world size, config hash
    item_table.safetensors         the item table H_V (V, d) float32 and the pending row updates
    config.json                    the run's full config
    manifest.json                  size and sha256 of every other file; written last, so its presence means the
                                   folder was complete when it was committed

How a checkpoint is committed (``stage`` -> write -> ``commit``): everything is written into
``checkpoints/.tmp-step-<k>/``; the manifest is written last; the folder is renamed into place (atomic on one
file system); then the ``latest`` marker (a one-line text file) is replaced atomically. A process killed at any
point leaves either the previous ``latest`` or the new one, never a half-written folder under a final name; stale
``.tmp-*`` folders are removed by the next ``stage``.

Loading: ``verify`` re-hashes every file against the manifest (a truncated or corrupted file is named), and
``check_pickles`` opens every torch-pickle file with ``torch.load(weights_only=True)`` under an explicit allow-list
before DeepSpeed (which loads with ``weights_only=False``) sees it, so a checkpoint never unpickles arbitrary
objects. Everything written by r2ec itself is JSON or safetensors. ``find_resume("auto")`` takes ``latest`` if it
verifies and otherwise falls back to the newest complete checkpoint, saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
ITEM_TABLE = "item_table.safetensors"
CONFIG = "config.json"
LEARNER = "learner"
DS_TAG = "ds"
_NAME = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, corrupted, unsafe or incompatible."""


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any, sort_keys: bool = True) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


# ------------------------------------------------------------------------------------------------ writing
def stage(output_dir: str | Path, step: int) -> Path:
    """A fresh temporary folder to write the checkpoint of ``step`` into; removes stale temporary folders."""
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / (_TMP_PREFIX + step_name(step))
    tmp.mkdir()
    return tmp


def write_manifest(folder: Path, step: int) -> dict:
    """Size and sha256 of every file under ``folder`` (the manifest itself excluded)."""
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
        with open(path, "rb") as f:  # durable before the rename that publishes them
            os.fsync(f.fileno())
    manifest = {"step": step, "files": files}
    write_json_atomic(folder / MANIFEST, manifest)
    return manifest


def commit(tmp: Path, step: int) -> Path:
    """Manifest, rename into place, then point ``latest`` at it. Returns the final folder."""
    write_manifest(tmp, step)
    final = tmp.parent / step_name(step)
    if final.exists():  # a checkpoint of the same step from an earlier attempt: the new one replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(tmp.parent)
    write_text_atomic(tmp.parent / LATEST, final.name + "\n")
    return final


def mark_best(output_dir: str | Path, step: int) -> None:
    write_text_atomic(checkpoint_root(output_dir) / BEST, step_name(step) + "\n")


def _marker(root: Path, name: str) -> str | None:
    path = root / name
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def prune(output_dir: str | Path, keep: int, log: Callable[[str], Any] = print) -> list[str]:
    """Keep the newest ``keep`` complete checkpoints plus the ones ``latest`` and ``best`` name; remove the rest."""
    root = checkpoint_root(output_dir)
    names = [p.name for p in list_checkpoints(root)]
    protected = set(names[-keep:]) | {_marker(root, LATEST), _marker(root, BEST)}
    removed = [n for n in names if n not in protected]
    for name in removed:
        shutil.rmtree(root / name, ignore_errors=True)
    if removed:
        log(f"checkpoint: removed {', '.join(removed)} (run.keep_checkpoints={keep}, best kept)")
    return removed


# ------------------------------------------------------------------------------------------------ reading
def list_checkpoints(root: Path) -> list[Path]:
    """Committed checkpoint folders (a manifest present), oldest first. Integrity is checked by ``verify``."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_step(folder: Path) -> int:
    m = _NAME.match(folder.name)
    if not m:
        raise CheckpointError(f"{folder}: not a checkpoint folder (expected a name like step-00000004)")
    return int(m.group(1))


def verify(folder: Path) -> dict:
    """Check every file against the manifest; raises CheckpointError naming the first bad file. Returns it."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST}, so the checkpoint was never completed")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from e
    for rel, meta in files.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {meta['bytes']} (truncated or replaced)")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path}: content does not match its sha256 in the manifest (corrupted)")
    return manifest


def find_resume(output_dir: str | Path, resume: str, log: Callable[[str], Any] = print) -> Path | None:
    """The checkpoint to resume from: ``none`` -> None; a path -> that folder, verified (errors are fatal);
    ``auto`` -> ``latest`` if it verifies, else the newest complete checkpoint that does (each rejected one is
    logged with its reason); None when the run has no checkpoint yet."""
    if resume == "none":
        return None
    if resume != "auto":
        folder = Path(resume)
        if (folder / LATEST).is_file() or folder.name == CHECKPOINTS:  # a checkpoints/ root: take its latest
            return find_resume(folder.parent if folder.name == CHECKPOINTS else folder, "auto", log)
        if not folder.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        verify(folder)
        return folder
    root = checkpoint_root(output_dir)
    candidates = list(reversed(list_checkpoints(root)))
    latest = _marker(root, LATEST)
    if latest and (root / latest) in candidates:
        candidates.remove(root / latest)
        candidates.insert(0, root / latest)
    for folder in candidates:
        try:
            verify(folder)
            return folder
        except CheckpointError as e:
            log(f"checkpoint: skipping {folder.name}: {e}")
    return None


# ------------------------------------------------------------------------------------------------ safe pickles
# Everything a DeepSpeed 0.19 checkpoint of this project pickles besides what torch's weights_only unpickler allows
# by itself (tensors, storages, torch.Size, OrderedDict, builtins). Found by listing the GLOBAL opcodes of real
# checkpoints of the learner (ZeRO 0/1/2/3, world size 1 and 2, fp32 on CPU, LoRA and full fine-tuning) and of their
# universal conversions (tests/test_learner_checkpoint.py checks the list against them). Each entry is a plain data
# holder with no __reduce__ / __setstate__ of its own: the unpickler only creates the object and fills __dict__
# (or calls an Enum with an int), so nothing here runs code on load.
SAFE_GLOBALS: list[str] = [
    # ZeRO-1/2/3 optimizer files (and the universal optimizer_state.pt): the static loss scaler of fp32 / bf16
    # training, attributes cur_scale and dynamic only.
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    # fp16 on GPU only (never written on CPU): its dynamic counterpart, numbers and a torch dtype as attributes.
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    # ZeRO-1/2/3 optimizer files: the ZeRO stage as an ``int`` Enum.
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    # ZeRO-1/2 optimizer files: a dataclass (numel, start) locating each parameter's slice in the flat partition.
    "deepspeed.utils.tensor_fragment.fragment_address",
]


def _safe_globals() -> list[Any]:
    import importlib

    out = []
    for dotted in SAFE_GLOBALS:
        module, _, name = dotted.rpartition(".")
        out.append(getattr(importlib.import_module(module), name))
    return out


def check_pickles(paths: Iterable[Path]) -> None:
    """Open every torch-pickle file with ``torch.load(weights_only=True)`` and the allow-list above (memory-mapped,
    so tensors are not read). Raises CheckpointError naming the file and the object it would have unpickled."""
    import torch

    allowed = _safe_globals()
    for path in paths:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - any failure means the file is not safe or not readable
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            # torch's first line is generic; the line naming the refused object is the useful one.
            named = [line for line in lines if "unsupported" in line.lower() or "GLOBAL" in line]
            reason = (named or lines or [type(e).__name__])[0]
            raise CheckpointError(f"{path}: refused to load with weights_only=True ({type(e).__name__}: "
                                  f"{reason})") from e


def pickle_files(folder: Path) -> list[Path]:
    """The torch-pickle files under ``folder`` (DeepSpeed writes ``*.pt``)."""
    return sorted(p for p in folder.rglob("*.pt") if p.is_file())


@dataclass(frozen=True)
class Compat:
    """What must match for a checkpoint to continue a run: base model, catalogue, LoRA shape, hidden size, the
    train split (the sampler's saved position indexes into it; a split built from other data or under another order
    rule would silently continue on other samples), and how the item table was built (a trained table continued as
    a frozen one, or the reverse, would be neither)."""

    base_model: str
    catalogue_sha256: str
    num_items: int
    lora: dict | None
    hidden_size: int
    train_split_sha256: str | None = None  # None: a checkpoint written before the train split was recorded
    # how the saved item table was built: "trained", "frozen" or "frozen-centred" (model.item_table, center_items);
    # a checkpoint written before the choice existed holds a trained table
    item_table: str = "trained"

    def differences(self, other: Compat) -> list[str]:
        out = []
        for field in ("base_model", "num_items", "catalogue_sha256", "lora", "hidden_size", "item_table"):
            a, b = getattr(self, field), getattr(other, field)
            if a != b:
                out.append(f"{field}: checkpoint {b!r}, this run {a!r}")
        if self.train_split_sha256 != other.train_split_sha256:
            saved = other.train_split_sha256[:12] if other.train_split_sha256 else "not recorded (an older version)"
            out.append(f"train split: checkpoint {saved}, this run {str(self.train_split_sha256)[:12]} (other data, "
                       "data settings or sample order rule: the saved sampler position would point at other samples)")
        return out


def catalogue_sha256(item_ids: Iterable[str]) -> str:
    h = hashlib.sha256()
    for item_id in item_ids:
        h.update(str(item_id).encode() + b"\n")
    return h.hexdigest()
