"""Reading what ``r2ec export`` wrote: the folder's layout, its metadata, the item table and the model, for
evaluation (``r2ec eval --checkpoint``) and inference (``r2ec recommend``). The writer is ``r2ec.export``; both use
the names below, so the layout is defined once.

Imports no ray, vllm or deepspeed (transformers and peft through ``r2ec.model``, safetensors for the table).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r2ec.checkpoint import CHECKPOINTS, MANIFEST, catalogue_sha256

EXPORT_META = "r2ec.json"
EXPORT_TABLE = "rec_head/item_table.safetensors"
EXPORT_CONFIG = "r2ec_config.json"
EXPORT_FORMAT = "r2ec-export"
EXPORT_VERSION = 1

class ExportError(RuntimeError):
    """An exported model folder that cannot be used, or an export that cannot be written."""


def load_item_table(path: Path) -> tuple[torch.Tensor, list[str], list[str]]:
    """(h_items (V, d) float32, item_ids, titles) from an exported ``item_table.safetensors``."""
    from safetensors import safe_open

    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            h_items = f.get_tensor("h_items")
        item_ids, titles = json.loads(meta["item_ids"]), json.loads(meta["titles"])
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a usable item table
        raise ExportError(f"{path}: not an exported item table (expected tensor 'h_items' and metadata 'item_ids', "
                          f"'titles'; {type(e).__name__}: {e})") from e
    if h_items.dim() != 2 or not (h_items.shape[0] == len(item_ids) == len(titles)):
        raise ExportError(f"{path}: h_items {tuple(h_items.shape)} does not match {len(item_ids)} item ids and "
                          f"{len(titles)} titles")
    if meta.get("catalogue_sha256") not in (None, catalogue_sha256(item_ids)):
        raise ExportError(f"{path}: the item ids do not match the catalogue_sha256 in its metadata")
    return h_items.float(), item_ids, titles


def read_json(path: Path, required: bool = True) -> dict | None:
    if not path.is_file():
        if required:
            raise ExportError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e


def export_model_config(path: str | Path, dtype: str, tau: float, marker: str):
    from r2ec.config import ModelConfig

    return ModelConfig(name_or_path=str(path), dtype=dtype, tau=tau, answer_marker=marker)


# ------------------------------------------------------------------------------------------------ loading an export
@dataclass
class ExportedModel:
    """An exported folder loaded for inference: the dual-head model, its prompts and the item table."""

    path: Path
    model: Any  # DualHeadModel
    builder: Any  # PromptBuilder
    item_ids: list[str]
    titles: list[str]
    h_items: torch.Tensor  # (V, d) float32 on the model's device
    meta: dict


def read_export_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ExportError(f"{path}: no such exported model folder")
    if not (path / EXPORT_META).is_file() and ((path / MANIFEST).is_file() or (path / CHECKPOINTS).is_dir()):
        raise ExportError(f"{path}: a training checkpoint or run folder, not an exported model; export it first "
                          f"with `r2ec export --checkpoint {path} --out DIR`")
    meta = read_json(path / EXPORT_META)
    if meta.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{path / EXPORT_META}: not an r2ec export (format {meta.get('format')!r}, expected "
                          f"{EXPORT_FORMAT!r}); create one with `r2ec export`")
    if meta.get("format_version") != EXPORT_VERSION:
        raise ExportError(f"{path / EXPORT_META}: format_version {meta.get('format_version')!r}, this r2ec reads "
                          f"version {EXPORT_VERSION}")
    for key in ("dtype", "tau", "answer_marker", "prompt", "item_table"):
        if key not in meta:
            raise ExportError(f"{path / EXPORT_META}: missing field {key!r}")
    return meta


def load_export(path: str | Path, device: str = "auto") -> ExportedModel:
    """Load an exported folder: ``DualHeadModel`` on it, the prompt builder of its run, the item table and
    catalogue (checked against ``r2ec.json``)."""
    from r2ec.config import PromptConfig
    from r2ec.model import DualHeadModel, resolve_device
    from r2ec.prompts import PromptBuilder

    path = Path(path)
    meta = read_export_meta(path)
    h_items, item_ids, titles = load_item_table(path / EXPORT_TABLE)
    table_meta = meta["item_table"]
    if catalogue_sha256(item_ids) != table_meta.get("catalogue_sha256") or len(item_ids) != table_meta.get(
            "num_items"):
        raise ExportError(f"{path / EXPORT_TABLE}: its catalogue ({len(item_ids)} items) is not the one "
                          f"{path / EXPORT_META} describes ({table_meta.get('num_items')} items)")
    model = DualHeadModel.from_config(export_model_config(path, meta["dtype"], meta["tau"], meta["answer_marker"]),
                                      resolve_device(device))
    hidden = int(model.model.config.hidden_size)
    if h_items.shape[1] != hidden:
        raise ExportError(f"{path / EXPORT_TABLE}: h_items has width {h_items.shape[1]}, the model's hidden size is "
                          f"{hidden}")
    builder = PromptBuilder.from_config(PromptConfig.model_validate(meta["prompt"]), meta["answer_marker"])
    return ExportedModel(path, model, builder, item_ids, titles, h_items.to(model.device), meta)


def export_run_config(path: str | Path) -> dict:
    """The training run's full config stored with an export (a plain dict, validated by the caller)."""
    return read_json(Path(path) / EXPORT_CONFIG)


def catalogue_differences(expected_ids: list[str], got_ids: list[str], limit: int = 5) -> str:
    """What differs between two catalogues, in words (sizes, ids only on one side, first reordering)."""
    a, b = set(expected_ids), set(got_ids)
    parts = [f"the export has {len(expected_ids)} items, the data {len(got_ids)}"]
    if b - a:
        parts.append(f"only in the data: {sorted(b - a)[:limit]}")
    if a - b:
        parts.append(f"only in the export: {sorted(a - b)[:limit]}")
    if a == b:
        first = next((i for i, (x, y) in enumerate(zip(expected_ids, got_ids, strict=True)) if x != y), None)
        if first is not None:
            parts.append(f"same ids in another order (first difference at row {first})")
    return "; ".join(parts)
