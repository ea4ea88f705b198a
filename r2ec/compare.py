"""``r2ec compare A B [C ...]``: several evaluations of the same samples in one table, with paired intervals.

Each argument is a run folder (its ``eval_<split>.json``, ``--split`` choosing the split) or an ``eval_<split>.json``
path; next to it must lie the ``eval_<split>_samples.jsonl`` every evaluation writes (per sample: ``sample_id``,
``user_id``, ``target_item_id``, ``target_rank``). Metrics are recomputed from those ranks with the project's metric
code, so every method in the table is measured the same way.

Before anything is compared, the evaluations must have ranked the same samples: the same split, the same catalogue
size and the same set of (sample_id, user_id, target item) triples. Otherwise the command refuses with one line
naming the difference (e.g. another subset, or a split built under another order rule, where the same sample ids
name other samples).

The table gives each method's metrics with a 95% interval that resamples users (``r2ec.algo.bootstrap``) and, for
every method after the first, its difference from the first with a *paired* user-bootstrap interval: the same users
are drawn for both methods, so the interval reflects how consistently one beats the other on the same users, not the
spread of users. Each interval uses the same draws (users numbered in sorted id order, ``--resamples`` and
``--seed``), so a method's interval here equals the ``_ci95`` its own evaluation wrote with the same settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from r2ec.algo.bootstrap import user_bootstrap_ci, user_codes
from r2ec.algo.metrics import is_point_metric, metric_names, per_sample_metrics


class CompareError(ValueError):
    """Evaluations that cannot be read or compared; the message names the file and the difference."""


@dataclass
class Evaluation:
    label: str
    path: Path  # its eval_<split>.json
    meta: dict  # the eval_<split>.json contents
    triples: list[tuple[int, str, str]]  # (sample_id, user_id, target_item_id), sorted by sample_id
    ranks: torch.Tensor  # (N,) long, 1-based target ranks in the order of ``triples``


def locate(spec: str, split: str) -> Path:
    """The ``eval_<split>.json`` of a run folder, or the given JSON path itself."""
    p = Path(spec)
    if p.is_dir():
        path = p / f"eval_{split}.json"
        if not path.is_file():
            found = ", ".join(sorted(f.name for f in p.glob("eval_*.json"))) or "none"
            raise CompareError(f"{p}: no eval_{split}.json in this folder (evaluations found: {found})")
        return path
    if not p.is_file():
        raise CompareError(f"{p}: no such file or folder")
    if not (p.name.startswith("eval_") and p.suffix == ".json"):
        raise CompareError(f"{p}: expected a run folder or an eval_<split>.json file")
    return p


def load_evaluation(path: Path, label: str) -> Evaluation:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CompareError(f"{path}: not a JSON evaluation ({e})") from None
    if not isinstance(meta, dict) or "split" not in meta:
        raise CompareError(f"{path}: not an evaluation written by r2ec (no 'split' key)")
    samples = path.with_name(f"eval_{meta['split']}_samples.jsonl")
    if not samples.is_file():
        raise CompareError(f"{samples}: missing; compare needs the per-sample ranks every evaluation writes next to "
                           f"{path.name}")
    rows: dict[int, tuple[str, str, int]] = {}
    for number, line in enumerate(samples.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            sid, row = int(rec["sample_id"]), (str(rec["user_id"]), str(rec["target_item_id"]),
                                               int(rec["target_rank"]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CompareError(f"{samples}: line {number}: expected a JSON object with sample_id, user_id, "
                               f"target_item_id and target_rank ({type(e).__name__}: {e})") from None
        if sid in rows:
            raise CompareError(f"{samples}: line {number}: sample_id {sid} appears twice")
        rows[sid] = row
    if "num_samples" in meta and meta["num_samples"] != len(rows):
        raise CompareError(f"{samples}: {len(rows)} samples, but {path.name} says num_samples {meta['num_samples']} "
                           "(an interrupted or mixed evaluation?)")
    ids = sorted(rows)
    return Evaluation(label, path, meta, [(i, rows[i][0], rows[i][1]) for i in ids],
                      torch.as_tensor([rows[i][2] for i in ids], dtype=torch.long))


def sample_difference(a: Evaluation, b: Evaluation) -> str | None:
    """Why ``a`` and ``b`` were not computed on the same samples (one line), or None when they were."""
    if a.meta["split"] != b.meta["split"]:
        return f"{a.label} is a {a.meta['split']} evaluation and {b.label} a {b.meta['split']} one"
    if a.meta.get("num_items") != b.meta.get("num_items"):
        return (f"{a.label} ranked {a.meta.get('num_items')} catalogue items and {b.label} "
                f"{b.meta.get('num_items')}: another catalogue")
    if a.triples == b.triples:
        return None
    ta, tb = {t[0]: t for t in a.triples}, {t[0]: t for t in b.triples}
    only_a, only_b = sorted(ta.keys() - tb.keys()), sorted(tb.keys() - ta.keys())
    if only_a or only_b:
        return (f"{a.label} has {len(a.triples)} samples and {b.label} {len(b.triples)}: {len(only_a)} only in "
                f"{a.label} (sample_id {_some(only_a)}), {len(only_b)} only in {b.label} (sample_id {_some(only_b)}); "
                "evaluate both with the same eval.max_samples and eval.subset_seed")
    other = [i for i in ta if ta[i] != tb[i]]
    i = other[0]
    return (f"{len(other)} sample ids name other samples in {a.label} and {b.label} (sample_id {i}: user "
            f"{ta[i][1]}, target {ta[i][2]} vs user {tb[i][1]}, target {tb[i][2]}): their splits were built "
            "differently (another data config, or another order rule); re-evaluate on one prepared split")


def _some(ids: list[int], n: int = 3) -> str:
    return "none" if not ids else ", ".join(map(str, ids[:n])) + (", ..." if len(ids) > n else "")


def shared_metrics(evals: list[Evaluation]) -> list[str]:
    """hit@K / ndcg@K for every K that all evaluations report, K ascending."""
    ks = None
    for e in evals:
        mine = {int(k.split("@")[1]) for k in e.meta if is_point_metric(k)}
        ks = mine if ks is None else ks & mine
    return metric_names(sorted(ks or ()))


def compare(evals: list[Evaluation], names: list[str] | None = None, resamples: int = 1000, seed: int = 0) -> dict:
    """The comparison as a JSON-ready dict; raises CompareError when the evaluations differ in their samples."""
    if len(evals) < 2:
        raise CompareError("compare needs at least two evaluations")
    for e in evals[1:]:
        why = sample_difference(evals[0], e)
        if why is not None:
            raise CompareError(f"not computed on the same samples: {why}")
    names = names or shared_metrics(evals)
    if not names:
        raise CompareError("the evaluations share no hit@K / ndcg@K metric")
    user, users = user_codes([t[1] for t in evals[0].triples])
    values = [per_sample_metrics(e.ranks, names) for e in evals]

    def summary(v: torch.Tensor) -> dict:
        ci = user_bootstrap_ci(v, user, len(users), resamples, seed).tolist()
        return {n: {"mean": float(v[:, j].mean()), "ci95": ci[j]} for j, n in enumerate(names)}

    ref = evals[0]
    return {
        "split": ref.meta["split"], "num_samples": len(ref.triples), "num_users": len(users), "metrics": names,
        "ci": {"unit": "user", "level": 0.95, "resamples": resamples, "seed": seed},
        "methods": [{"label": e.label, "path": str(e.path), "method": e.meta.get("method"), **summary(v)}
                    for e, v in zip(evals, values, strict=True)],
        "differences": [{"label": f"{e.label} - {ref.label}", **summary(v - values[0])}
                        for e, v in zip(evals[1:], values[1:], strict=True)],
    }


def format_table(result: dict) -> str:
    """Markdown: one row per method (mean [95% CI]), then one per difference to the first method."""
    names = result["metrics"]
    lines = [f"{result['split']}: {result['num_samples']} samples, {result['num_users']} users; 95% intervals resample "
             f"users ({result['ci']['resamples']} resamples, seed {result['ci']['seed']}), differences paired",
             "", "| method | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    for row in result["methods"]:
        lines.append(f"| {row['label']} | " + " | ".join(_cell(row[n], signed=False) for n in names) + " |")
    for row in result["differences"]:
        lines.append(f"| {row['label']} | " + " | ".join(_cell(row[n], signed=True) for n in names) + " |")
    return "\n".join(lines)


def _cell(v: dict, signed: bool) -> str:
    fmt = "{:+.4f}" if signed else "{:.4f}"
    lo, hi = v["ci95"]
    mark = " *" if signed and (lo > 0 or hi < 0) else ""  # the paired interval excludes zero
    return f"{fmt.format(v['mean'])} [{fmt.format(lo)}, {fmt.format(hi)}]{mark}"


def default_labels(paths: list[Path]) -> list[str]:
    """The run folder's name for each evaluation, made unique by the parent folders' names where needed."""
    labels = [p.parent.name or str(p.parent) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [str(p.parent) for p in paths]
    return labels


def compare_command(specs: list[str], split: str, json_out: str | None, metrics: str | None, resamples: int,
                    seed: int, labels: str | None) -> int:
    paths = [locate(s, split) for s in specs]
    names = labels.split(",") if labels else default_labels(paths)
    if len(names) != len(paths):
        raise CompareError(f"--labels has {len(names)} names for {len(paths)} evaluations")
    evals = [load_evaluation(p, n) for p, n in zip(paths, names, strict=True)]
    chosen = [m.strip() for m in metrics.split(",")] if metrics else None
    if chosen:
        available = shared_metrics(evals)
        missing = [m for m in chosen if m not in available]
        if missing:
            raise CompareError(f"--metrics {', '.join(missing)}: not reported by every evaluation "
                               f"(available: {', '.join(available)})")
    result = compare(evals, chosen, resamples, seed)
    print(format_table(result))
    if json_out:
        out = Path(json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return 0
