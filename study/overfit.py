"""The real-model overfit check: can the learner fit 16 fixed MovieLens-100k users?

Usage::

    python -m study.overfit --config configs/study-ml100k.yaml --steps 30 --lr 1e-3 --out outputs/study/overfit

One ``LearnerWorker`` (the DeepSpeed learner rank ``r2ec train`` uses, here in this process, world size 1, ZeRO-0)
takes ``--steps`` warm-up steps (item loss, h at prompt + answer marker, ``--negatives`` catalogue or in_batch) on
the same 16 train samples of 16 different users (a user-stratified pick from the train split, ``--seed``). The model
is the config's (SmolLM2-135M-Instruct, LoRA r=4, alpha=128). Every step logs the training NDCG@10 of the 16 users
against the cached table (its rows for the 16 targets re-encoded each step); at the end the whole catalogue is
re-encoded with the final weights and the 16 users are ranked against it, as evaluation would: that NDCG@10 must
approach 1. If it does not, the learner has a defect that no amount of RecPO steps will hide.

Writes ``overfit.json`` (config, per-step log, final ranks and NDCG@10) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import socket
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/study-ml100k.yaml")
    p.add_argument("--out", default="outputs/study/overfit")
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--negatives", choices=["catalogue", "in_batch"], default="catalogue")
    p.add_argument("--seed", type=int, default=0, help="seed of the user-stratified pick of train samples")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from learner.worker import LearnerWorker
    from r2ec.algo.metrics import ndcg_at_k, target_rank
    from r2ec.assets import cache_root, resolve
    from r2ec.config import LearnerConfig, LoraConfig, WarmupConfig, load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.data.sampler import history_tensor, stratified_subset
    from r2ec.evaluate import zero_shot_item_table
    from r2ec.prompts import PromptBuilder, item_prompt_ids, user_prompt_ids
    from r2ec.protocol import WarmupShard

    cfg = load_config(args.config)
    prepared = prepare_from_config(cfg.data)
    train, titles = prepared.splits["train"], list(prepared.items["title"])
    rows = [train[i] for i in stratified_subset(list(train["user_id"]), args.users, args.seed)]
    if len({r["user_id"] for r in rows}) != args.users:
        raise SystemExit(f"the train split has fewer than {args.users} users")
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    item_prompts = item_prompt_ids(builder, tokenizer, prepared.items)

    learner_cfg = LearnerConfig(zero_stage=0, lr=args.lr, prompts_per_step=args.users, micro_batch_size=args.users,
                                gradient_checkpointing=False, max_steps=1)
    warmup_cfg = WarmupConfig(steps=args.steps, prompts_per_step=args.users, lr=args.lr,
                              item_negatives=args.negatives)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    worker = LearnerWorker(cfg.model, learner_cfg, cfg.recpo, rank=0, world_size=1, master_addr="127.0.0.1",
                           master_port=port, device="cpu", seed=cfg.run.seed, warmup_cfg=warmup_cfg)
    marker = list(worker.dual.marker_ids)
    seqs = [user_prompt_ids(builder, tokenizer, r, titles) + marker for r in rows]
    history = history_tensor([prepared.earlier_items_of(r["user_id"], r["position"]) for r in rows])
    target = torch.as_tensor([r["target_item_idx"] for r in rows], dtype=torch.long)

    # LoRA's B starts at zero, so the initial model is the base model: its (cached) zero-shot table.
    base_cfg = cfg.model.model_copy(update={"lora": LoraConfig(enabled=False)})
    table = zero_shot_item_table(worker.dual, base_cfg, item_prompts, cfg.eval.item_batch_size,
                                 cache_root() / "item_tables")
    worker.set_items(item_prompts, table)

    def ranks_now(h_items: torch.Tensor) -> torch.Tensor:
        worker.engine.eval()
        with torch.no_grad():
            h = worker.dual.last_hidden(seqs)
            return target_rank(worker.dual.item_scores(h, h_items, history, target), target)

    before = ranks_now(table)
    log, updates = [], (torch.zeros(0, dtype=torch.long), torch.zeros(0, table.shape[1]))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        result = worker.warmup_step(WarmupShard(seqs, history, target, args.users, *updates))
        updates = (result.table_updates_idx, result.table_updates)
        m = result.metrics
        log.append({"step": step, **{k: m[k] for k in ("loss_item", "train_ndcg@10", "target_rank_mean",
                                                        "grad_norm", "diag_table_cos_mean", "diag_score_std",
                                                        "time_train_s")}})
        print(f"step {step}: loss {m['loss_item']:.4f} train NDCG@10 {m['train_ndcg@10']:.3f} mean rank "
              f"{m['target_rank_mean']:.1f} ({m['time_train_s']:.1f}s)", flush=True)
    train_s = time.perf_counter() - start
    t0 = time.perf_counter()
    fresh = worker.encode_items(item_prompts, batch_size=cfg.eval.item_batch_size)
    encode_s = time.perf_counter() - t0
    after = ranks_now(fresh)
    result = {
        "config": args.config, "users": args.users, "steps": args.steps, "lr": args.lr, "negatives": args.negatives,
        "seed": args.seed, "model": cfg.model.name_or_path, "lora": cfg.model.lora.model_dump(),
        "ndcg@10_before": float(ndcg_at_k(before, 10).mean()), "ranks_before": before.tolist(),
        "ndcg@10_after": float(ndcg_at_k(after, 10).mean()), "ranks_after": after.tolist(),
        "train_seconds": round(train_s, 1), "item_table_seconds": round(encode_s, 1), "log": log,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overfit.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"NDCG@10 of the {args.users} training users: {result['ndcg@10_before']:.3f} before, "
          f"{result['ndcg@10_after']:.3f} after {args.steps} steps (fresh table); ranks after {after.tolist()}")
    return result


if __name__ == "__main__":
    main()
