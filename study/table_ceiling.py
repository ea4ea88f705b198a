"""How well can ANY single user state rank against an item table? A ceiling for what a few CPU steps can learn.

Usage::

    python -m study.table_ceiling --config configs/quickstart.yaml --valid-samples 128 --out outputs/study/table_ceiling.json

The quickest thing a recommender trained on a few hundred users can learn is what all users share: which items are
popular. Through the rec_head (``cos(h, H_V[v]) / tau``), "the same for every user" is one user state u. This
script fits u directly (a free vector, Adam, the catalogue softmax of the train split's targets; no history masking,
which a state shared by all users cannot do) against the zero-shot item table of ``--config``'s model, raw and with
its mean row subtracted (``model.center_items``), at several temperatures, and ranks the validation subset the
training runs validate on (``eval.valid_max_samples``, user-stratified, history masked) with it. Popularity (train
target counts) on the same samples is the reference.

If even the best shared state ranks far below popularity, the table's geometry, not the learner, caps what a short
run can show: a model that learns popularity perfectly through that table still cannot rank popular items high.
No model weights are trained; the table comes from ``r2ec eval``'s zero-shot cache when it is there.
Writes a JSON file with every row (``--out``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def fit_shared_state(table: torch.Tensor, targets: torch.Tensor, tau: float, iters: int, batch: int,
                     seed: int) -> tuple[torch.Tensor, float]:
    """The state u minimising the mean catalogue cross-entropy of ``targets`` (one u for all): (u (d,), loss)."""
    from r2ec.algo.recpo import cosine_scores

    g = torch.Generator().manual_seed(seed)
    u = torch.nn.Parameter(table.mean(dim=0) + 0.01 * torch.randn(table.shape[1], generator=g))
    opt = torch.optim.Adam([u], lr=1e-2)
    loss = torch.zeros(())
    for _ in range(iters):
        idx = torch.randint(0, len(targets), (batch,), generator=g)
        loss = -torch.log_softmax(cosine_scores(u[None], table, tau), dim=-1)[0, targets[idx]].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return u.detach(), float(loss.detach())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--taus", type=float, nargs="+", default=[0.02, 0.05, 0.1])
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--valid-samples", type=int, default=None,
                   help="size of the user-stratified validation subset (default: the config's eval.valid_max_samples)")
    p.add_argument("--out", default="outputs/study/table_ceiling.json")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from r2ec.algo.metrics import mask_history, ndcg_at_k, target_rank
    from r2ec.algo.recpo import centred_rows, cosine_scores
    from r2ec.assets import cache_root, resolve
    from r2ec.config import LoraConfig, load_config
    from r2ec.data.prepare import prepare_from_config
    from r2ec.data.sampler import history_tensor
    from r2ec.evaluate import EvalSubset, zero_shot_item_table
    from r2ec.model import DualHeadModel
    from r2ec.prompts import PromptBuilder, item_prompt_ids

    cfg = load_config(args.config)
    torch.manual_seed(cfg.run.seed)
    prepared = prepare_from_config(cfg.data)
    train, valid = prepared.splits["train"], prepared.splits["valid"]
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    prompts = item_prompt_ids(builder, tokenizer, prepared.items)
    base_cfg = cfg.model.model_copy(update={"lora": LoraConfig(enabled=False)})
    model = DualHeadModel.from_config(base_cfg, "cpu")
    raw = zero_shot_item_table(model, base_cfg, prompts, cfg.eval.item_batch_size, cache_root() / "item_tables").float()
    del model

    targets = torch.as_tensor(train["target_item_idx"], dtype=torch.long)
    size = args.valid_samples or cfg.eval.valid_max_samples
    rows = [valid[i] for i in EvalSubset.of(prepared, "valid", size, cfg.eval).indices]
    history = history_tensor([prepared.earlier_items_of(r["user_id"], r["position"]) for r in rows])
    target = torch.as_tensor([r["target_item_idx"] for r in rows], dtype=torch.long)

    def ranked(scores: torch.Tensor) -> dict:
        rank = target_rank(mask_history(scores.expand(len(rows), -1).clone(), history, target), target)
        return {"ndcg@10": float(ndcg_at_k(rank, 10).mean()), "hit@10": float((rank < 10).float().mean()),
                "mean_rank": float(rank.double().mean() + 1)}

    def pairwise_cos(t: torch.Tensor) -> float:
        u = torch.nn.functional.normalize(t, dim=-1)
        return float(((u @ u.T).sum() - len(u)) / (len(u) * (len(u) - 1)))

    popularity = torch.bincount(targets, minlength=len(prompts)).double().log1p()
    result = {"config": args.config, "model": cfg.model.name_or_path, "valid_samples": len(rows),
              "popularity": ranked(popularity), "rows": []}
    print(f"popularity: {result['popularity']}")
    for name, table in (("raw", raw), ("centred", centred_rows(raw))):
        for tau in args.taus:
            u, loss = fit_shared_state(table, targets, tau, args.iters, 4096, cfg.run.seed)
            row = {"table": name, "tau": tau, "table_pairwise_cos": pairwise_cos(table), "train_loss": loss,
                   **ranked(cosine_scores(u[None], table, tau))}
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
