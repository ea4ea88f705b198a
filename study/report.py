"""The quality study's tables and curves, from the results ``study.run`` keeps under ``study/results/``.

Every table is made by ``r2ec compare`` (``r2ec.compare``) from the evaluations' per-sample ranks, so every method is
measured the same way, on the same samples, with 95% intervals that resample users and paired user-bootstrap
intervals of differences:

* the study subset: the user-stratified subset of ``eval.max_samples`` test samples (``configs/study-ml100k.yaml``,
  every test user), the one every method can afford, the LLM methods included; each method minus popularity;
* the questions the study asks, each a paired comparison on that subset: warm-up + RecPO minus zero-shot, minus
  SASRec, and minus warm-up only (the paper's claim that reasoning helps);
* the full test split, for the methods cheap enough to rank all of it.

A method whose evaluation is missing, or was computed on other samples, is listed as such and left out; ``r2ec
compare`` refuses to mix them. Draws the training curves (warm-up loss, RecPO reward and R_d, validation NDCG@10 vs
step) into one PNG.

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
    ("sasrec/eval_test.json", "SASRec"),
    ("zero-shot/eval_test.json", "Zero-shot dual-head (SmolLM2-135M)"),
    ("warmup/eval_test.json", "Warm-up only (= w/o reasoning)"),
    ("recpo/eval_test.json", "RecPO without warm-up"),
    ("warmup-recpo/eval_test.json", "Warm-up + RecPO"),
]
PAIRS = [  # (reference, method): the study's questions
    ("zero-shot/eval_test.json", "warmup-recpo/eval_test.json"),
    ("sasrec/eval_test.json", "warmup-recpo/eval_test.json"),
    ("warmup/eval_test.json", "warmup-recpo/eval_test.json"),
    ("zero-shot/eval_test.json", "recpo/eval_test.json"),
]
FULL = [
    ("popularity-full/eval_test.json", "Popularity"),
    ("sasrec/full/eval_test.json", "SASRec"),
]
LABELS = dict(SUBSET)


def table(root: Path, methods: list[tuple[str, str]], resamples: int, seed: int) -> dict | None:
    """``r2ec compare`` over the methods whose evaluation exists and ranked the reference's samples."""
    evals, skipped = [], []
    for rel, label in methods:
        path = root / rel
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
    p.add_argument("--root", default="study/results")
    p.add_argument("--config", default="configs/study-ml100k.yaml", help="for eval.max_samples / ci settings")
    p.add_argument("--img", default="docs/img")
    p.add_argument("--out", default="study/results.json")
    args = p.parse_args()
    from r2ec.config import load_config

    ev = load_config(args.config).eval
    root = Path(args.root)
    try:
        print(f"\nTest, the user-stratified subset of {ev.max_samples} samples\n")
        subset = table(root, SUBSET, ev.ci_resamples, ev.ci_seed)
        pairs = []
        for ref, method in PAIRS:
            print(f"\n{LABELS[method]} vs {LABELS[ref]}\n")
            pairs.append(table(root, [(ref, LABELS[ref]), (method, LABELS[method])], ev.ci_resamples, ev.ci_seed))
        print("\nTest, the full split\n")
        full = table(root, FULL, ev.ci_resamples, ev.ci_seed)
    except CompareError as e:
        raise SystemExit(f"study.report: {e}") from None
    Path(args.out).write_text(json.dumps({"subset": subset, "pairs": pairs, "full": full}, indent=1) + "\n")
    print(f"-> {args.out}")
    curves(root, Path(args.img))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def curves(root: Path, img: Path) -> None:
    """Warm-up loss, RecPO reward and R_d per step (5-step moving averages) and validation NDCG@10 of the training
    methods, against the global step, as one PNG."""
    runs = {name: _read_jsonl(root / name / "metrics.jsonl") for name in ("warmup", "recpo", "warmup-recpo")}
    if not any(runs.values()):
        print(f"(no metrics.jsonl under {root}; no curves drawn)")
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def smooth(v: list[float], w: int = 5) -> list[float]:
        return [sum(v[max(0, i - w + 1):i + 1]) / len(v[max(0, i - w + 1):i + 1]) for i in range(len(v))]

    img.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    panels = (("warmup", "loss_item", "warm-up item loss"), ("recpo", "reward_mean", "fused reward (mean)"),
              ("recpo", "r_d_mean", "R_d, ranking reward (mean)"))
    for ax, (phase, key, title) in zip(axes, panels, strict=False):
        for name, records in runs.items():
            steps = [r for r in records if r.get("phase") == phase and key in r]
            if steps:
                ax.plot([r["step"] for r in steps], smooth([r[key] for r in steps]), "-", label=name)
        ax.set_title(f"{title}, 5-step mean")
        ax.set_xlabel("step")
        ax.legend()
    ax = axes[3]
    for name, records in runs.items():
        valid = [r for r in records if "valid/ndcg@10" in r]
        cfg = root / name / "config.json"
        if valid:  # a warm-up-only run validates without reasoning (eval.max_new_tokens 0): say so in the legend
            quiet = cfg.is_file() and json.loads(cfg.read_text())["eval"]["max_new_tokens"] == 0
            ax.plot([r["step"] for r in valid], [r["valid/ndcg@10"] for r in valid], "o-",
                    label=name + (" (without reasoning)" if quiet else " (with reasoning)"))
    ax.set_title("validation NDCG@10")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    out = img / "study_curves.png"
    fig.savefig(out, dpi=110)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
