"""The quality study's tables and curves, from the results ``study.run`` keeps under ``study/results/``.

Every table is made by ``r2ec compare`` (``r2ec.compare``) from the evaluations' per-sample ranks, so every method is
measured the same way, on the same samples, with 95% intervals that resample users and paired user-bootstrap
intervals of differences:

* the study subset: the user-stratified subset of ``eval.max_samples`` test samples (``configs/study-ml100k.yaml``,
  every test user), the one every method can afford, the LLM methods included; each method minus popularity;
* the questions the study asks, each a paired comparison on that subset: warm-up + RecPO minus zero-shot, minus
  SASRec, and minus warm-up only (the paper's claim that reasoning helps);
* the full test split, for the methods cheap enough to rank all of it;
* the training runs' collapse diagnostics (docs/training.md): RecPO steps with no advantage left, distinct chains
  per step, distinct chains and validation NDCG@10 per validation, distinct chains of the test evaluation.

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
    diag = diagnostics(root)
    Path(args.out).write_text(json.dumps({"subset": subset, "pairs": pairs, "full": full, "diagnostics": diag},
                                         indent=1) + "\n")
    print(f"-> {args.out}")
    curves(root, Path(args.img))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


TRAINED = ("warmup", "recpo", "warmup-recpo")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def diagnostics(root: Path) -> dict[str, dict]:
    """Per training run, what tells a learning run from a collapsed one: how many RecPO steps had (almost) no
    advantage left (``adv_abs_mean`` 0 or below .005: every chain of every group scored alike), the share of distinct
    chains per RecPO step (``chains_distinct``, mean and minimum), and per validation its NDCG@10 and share of
    distinct chains; then the test evaluation's share of distinct chains. A figure the run did not log is None."""
    out: dict[str, dict] = {}
    print("\nTraining diagnostics (collapse: no advantage left, one chain for every user)\n")
    for name in TRAINED:
        records = _read_jsonl(root / name / "metrics.jsonl")
        if not records:
            continue
        rl = [r for r in records if r.get("phase", "recpo") == "recpo" and "adv_abs_mean" in r]
        adv = [r["adv_abs_mean"] for r in rl]
        distinct = [r["chains_distinct"] for r in rl if "chains_distinct" in r]
        test = root / name / "eval_test.json"
        test_distinct = json.loads(test.read_text()).get("reasoning_distinct_frac") if test.is_file() else None
        d = out[name] = {
            "recpo_steps": len(rl),
            "adv_zero_steps": sum(a == 0 for a in adv),
            "adv_below_0.005_steps": sum(a < 0.005 for a in adv),
            "chains_distinct_mean": sum(distinct) / len(distinct) if distinct else None,
            "chains_distinct_min": min(distinct) if distinct else None,
            "valid": [{"step": r["step"], "ndcg@10": r["valid/ndcg@10"],
                       "reasoning_distinct_frac": r.get("valid/reasoning_distinct_frac")}
                      for r in records if "valid/ndcg@10" in r],
            "test_reasoning_distinct_frac": test_distinct,
        }
        print(f"{name}: {d['recpo_steps']} RecPO steps, adv_abs_mean 0 in {d['adv_zero_steps']} and < .005 in "
              f"{d['adv_below_0.005_steps']}; distinct chains per step mean {_fmt(d['chains_distinct_mean'])}, "
              f"min {_fmt(d['chains_distinct_min'])}; test distinct chains {_fmt(test_distinct)}")
        for v in d["valid"]:
            print(f"  valid step {v['step']}: NDCG@10 {v['ndcg@10']:.4f}, distinct chains "
                  f"{_fmt(v['reasoning_distinct_frac'])}")
    return out


def curves(root: Path, img: Path) -> None:
    """Warm-up loss, RecPO reward and R_d per step (5-step moving averages) and validation NDCG@10 of the training
    methods, against the global step, as one PNG."""
    runs = {name: _read_jsonl(root / name / "metrics.jsonl") for name in TRAINED}
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
