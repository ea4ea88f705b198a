"""The layers: ``driver/`` (orchestration) is the only package that imports ray; ``r2ec/`` (the library) imports
no ray, vllm or deepspeed and nothing of the layers above it; ``rollout/`` imports no deepspeed, ``learner/`` no vllm;
and no module of the project takes part in an import cycle.

The import-time checks run in a fresh interpreter so modules imported by other tests cannot hide a violation; the
source checks walk every module's ``import`` statements (those inside functions too) with ``ast``.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("r2ec", "rollout", "learner", "driver")
CORE = ["r2ec", "r2ec.config", "r2ec.algo.metrics", "r2ec.algo.recpo", "r2ec.prompts", "r2ec.model",
        "r2ec.data.prepare", "r2ec.data.sampler", "r2ec.evaluate", "r2ec.assets", "r2ec.protocol",
        "r2ec.weight_sync", "r2ec.checkpoint", "r2ec.export", "r2ec.recommend", "r2ec.compare", "r2ec.weight_share",
        "r2ec.rng"]
DRIVER = ["driver", "driver.cli", "driver.loop", "driver.system", "driver.run_state", "driver.tracking",
          "driver.colocated"]
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


def test_driver_imports_the_distributed_stack_lazily():
    # `r2ec --help` and the config checks must not pay for (or need) vLLM and DeepSpeed.
    assert not _top(_loaded_after_import(DRIVER)) & {"vllm", "deepspeed"}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> list[str]:
    """Every module named by an import statement of the file (at any depth), ``from a import b`` as ``a.b``."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def _edges() -> dict[str, set[str]]:
    """module -> the project's modules it imports (``from a import b`` counts as a.b when b is a module)."""
    mods = _modules()
    edges = {}
    for name, path in mods.items():
        got = set()
        for imp in _imports(path):
            if imp in mods:
                got.add(imp)
            elif imp.rsplit(".", 1)[0] in mods and "." in imp:
                parent = imp.rsplit(".", 1)[0]
                if f"{parent}.{imp.rsplit('.', 1)[1]}" not in mods:
                    got.add(parent)  # `from package import name`: the package itself
        edges[name] = {m for m in got if m != name and not name.startswith(m + ".")}  # a package's own __init__
    return edges


def test_only_the_driver_imports_ray():
    offenders = [f"{name} imports {imp}" for name, path in _modules().items() if not name.startswith("driver")
                 for imp in _imports(path) if imp == "ray" or imp.startswith("ray.")]
    assert not offenders, offenders


def test_the_library_imports_nothing_above_it():
    # r2ec/ is the bottom layer: no module of it may import rollout/, learner/ or driver/.
    offenders = [f"{a} -> {b}" for a, deps in _edges().items() if a.startswith("r2ec") for b in deps
                 if b.split(".")[0] != "r2ec"]
    assert not offenders, offenders


def test_no_import_cycles():
    edges = _edges()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_cycle_check_finds_a_cycle(tmp_path, monkeypatch):
    # The check above must be able to fail: two modules importing each other are found.
    pkg = tmp_path / "r2ec"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from r2ec import b\n")
    (pkg / "b.py").write_text("def f():\n    import r2ec.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("r2ec",))
    with pytest.raises(AssertionError, match=r"\['r2ec.a', 'r2ec.b'\]"):
        test_no_import_cycles()


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
    assert not _top(_loaded_after_import(CORE + ROLLOUT + LEARNER + DRIVER)) & {"trl", "matplotlib"}
