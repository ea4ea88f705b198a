"""R2ec without reasoning (the paper's Table 2 ablation): the same dual-head model and item loss, but no chain.

Usage::

    python -m study.no_reasoning --config configs/quickstart.yaml --out outputs/study/no_reasoning --max-minutes 20

The model is ``cfg.model`` (quickstart: SmolLM2-135M-Instruct, float32, LoRA r=4, alpha=128), built by
``DualHeadModel.from_config``. Only the rec_head path is trained.

* User representation. R2ec reads h_T at the last token of the answer marker that closes the generated chain. Here
  the chain is empty: the user prompt is rendered exactly as for R2ec (chat template, assistant turn opened) and the
  marker's tokens follow it directly. So h_user is the final hidden state at the last token of
  ``prompt + "<answer>"``, the sequence R2ec scores when a chain is an appended marker only. The hidden state is
  read at the same kind of position as R2ec's h_T, which also mirrors the item side (item prompts end with the
  marker in a pre-filled assistant turn).
* Loss. ``r2ec.algo.recpo.item_loss`` with every advantage 1 and every row relabelled, which is the plain in-batch
  softmax cross-entropy of cos(h_user, e_v)/tau over the batch's unique target items. The item encodings are
  recomputed with gradient through the item prompts (``DualHeadModel.last_hidden``), as the RecPO learner does.
  Nothing is re-derived here.
* Optimiser. AdamW on the LoRA parameters, ``--lr`` (default: ``learner.lr`` of the config, 1e-5 as in the paper),
  gradient clipping at ``learner.grad_clip``, a batch of ``--batch-size`` train samples drawn without replacement
  from the train split shuffled with ``--seed`` (a new permutation each pass), for ``--max-minutes`` of wall time
  (the step-0 and periodic validations count towards it; the final validation and the test come on top).
* Validation. Every ``--valid-every`` steps (and at step 0 and at the end) the whole item table is re-encoded
  (no grad; at step 0 the LoRA adapters are zero, so the base model's cached zero-shot table is used) and NDCG@10 is
  computed on a user-stratified subset of ``--valid-samples`` valid samples, with the project's metrics and history masking. The
  adapters of the best validation (and its table) are kept; a tie goes to the later weights, because on 64 samples
  ties (often at 0) say nothing. One item-table refresh encodes 1,682 prompts of ~72 tokens, i.e. several minutes on
  two CPU cores. So keep ``--valid-every`` large; a run has at least the final refresh, which the test needs. The final test ranks the user-stratified subset of ``--max-samples`` test
  samples with ``r2ec.evaluate.rank_split`` and writes ``eval_test.json`` in the key format of ``r2ec eval``.
  ``eval_valid.json`` (the best weights on the validation slice) and ``train_log.jsonl`` are written too. The log
  has one line per step (loss, seconds) and one per validation (valid Hit@10 / NDCG@10, item-table seconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from r2ec.algo.recpo import item_loss
from r2ec.evaluate import EvalSubset, format_metrics, item_prompt_ids, rank_split, user_prompt_ids, zero_shot_item_table
from study.sasrec import split_metrics, split_rows


class NoReasoning:
    """The dual-head model with h_user read at ``prompt + marker`` (no chain)."""

    def __init__(self, model, builder, titles: list[str], item_prompts: list[list[int]]):
        self.model, self.builder, self.titles, self.item_prompts = model, builder, titles, item_prompts

    def user_seqs(self, rows: list[dict]) -> list[list[int]]:
        return [user_prompt_ids(self.builder, self.model.tokenizer, r, self.titles) + list(self.model.marker_ids)
                for r in rows]

    def loss(self, rows: list[dict], tau: float) -> torch.Tensor:
        """In-batch softmax item loss of one batch of train samples, with gradient through both sides."""
        target = torch.as_tensor([r["target_item_idx"] for r in rows], dtype=torch.long)
        items, labels = torch.unique(target, return_inverse=True)  # the batch's unique targets, as the learner
        h_user = self.model.last_hidden(self.user_seqs(rows))
        h_items = self.model.last_hidden([self.item_prompts[v] for v in items.tolist()])
        n = len(rows)
        device = h_user.device
        return item_loss(h_user, h_items, labels.to(device), torch.ones(n, device=device),
                         torch.ones(n, dtype=torch.bool, device=device), tau=tau)

    def scorer(self, h_items: torch.Tensor, batch_size: int = 16):
        """``score_batch`` for ``rank_split`` / ``split_metrics``: full-catalogue cos/tau, history masked."""
        @torch.no_grad()
        def score_batch(rows, earlier, target):
            self.model.model.eval()
            scores = []
            for lo in range(0, len(rows), batch_size):
                part = rows[lo:lo + batch_size]
                h = self.model.last_hidden(self.user_seqs(part))
                scores.append(self.model.item_scores(h, h_items, earlier[lo:lo + batch_size],
                                                     target[lo:lo + batch_size]).cpu())
            return torch.cat(scores), [None] * len(rows)

        return score_batch

    @torch.no_grad()
    def item_table(self, batch_size: int) -> torch.Tensor:
        self.model.model.eval()
        return self.model.encode_items(self.item_prompts, batch_size=batch_size)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.model.named_parameters() if p.requires_grad}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--out", default="outputs/study/no_reasoning")
    p.add_argument("--seed", type=int, default=None, help="default: run.seed of the config")
    p.add_argument("--max-minutes", type=float, default=20.0, help="wall time of training (validations included)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8, help="train samples (users) per step")
    p.add_argument("--lr", type=float, default=None, help="default: learner.lr of the config")
    p.add_argument("--valid-every", type=int, default=50, help="steps between validations (each re-encodes all items)")
    p.add_argument("--valid-samples", type=int, default=64, help="a user-stratified subset of N valid samples")
    p.add_argument("--no-initial-valid", action="store_true", help="skip the step-0 validation")
    p.add_argument("--max-samples", type=int, default=None,
                   help="test on the user-stratified subset of N test samples (default: eval.max_samples)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: OMP_NUM_THREADS); 1 is several times faster on a busy machine")
    args = p.parse_args(argv)

    from r2ec.assets import cache_root
    from r2ec.config import LoraConfig, load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.model import DualHeadModel
    from r2ec.prompts import PromptBuilder

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    seed = cfg.run.seed if args.seed is None else args.seed
    lr = cfg.learner.lr if args.lr is None else args.lr
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    prepared = prepare_from_config(cfg.data)
    model = DualHeadModel.from_config(cfg.model, "cpu" if cfg.run.device == "auto" else cfg.run.device)
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    titles = list(prepared.items["title"])
    item_prompts = item_prompt_ids(builder, model.tokenizer, prepared.items)
    nr = NoReasoning(model, builder, titles, item_prompts)
    params = trainable(model)
    if not params:
        raise SystemExit("the model has no trainable parameters: enable model.lora in the config")
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=cfg.learner.weight_decay)
    tau, ks = cfg.model.tau, cfg.eval.ks
    train = prepared.splits["train"]
    valid_subset = EvalSubset.of(prepared, "valid", args.valid_samples, cfg.eval)
    valid_rows = split_rows(prepared, "valid", valid_subset.indices)
    gen = torch.Generator().manual_seed(seed)
    print(f"no-reasoning: lr {lr}, batch {args.batch_size}, {sum(p.numel() for p in params.values())} trainable "
          f"parameters, {len(train)} train samples, {len(valid_rows)} valid samples, tau {tau}", flush=True)

    log = open(out / "train_log.jsonl", "w")
    start = time.perf_counter()
    best = {"ndcg@10": -1.0, "step": None, "state": None, "table": None}

    def validate(step: int, initial: bool = False) -> None:
        t0 = time.perf_counter()
        if initial:  # zero LoRA adapters = the base model: its zero-shot table (cached on disk)
            base_cfg = cfg.model.model_copy(update={"lora": LoraConfig(enabled=False)})
            table = zero_shot_item_table(model, base_cfg, item_prompts, cfg.eval.item_batch_size,
                                         cache_root() / "item_tables")
        else:
            table = nr.item_table(cfg.eval.item_batch_size)
        t_table = time.perf_counter() - t0
        m = split_metrics(prepared, valid_rows, nr.scorer(table, cfg.eval.batch_size), ks)
        rec = {"step": step, "valid_ndcg@10": m["ndcg@10"], "valid_hit@10": m["hit@10"],
               "item_table_s": round(t_table, 1), "valid_s": round(time.perf_counter() - t0, 1),
               "elapsed_s": round(time.perf_counter() - start, 1)}
        better = m["ndcg@10"] >= best["ndcg@10"]  # a tie goes to the later (more trained) weights
        if better:
            best.update({"ndcg@10": m["ndcg@10"], "step": step, "table": table,
                         "state": {n: q.detach().clone() for n, q in params.items()}})
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(f"valid step {step}: ndcg@10 {m['ndcg@10']:.4f} hit@10 {m['hit@10']:.4f} (item table "
              f"{t_table:.0f}s, total {rec['valid_s']:.0f}s){'  *' if better else ''}", flush=True)

    if not args.no_initial_valid:
        validate(0, initial=True)
    step, last_valid, order, pos, losses = 0, 0, torch.randperm(len(train), generator=gen), 0, []
    t_train = 0.0
    while (time.perf_counter() - start < args.max_minutes * 60
           and (args.max_steps is None or step < args.max_steps)):
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(train), generator=gen), 0
        rows = train.select(order[pos:pos + args.batch_size].tolist()).to_list()
        pos += args.batch_size
        t0 = time.perf_counter()
        model.model.train()
        loss = nr.loss(rows, tau)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.learner.grad_clip)
        optimizer.step()
        dt = time.perf_counter() - t0
        t_train += dt
        step += 1
        losses.append(float(loss.detach()))
        rec = {"step": step, "loss": losses[-1], "grad_norm": float(grad_norm), "step_s": round(dt, 2),
               "elapsed_s": round(time.perf_counter() - start, 1)}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        print(f"step {step}: loss {losses[-1]:.4f} grad_norm {float(grad_norm):.3f} ({dt:.1f}s)", flush=True)
        if args.valid_every and step % args.valid_every == 0:
            validate(step)
            last_valid = step
    if step > last_valid or best["state"] is None:
        validate(step)
    log.close()
    train_elapsed = time.perf_counter() - start
    steps_per_min = step / (t_train / 60) if t_train else 0.0
    print(f"trained {step} steps in {t_train:.0f}s of optimisation ({steps_per_min:.2f} steps/min; "
          f"{train_elapsed:.0f}s with validations); best valid NDCG@10 {best['ndcg@10']:.4f} at step {best['step']}",
          flush=True)

    with torch.no_grad():
        for n, q in params.items():
            q.copy_(best["state"][n])
    extra = {"seed": seed, "lr": lr, "batch_size": args.batch_size, "steps": step, "best_step": best["step"],
             "steps_per_min": round(steps_per_min, 3), "threads": torch.get_num_threads(), "train_seconds": round(train_elapsed, 1),
             "train_loss_first": losses[0] if losses else None,
             "train_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None}
    score = nr.scorer(best["table"], cfg.eval.batch_size)
    results = {"valid": rank_split(prepared, valid_subset, cfg.eval.batch_size, ks, out, "r2ec-no-reasoning", score,
                                   extra)}
    if abs(results["valid"]["ndcg@10"] - best["ndcg@10"]) > 1e-6:
        print(f"warning: valid NDCG@10 of the restored best weights {results['valid']['ndcg@10']:.6f} differs from "
              f"the one seen in training {best['ndcg@10']:.6f}")
    test_subset = EvalSubset.of(prepared, "test", args.max_samples or cfg.eval.max_samples, cfg.eval)
    results["test"] = rank_split(prepared, test_subset, cfg.eval.batch_size, ks, out, "r2ec-no-reasoning", score,
                                 extra)
    for name, r in results.items():
        print(f"{name:>6}: {format_metrics(r)}  (n={r['num_samples']}, users {r['num_users']})")
    return results


if __name__ == "__main__":
    main()
