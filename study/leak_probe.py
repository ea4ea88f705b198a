"""How much catalogue order an item-id tie-break hands to ID-based models: a probe that knows nothing about users.

The "next ids" heuristic ranks the 20 catalogue items that follow the user's last history item in catalogue order
(item ids sorted) first, nearest first, then everything else by popularity. It has no notion of taste; whatever it
gains over popularity comes from catalogue order leaking through the split. The probe builds the split twice from the
same source rows and ranks the test split with the project's evaluation loop (``r2ec.evaluate.rank_split``, full
catalogue, earlier items masked, user-bootstrap intervals):

* ``input-order``: the project's order rule (ties keep the input file's row order, ``r2ec.data.samples``);
* ``id-order``: the old rule, emulated by renumbering the input rows in (timestamp, user_id, item_id) order before
  the same build, so that equal timestamps fall back to user and item ids (what the project did before the rule).

Usage::

    python -m study.leak_probe --config configs/study-ml100k.yaml --out outputs/study/leak-probe

Writes ``<out>/<rule>/<method>/eval_test.json`` (+ per-sample JSONL, so ``r2ec compare`` works on them) and
``<out>/leak_probe.json``; prints one table per rule.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from r2ec.algo.metrics import mask_history
from r2ec.compare import compare, format_table, load_evaluation
from r2ec.evaluate import EvalSubset, fixed_scorer, popularity_scores, rank_split

NEXT = 20  # how many following ids the heuristic puts first


def id_order(tables):
    """The same interactions with their rows renumbered in (timestamp, user_id, item_id) order: under the project's
    rule (ties by row) this reproduces the old id tie-break."""
    ordered = sorted(tables.interactions, key=lambda x: (x.timestamp, x.user_id, x.item_id, x.row))
    rows = {id(x): i + 1 for i, x in enumerate(ordered)}
    tables.interactions = [x._replace(row=rows[id(x)]) for x in tables.interactions]
    return tables


def next_ids_scorer(pop: torch.Tensor):
    """``score_batch``: the NEXT items after the last history item in catalogue order first, then popularity."""
    num_items = len(pop)
    base = pop / (pop.max() + 1)  # < 1: popularity only orders what the bonus leaves tied

    def score_batch(rows, earlier, target):
        scores = base.expand(len(rows), -1).clone()
        for b, r in enumerate(rows):
            last = r["history_item_idx"][-1]
            nxt = torch.arange(last + 1, min(last + 1 + NEXT, num_items))
            scores[b, nxt] += (NEXT + 1 - (nxt - last)).to(scores.dtype)  # nearest id scores highest
        return mask_history(scores, earlier, target), [None] * len(rows)

    return score_batch


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/study-ml100k.yaml")
    p.add_argument("--out", default="outputs/study/leak-probe")
    args = p.parse_args(argv)

    from r2ec.assets import cache_root
    from r2ec.config import load_config
    from r2ec.data.prepare import input_files, load_source, make_summary, to_prepared
    from r2ec.data.samples import build_samples

    cfg = load_config(args.config)
    d = cfg.data
    movielens = None
    if d.source == "movielens100k" and d.movielens_dir is None:
        from r2ec.assets import resolve

        movielens = Path(resolve("asset://ml-100k"))
    inputs = input_files(d, movielens)
    out, report = Path(args.out), {}
    for rule in ("input-order", "id-order"):
        tables = load_source(d, inputs, cache_root() / "data", log=print)
        if rule == "id-order":
            tables = id_order(tables)
        built = build_samples(tables, d.max_history, d.train_frac, d.valid_frac, d.prompt.rating_scale)
        prepared = to_prepared(built, make_summary(tables, built))
        subset = EvalSubset.of(prepared, "test", None, cfg.eval)
        pop = popularity_scores(prepared)
        evals = []
        for method, score in (("popularity", fixed_scorer(pop)), ("next-ids", next_ids_scorer(pop))):
            folder = out / rule / method
            rank_split(prepared, subset, 512, cfg.eval.ks, folder, method, score)
            evals.append(load_evaluation(folder / "eval_test.json", method))
        result = compare(evals, resamples=cfg.eval.ci_resamples, seed=cfg.eval.ci_seed)
        ties = tie_share(prepared)
        users = subset_users(prepared, cfg.eval.subset_seed)
        print(f"\n{rule}: test split, {ties:.1%} of test targets share their timestamp with the previous item")
        for split, rows in users.items():
            print(f"  {split}: users among the first N samples in time order vs a user-stratified subset of N: "
                  + ", ".join(f"N={n}: {a} vs {b}" for n, (a, b) in rows.items()))
        print()
        print(format_table(result))
        report[rule] = {**result, "test_targets_tied_with_previous": ties, "users_first_vs_stratified": users}
    (out / "leak_probe.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n-> {out / 'leak_probe.json'}")
    return report


def subset_users(prepared, seed: int, sizes=(128, 500, 1000)) -> dict:
    """split -> N -> (users among the first N samples in time order, users in the stratified subset of N)."""
    from r2ec.data.sampler import stratified_subset

    out = {}
    for split in ("valid", "test"):
        users = prepared.splits[split]["user_id"]
        out[split] = {n: (len(set(users[:n])), len({users[i] for i in stratified_subset(users, n, seed)}))
                      for n in sizes}
    return out


def tie_share(prepared) -> float:
    """Share of test samples whose target has the same timestamp as the last history item."""
    test = prepared.splits["test"]
    tied = [h[-1] == t for h, t in zip(test["history_timestamps"], test["target_timestamp"], strict=True)]
    return sum(tied) / len(tied)


if __name__ == "__main__":
    main()
