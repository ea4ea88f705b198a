"""The quality study's table and curves, from what the study's runs wrote under ``outputs/study/``.

Reads each method's ``eval_test.json`` and ``eval_test_samples.jsonl`` (the per-sample target ranks every evaluation
in this project writes), recomputes Hit@K / NDCG@K over the first ``--samples`` test samples with the project's
metric code, and adds a 95% bootstrap interval for NDCG@10 (resampling test samples) and, against R2ec + RecPO, a
paired bootstrap interval of the difference: with 500 test samples a Hit@10 of 0.06 is 30 hits, so differences of
a few hundredths are within noise and the table says so. Draws the RecPO training curves (reward, R_d, validation
NDCG@10 vs step) as PNG files.

    python -m study.report                       # table on stdout, study/results.json, docs/img/study_*.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from r2ec.algo.metrics import ndcg_at_k, ranking_metrics

# (folder under outputs/study, label in the table); the order of the table.
METHODS = [
    ("popularity", "Popularity"),
    ("sasrec", "SASRec"),
    ("zero-shot", "Zero-shot dual-head (SmolLM2-135M)"),
    ("no-reasoning", "R2ec w/o reasoning (item loss only)"),
    ("recpo", "R2ec + RecPO"),
]
REFERENCE = "recpo"
KS = (5, 10, 20)


def load_ranks(folder: Path, n: int) -> torch.Tensor | None:
    """The first ``n`` per-sample target ranks (1-based) of a test evaluation, in split order."""
    path = folder / "eval_test_samples.jsonl"
    if not path.is_file():
        return None
    ranks = [json.loads(line)["target_rank"] for line in path.read_text().splitlines() if line.strip()]
    if len(ranks) < n:
        raise SystemExit(f"{path}: {len(ranks)} test samples, fewer than the {n} the table compares on; "
                         f"re-run that method with eval.max_samples >= {n}")
    return torch.as_tensor(ranks[:n])


def bootstrap(values: torch.Tensor, reps: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean of ``values`` (N,) over ``reps`` resamples of the N samples."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(values), (reps, len(values)), generator=g)
    means = values[idx].mean(dim=1)
    return float(means.quantile(0.025)), float(means.quantile(0.975))


def main() -> None:
    p = argparse.ArgumentParser(description="quality study: table + curves")
    p.add_argument("--root", default="outputs/study")
    p.add_argument("--samples", type=int, default=500, help="compare on the first N test samples")
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--img", default="docs/img")
    p.add_argument("--out", default="study/results.json")
    args = p.parse_args()
    root = Path(args.root)

    ranks = {key: load_ranks(root / key, args.samples) for key, _ in METHODS}
    ref = ranks.get(REFERENCE)
    rows = []
    for key, label in METHODS:
        r = ranks[key]
        if r is None:
            print(f"(no results for {key} under {root / key}; skipped)")
            continue
        m = ranking_metrics(r, KS)
        ndcg10 = ndcg_at_k(r, 10).double()
        row = {"method": label, "samples": len(r), **{k: float(v) for k, v in m.items()},
               "ndcg@10_ci": bootstrap(ndcg10, args.reps, 0)}
        if ref is not None and key != REFERENCE:
            diff = ndcg_at_k(ref, 10).double() - ndcg10  # paired: the same test samples
            row["recpo_minus_this_ndcg@10_ci"] = bootstrap(diff, args.reps, 1)
        rows.append(row)

    cols = [f"{m}@{k}" for k in KS for m in ("hit", "ndcg")]
    print(f"\nTest, first {args.samples} samples (full-catalogue ranking, history masked)\n")
    print("| method | " + " | ".join(c.replace("hit", "H").replace("ndcg", "N") for c in cols)
          + " | N@10 95% CI | RecPO - this, N@10 95% CI |")
    print("| --- " * (len(cols) + 3) + "|")
    for row in rows:
        ci = "[{:.4f}, {:.4f}]".format(*row["ndcg@10_ci"])
        d = row.get("recpo_minus_this_ndcg@10_ci")
        dci = "[{:+.4f}, {:+.4f}]".format(*d) if d else ""
        print(f"| {row['method']} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + f" | {ci} | {dci} |")
    Path(args.out).write_text(json.dumps({"samples": args.samples, "rows": rows}, indent=1) + "\n")
    print(f"\n-> {args.out}")
    curves(root / "recpo", root / "no-reasoning", Path(args.img))


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def curves(recpo: Path, no_reasoning: Path, img: Path) -> None:
    """Reward and R_d per step (with a 5-step moving average) and validation NDCG@10, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = _read_jsonl(recpo / "metrics.jsonl")
    steps = [r for r in records if "reward_mean" in r]
    valid = [r for r in records if "valid/ndcg@10" in r]
    if not steps:
        print(f"(no {recpo / 'metrics.jsonl'}; no curves drawn)")
        return
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
