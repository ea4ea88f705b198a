"""Learner checkpoints (learner/worker.py, learner/universal.py) with real DeepSpeed ranks on CPU (gloo).

What is checked:
- exact resume: step A, save, step B in one run; fresh ranks load the checkpoint and take step B again: the same
  losses and bit-identical parameters (so the AdamW states came back), the same RNG streams on every rank, at
  world size 1 and 2 under ZeRO-2 and ZeRO-3 (LoRA under ZeRO-3);
- another world size through DeepSpeed's universal checkpoint: 2 -> 1 (ZeRO-2 full, ZeRO-3 LoRA) and 1 -> 2 (ZeRO-3
  LoRA); the next step equals the uninterrupted run's to float rounding (the learner's losses are normalised
  globally, so W ranks' losses add up to one rank's);
- safe loading: ``check_pickles`` accepts the real checkpoints (and ``SAFE_GLOBALS`` is exactly what they need) and
  refuses a crafted pickle that would run a command, naming the file; the conversion refuses it too.

Helpers (configs, step data, shards) come from tests/test_learner.py.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import random
import shutil
import traceback
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_learner import TIMEOUT_S, USERS, _configs, _free_port, _make_step, _max_diff, _shard, gather_ranks

from r2ec.checkpoint import SAFE_GLOBALS, CheckpointError, check_pickles, pickle_files

# name -> (world size, ZeRO stage, LoRA)
RUNS = {"w1-zero2": (1, 2, False), "w1-zero3-lora": (1, 3, True), "w2-zero2": (2, 2, False),
        "w2-zero3-lora": (2, 3, True)}
USERS_OF = {1: [list(range(USERS))], 2: [[0, 1], [2, 3]]}


def _probe() -> tuple:
    """One draw from every RNG a rank keeps (python, numpy, torch)."""
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _step(worker, rank: int, payload: dict, step: dict):
    worker.set_items(step["items"], step["table"])  # the item table is the driver's state, not the learner's
    return worker.train_step(_shard(step, payload["users"][rank]))


def _weights(worker) -> dict[str, Any]:
    # Collective under ZeRO-3; full tensors on rank 0 only.
    return {"trainable": worker.trainable_state_dict(), "merged": worker.full_state_dict()}


def _scenario_run(worker, rank: int, payload: dict) -> dict:
    """The uninterrupted run: step A, save, step B."""
    _step(worker, rank, payload, payload["steps"][0])
    for _ in range(3 + rank):  # move every RNG away from its freshly seeded state before saving
        _probe()
    worker.save_checkpoint(payload["dir"])
    probe = _probe()
    result = _step(worker, rank, payload, payload["steps"][1])
    return {"probe": probe, "metrics": result.metrics, **_weights(worker)}


def _scenario_resume(worker, rank: int, payload: dict) -> dict:
    """Fresh ranks: load, then step B."""
    out: dict[str, Any] = {}
    try:  # the wrong loading mode is refused before anything collective happens
        worker.load_checkpoint(payload["dir"], payload["dir"] if payload.get("universal_dir") is None else None)
    except ValueError as e:
        out["wrong_mode"] = str(e)
    out["load"] = worker.load_checkpoint(payload["dir"], payload.get("universal_dir"))
    out["probe"] = _probe()
    out["metrics"] = _step(worker, rank, payload, payload["steps"][1]).metrics
    return {**out, **_weights(worker)}


SCENARIOS = {"run": _scenario_run, "resume": _scenario_resume}


def _rank_main(scenario: str, rank: int, world_size: int, port: int, cfgs: tuple, payload: dict, queue) -> None:
    torch.set_num_threads(1)  # one core per rank on a 2-core machine
    try:
        from learner.worker import LearnerWorker

        worker = LearnerWorker(*cfgs, rank=rank, world_size=world_size, master_addr="127.0.0.1", master_port=port,
                               device="cpu", seed=0, load_universal=payload.get("universal_dir") is not None)
        queue.put((rank, pickle.dumps(SCENARIOS[scenario](worker, rank, payload))))
    except BaseException:  # noqa: BLE001 - report the traceback instead of letting the parent time out
        queue.put((rank, traceback.format_exc()))


def _run_ranks(scenario: str, world_size: int, cfgs: tuple, payload: dict) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    payload = {**payload, "users": USERS_OF[world_size]}
    procs = [ctx.Process(target=_rank_main, args=(scenario, r, world_size, port, cfgs, payload, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results = gather_ranks(procs, queue, TIMEOUT_S)
    return [results[r] for r in range(world_size)]


def _total(ranks: list[dict], key: str) -> float:
    """The step's loss: the ranks' shares add up (losses are normalised by global counts)."""
    return sum(r["metrics"][key] for r in ranks)


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def steps(tiny_model_dir):
    from r2ec.model import DualHeadModel

    dual = DualHeadModel.from_config(_configs(str(tiny_model_dir), 2)[0])
    return [_make_step(dual, seed=0), _make_step(dual, seed=1)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, steps, tmp_path_factory):
    """name -> (checkpoint dir, per-rank results of the run): each run once, on first use."""
    cache: dict[str, tuple[Path, list[dict]]] = {}

    def get(name: str) -> tuple[Path, list[dict]]:
        if name not in cache:
            world, stage, lora = RUNS[name]
            folder = tmp_path_factory.mktemp(name) / "learner"
            ranks = _run_ranks("run", world, _configs(str(tiny_model_dir), stage, lora=lora),
                               {"steps": steps, "dir": str(folder)})
            cache[name] = folder, ranks
        return cache[name]

    return get


def _pickle_globals(path: Path) -> set[str]:
    """Every global a torch-pickle file refers to (GLOBAL / STACK_GLOBAL opcodes), as dotted names."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    ops = list(pickletools.genops(data))
    out = set()
    for i, (op, arg, _) in enumerate(ops):
        if op.name == "GLOBAL":
            out.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            out.add(f"{ops[i - 2][1]}.{ops[i - 1][1]}")
    return out


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", [n if n == "w1-zero2" else pytest.param(n, marks=pytest.mark.multirank) for n in RUNS])
def test_exact_resume(name, tiny_model_dir, steps, uninterrupted):
    from learner.universal import needs_universal, saved_world_size

    world, stage, lora = RUNS[name]
    folder, run = uninterrupted(name)
    assert sorted(p.name for p in folder.glob("rng-rank*.json")) == [f"rng-rank{r}.json" for r in range(world)]
    assert not (folder / "latest").exists()  # no DeepSpeed marker: the project keeps its own
    assert saved_world_size(folder) == world and not needs_universal(folder, world)
    assert needs_universal(folder, 3 - world)

    resumed = _run_ranks("resume", world, _configs(str(tiny_model_dir), stage, lora=lora),
                         {"steps": steps, "dir": str(folder)})
    for r in range(world):
        a, b = run[r], resumed[r]
        assert b["load"] == {"global_steps": 1, "world_size_saved": world, "universal": False, "rng_restored": True,
                             "rng_seed": None}
        assert "load_universal=True" in b["wrong_mode"]
        assert b["probe"] == a["probe"]  # python, numpy and torch streams continue where they were saved
        for key in ("loss_token", "loss_item", "grad_norm", "reward_mean"):
            assert b["metrics"][key] == pytest.approx(a["metrics"][key], abs=1e-6, rel=0), key
    assert world == 1 or run[0]["probe"] != run[1]["probe"]  # per-rank streams, each restored to its own rank
    # Step B from the checkpoint is bit-identical: weights, fp32 master copies and AdamW moments all came back.
    assert _max_diff(run[0]["trainable"], resumed[0]["trainable"]) == 0.0
    assert _max_diff(run[0]["merged"], resumed[0]["merged"]) == 0.0
    if lora:
        assert run[0]["trainable"] and all("lora_" in k for k in run[0]["trainable"])


UNIVERSAL = {"zero2-2to1": ("w2-zero2", 1), "zero3-lora-2to1": ("w2-zero3-lora", 1),
             "zero3-lora-1to2": ("w1-zero3-lora", 2)}


@pytest.mark.multirank
@pytest.mark.parametrize("case", list(UNIVERSAL))
def test_resume_at_another_world_size_via_universal(case, tiny_model_dir, steps, uninterrupted, tmp_path):
    from learner.universal import UNIVERSAL_INFO, saved_world_size, to_universal

    source, world = UNIVERSAL[case]
    saved, stage, lora = RUNS[source]
    folder, run = uninterrupted(source)
    out = to_universal(folder, tmp_path / "universal")
    assert out == tmp_path / "universal" and (out / UNIVERSAL_INFO).is_file() and (out / "ds" / "zero").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["universal"]  # no temporary folder left behind
    assert not (out / "latest_universal").exists() and saved_world_size(out) == saved

    resumed = _run_ranks("resume", world, _configs(str(tiny_model_dir), stage, lora=lora),
                         {"steps": steps, "dir": str(folder), "universal_dir": str(out)})
    for res in resumed:
        load = res["load"]
        assert load["global_steps"] == 1 and load["world_size_saved"] == saved and load["universal"]
        assert not load["rng_restored"] and isinstance(load["rng_seed"], int)  # reseeded, and says so
        assert "universal_dir" in res["wrong_mode"]
    assert world == 1 or resumed[0]["load"]["rng_seed"] != resumed[1]["load"]["rng_seed"]
    # The next step at the new world size is the uninterrupted run's step B (float rounding apart).
    for key in ("loss_token", "loss_item"):
        assert _total(resumed, key) == pytest.approx(_total(run, key), abs=1e-5, rel=0), key
    assert resumed[0]["metrics"]["grad_norm"] == pytest.approx(run[0]["metrics"]["grad_norm"], rel=1e-5)
    assert _max_diff(run[0]["trainable"], resumed[0]["trainable"]) < 1e-5
    assert _max_diff(run[0]["merged"], resumed[0]["merged"]) < 1e-5


def test_check_pickles_accepts_real_checkpoints_and_refuses_a_malicious_pickle(uninterrupted, tmp_path):
    from learner.universal import to_universal

    files = []
    for name in ("w2-zero2", "w2-zero3-lora"):  # ZeRO-2 and ZeRO-3 files, LoRA and full, sharded over 2 ranks
        folder, _ = uninterrupted(name)
        files += pickle_files(folder)
        files += pickle_files(to_universal(folder, tmp_path / f"universal-{name}"))
    check_pickles(files)
    # The allow-list is exactly what these checkpoints need beyond torch's own (DynamicLossScaler: fp16 on GPU).
    found = set().union(*(_pickle_globals(p) for p in files))
    extra = {g for g in found if not g.startswith("torch.") and g != "collections.OrderedDict"}
    assert extra == set(SAFE_GLOBALS) - {"deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"}

    # A checkpoint whose optimizer file was replaced by a pickle that runs a command when loaded.
    source, _ = uninterrupted("w2-zero2")
    tampered = tmp_path / "tampered"
    shutil.copytree(source, tampered)
    marker = tmp_path / "pwned"
    victim = tampered / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Evil(f"touch {marker}")}, victim)
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt") as err:
        check_pickles(pickle_files(tampered))
    assert "system" in str(err.value.__cause__)  # torch names the refused global (posix.system / nt.system)
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        to_universal(tampered, tmp_path / "tampered-universal")
    assert not (tmp_path / "tampered-universal").exists()
    assert not marker.exists()


class _Evil:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)
