"""The algorithm core imports no ray, vllm or deepspeed; rollout/ imports no deepspeed; learner/ no vllm.

Each check runs in a fresh interpreter so modules imported by other tests cannot hide a violation.
"""

import subprocess
import sys

import pytest

CORE = ["r2ec", "r2ec.config", "r2ec.algo.metrics", "r2ec.algo.recpo", "r2ec.prompts", "r2ec.model",
        "r2ec.data.prepare", "r2ec.evaluate", "r2ec.assets", "r2ec.cli"]
PURE = ["r2ec.algo.metrics", "r2ec.algo.recpo"]


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


@pytest.mark.parametrize("package, forbidden", [("rollout", "deepspeed"), ("learner", "vllm")])
def test_worker_package_boundaries(package, forbidden):
    assert forbidden not in _top(_loaded_after_import([package]))
