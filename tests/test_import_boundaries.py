"""The algorithm core imports no ray, vllm or deepspeed; rollout/ imports no deepspeed; learner/ no vllm.

Each check runs in a fresh interpreter so modules imported by other tests cannot hide a violation.
"""

import subprocess
import sys

import pytest

CORE = ["r2ec", "r2ec.config", "r2ec.algo.metrics", "r2ec.algo.recpo", "r2ec.prompts", "r2ec.model",
        "r2ec.data.prepare", "r2ec.data.sampler", "r2ec.evaluate", "r2ec.assets", "r2ec.cli", "r2ec.protocol",
        "r2ec.weight_sync", "r2ec.tracking", "r2ec.driver", "r2ec.train", "r2ec.checkpoint", "r2ec.run_state",
        "r2ec.export", "r2ec.recommend", "r2ec.compare", "r2ec.colocated", "r2ec.weight_share", "r2ec.rng"]
PURE = ["r2ec.algo.metrics", "r2ec.algo.recpo", "r2ec.algo.bootstrap", "r2ec.protocol", "r2ec.weight_sync",
        "r2ec.weight_share"]
ROLLOUT = ["rollout", "rollout.engine", "rollout.worker", "rollout.hf_engine", "rollout.vllm_engine"]
LEARNER = ["learner", "learner.worker", "learner.ds_config", "learner.universal", "learner.item_term", "learner.weights",
           ]


def _loaded_after_import(modules):
    code = ("import sys, json\n" + "".join(f"import {m}\n" for m in modules) +
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    import json

    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def _top(mods):
    return {m.split(".")[0] for m in mods}


def test_core_imports_no_distributed_stack():
    assert not _top(_loaded_after_import(CORE)) & {"ray", "vllm", "deepspeed"}


def test_pure_math_imports_torch_only():
    before = _top(_loaded_after_import(["torch"]))
    after = _top(_loaded_after_import(PURE))
    assert after - before == {"r2ec"}, f"unexpected imports: {sorted(after - before - {'r2ec'})}"


@pytest.mark.parametrize("modules, forbidden", [(ROLLOUT, {"deepspeed", "ray"}), (LEARNER, {"vllm", "ray"})])
def test_worker_package_boundaries(modules, forbidden):
    # Workers are plain classes: ray.remote is applied by the driver only. vLLM and DeepSpeed load lazily.
    assert not _top(_loaded_after_import(modules)) & forbidden


def test_engines_load_their_libraries_lazily():
    assert not _top(_loaded_after_import(ROLLOUT + LEARNER)) & {"vllm", "deepspeed"}


def test_bench_only_dependencies_stay_out_of_the_system():
    # TRL (the peer in bench/trl_grpo.py) and matplotlib (study curves) are the `bench` extra: a user who installs
    # the system without it must be able to import every module of it.
    assert not _top(_loaded_after_import(CORE + ROLLOUT + LEARNER)) & {"trl", "matplotlib"}
