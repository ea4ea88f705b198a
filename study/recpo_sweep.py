"""Summarise RecPO runs that differ in one setting, on validation only: the table behind docs/results.md's RecPO
sweeps (learning rate, temperature, chain length).

    python -m study.recpo_sweep outputs/study/warmup-recpo outputs/study/recpo-temp1.0 outputs/study/recpo-temp2.0

The first folder is the reference. For each run (its ``metrics.jsonl`` and last ``eval_valid.json``): validation
NDCG@10 at every validation and the share of distinct greedy chains; the last validation's paired difference to the
reference with a user-bootstrap 95% interval (``r2ec.compare``: the runs must have validated on the same samples);
and over the RecPO steps: the range of ``adv_abs_mean``, the smallest share of distinct sampled chains, the mean
sampled chain length, the share of chains that needed the marker appended (no ``<answer>`` of their own), the mean
reward of the first and the last 5 steps, and the median gradient norm and step time; the JSON (``--out``) also keeps
the first step's item loss and item-term gradient norm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: missing; expected the folder of an r2ec train run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(run: Path) -> dict:
    records = _records(run)
    rl = [r for r in records if r.get("phase", "recpo") == "recpo" and "adv_abs_mean" in r]
    if not rl:
        raise SystemExit(f"{run}/metrics.jsonl: no RecPO step recorded")
    valid = [r for r in records if "valid/ndcg@10" in r]
    if not valid or not (run / "eval_valid.json").is_file():
        raise SystemExit(f"{run}: no validation recorded (metrics.jsonl has no valid/ndcg@10, or eval_valid.json is "
                         "missing); the sweep compares runs on validation")
    samples = json.loads((run / "eval_valid.json").read_text()).get("num_samples")

    def mean(key: str, rows: list[dict]) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return sum(vals) / len(vals) if vals else None

    return {
        "run": str(run), "recpo_steps": len(rl),
        "valid": [{"step": r["step"], "ndcg@10": r["valid/ndcg@10"],
                   "distinct_greedy_frac": r.get("valid/reasoning_distinct_frac")} for r in valid],
        "valid_samples": samples,
        "adv_abs_mean_range": [min(r["adv_abs_mean"] for r in rl), max(r["adv_abs_mean"] for r in rl)],
        "chains_distinct_min": min((r["chains_distinct"] for r in rl if "chains_distinct" in r), default=None),
        "chain_len_mean": mean("chain_len_mean", rl),
        "appended_marker_frac": mean("chains_with_appended_marker", rl),
        "reward_first5": mean("reward_mean", rl[:5]), "reward_last5": mean("reward_mean", rl[-5:]),
        "grad_norm_median": statistics.median(r["grad_norm"] for r in rl),
        "loss_item_first": rl[0].get("loss_item"), "grad_norm_item_first": rl[0].get("grad_norm_item"),
        "step_s_median": statistics.median(r["time_step_s"] for r in rl),
    }


def main(argv=None) -> None:
    from r2ec.compare import compare, load_evaluation, locate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders; the first is the reference")
    ap.add_argument("--out", type=Path, default=None, help="write the summary as JSON here")
    args = ap.parse_args(argv)
    rows = [summarise(r) for r in args.runs]
    evals = [load_evaluation(locate(str(r), "valid"), r.name) for r in args.runs]
    diffs = compare(evals, ["ndcg@10"])["differences"] if len(evals) > 1 else []
    for row, d in zip(rows[1:], diffs, strict=True):
        row["valid_ndcg@10_minus_ref"] = {"mean": d["ndcg@10"]["mean"], "ci95": d["ndcg@10"]["ci95"]}
    print("| run | valid NDCG@10 by step | minus the first [paired 95%] | distinct greedy chains | adv_abs_mean | "
          "min distinct sampled | chain length | marker appended | reward first 5 -> last 5 | grad norm | step s |")
    print("| --- " * 11 + "|")
    for row in rows:
        n = row["valid_samples"] or 0
        by_step = " / ".join(f"{v['ndcg@10']:.4f}" for v in row["valid"])
        distinct = " / ".join(f"{round((v['distinct_greedy_frac'] or 0) * n)}" for v in row["valid"])
        d = row.get("valid_ndcg@10_minus_ref")
        diff = f"{d['mean']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" if d else ""
        lo, hi = row["adv_abs_mean_range"]
        print(f"| {Path(row['run']).name} | {by_step} | {diff} | {distinct} of {n} | {lo:.2f}-{hi:.2f} | "
              f"{row['chains_distinct_min']:.2f} | {row['chain_len_mean']:.1f} | {row['appended_marker_frac']:.2f} | "
              f"{row['reward_first5']:.3f} -> {row['reward_last5']:.3f} | {row['grad_norm_median']:.2f} | "
              f"{row['step_s_median']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"-> {args.out}")


if __name__ == "__main__":
    main()
