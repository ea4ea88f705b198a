"""Export a training checkpoint as a plain Hugging Face model folder plus what R2ec inference needs.

``r2ec export --checkpoint PATH --out DIR`` turns ``<output_dir>/checkpoints/step-XXXXXXXX/`` (or a run's
output_dir / its ``checkpoints/`` folder: the newest complete checkpoint is taken) into::

    DIR/config.json, model.safetensors (or shards + index), generation_config.json
                                      the causal LM, LoRA merged, in ``model.dtype``: loads with plain
                                      ``AutoModelForCausalLM.from_pretrained(DIR)`` and ``vllm.LLM(model=DIR)``
    DIR/tokenizer files               the base model's tokenizer and chat template, unchanged (the answer marker is
                                      plain text to the tokenizer, as in training: no token is added)
    DIR/rec_head/item_table.safetensors
                                      tensor ``h_items`` (V, d) float32, rows in catalogue order (item_id sorted);
                                      the catalogue itself in the header metadata: ``item_ids`` and ``titles`` are
                                      JSON lists of strings, ``catalogue_sha256`` as ``r2ec.checkpoint`` computes it.
                                      In a subfolder because vLLM loads every ``*.safetensors`` file at the top of
                                      an unsharded model folder as model weights (and refuses unknown tensors)
    DIR/r2ec.json                     what inference needs: tau, answer marker, dtype, the ``data.prompt`` section,
                                      default ``max_new_tokens``, item-table facts and the source checkpoint (step,
                                      config hash, base model, LoRA shape, ZeRO stage)
    DIR/r2ec_config.json              the run's full config (``r2ec eval --checkpoint DIR`` uses its data and eval
                                      sections when no ``--config`` is given)

How the weights are rebuilt: the checkpoint is verified against its manifest, every DeepSpeed pickle is opened with
``torch.load(weights_only=True)`` under the allow-list (``r2ec.checkpoint.check_pickles``) before DeepSpeed loads
it, then DeepSpeed's own ``zero_to_fp32`` consolidates the fp32 master weights of ZeRO-1/2/3 at any world size
(frozen parameters included). The model is rebuilt exactly as ``DualHeadModel.from_config`` builds it (LoRA via
peft), the consolidated state dict is loaded strictly (DeepSpeed's names, minus the ``model.`` prefix of the
learner's wrapper module), LoRA is merged with peft's ``merge_and_unload`` in float32, and only then is the model
cast to ``model.dtype`` and saved. The consolidation and the merge live in ``r2ec.export_weights``.

The item table is re-encoded by default with the exported folder itself, loaded the way inference loads it (as
training re-encodes the table before its final test evaluation); ``--keep-table`` copies the checkpoint's table,
and a run with ``model.item_table: frozen`` always has its table copied (it was never re-encoded in training).
Either way the catalogue comes from the run's prepared data (``data`` section of the checkpoint's config), whose
size must match the checkpoint's table. Everything is written into a temporary folder next to DIR and renamed into
place at the end; DIR must not exist (``--force`` replaces it).

Deviations / limits:
- ZeRO stage 0 has no separate fp32 master copy that ``zero_to_fp32`` understands: the module weights saved in
  ``mp_rank_00_model_states.pt`` are used (float32 on CPU; with bf16/fp16 training on GPU they are the bf16/fp16
  weights the rollout engines received, not fp32 masters).
- The skeleton is built by loading the base model from ``model.name_or_path`` (then every tensor is overwritten), so
  the base model must be available where the export runs, and memory peaks at about twice the fp32 model.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r2ec.bundle import (
    EXPORT_CONFIG,
    EXPORT_FORMAT,
    EXPORT_META,
    EXPORT_TABLE,
    EXPORT_VERSION,
    ExportError,
    export_model_config,
    read_json,
)
from r2ec.checkpoint import (
    CHECKPOINTS,
    CONFIG,
    DS_TAG,
    ITEM_TABLE,
    LATEST,
    LEARNER,
    MANIFEST,
    TRAINER_STATE,
    CheckpointError,
    catalogue_sha256,
    check_pickles,
    checkpoint_step,
    find_resume,
    pickle_files,
    verify,
)
from r2ec.export_weights import Log, build_merged_model, consolidated_state_dict


# ------------------------------------------------------------------------------------------------ checkpoint side
def resolve_checkpoint(path: str | Path, log: Log = print) -> tuple[Path, bool]:
    """A checkpoint folder, or the newest complete checkpoint of a run's output_dir / ``checkpoints/`` folder.
    Returns (folder, already verified)."""
    path = Path(path)
    if (path / MANIFEST).is_file() or path.name.startswith("step-"):
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint folder")
        return path, False
    if path.name == CHECKPOINTS or (path / LATEST).is_file():
        output_dir = path.parent
    elif (path / CHECKPOINTS).is_dir():
        output_dir = path
    else:
        raise CheckpointError(f"{path}: neither a checkpoint folder (step-XXXXXXXX/ with {MANIFEST}) nor a run's "
                              f"output_dir or {CHECKPOINTS}/ folder")
    folder = find_resume(output_dir, "auto", log)
    if folder is None:
        raise CheckpointError(f"{output_dir / CHECKPOINTS}: no complete checkpoint to export")
    return folder, True


def load_checkpoint_config(folder: Path):
    """The run's full config from ``<ckpt>/config.json`` (ConfigError naming the file when invalid)."""
    from r2ec.config import load_config

    if not (folder / CONFIG).is_file():
        raise CheckpointError(f"{folder / CONFIG}: missing; a checkpoint carries the run's full config")
    return load_config(folder / CONFIG)


def _check_tokenizer(saved: Path, tokenizer, marker: str) -> None:
    """The saved tokenizer must tokenise the answer marker and render prompts exactly as the original."""
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(saved)
    if again.encode(marker, add_special_tokens=False) != tokenizer.encode(marker, add_special_tokens=False):
        raise ExportError(f"{saved}: the saved tokenizer splits the answer marker {marker!r} differently")
    probe = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": marker}]
    kwargs = dict(continue_final_message=True, tokenize=False)
    if again.apply_chat_template(probe, **kwargs) != tokenizer.apply_chat_template(probe, **kwargs):
        raise ExportError(f"{saved}: the saved chat template renders prompts differently from the original")


# ------------------------------------------------------------------------------------------------ item table file
def save_item_table(path: Path, h_items: torch.Tensor, item_ids: list[str], titles: list[str]) -> str:
    """``h_items`` (V, d) float32 plus the catalogue in the header metadata. Returns the catalogue sha256."""
    from safetensors.torch import save_file

    if h_items.dim() != 2 or h_items.shape[0] != len(item_ids) or len(item_ids) != len(titles):
        raise ExportError(f"item table {tuple(h_items.shape)} does not describe {len(item_ids)} item ids and "
                          f"{len(titles)} titles")
    sha = catalogue_sha256(item_ids)
    meta = {"format": "r2ec-item-table-1", "item_ids": json.dumps([str(i) for i in item_ids]),
            "titles": json.dumps([str(t) for t in titles]), "catalogue_sha256": sha}
    save_file({"h_items": h_items.detach().to("cpu", torch.float32).contiguous()}, str(path), metadata=meta)
    return sha


# ------------------------------------------------------------------------------------------------ export
@dataclass
class _Source:
    """The checkpoint being exported (verified, its pickles checked) and what it says about the run."""

    folder: Path
    step: int
    cfg: Any  # the run's full r2ec.config.Config
    trainer_state: dict | None
    reencode_items: bool


@dataclass
class _Catalogue:
    """The run's prepared catalogue, checked against the checkpoint's item table."""

    items: Any  # the prepared items (datasets.Dataset), for re-encoding
    item_ids: list[str]
    titles: list[str]
    table: torch.Tensor  # the checkpoint's h_items (V, d)
    table_path: Path
    sha: str


def export_checkpoint(ckpt: str | Path, out: str | Path, reencode_items: bool | None = None, device: str = "auto",
                      overwrite: bool = False, log: Log = print) -> Path:
    """Export a checkpoint (see the module docstring). Returns the final folder. ``reencode_items`` None: re-encode
    unless the run's ``model.item_table`` is 'frozen'."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; choose another --out or pass --force to replace it")
    src = _open_source(ckpt, reencode_items, log)
    cfg = src.cfg
    catalogue = _read_catalogue(src, log)
    model, tokenizer = _merged_model(src, log)
    hidden = int(model.config.hidden_size)
    if catalogue.table.shape[1] != hidden:
        raise CheckpointError(f"{catalogue.table_path}: h_items has width {catalogue.table.shape[1]}, the model's "
                              f"hidden size is {hidden}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _save_model(tmp, model, tokenizer, cfg.model.dtype)
        del model  # the only reference left: free it before a re-encoding loads the exported copy
        _check_tokenizer(tmp, tokenizer, cfg.model.answer_marker)
        table = _export_table(tmp, src, catalogue, device, log)
        (tmp / EXPORT_TABLE).parent.mkdir()
        save_item_table(tmp / EXPORT_TABLE, table, catalogue.item_ids, catalogue.titles)
        _write_json(tmp / EXPORT_META, _export_meta(src, catalogue, hidden))
        _write_json(tmp / EXPORT_CONFIG, cfg.model_dump(mode="json"))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: {src.folder} (step {src.step}) -> {out} ({cfg.model.dtype}, {len(catalogue.item_ids)} items)")
    return out


def _open_source(ckpt: str | Path, reencode_items: bool | None, log: Log) -> _Source:
    """Find and verify the checkpoint, read its config and trainer state, check its pickles, and settle
    ``reencode_items`` (None: re-encode unless the run's table is frozen)."""
    folder, verified = resolve_checkpoint(ckpt, log)
    if not verified:
        verify(folder)
    step = checkpoint_step(folder)
    cfg = load_checkpoint_config(folder)
    check_pickles(pickle_files(folder / LEARNER))
    trainer_state = read_json(folder / TRAINER_STATE, required=False)
    if reencode_items is None:
        reencode_items = cfg.model.item_table == "trained"
    elif reencode_items and cfg.model.item_table == "frozen":
        raise ExportError(f"{folder}: the run kept its item table frozen (model.item_table 'frozen'); re-encoding it "
                          "with the trained weights would score users against rows they were never trained on")
    return _Source(folder, step, cfg, trainer_state, reencode_items)


def _read_catalogue(src: _Source, log: Log) -> _Catalogue:
    """The catalogue: the run's prepared data, checked against the checkpoint's table (size and, when the trainer
    state records it, the catalogue hash)."""
    from safetensors.torch import load_file

    from r2ec.data.prepare import prepare_from_config

    folder, cfg = src.folder, src.cfg
    prepared = prepare_from_config(cfg.data, log=log)
    item_ids, titles = prepared.item_ids(), list(prepared.items["title"])
    ckpt_table_path = folder / ITEM_TABLE
    if not ckpt_table_path.is_file():
        raise CheckpointError(f"{ckpt_table_path}: missing")
    try:
        ckpt_table = load_file(str(ckpt_table_path))["h_items"]
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ckpt_table_path}: no readable tensor 'h_items' ({type(e).__name__}: {e})") from e
    if ckpt_table.dim() != 2 or ckpt_table.shape[0] != len(item_ids):
        raise CheckpointError(f"{ckpt_table_path}: h_items is {tuple(ckpt_table.shape)}, but the run's data "
                              f"({cfg.data.source}) prepares {len(item_ids)} items; the data changed since training")
    sha = catalogue_sha256(item_ids)
    expected_sha = _stored_catalogue_sha(src.trainer_state)
    if expected_sha is not None and expected_sha != sha:
        raise CheckpointError(f"{folder / TRAINER_STATE}: catalogue_sha256 {expected_sha[:12]}... but the "
                              f"run's data now prepares a catalogue with {sha[:12]}...; the data changed since "
                              "training")
    return _Catalogue(prepared.items, item_ids, titles, ckpt_table, ckpt_table_path, sha)


def _merged_model(src: _Source, log: Log):
    """(causal LM with LoRA merged, float32 on CPU, tokenizer) from the checkpoint's consolidated weights; the
    consolidated state dict is dropped on return, before anything else is loaded."""
    state = consolidated_state_dict(src.folder, src.cfg.learner.zero_stage, log)
    return build_merged_model(src.cfg, state, src.folder / LEARNER / DS_TAG)


def _save_model(tmp: Path, model, tokenizer, dtype: str) -> None:
    """The causal LM cast to ``model.dtype`` (only now, after the float32 merge) and the tokenizer, into ``tmp``."""
    model.to(getattr(torch, dtype))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def _export_table(tmp: Path, src: _Source, catalogue: _Catalogue, device: str, log: Log) -> torch.Tensor:
    """The item table to ship: re-encoded with the exported folder ``tmp``, or the checkpoint's own."""
    cfg = src.cfg
    if not src.reencode_items:
        log(f"export: item table copied from the checkpoint (model.item_table {cfg.model.item_table!r})")
        return catalogue.table.float()
    from r2ec.model import DualHeadModel, resolve_device
    from r2ec.prompts import PromptBuilder, item_prompt_ids

    # The exported folder itself, loaded as inference loads it: the table matches what it computes.
    dual = DualHeadModel.from_config(export_model_config(tmp, cfg.model.dtype, cfg.model.tau,
                                                          cfg.model.answer_marker), resolve_device(device))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    prompts = item_prompt_ids(builder, dual.tokenizer, catalogue.items)
    table = dual.encode_items(prompts, batch_size=cfg.eval.item_batch_size).cpu()
    del dual
    log(f"export: item table re-encoded with the exported weights ({len(prompts)} items)")
    return table


def _export_meta(src: _Source, catalogue: _Catalogue, hidden: int) -> dict[str, Any]:
    """``r2ec.json``: what inference needs, the item table's facts and where the export came from."""
    cfg = src.cfg
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
        "dtype": cfg.model.dtype,
        "tau": cfg.model.tau,
        "answer_marker": cfg.model.answer_marker,
        "prompt": cfg.data.prompt.model_dump(mode="json"),
        "max_new_tokens": cfg.eval.max_new_tokens,
        "item_table": {"file": EXPORT_TABLE, "num_items": len(catalogue.item_ids), "hidden_size": hidden,
                       "catalogue_sha256": catalogue.sha,
                       "source": "re-encoded" if src.reencode_items else "checkpoint"},
        "source": {"checkpoint": str(src.folder), "step": src.step, "config_hash": cfg.hash(),
                   "base_model": cfg.model.name_or_path,
                   "lora": cfg.model.lora.model_dump(mode="json") if cfg.model.lora.enabled else None,
                   "zero_stage": cfg.learner.zero_stage,
                   "learner_world_size": (src.trainer_state or {}).get("learner_world_size",
                                                                       cfg.cluster.learner.num_workers)},
    }


def _stored_catalogue_sha(trainer_state: dict | None) -> str | None:
    if not trainer_state:
        return None
    for holder in (trainer_state, trainer_state.get("compat") or {}):
        if isinstance(holder, dict) and isinstance(holder.get("catalogue_sha256"), str):
            return holder["catalogue_sha256"]
    return None


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an existing ``out`` (overwrite) is moved aside first and removed."""
    old = None
    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


