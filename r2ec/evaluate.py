"""Full-ranking evaluation: Hit@K and NDCG@K over the whole catalogue, every earlier item of the user masked.

Two scorers share one loop:
- ``popularity``: items ranked by how often they are the target of a train sample.
- the dual-head model: greedy reasoning with the HF engine, h_T at the answer marker, cos/tau against the item table:
  the zero-shot model of ``cfg.model`` (its table encoded here), or an exported trained model (``evaluate_export``,
  ``r2ec eval --checkpoint DIR``) with the item table exported with it.

Ties are broken deterministically (``r2ec.algo.metrics.target_rank``): among equal scores the item with the smaller
catalogue index (catalogue sorted by item_id) ranks first.

Which samples: the whole split, or with ``eval.max_samples`` a user-stratified subset (``r2ec.data.sampler.
stratified_subset``, seeded by ``eval.subset_seed``), the same for every method given the same seed and N.

Outputs, under ``run.output_dir``: ``eval_<split>.json`` (``hit@K``/``ndcg@K`` for each K with ``<metric>_ci95``, a
95% interval that resamples users (``r2ec.algo.bootstrap``), ``num_samples``, ``num_users``, ``samples_sha256`` (what
``r2ec compare`` checks first), the subset rule, ``method``, ``split`` and timing) and ``eval_<split>_samples.jsonl``
(per sample: ``sample_id``, ``user_id``, reasoning text, top-10 item ids and titles, target rank).

Deviations: the official code masks the history window only; we mask every earlier item of the user (a repeat of
the target itself is never masked, so it stays rankable).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from r2ec.algo.bootstrap import user_bootstrap_ci, user_codes
from r2ec.algo.metrics import (
    RankingAccumulator,
    is_point_metric,
    mask_history,
    metric_names,
    per_sample_metrics,
    target_rank,
    topk_items,
)
from r2ec.algo.recpo import centred_rows, unit_rows
from r2ec.checkpoint import write_json_atomic
from r2ec.data.sampler import history_tensor, stratified_subset
from r2ec.data.samples import samples_sha256
from r2ec.prompts import PromptBuilder, item_prompt_ids, user_prompt_ids

TOP_N_LOGGED = 10


def popularity_scores(prepared) -> torch.Tensor:
    """(V,) float: how often each item is the target of a train sample."""
    counts = torch.zeros(len(prepared.items), dtype=torch.float32)
    targets = torch.as_tensor(prepared.splits["train"]["target_item_idx"], dtype=torch.long)
    counts.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float32))
    return counts


def _item_table_key(model_cfg, prompt_ids: list[list[int]]) -> str:
    from r2ec.assets import resolve

    h = hashlib.sha256()
    path = Path(resolve(model_cfg.name_or_path))
    h.update(str(path.resolve() if path.exists() else model_cfg.name_or_path).encode())
    if path.is_dir():  # a local checkpoint: its files' sizes and times identify the weights
        for f in sorted(path.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    # only what changes the encodings (not tau or how training treats the table)
    h.update(json.dumps(model_cfg.model_dump(mode="json", include={"name_or_path", "dtype", "answer_marker", "lora"}),
                        sort_keys=True).encode())
    for ids in prompt_ids:
        h.update(b"|" + ",".join(map(str, ids)).encode())
    return h.hexdigest()[:16]


def zero_shot_item_table(model, model_cfg, prompt_ids: list[list[int]], batch_size: int, cache_dir: Path | None,
                         log=print) -> torch.Tensor:
    """Encode the catalogue with the (untrained) model; cached by weights + prompts, since it is deterministic."""
    from safetensors.torch import load_file, save_file

    path = None
    if cache_dir is not None and not model_cfg.lora.enabled:
        path = cache_dir / f"item_table-{_item_table_key(model_cfg, prompt_ids)}.safetensors"
        if path.is_file():
            log(f"item table: loaded from cache {path}")
            return load_file(str(path))["h_items"].to(model.device)
    from tqdm import tqdm

    start = time.perf_counter()
    with tqdm(total=len(prompt_ids), desc="encoding items", unit="item", leave=False) as bar:
        table = model.encode_items(prompt_ids, batch_size=batch_size, progress=bar.update)
    log(f"item table: {len(prompt_ids)} items encoded in {time.perf_counter() - start:.1f}s")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"h_items": table.cpu().contiguous()}, str(tmp))
        os.replace(tmp, path)
    return table


def evaluate(cfg, split: Literal["valid", "test"] | None = None, baseline: Literal["popularity"] | None = None,
             log=print) -> dict:
    """Evaluate on a split and write the JSON and per-sample JSONL; returns the metrics dict."""
    from r2ec.assets import cache_root
    from r2ec.data.prepare import prepare_from_config

    split = split or cfg.eval.split
    prepared = prepare_from_config(cfg.data, log=log)
    subset = EvalSubset.of(prepared, split, cfg.eval.max_samples, cfg.eval)
    titles = list(prepared.items["title"])
    out_dir = Path(cfg.run.output_dir)

    model = builder = h_items = pop = None
    if baseline == "popularity":
        pop = popularity_scores(prepared)
        method, batch_size = "popularity", 256
    elif baseline is None:
        from r2ec.model import DualHeadModel, resolve_device

        torch.manual_seed(cfg.run.seed)
        model = DualHeadModel.from_config(cfg.model, resolve_device(cfg.run.device))
        builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
        h_items = zero_shot_item_table(model, cfg.model, item_prompt_ids(builder, model.tokenizer, prepared.items),
                                       cfg.eval.item_batch_size, cache_root() / "item_tables", log)
        if cfg.model.center_items:  # the table a frozen, centred run starts from (driver/session.py): cosine sees it
            h_items = centred_rows(h_items)
        method, batch_size = "zero-shot" if not cfg.model.lora.enabled else "model", cfg.eval.batch_size
    else:
        raise ValueError(f"unknown baseline {baseline!r}; expected 'popularity' or none")

    if pop is not None:
        score_batch = fixed_scorer(pop)
    else:
        score_batch = _model_scorer(model, builder, h_items, titles, cfg.eval.max_new_tokens)

    return rank_split(prepared, subset, batch_size, cfg.eval.ks, out_dir, method, score_batch,
                      reasoned=pop is None and cfg.eval.max_new_tokens > 0)


def fixed_scorer(item_scores: torch.Tensor):
    """``score_batch`` of a baseline that gives every user the same scores (V,) (popularity), history masked."""
    def score_batch(rows, earlier, target):
        return mask_history(item_scores.expand(len(rows), -1), earlier, target), [None] * len(rows)

    return score_batch


def _model_scorer(model, builder: PromptBuilder, h_items: torch.Tensor, titles: list[str], max_new_tokens: int):
    """``score_batch`` of the dual-head model: greedy reasoning, then the rec_head over the full catalogue (the
    table normalised once here, not per batch). ``max_new_tokens`` 0 = no reasoning: each chain is the answer
    marker alone (appended), h_T is read at prompt + marker, and nothing is generated."""
    h_items = unit_rows(h_items)

    @torch.no_grad()
    def score_batch(rows, earlier, target):
        prompts = [user_prompt_ids(builder, model.tokenizer, r, titles) for r in rows]
        if max_new_tokens == 0:  # the marker alone; the generator is not called at all
            chains = [model.finish_chain([]) for _ in prompts]
        else:
            chains = model.generate(prompts, max_new_tokens=max_new_tokens)
        h_user = model.user_hidden(prompts, [c.token_ids for c in chains])
        scores = model.item_scores(h_user, h_items, earlier.to(h_items.device), target.to(h_items.device),
                                   items_unit=True)
        return scores.cpu(), [{"text": c.text, "appended_marker": c.appended_marker} for c in chains]

    return score_batch


def evaluate_export(cfg, model_dir: str | Path, split: Literal["valid", "test"] | None = None, log=print) -> dict:
    """Evaluate an exported model (``r2ec export``) on a split of ``cfg.data``, ranking with the exported item
    table. The data's catalogue must be the exported one (same item ids in the same order); the user prompts use
    the export's prompt settings, the ones its item table was encoded with. ``cfg.model`` is not used."""
    from r2ec.bundle import EXPORT_TABLE, ExportError, catalogue_differences, load_export
    from r2ec.data.prepare import prepare_from_config

    split = split or cfg.eval.split
    torch.manual_seed(cfg.run.seed)
    exported = load_export(model_dir, cfg.run.device)
    prepared = prepare_from_config(cfg.data, log=log)
    if prepared.item_ids() != exported.item_ids:
        raise ExportError(f"the catalogue of the data ({cfg.data.source}) is not the one exported in "
                          f"{Path(model_dir) / EXPORT_TABLE}: "
                          f"{catalogue_differences(exported.item_ids, prepared.item_ids())}")
    titles = list(prepared.items["title"])
    changed = sum(a != b for a, b in zip(titles, exported.titles, strict=True))
    if changed:
        log(f"eval: warning: {changed} item titles differ from the exported catalogue (the item table was encoded "
            "with the exported titles; user prompts use the data's)")
    if cfg.data.prompt.model_dump(mode="json") != exported.meta["prompt"]:
        log("eval: note: the config's data.prompt differs from the export's; using the export's prompt settings")
    subset = EvalSubset.of(prepared, split, cfg.eval.max_samples, cfg.eval)
    score_batch = _model_scorer(exported.model, exported.builder, exported.h_items, titles, cfg.eval.max_new_tokens)
    source = exported.meta.get("source", {})
    return rank_split(prepared, subset, cfg.eval.batch_size, cfg.eval.ks, Path(cfg.run.output_dir), "r2ec-export",
                      score_batch, {"model": str(model_dir), "step": source.get("step"),
                                    "config_hash": source.get("config_hash")}, reasoned=cfg.eval.max_new_tokens > 0)


ScoreBatch = Callable[[list[dict], torch.Tensor, torch.Tensor], tuple[torch.Tensor, list[dict | None]]]


@dataclass(frozen=True)
class EvalSubset:
    """Which samples of a split an evaluation ranks, and how their intervals are drawn."""

    split: str  # 'valid' | 'test'
    indices: list[int]  # rows of the split, ascending
    max_samples: int | None  # the N asked for (None = the whole split)
    seed: int  # eval.subset_seed
    ci_resamples: int
    ci_seed: int

    @classmethod
    def of(cls, prepared, split: str, max_samples: int | None, eval_cfg) -> EvalSubset:
        """The user-stratified subset of ``max_samples`` samples (the whole split for None)."""
        users = list(prepared.splits[split]["user_id"])
        if not users:
            raise ValueError(f"the {split} split is empty; nothing to evaluate")
        indices = stratified_subset(users, max_samples, eval_cfg.subset_seed)
        return cls(split, indices, max_samples, eval_cfg.subset_seed, eval_cfg.ci_resamples, eval_cfg.ci_seed)

    def describe(self) -> dict:
        rule = "whole split" if self.max_samples is None else "user-stratified"
        return {"rule": rule, "max_samples": self.max_samples,
                "subset_seed": self.seed, "ci": {"unit": "user", "level": 0.95, "resamples": self.ci_resamples,
                                                 "seed": self.ci_seed}}


def format_metrics(result: dict) -> str:
    """``hit@5=0.0123 ndcg@5=...``: the point metrics of an evaluation result on one line (intervals left out), and
    the share of distinct reasoning chains when the evaluation reasoned."""
    line = " ".join(f"{k}={v:.4f}" for k, v in result.items() if is_point_metric(k))
    if "reasoning_distinct_frac" in result:
        line += f"  (distinct chains {result['reasoning_distinct_frac']:.3f})"
    return line


def user_intervals(ranks: torch.Tensor, user_ids: list[str], ks: list[int], resamples: int, seed: int) -> dict:
    """``num_users`` and a user-bootstrap ``<metric>_ci95`` for every hit@K / ndcg@K of the samples' ``ranks``."""
    out: dict = {}
    names = metric_names(ks)
    values = per_sample_metrics(ranks, names)  # (N, M)
    user, users = user_codes(user_ids)
    ci = user_bootstrap_ci(values, user, len(users), resamples, seed)
    out["num_users"] = len(users)
    for name, (lo, hi) in zip(names, ci.tolist(), strict=True):
        out[f"{name}_ci95"] = [lo, hi]
    return out


def rank_split(prepared, subset: EvalSubset, batch_size: int, ks: list[int], out_dir: Path, method: str,
               score_batch: ScoreBatch, extra: dict | None = None, reasoned: bool = False) -> dict:
    """The evaluation loop shared by every scorer: ``score_batch(rows, earlier (B, H), target (B,))`` returns
    full-catalogue scores (B, V) with the history already masked, and per-row reasoning (or None). Writes
    ``eval_<split>.json`` and ``eval_<split>_samples.jsonl`` under ``out_dir``; returns the metrics dict.
    ``reasoned``: the scorer generated its chains (``eval.max_new_tokens`` > 0), so the result reports the share
    of distinct chains (an evaluation without reasoning has the bare marker for every user by construction)."""
    from tqdm import tqdm

    split, indices = subset.split, subset.indices
    ds = prepared.splits[split]
    titles = list(prepared.items["title"])
    item_ids = prepared.item_ids()
    out_dir.mkdir(parents=True, exist_ok=True)
    acc, ranks = RankingAccumulator(ks), []
    seen: dict[str, list] = {"sample_id": [], "user_id": [], "target_item_id": []}
    chains: list[str] = []  # every reasoning chain: how many differ tells a collapsed language model at a glance
    samples_path = out_dir / f"eval_{split}_samples.jsonl"
    start = time.perf_counter()
    n = len(indices)
    with open(samples_path.with_suffix(".tmp"), "w") as fout, tqdm(total=n, desc=f"eval {split}", unit="user") as bar:
        for lo in range(0, n, batch_size):
            rows = [ds[i] for i in indices[lo: lo + batch_size]]
            earlier = history_tensor([prepared.earlier_items_of(r["user_id"], r["position"]) for r in rows])
            target = torch.as_tensor([r["target_item_idx"] for r in rows], dtype=torch.long)
            scores, reasoning = score_batch(rows, earlier, target)
            top = topk_items(scores, min(TOP_N_LOGGED, len(item_ids)))
            rank = target_rank(scores, target)
            acc.add(rank)
            ranks += rank.tolist()
            for r, rk, tp, rs in zip(rows, rank.tolist(), top.tolist(), reasoning, strict=True):
                rec = {"sample_id": r["sample_id"], "user_id": r["user_id"],
                       "target_item_id": item_ids[r["target_item_idx"]], "target_title": titles[r["target_item_idx"]],
                       "target_rank": rk, "top10_item_ids": [item_ids[i] for i in tp],
                       "top10_titles": [titles[i] for i in tp]}
                if rs is not None:
                    rec["reasoning"] = rs["text"]
                    rec["appended_marker"] = rs["appended_marker"]
                    chains.append(rs["text"])
                for key in seen:
                    seen[key].append(rec[key])
                fout.write(json.dumps(rec) + "\n")
            bar.update(len(rows))
    os.replace(samples_path.with_suffix(".tmp"), samples_path)
    metrics = {**acc.compute(), **user_intervals(torch.as_tensor(ranks), seen["user_id"], ks, subset.ci_resamples,
                                                 subset.ci_seed)}
    result = {**metrics, "method": method, "split": split, "num_items": len(item_ids),
              "samples_sha256": samples_sha256(seen["sample_id"], seen["user_id"], seen["target_item_id"]),
              "subset": subset.describe(), "seconds": round(time.perf_counter() - start, 2), **(extra or {})}
    if reasoned and chains:  # 1.0: every sample reasoned differently; 1/N: one chain for every user (collapsed)
        result["reasoning_distinct_frac"] = len(set(chains)) / len(chains)
    write_json_atomic(out_dir / f"eval_{split}.json", result, sort_keys=False)
    return result
