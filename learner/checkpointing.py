"""A learner rank's checkpoint: DeepSpeed's sharded state plus this rank's RNG states (``LearnerWorker`` calls these).

Layout inside ``<checkpoint>/learner/`` (``r2ec.checkpoint`` owns the folder around it): ``ds/`` is DeepSpeed's
sharded checkpoint of every rank (module, ZeRO partitions of the fp32 weights and AdamW states, step counters),
without DeepSpeed's ``latest`` file and without client state; ``rng-rank<r>.json`` is rank r's RNG states
(``r2ec.rng``). Both functions are collective: every rank calls them at once.

Imports no vllm and no ray; DeepSpeed is used through the engine handed in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from r2ec.rng import rng_state, seed_all, set_rng_state


def save_rank(engine, rank: int, world_size: int, directory: str) -> None:
    """Write this rank's part of the learner checkpoint into ``directory`` (collective: every rank at once).

    ``directory/ds/``: DeepSpeed's sharded checkpoint (module, ZeRO partitions of the fp32 weights and AdamW
    states, step counters), without DeepSpeed's ``latest`` file and without client state (the driver keeps
    the project's state itself). ``directory/rng-rank<r>.json``: this rank's RNG states. Returns once every
    rank has finished writing."""
    from r2ec.checkpoint import DS_TAG, write_json_atomic

    path = os.fspath(directory)
    os.makedirs(path, exist_ok=True)
    engine.save_checkpoint(path, tag=DS_TAG, client_state={}, save_latest=False)
    state = {"world_size": world_size, "rank": rank, "global_steps": int(engine.global_steps),
             **rng_state()}
    write_json_atomic(Path(path) / f"rng-rank{rank}.json", state)
    if world_size > 1:
        torch.distributed.barrier()


def load_rank(engine, rank: int, world_size: int, seed: int, load_universal: bool, directory: str,
              universal_dir: str | None = None) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into ``directory`` (collective: every rank at once).

    Module weights, fp32 master weights, AdamW states and DeepSpeed's step counters are restored, so the next
    ``train_step`` is the one an uninterrupted run would take. Every torch-pickle file is first opened with
    ``torch.load(weights_only=True)`` under ``r2ec.checkpoint.SAFE_GLOBALS`` (DeepSpeed itself unpickles with
    ``weights_only=False``). With ``universal_dir`` (the output of ``learner.universal.to_universal``, needed
    when the checkpoint was written by another number of ranks) the weights and optimizer states come from the
    universal checkpoint instead; the worker must have been built with ``load_universal=True``.

    Call it on a freshly built worker, before any ``train_step`` (DeepSpeed's ZeRO-3 cannot load into an
    engine whose parameters it has already partitioned and trained), with the same model / LoRA / ZeRO config.

    RNG: this rank's saved states are restored when the checkpoint has this world size; otherwise every RNG
    is seeded from (seed, saved step, rank), which is deterministic but not the uninterrupted run's stream.
    Returns ``{"global_steps", "world_size_saved", "universal", "rng_restored", "rng_seed"}``."""
    from learner.universal import needs_universal, saved_world_size
    from r2ec.checkpoint import DS_TAG, CheckpointError, check_pickles, pickle_files

    folder = Path(directory)
    if universal_dir is not None and not load_universal:
        raise ValueError("load_checkpoint(universal_dir=...) needs a LearnerWorker built with "
                         "load_universal=True (DeepSpeed's checkpoint.load_universal is fixed at initialisation)")
    if universal_dir is None and load_universal:
        raise ValueError("this LearnerWorker was built with load_universal=True and can only load a universal "
                         "checkpoint: pass universal_dir (see learner.universal.to_universal)")
    load_dir = Path(universal_dir) if universal_dir is not None else folder
    if not (load_dir / DS_TAG).is_dir():
        raise CheckpointError(f"{load_dir / DS_TAG}: no DeepSpeed checkpoint folder")
    files = pickle_files(load_dir / DS_TAG)
    if not files:
        raise CheckpointError(f"{load_dir / DS_TAG}: no checkpoint files")
    check_pickles(files)  # before DeepSpeed unpickles anything
    saved_w = saved_world_size(folder)
    if universal_dir is None and needs_universal(folder, world_size):  # (ZeRO-0 loads at any size)
        raise CheckpointError(f"{folder}: written by {saved_w} learner ranks, this learner has "
                              f"{world_size}; convert it with learner.universal.to_universal and load it "
                              "with load_universal=True")

    load_path, _ = engine.load_checkpoint(os.fspath(load_dir), tag=DS_TAG, load_module_strict=True,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"{load_dir / DS_TAG}: DeepSpeed found no checkpoint to load")
    steps = int(engine.global_steps)

    rng_file = folder / f"rng-rank{rank}.json"
    rng_seed = None
    if saved_w == world_size and rng_file.is_file():
        state = json.loads(rng_file.read_text())
        if state.get("world_size") != world_size or state.get("rank") != rank:
            raise CheckpointError(f"{rng_file}: belongs to rank {state.get('rank')} of "
                                  f"{state.get('world_size')}, not rank {rank} of {world_size}")
        set_rng_state(state)
    else:
        rng_seed = (seed * 1_000_003 + steps * 1_009 + rank) % 2**32
        seed_all(rng_seed)
    return {"global_steps": steps, "world_size_saved": saved_w, "universal": universal_dir is not None,
            "rng_restored": rng_seed is None, "rng_seed": rng_seed}
