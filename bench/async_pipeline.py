"""One-step-off pipeline (``rollout.async``) against the synchronous loop: seconds per RecPO step, side by side.

Runs the real system (local Ray on 127.0.0.1, one vLLM CPU rollout worker, one DeepSpeed learner rank) on
``configs/quickstart.yaml`` with the rollout worker and the learner rank pinned to one core each
(``cluster.rollout.cpu_affinity`` 0, which vLLM's engine processes inherit and its compute threads bind to, and
``cluster.learner.cpu_affinity`` 1, on one OpenMP thread), and times whole steps
with the training loop's own primitives on ONE system: first ``--steps`` synchronous steps (``driver.steps.rl_step``:
rollout, then learner, then weight sync), then ``--steps`` one-step-off steps (``driver.pipeline.overlapped_step``:
the learner trains step k while the rollout worker samples step k + 1, then the sync), continuing the same weights.
The first step of each mode is left out of the medians (one-time costs; for the pipeline, the on-policy rollout that
fills it). Unpinned, vLLM's scheduler process (``EngineCore``, ~30 % of a core while it samples) shared the learner's
core. Pinning costs the synchronous loop, whose phases take turns, a core in each phase; ``--unpinned-sync`` times
that loop on the config's own cores too, for the comparison a 2-core user makes.

As in bench/train_step.py, the item table is encoded once in this process with the HF model (cached on disk) instead
of the start-up vLLM encoding ``r2ec train`` does; the quickstart's LoRA-delta sync and shared-prompt packing are on.

    python bench/async_pipeline.py            # ~5 min on 2 idle cores
    python bench/async_pipeline.py --quick    # smoke run: 2 steps per mode of 8-token chains
    python bench/async_pipeline.py --unpinned-sync   # + the synchronous loop on the config's own cores, ~8 min
                                                     # (bench/results/async_unpinned_sync.json)
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

PINNED = ["cluster.rollout.cpu_affinity='0'", "cluster.learner.cpu_affinity='1'", "rollout.vllm.cpu_threads_bind=all",
          "cluster.learner.omp_threads=1", "cluster.rollout.cpus_per_worker=1", "cluster.learner.cpus_per_worker=1"]


def run(cfg, data, table: torch.Tensor, steps: int, log, pipeline: bool = True) -> dict[str, list[dict]]:
    """``steps`` synchronous then (``pipeline``) ``steps`` one-step-off RecPO steps on one fresh system; per-step
    timings."""
    from driver.pipeline import overlapped_step
    from driver.run_state import rollout_seed
    from driver.steps import batch_inputs, rl_step
    from driver.system import System
    from r2ec.data.sampler import EpochSampler
    from r2ec.spans import SpanRecorder

    prepared, builder, tokenizer, titles, item_prompts = data
    train_ds = prepared.splits["train"]
    sampler = EpochSampler(len(train_ds), cfg.run.seed)
    updates = (torch.zeros(0, dtype=torch.long), torch.zeros(0, table.shape[1]))
    G, spans = cfg.recpo.group_size, SpanRecorder("driver")

    def draw():
        return batch_inputs([train_ds[i] for i in sampler.next(cfg.learner.prompts_per_step)], prepared, builder,
                            tokenizer, titles)

    out: dict[str, list[dict]] = {"sync": [], "async": []}
    with System(cfg, "cpu", log) as system:
        system.set_items(item_prompts, table)
        version = 0
        for _ in range(steps):
            version += 1
            t = time.perf_counter()
            rollout, results, timings = rl_step(system, cfg, *draw(), updates, version=version, spans=spans)
            out["sync"].append(_row(time.perf_counter() - t, rollout, results, timings))
            log(f"  sync step {version}: {out['sync'][-1]['step_s']:.2f}s")
        if not pipeline:
            return out
        inputs = draw()
        rollout = system.generate(inputs[0], G, seed=rollout_seed(cfg.run.seed, version + 1), weight_version=version)
        for _ in range(steps):
            version += 1
            nxt = draw()  # the last step samples one more rollout too: every measured step overlaps the same work
            t = time.perf_counter()
            rollout_next, results, timings = overlapped_step(system, cfg, rollout, inputs, updates, nxt[0], version,
                                                             spans)
            out["async"].append(_row(time.perf_counter() - t, rollout, results, timings))
            log(f"  async step {version}: {out['async'][-1]['step_s']:.2f}s (staleness "
                f"{version - 1 - rollout.weight_version}, ratio {out['async'][-1]['offpolicy_ratio_mean']:.4f})")
            rollout, inputs = rollout_next, nxt
    return out


def _row(step_s: float, rollout, results, timings: dict) -> dict:
    from r2ec.protocol import StepMetrics

    m = StepMetrics.reduce([r.metrics for r in results])
    return {"step_s": step_s, "rollout_s": timings["time_rollout_s"], "learner_s": timings["time_learner_s"],
            "sync_s": timings["time_sync_s"], "train_s": m["time_train_s"], "tokens": rollout.num_sampled_tokens,
            "offpolicy_ratio_mean": m["offpolicy_ratio_mean"], "weight_version": rollout.weight_version}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--steps", type=int, default=6, help="steps per mode (the first is left out of the medians)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 steps per mode, 8-token chains")
    p.add_argument("--unpinned-sync", action="store_true",
                   help="also the synchronous steps on a second system with the config's own cores (the quickstart: "
                   "each phase on both cores), on the same prompts: mode sync_unpinned")
    p.add_argument("--out-dir", default=None, help="where the JSON goes (default bench/results)")
    args = p.parse_args()

    from r2ec.config import load_config

    logging.getLogger("ray").setLevel(logging.WARNING)
    overrides = ["run.checkpoint_every=null", "run.output_dir=outputs/bench/async_pipeline", "recpo.off_policy=tis",
                 *PINNED]
    if args.quick:
        overrides += ["rollout.sampling.max_new_tokens=8"]
        args.steps = 2
    cfg = load_config(args.config, overrides)
    data, table = system_inputs(cfg)
    clock = RunClock()
    per_step = run(cfg, data, table, args.steps, print)
    if args.unpinned_sync:
        unpinned = load_config(args.config, [o for o in overrides if o not in PINNED])
        per_step["sync_unpinned"] = run(unpinned, data, table, args.steps, print, pipeline=False)["sync"]
    rows = []
    for mode, steps in per_step.items():
        measured = steps[1:] or steps
        rows.append({"mode": mode, "measured_steps": len(measured),
                     **{f"{k}_median": statistics.median(s[k] for s in measured)
                        for k in ("step_s", "rollout_s", "learner_s", "sync_s", "train_s")}})
    sync_s, async_s = rows[0]["step_s_median"], rows[1]["step_s_median"]
    unpinned = {"sync_unpinned_step_s": rows[2]["step_s_median"],
                "async_over_sync_unpinned": async_s / rows[2]["step_s_median"]} if args.unpinned_sync else {}
    print(f"\nasync / sync seconds per step: {async_s / sync_s:.3f}" + (
        f"; against the unpinned sync: {unpinned['async_over_sync_unpinned']:.3f}" if unpinned else ""))
    report("async_unpinned_sync" if args.unpinned_sync else "async", rows,
           ["mode", "measured_steps", "step_s_median", "rollout_s_median", "learner_s_median", "sync_s_median",
            "train_s_median"],
           out_dir=Path(args.out_dir) if args.out_dir else None,
           settings={"config": args.config, "overrides": overrides, "steps_per_mode": args.steps, "quick": args.quick,
                     **clock.fields()},
           sync_step_s=sync_s, async_step_s=async_s, async_over_sync=async_s / sync_s, per_step=per_step, **unpinned)


if __name__ == "__main__":
    main()
