"""Resuming the learner with another number of ranks: DeepSpeed's universal checkpoint.

A learner checkpoint (``<ckpt>/learner/``, see ``LearnerWorker.save_checkpoint``) holds DeepSpeed's sharded files
under ``ds/``: under ZeRO-1/2/3 every rank's file holds only its partition of the fp32 weights and AdamW states,
so it can be loaded as is only by the same number of ranks. ``to_universal`` converts it with DeepSpeed's own
converter (``deepspeed.checkpoint.ds_to_universal``, called in-process with one worker: no GPU, no process group)
into the universal layout, one folder per parameter with its full fp32 value, ``exp_avg``, ``exp_avg_sq`` and
step, from which any number of ranks can take their partitions. The converted folder has the same shape as a
learner folder (``<out>/ds/``), plus ``universal.json`` describing the source. Load it with
``LearnerWorker(..., load_universal=True).load_checkpoint(<ckpt>/learner, universal_dir=<out>)``.

What DeepSpeed 0.19.8 supports here (fp32 on CPU, gloo, torch AdamW as the client optimizer), checked with this
learner (tests/test_learner_checkpoint.py runs the cases marked *):
- ZeRO-2 (* 2 -> 1 ranks, full fine-tuning; also 1 -> 2 with LoRA) and ZeRO-1 (2 -> 1): converted and loaded; the
  next step matches the uninterrupted run to float rounding (~1e-8 here: the ranks' partial sums are added in
  another order, so it is not bitwise).
- ZeRO-3 (* 2 -> 1 and * 1 -> 2 with LoRA; 1 -> 2 full fine-tuning): the converter's stage-3 path, same result.
- The converter needs the ``universal_checkpoint_info`` entry that Megatron-style models attach to themselves; a
  plain data-parallel model has none, so it is converted with the converter's own ``inject_missing_state``
  (an empty info block: no tensor- or pipeline-parallel patterns, which is exactly this learner's case).
- LoRA (frozen base weights): the optimizer holds the adapters only, so only they travel through the universal
  files. DeepSpeed does not load the module state in universal mode, so the frozen base weights come from the base
  model the worker loads, which is what they were at save time (they never change). The converter also writes an
  ``fp32.pt`` for each frozen parameter from the module state; it is not used on load.
- ZeRO-0 (no ZeRO): nothing is partitioned; ``mp_rank_00_model_states.pt`` holds the whole module and optimizer
  and is loaded directly at any world size (checked 2 -> 1), so ``to_universal`` refuses it and
  ``needs_universal`` answers False.
- Not carried over to another world size: the per-rank RNG streams (their number changes; ``load_checkpoint``
  reseeds from (seed, step, rank) and reports ``rng_restored: False``). DeepSpeed's data sampler and LR scheduler
  are not used by the learner.
- Not checked here (no GPU): bf16 / fp16 mixed precision, whose optimizer files are named and laid out
  differently (``bf16_zero_pp_rank_*`` with ZeRO-1 + bf16); the converter has code paths for them, untested here.

Everything is read with ``r2ec.checkpoint.check_pickles`` first; DeepSpeed's converter itself unpickles with
``weights_only=False``. Imports deepspeed lazily.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
from pathlib import Path

from r2ec.checkpoint import DS_TAG, CheckpointError, check_pickles, pickle_files, write_json_atomic

UNIVERSAL_INFO = "universal.json"
_OPTIM = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")


def _ds_folder(learner_dir: Path) -> Path:
    folder = Path(learner_dir) / DS_TAG
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no DeepSpeed checkpoint folder")
    return folder


def zero_stage(learner_dir: Path) -> int:
    """0 (no ZeRO), 2 (ZeRO-1 or 2: partitioned optimizer, whole module file) or 3, from DeepSpeed's file names."""
    names = [p.name for p in _ds_folder(learner_dir).iterdir()]
    if any(_ZERO3_MODEL.match(n) for n in names):
        return 3
    return 2 if any(_OPTIM.match(n) for n in names) else 0


def _model_states_file(folder: Path) -> Path:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"{folder}: no DeepSpeed model-states file (mp_rank_00_model_states.pt)")


def saved_world_size(learner_dir: Path) -> int:
    """The data-parallel world size that wrote ``learner_dir/ds``: the ``dp_world_size`` DeepSpeed records in its
    model-states file (read with ``weights_only=True`` after ``check_pickles``), cross-checked against the number
    of per-rank optimizer files. Needs no process group."""
    import torch

    from r2ec.checkpoint import _safe_globals

    folder = _ds_folder(learner_dir)
    path = _model_states_file(folder)
    check_pickles([path])
    with torch.serialization.safe_globals(_safe_globals()):
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    world = state.get("dp_world_size") if isinstance(state, dict) else None
    if not isinstance(world, int) or world < 1:
        raise CheckpointError(f"{path}: no dp_world_size recorded")
    ranks = {int(m.group(1)) for p in folder.iterdir() if (m := _OPTIM.match(p.name))}
    if ranks and ranks != set(range(world)):
        raise CheckpointError(f"{folder}: dp_world_size is {world} but optimizer files exist for ranks "
                              f"{sorted(ranks)} (an incomplete or mixed checkpoint)")
    return world


def needs_universal(learner_dir: Path, world_size: int) -> bool:
    """Whether loading ``learner_dir`` with ``world_size`` ranks needs ``to_universal`` first: a ZeRO-1/2/3
    checkpoint written by another number of ranks. (A ZeRO-0 checkpoint loads at any world size.)"""
    return zero_stage(learner_dir) != 0 and saved_world_size(learner_dir) != world_size


def to_universal(learner_dir: Path, out_dir: Path) -> Path:
    """Convert the DeepSpeed checkpoint ``learner_dir/ds`` into DeepSpeed's universal format at ``out_dir``
    (``out_dir/ds/`` with ``zero/<param>/{fp32,exp_avg,exp_avg_sq,step}.pt`` and the model-states files, plus
    ``out_dir/universal.json``). Written into a temporary sibling folder and renamed into place; an existing
    ``out_dir`` is replaced. Returns ``out_dir``."""
    from deepspeed.checkpoint import ds_to_universal

    learner_dir, out_dir = Path(learner_dir), Path(out_dir)
    src = _ds_folder(learner_dir)
    stage = zero_stage(learner_dir)
    if stage == 0:
        raise CheckpointError(f"{src}: a ZeRO-0 checkpoint is not partitioned; load it directly at any world size "
                              "(no universal conversion needed)")
    check_pickles(pickle_files(src))  # the converter unpickles with weights_only=False
    world = saved_world_size(learner_dir)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    args = argparse.Namespace(input_folder=os.fspath(src), output_folder=os.fspath(tmp / DS_TAG),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the converter prints progress; keep it for the error message
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"{src}: DeepSpeed's universal conversion failed ({type(e).__name__}: {e}); "
                              f"converter output:\n{log.getvalue()[-4000:]}") from e
    # The converter points a `latest_universal` file (in the output's parent) at its folder; the project keeps
    # its own markers and always loads the tag explicitly.
    (tmp / "latest_universal").unlink(missing_ok=True)
    write_json_atomic(tmp / UNIVERSAL_INFO, {"source": os.fspath(learner_dir), "source_world_size": world,
                                            "zero_stage": stage, "tag": DS_TAG})
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.rename(tmp, out_dir)
    return out_dir
