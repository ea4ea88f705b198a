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
cast to ``model.dtype`` and saved.

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

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
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

_WRAPPER_PREFIX = "model."  # the learner's DeepSpeed module registers the HF/peft model as ``model``


Log = Callable[[str], Any]


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


def consolidated_state_dict(folder: Path, zero_stage: int, log: Log = print) -> dict[str, torch.Tensor]:
    """The full model's weights from the DeepSpeed checkpoint under ``<ckpt>/learner/ds``, keyed by the HF / peft
    model's own parameter names (DeepSpeed's ``model.`` prefix removed). Call ``check_pickles`` first."""
    ds_dir = folder / LEARNER / DS_TAG
    if not ds_dir.is_dir():
        raise CheckpointError(f"{ds_dir}: missing; expected DeepSpeed's checkpoint (tag {DS_TAG!r}) there")
    if zero_stage == 0:
        state = _stage0_module_weights(ds_dir)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # zero_to_fp32 prints its progress on stdout; keep stdout for our own output (the CLI prints JSON there).
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                state = get_fp32_state_dict_from_zero_checkpoint(str(folder / LEARNER), tag=DS_TAG,
                                                                 exclude_frozen_parameters=False)
            except (FileNotFoundError, ValueError, KeyError) as e:
                raise CheckpointError(f"{ds_dir}: DeepSpeed could not consolidate the ZeRO-{zero_stage} checkpoint "
                                      f"({type(e).__name__}: {e})") from e
    out = {}
    for name, tensor in state.items():
        if not name.startswith(_WRAPPER_PREFIX):
            raise CheckpointError(f"{ds_dir}: unexpected parameter name {name!r} (expected the learner's "
                                  f"'{_WRAPPER_PREFIX}...' names)")
        out[name[len(_WRAPPER_PREFIX):]] = tensor
    log(f"export: {len(out)} tensors consolidated from {ds_dir} (ZeRO-{zero_stage})")
    return out


def _stage0_module_weights(ds_dir: Path) -> dict[str, torch.Tensor]:
    from r2ec.checkpoint import _safe_globals

    path = ds_dir / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a ZeRO-0 DeepSpeed checkpoint keeps the model weights there")
    # check_pickles has accepted this file under the same allow-list, so weights_only loading is enough here.
    with torch.serialization.safe_globals(_safe_globals()):
        blob = torch.load(path, map_location="cpu", weights_only=True)
    module = blob.get("module") if isinstance(blob, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: no 'module' state dict in it")
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def _tied(model) -> bool:
    return bool(getattr(model.config, "tie_word_embeddings", False))


def load_weights(model, state: dict[str, torch.Tensor], source: Path) -> None:
    """Load ``state`` into ``model`` strictly: every tensor of the model must come from the checkpoint (a tied
    ``lm_head.weight`` may be absent: it is the embedding) and nothing may be left over."""
    tied = _tied(model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"{source}: its weights do not fit the model built from model.name_or_path "
                              f"({str(e).splitlines()[-1].strip()})") from e
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: its weights do not match the model built from the checkpoint's config "
            f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]}); was it "
            "written with another base model or LoRA setting?")


def build_merged_model(cfg, state: dict[str, torch.Tensor], source: Path):
    """(causal LM with LoRA merged, in float32 on CPU, tokenizer). ``cfg`` is the run's full config."""
    from r2ec.model import DualHeadModel

    # float32 for the merge: W + B A * scaling in full precision, as the learner's weight broadcast computes it.
    dual = DualHeadModel.from_config(cfg.model.model_copy(update={"dtype": "float32"}), "cpu")
    model = dual.model
    load_weights(model, state, source)
    if cfg.model.lora.enabled:
        model = model.merge_and_unload()
    if _tied(model):
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        if emb.data_ptr() != head.data_ptr():
            raise CheckpointError(f"{source}: the model ties lm_head to the embeddings but the merged weights "
                                  "differ (LoRA on embed_tokens or lm_head is not supported by export)")
    return model.eval(), dual.tokenizer


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
def export_checkpoint(ckpt: str | Path, out: str | Path, reencode_items: bool | None = None, device: str = "auto",
                      overwrite: bool = False, log: Log = print) -> Path:
    """Export a checkpoint (see the module docstring). Returns the final folder. ``reencode_items`` None: re-encode
    unless the run's ``model.item_table`` is 'frozen'."""
    from safetensors.torch import load_file

    from r2ec.data.prepare import prepare_from_config
    from r2ec.model import DualHeadModel, resolve_device
    from r2ec.prompts import PromptBuilder, item_prompt_ids

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: already exists; choose another --out or pass --force to replace it")
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

    # The catalogue: the run's prepared data, checked against the checkpoint's table.
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
    expected_sha = _stored_catalogue_sha(trainer_state)
    if expected_sha is not None and expected_sha != sha:
        raise CheckpointError(f"{folder / TRAINER_STATE}: catalogue_sha256 {expected_sha[:12]}... but the "
                              f"run's data now prepares a catalogue with {sha[:12]}...; the data changed since "
                              "training")

    state = consolidated_state_dict(folder, cfg.learner.zero_stage, log)
    model, tokenizer = build_merged_model(cfg, state, folder / LEARNER / DS_TAG)
    del state
    hidden = int(model.config.hidden_size)
    if ckpt_table.shape[1] != hidden:
        raise CheckpointError(f"{ckpt_table_path}: h_items has width {ckpt_table.shape[1]}, the model's hidden "
                              f"size is {hidden}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.to(getattr(torch, cfg.model.dtype))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        _check_tokenizer(tmp, tokenizer, cfg.model.answer_marker)
        if reencode_items:
            # The exported folder itself, loaded as inference loads it: the table matches what it computes.
            dual = DualHeadModel.from_config(export_model_config(tmp, cfg.model.dtype, cfg.model.tau,
                                                                  cfg.model.answer_marker), resolve_device(device))
            builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
            prompts = item_prompt_ids(builder, dual.tokenizer, prepared.items)
            table = dual.encode_items(prompts, batch_size=cfg.eval.item_batch_size).cpu()
            del dual
            log(f"export: item table re-encoded with the exported weights ({len(prompts)} items)")
        else:
            table = ckpt_table.float()
            log(f"export: item table copied from the checkpoint (model.item_table {cfg.model.item_table!r})")
        (tmp / EXPORT_TABLE).parent.mkdir()
        save_item_table(tmp / EXPORT_TABLE, table, item_ids, titles)
        meta = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "dtype": cfg.model.dtype,
            "tau": cfg.model.tau,
            "answer_marker": cfg.model.answer_marker,
            "prompt": cfg.data.prompt.model_dump(mode="json"),
            "max_new_tokens": cfg.eval.max_new_tokens,
            "item_table": {"file": EXPORT_TABLE, "num_items": len(item_ids), "hidden_size": hidden,
                           "catalogue_sha256": sha, "source": "re-encoded" if reencode_items else "checkpoint"},
            "source": {"checkpoint": str(folder), "step": step, "config_hash": cfg.hash(),
                       "base_model": cfg.model.name_or_path,
                       "lora": cfg.model.lora.model_dump(mode="json") if cfg.model.lora.enabled else None,
                       "zero_stage": cfg.learner.zero_stage,
                       "learner_world_size": (trainer_state or {}).get("learner_world_size",
                                                                       cfg.cluster.learner.num_workers)},
        }
        _write_json(tmp / EXPORT_META, meta)
        _write_json(tmp / EXPORT_CONFIG, cfg.model_dump(mode="json"))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: {folder} (step {step}) -> {out} ({cfg.model.dtype}, {len(item_ids)} items)")
    return out


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


