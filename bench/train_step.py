"""Where a RecPO step's time goes, and how it grows with group size, batch size and rollout workers.

Runs the real system (local Ray on 127.0.0.1, vLLM CPU rollout workers, a DeepSpeed learner rank) on
``configs/quickstart.yaml`` and times whole RecPO steps with the training loop's own ``rl_step``:

- generate: the rollout workers' sampling (per worker, averaged over workers);
- hidden: the 1-token prefill that captures h_T for every chain (per worker);
- reward: the learner's rec_head scoring of the chains, fused rewards and group advantages;
- train: the learner's token term + item term + optimiser step;
- sync: broadcasting the updated weights to every rollout worker;
- step: the whole step seen by the driver (includes Ray calls and the driver's own bookkeeping).

Optionally the same for a few variants (``--variants``), each a fresh system: group size G, users per step B,
rollout workers W.

Caveats:
- The item table is encoded once in this process with the HF model (cached on disk) and handed to the system,
  instead of the 1,682-prompt vLLM encoding ``r2ec train`` does at start; that cost is start-up, not step time (see
  README *Results*). The untrained LoRA adapter is zero, so the table equals the one training starts from.
- Step 1 of a fresh system includes one-time costs (first DeepSpeed step, allocator warm-up); it is reported but
  left out of the per-step medians when more than one step runs.
- On a 2-core machine rollout workers and learner ranks share the same two cores, so two rollout workers do not
  run in parallel with each other in any useful sense; the W=2 row (each worker reserving half a logical CPU, so
  the cluster needs the same 2 as the base layout) measures the overhead, not a speed-up.

    python bench/train_step.py                           # the quickstart (base) only, ~3 min on 2 idle cores
    python bench/train_step.py --variants base,G8,B8,W2  # plus the scaling rows, ~12 min
    python bench/train_step.py --quick    # smoke run: 1 variant, 1 step of 8-token chains
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RunClock, report, system_inputs  # noqa: E402

PHASES = ("generate", "hidden", "reward", "train", "sync", "step")


def run_variant(cfg, data, table: torch.Tensor, steps: int, log) -> list[dict]:
    """``steps`` RecPO steps on a fresh system built from ``cfg``; one dict of phase seconds per step."""
    from driver.steps import batch_inputs, rl_step
    from driver.system import System
    from r2ec.data.sampler import EpochSampler

    prepared, builder, tokenizer, titles, item_prompts = data
    train_ds = prepared.splits["train"]
    sampler = EpochSampler(len(train_ds), cfg.run.seed)
    updates = (torch.zeros(0, dtype=torch.long), torch.zeros(0, table.shape[1]))
    W = cfg.cluster.rollout.num_workers
    out = []
    with System(cfg, "cpu", log) as system:
        system.set_items(item_prompts, table)
        for step in range(1, steps + 1):
            rows = [train_ds[i] for i in sampler.next(cfg.learner.prompts_per_step)]
            prompts, earlier, target = batch_inputs(rows, prepared, builder, tokenizer, titles)
            t = time.perf_counter()
            rollout, results, timings = rl_step(system, cfg, prompts, earlier, target, updates, version=step)
            step_s = time.perf_counter() - t
            updates = (torch.cat([r.table_updates_idx for r in results]), torch.cat([r.table_updates for r in results]))
            out.append({
                "generate": rollout.timings.get("generate", 0.0) / W,
                "hidden": rollout.timings.get("hidden", 0.0) / W,
                "reward": max(r.metrics["time_reward_s"] for r in results),
                "train": max(r.metrics["time_train_s"] for r in results),
                "sync": timings["time_sync_s"],
                "step": step_s,
                "tokens": rollout.timings.get("generated_tokens", 0.0),
            })
            log(f"  step {step}: " + " ".join(f"{k}={v:.2f}" for k, v in out[-1].items()))
    return out


def summarise(name: str, cfg, steps: list[dict]) -> dict:
    """Medians over steps 2.. (step 1 alone when only one ran), plus step 1's total for the one-time costs."""
    measured = steps[1:] or steps
    row = {"variant": name, "G": cfg.recpo.group_size, "B": cfg.learner.prompts_per_step,
           "W": cfg.cluster.rollout.num_workers, "chains": cfg.recpo.group_size * cfg.learner.prompts_per_step,
           "steps": len(measured)}
    for k in PHASES:
        row[f"{k}_s"] = statistics.median(s[k] for s in measured)
    row["first_step_s"] = steps[0]["step"]
    row["chains_per_s"] = row["chains"] / row["step_s"]
    row["tokens_per_s"] = statistics.median(s["tokens"] for s in measured) / row["step_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=3, help="steps per variant (the first is reported separately)")
    p.add_argument("--variants", default="base",
                   help="comma list from base, G2, G8, B2, B8, W2 (each a fresh system); make bench runs base only, "
                   "the scaling rows of docs/performance.md section 4 come from base,G8,B8,W2")
    p.add_argument("--quick", action="store_true", help="smoke run: base only, 1 step, 8-token chains")
    args = p.parse_args()

    from r2ec.config import load_config

    logging.getLogger("ray").setLevel(logging.WARNING)
    base = ["run.checkpoint_every=null", "run.output_dir=outputs/bench/train_step"]
    if args.quick:
        base += ["rollout.sampling.max_new_tokens=8"]
        args.steps, args.variants = 1, "base"
    variants = {"base": [], "G2": ["recpo.group_size=2"], "G8": ["recpo.group_size=8"],
                "B2": ["learner.prompts_per_step=2"], "B8": ["learner.prompts_per_step=8"],
                # Two rollout workers on half a logical CPU each: the same 1 + 1 CPUs as the base layout, which is
                # all a 2-core machine has (a third whole CPU fails the driver's resource check).
                "W2": ["cluster.rollout.num_workers=2", "cluster.rollout.cpus_per_worker=0.5"]}
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in variants]
    if unknown:
        p.error(f"unknown variants {unknown}; expected some of {sorted(variants)}")

    cfg0 = load_config(args.config, base)
    data, table = system_inputs(cfg0)

    rows, raw = [], {}
    clock = RunClock()
    for name in names:
        cfg = load_config(args.config, base + variants[name])
        print(f"\n{name}: G={cfg.recpo.group_size} B={cfg.learner.prompts_per_step} "
              f"W={cfg.cluster.rollout.num_workers}, {args.steps} step(s)")
        raw[name] = run_variant(cfg, data, table, args.steps, print)
        rows.append(summarise(name, cfg, raw[name]))
    ref = rows[0]["step_s"]
    for r in rows:
        r["step_vs_first_variant"] = r["step_s"] / ref
    report("train_step", rows,
           ["variant", "G", "B", "W", "chains", "steps", *[f"{k}_s" for k in PHASES], "first_step_s",
            "chains_per_s", "tokens_per_s", "step_vs_first_variant"],
           settings={"config": args.config, "overrides": base, "steps": args.steps, **clock.fields()},
           per_step=raw)


if __name__ == "__main__":
    main()
