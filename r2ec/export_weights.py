"""The weights side of ``r2ec export``: a training checkpoint's DeepSpeed weights as one causal LM.

The fp32 master weights of ZeRO-1/2/3 at any world size are consolidated with DeepSpeed's own ``zero_to_fp32``
(ZeRO-0 has none: its saved module weights are used), renamed to the HF / peft model's parameter names, loaded
strictly into the model ``DualHeadModel.from_config`` builds, and LoRA is merged in float32. ``r2ec.export`` (whose
docstring describes the whole export and its limits) checks the pickles first and writes the result.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from r2ec.checkpoint import DS_TAG, LEARNER, CheckpointError

_WRAPPER_PREFIX = "model."  # the learner's DeepSpeed module registers the HF/peft model as ``model``


Log = Callable[[str], Any]


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
