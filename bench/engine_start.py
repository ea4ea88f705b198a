"""vLLM engine start-up in a rollout worker: in the worker's process (``rollout.vllm.in_process``) or in vLLM's own.

What it measures: how long ``RolloutWorker(...)`` takes to build its vLLM engine (CPU build) in a fresh process,
the way a rollout worker (a Ray actor) starts, with the engine core and model worker

- ``separate``: in two processes of their own (vLLM's default: each spawned process imports torch and vLLM again),
- ``in_process``: in the worker's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor),

and then one ``RolloutWorker.generate`` of the quickstart's rollout batch (8 prompts x G = 4 chains, its sampling
settings), so that the faster start is not bought with slower sampling. Each measurement runs in a fresh
subprocess (``--one MODE``), the modes alternating, ``--repeat`` times each; medians are reported with their ratio.
The prompts are random token ids (150-300 tokens, fixed seed), the same for both modes.

    python bench/engine_start.py           # ~2 min on 2 cores; bench/results/engine_start.json
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import load_average, report, run_with_quick_model  # noqa: E402

DEFAULT_MODEL = "asset://smollm2-135m-instruct"
MODES = ("separate", "in_process")
MARK = "engine_start: "  # the child's result line (vLLM logs on the same streams)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--config", default="configs/quickstart.yaml", help="rollout settings (relative: to the repository)")
    p.add_argument("--repeat", type=int, default=2, help="fresh processes per mode")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--one", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="smoke run: a tiny random model, 2 prompts, 8 new tokens")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.prompts = 1, 2
    return args


def measure_one(args: argparse.Namespace) -> dict:
    """In this (fresh) process: build the worker with the engine in ``args.one`` mode, then one generate."""
    from r2ec.config import load_config
    from rollout.worker import RolloutWorker

    cfg = load_config(ROOT / args.config)  # an absolute --config stays itself
    model = cfg.model.model_copy(update={"name_or_path": args.model})
    rollout = cfg.rollout.model_copy(update={"engine": "vllm"})
    rollout.vllm.in_process = args.one == "in_process"
    if args.quick:
        rollout.sampling.max_new_tokens = 8
        rollout.vllm.max_model_len = 1024
    t = time.perf_counter()
    worker = RolloutWorker(model, rollout, seed=0, device="cpu", own_process=args.one == "in_process")
    start_s = time.perf_counter() - t
    vocab = worker.finisher.tokenizer.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(100, vocab) for _ in range(rng.randint(150, 300))] for _ in range(args.prompts)]
    t = time.perf_counter()
    out = worker.generate(prompts, cfg.recpo.group_size, seed=1)
    generate_s = time.perf_counter() - t
    return {"mode": args.one, "start_s": start_s, "generate_s": generate_s, "chains": len(out),
            "chain_tokens": sum(len(c) for c in out.chain_ids)}


def run(args: argparse.Namespace) -> None:
    t0, before = time.perf_counter(), load_average()
    rows = []
    for r in range(args.repeat):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--one", mode, "--model", args.model, "--config", args.config,
                   "--prompts", str(args.prompts)] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"engine_start: the {mode} run failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith(MARK))
            row = {"round": r, **json.loads(line.removeprefix(MARK))}
            print(f"{mode}: engine up in {row['start_s']:.1f} s, generate {row['generate_s']:.2f} s "
                  f"({row['chains']} chains, {row['chain_tokens']} tokens)", flush=True)
            rows.append(row)

    def median(mode: str, key: str) -> float:
        xs = sorted(r[key] for r in rows if r["mode"] == mode)
        return xs[len(xs) // 2]

    figures = {f"{m}_{k}": median(m, k) for m in MODES for k in ("start_s", "generate_s")}
    figures["in_process_over_separate_start"] = figures["in_process_start_s"] / figures["separate_start_s"]
    figures["in_process_over_separate_generate"] = figures["in_process_generate_s"] / figures["separate_generate_s"]
    print(f"start: in-process {figures['in_process_start_s']:.1f} s vs separate {figures['separate_start_s']:.1f} s "
          f"({figures['in_process_over_separate_start']:.2f}x); generate "
          f"{figures['in_process_over_separate_generate']:.2f}x")
    report("engine_start", rows, out_dir=args.out_dir, **figures,
           settings={"config": args.config, "model": args.model, "repeat": args.repeat, "prompts": args.prompts,
                     "quick": args.quick, "load_avg_before": before, "load_avg_after": load_average(),
                     "wall_s": round(time.perf_counter() - t0, 1)})


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    if args.one:
        print(MARK + json.dumps(measure_one(args)), flush=True)
        return
    run_with_quick_model(args, run, DEFAULT_MODEL)


if __name__ == "__main__":
    main()
