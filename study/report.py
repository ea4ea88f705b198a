"""The quality study's tables and curves, from what the study's runs wrote under ``outputs/study/``.

Two tables, each made by ``r2ec compare`` (``r2ec.compare``) from the evaluations' per-sample ranks, so every method is
measured the same way, on the same samples, with 95% intervals that resample users and, for each method, a paired
user-bootstrap interval of its difference from the first row (popularity):

* the study subset: the user-stratified subset of ``eval.max_samples`` test samples (``configs/study-ml100k.yaml``),
  the one every method can afford, the LLM methods included;
* the full test split, for the methods cheap enough to rank all of it.

A method whose evaluation is missing, or was computed on other samples (e.g. under the old split), is listed as such
and left out of the table; ``r2ec compare`` refuses to mix them. Draws the RecPO training curves (reward, R_d,
validation NDCG@10 vs step) as PNG files.

    python -m study.report      # tables on stdout, study/results.json, docs/img/study_curves.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from r2ec.compare import CompareError, compare, format_table, load_evaluation, sample_difference

# (evaluation under --root, label); the order of the tables; the first present one is the reference.
SUBSET = [
    ("popularity/eval_test.json", "Popularity"),
    ("sasrec/subset{n}/eval_test.json", "SASRec"),
    ("zero-shot/eval_test.json", "Zero-shot dual-head (SmolLM2-135M)"),
    ("no-reasoning/eval_test.json", "R2ec w/o reasoning"),
    ("recpo/eval_test.json", "R2ec + RecPO"),
]
FULL = [
    ("popularity-full/eval_test.json", "Popularity"),
    ("sasrec/eval_test.json", "SASRec"),
]


def table(root: Path, methods: list[tuple[str, str]], n: int, resamples: int, seed: int) -> dict | None:
    """``r2ec compare`` over the methods whose evaluation exists and ranked the reference's samples."""
    evals, skipped = [], []
    for rel, label in methods:
        path = root / rel.format(n=n)
        if not path.is_file():
            skipped.append({"method": label, "why": f"no {path}"})
            continue
        e = load_evaluation(path, label)
        why = sample_difference(evals[0], e) if evals else None
        if why is not None:
            skipped.append({"method": label, "why": why})
            continue
        evals.append(e)
    for s in skipped:
        print(f"(left out: {s['method']}: {s['why']})")
    if len(evals) < 2:
        return None
    result = compare(evals, resamples=resamples, seed=seed)
    print(format_table(result) + "\n")
    return {**result, "left_out": skipped}


def main() -> None:
    p = argparse.ArgumentParser(description="quality study: tables + curves")
    p.add_argument("--root", default="outputs/study")
    p.add_argument("--config", default="configs/study-ml100k.yaml", help="for eval.max_samples / ci settings")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--out", default="study/results.json")
    args = p.parse_args()
    from r2ec.config import load_config

    ev = load_config(args.config).eval
    root = Path(args.root)
    try:
        print(f"\nTest, the user-stratified subset of {ev.max_samples} samples\n")
        subset = table(root, SUBSET, ev.max_samples, ev.ci_resamples, ev.ci_seed)
        print("\nTest, the full split\n")
        full = table(root, FULL, ev.max_samples, ev.ci_resamples, ev.ci_seed)
    except CompareError as e:
        raise SystemExit(f"study.report: {e}") from None
    Path(args.out).write_text(json.dumps({"subset": subset, "full": full}, indent=1) + "\n")
    print(f"-> {args.out}")
    curves(root / "recpo", root / "no-reasoning", Path(args.img))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def curves(recpo: Path, no_reasoning: Path, img: Path) -> None:
    """Reward and R_d per step (with a 5-step moving average) and validation NDCG@10, as PNG files."""
    records = _read_jsonl(recpo / "metrics.jsonl")
    steps = [r for r in records if "reward_mean" in r]
    valid = [r for r in records if "valid/ndcg@10" in r]
    if not steps:
        print(f"(no {recpo / 'metrics.jsonl'}; no curves drawn)")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    x = [r["step"] for r in steps]

    def smooth(v: list[float], w: int = 5) -> list[float]:
        return [sum(v[max(0, i - w + 1):i + 1]) / len(v[max(0, i - w + 1):i + 1]) for i in range(len(v))]

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key, title in ((axes[0], "reward_mean", "fused reward (mean over chains)"),
                           (axes[1], "r_d_mean", "R_d, ranking reward (mean)")):
        v = [r[key] for r in steps]
        ax.plot(x, v, ".", alpha=0.4, label="per step")
        ax.plot(x, smooth(v), "-", label="5-step mean")
        ax.set_title(title)
        ax.set_xlabel("RecPO step")
        ax.legend()
    ax = axes[2]
    ax.plot([r["step"] for r in valid], [r["valid/ndcg@10"] for r in valid], "o-", label="R2ec + RecPO")
    nr = [r for r in _read_jsonl(no_reasoning / "train_log.jsonl") if r.get("valid_ndcg@10") is not None]
    if nr:
        ax2 = ax.twiny()
        ax2.plot([r["step"] for r in nr], [r["valid_ndcg@10"] for r in nr], "s--", color="tab:orange",
                 label="w/o reasoning (top axis: its steps)")
        ax2.set_xlabel("w/o reasoning: optimiser step")
        ax2.legend(loc="lower right")
    ax.set_title("validation NDCG@10")
    ax.set_xlabel("RecPO step")
    ax.legend(loc="upper left")
    fig.tight_layout()
    out = img / "study_curves.png"
    fig.savefig(out, dpi=110)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
