"""Sweep the warm-up's settings on validation: each setting's validation NDCG@10 before and after, paired.

Usage::

    python -m study.warmup_sweep --config configs/quickstart.yaml --steps 36 --valid-every 12 \\
        --vary warmup.lr=1e-3,2e-3,4e-3 --vary model.tau=0.05,0.1 --out outputs/study/warmup_sweep.json

Every combination of the ``--vary`` values (dotted config keys, as ``--set``) is one point. Each point runs, in its
own process (one DeepSpeed learner rank in-process, ZeRO-0; no Ray, no rollout engine), what ``r2ec train``'s
warm-up phase runs: ``--steps`` warm-up steps (``warmup.prompts_per_step`` users each, drawn by the run's own
sampler from ``run.seed``) against the zero-shot item table (frozen, centred when ``model.center_items``), and
ranks the validation subset of the config (``eval.valid_max_samples``, user-stratified, history masked) without
reasoning (h at prompt + answer marker, the representation the warm-up trains) before the first step and after the
last. The difference after - before gets a paired 95% user-bootstrap interval (the same users drawn for both).
Before and after, it also counts the distinct greedy 16-token chains of the first 32 validation users: a warm-up that
moves validation by collapsing the reasoning (one chain for everyone) shows there.
Only the validation split is read: settings chosen here are reported on test elsewhere.

Deviation from ``r2ec train``: the learner rank runs at ZeRO-0 whatever ``learner.zero_stage`` says (one rank, so
ZeRO partitions nothing), and the table must be frozen (``model.item_table: frozen`` is set for every point): a
trained table is re-encoded by the rollout engines, which this script does not start.
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CHAIN_USERS, CHAIN_TOKENS = 32, 16  # the generation check: greedy chains of the first validation users


def points(vary: list[str]) -> list[list[str]]:
    """The cartesian product of ``KEY=V1,V2,...`` specs as lists of ``KEY=V`` overrides (one list per point)."""
    axes = []
    for spec in vary:
        key, sep, values = spec.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"--vary {spec!r}: expected KEY=V1,V2,... (a dotted config key and its values)")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(p) for p in itertools.product(*axes)] if axes else [[]]


def run_point(config: str, overrides: list[str], steps: int, valid_every: int | None = None) -> dict:
    """One point, in this process: warm-up steps and the validation before and after (and every ``valid_every``
    steps, NDCG@10 only, into the log). Returns its record."""
    from transformers import AutoTokenizer

    from driver.steps import batch_inputs
    from learner.worker import LearnerWorker
    from r2ec.algo.bootstrap import user_bootstrap_ci, user_codes
    from r2ec.algo.metrics import hit_at_k, ndcg_at_k, per_sample_metrics, target_rank
    from r2ec.algo.recpo import centred_rows
    from r2ec.assets import cache_root, resolve
    from r2ec.config import LoraConfig, load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.data.sampler import EpochSampler
    from r2ec.evaluate import EvalSubset, zero_shot_item_table
    from r2ec.prompts import PromptBuilder, item_prompt_ids
    from r2ec.protocol import WarmupShard

    cfg = load_config(config, [*overrides, "model.item_table=frozen", f"warmup.steps={steps}",
                               "learner.zero_stage=0"])
    torch.manual_seed(cfg.run.seed)
    prepared = prepare_from_config(cfg.data, log=lambda *_: None)
    train, valid, titles = prepared.splits["train"], prepared.splits["valid"], list(prepared.items["title"])
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    item_prompts = item_prompt_ids(builder, tokenizer, prepared.items)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = LearnerWorker(cfg.model, cfg.learner, cfg.recpo, rank=0, world_size=1, master_addr="127.0.0.1",
                           master_port=port, device="cpu", seed=cfg.run.seed, warmup_cfg=cfg.warmup)
    marker = list(worker.dual.marker_ids)
    # LoRA's B starts at zero, so the initial model is the base model: its (cached) zero-shot table.
    base_cfg = cfg.model.model_copy(update={"lora": LoraConfig(enabled=False)})
    table = zero_shot_item_table(worker.dual, base_cfg, item_prompts, cfg.eval.item_batch_size,
                                 cache_root() / "item_tables", log=lambda *_: None)
    if cfg.model.center_items:
        table = centred_rows(table)
    worker.set_items(item_prompts, table)

    subset = EvalSubset.of(prepared, "valid", cfg.eval.valid_max_samples, cfg.eval)
    vrows = [valid[i] for i in subset.indices]
    vprompts, vearlier, vtarget = batch_inputs(vrows, prepared, builder, tokenizer, titles)

    def valid_ranks() -> torch.Tensor:
        worker.engine.eval()
        ranks = []
        with torch.no_grad():
            for lo in range(0, len(vrows), cfg.eval.batch_size):
                hi = lo + cfg.eval.batch_size
                h = worker.dual.last_hidden([p + marker for p in vprompts[lo:hi]])
                ranks.append(target_rank(worker.dual.item_scores(h, table, vearlier[lo:hi], vtarget[lo:hi]),
                                         vtarget[lo:hi]))
        return torch.cat(ranks)

    def distinct_chains() -> int:
        """Distinct greedy continuations (CHAIN_TOKENS tokens) of the first CHAIN_USERS validation prompts: the item
        loss trains the LoRA weights that also write the reasoning, and can collapse it (docs/training.md)."""
        return len({tuple(c) for c in worker.greedy(vprompts[:CHAIN_USERS], CHAIN_TOKENS)})

    t0 = time.perf_counter()
    before, chains_before = valid_ranks(), distinct_chains()
    sampler, users, log = EpochSampler(len(train), cfg.run.seed), cfg.warmup.prompts_per_step, []
    no_updates = (torch.zeros(0, dtype=torch.long), torch.zeros(0, table.shape[1]))
    t1 = time.perf_counter()
    for step in range(1, steps + 1):
        prompts, earlier, target = batch_inputs([train[i] for i in sampler.next(users)], prepared, builder,
                                                tokenizer, titles)
        m = worker.warmup_step(WarmupShard([p + marker for p in prompts], earlier, target, users, *no_updates)).metrics
        log.append({"step": step, "loss_item": m["loss_item"], "target_rank_mean": m["target_rank_mean"],
                    "grad_norm": m["grad_norm"], "diag_score_std": m["diag_score_std"]})
        if valid_every and step % valid_every == 0 and step < steps:
            t_valid = time.perf_counter()
            log[-1]["valid_ndcg@10"] = float(ndcg_at_k(valid_ranks(), 10).mean())
            t1 += time.perf_counter() - t_valid  # train_seconds counts the steps only
    train_s = time.perf_counter() - t1
    after, chains_after = valid_ranks(), distinct_chains()
    names = ["ndcg@10", "hit@10", "hit@20"]
    user, user_ids = user_codes([r["user_id"] for r in vrows])
    diff = per_sample_metrics(after, names) - per_sample_metrics(before, names)
    ci = user_bootstrap_ci(diff, user, len(user_ids), cfg.eval.ci_resamples, cfg.eval.ci_seed).tolist()
    last = log[-5:]
    return {
        "overrides": overrides, "steps": steps, "users_per_step": users, "lr": cfg.warmup.lr, "tau": cfg.model.tau,
        "item_negatives": cfg.warmup.item_negatives, "center_items": cfg.model.center_items,
        "valid_samples": len(vrows), "valid_users": len(user_ids),
        "ndcg@10_before": float(ndcg_at_k(before, 10).mean()), "ndcg@10_after": float(ndcg_at_k(after, 10).mean()),
        "distinct_chains_before": chains_before, "distinct_chains_after": chains_after,
        "chain_check": {"users": min(CHAIN_USERS, len(vrows)), "max_new_tokens": CHAIN_TOKENS},
        "hit@20_before": float(hit_at_k(before, 20).mean()), "hit@20_after": float(hit_at_k(after, 20).mean()),
        "differences": {n: {"mean": float(diff[:, j].mean()), "ci95": ci[j]} for j, n in enumerate(names)},
        "loss_item_first": log[0]["loss_item"], "loss_item_last5": sum(r["loss_item"] for r in last) / len(last),
        "train_seconds": round(train_s, 1), "seconds": round(time.perf_counter() - t0, 1), "log": log,
    }


def format_row(r: dict) -> str:
    d = r["differences"]["ndcg@10"]
    curve = " ".join(f"{x['step']}: {x['valid_ndcg@10']:.4f}" for x in r["log"] if "valid_ndcg@10" in x)
    lo, hi = d["ci95"]
    star = " *" if lo > 0 or hi < 0 else ""
    return (f"| {' '.join(r['overrides']) or '(config)'} | {r['loss_item_first']:.2f} -> {r['loss_item_last5']:.2f} | "
            f"{r['ndcg@10_before']:.4f} -> {r['ndcg@10_after']:.4f} | {d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]{star} | "
            f"{r['hit@20_before']:.4f} -> {r['hit@20_after']:.4f} | {curve or '-'} | "
            f"{r['distinct_chains_before']} -> {r['distinct_chains_after']} of {r['chain_check']['users']} | "
            f"{r['train_seconds']:.0f} s |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, required=True, help="warm-up steps per point")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a dotted config key and the values to try (repeatable: the points are every combination)")
    p.add_argument("--valid-every", type=int, help="also validate every N steps (NDCG@10 into the point's log)")
    p.add_argument("--out", required=True, help="JSON file with every point's record")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one point (JSON overrides) and write --out
    args = p.parse_args(argv)
    if args.one is not None:
        Path(args.out).write_text(json.dumps(run_point(args.config, json.loads(args.one), args.steps,
                                                    args.valid_every)) + "\n")
        return 0
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| point | item loss, step 1 -> mean of last 5 | valid NDCG@10 before -> after | difference [paired 95%] "
          "| valid Hit@20 before -> after | valid NDCG@10 on the way | distinct greedy chains before -> after | steps |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for overrides in points(args.vary):
        with tempfile.TemporaryDirectory() as tmp:  # a process per point: one torch.distributed group each
            one = Path(tmp) / "point.json"
            every = ["--valid-every", str(args.valid_every)] if args.valid_every else []
            subprocess.run([sys.executable, "-m", "study.warmup_sweep", "--config", args.config, "--steps",
                            str(args.steps), *every, "--one", json.dumps(overrides), "--out", str(one)], check=True)
            results.append(json.loads(one.read_text()))
        print(format_row(results[-1]), flush=True)
        out.write_text(json.dumps({"config": args.config, "steps": args.steps, "points": results}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
