"""How alike are the top-10 lists an evaluation gave its users? A check for a user-independent recommender.

    python -m study.top10_overlap outputs/study/popularity outputs/study/zero-shot outputs/study/warmup

For each evaluation folder (its ``eval_<split>_samples.jsonl``): the mean Jaccard overlap of the top-10 lists of
3,000 random pairs of samples (seed 0), the number of distinct items that appear in any top-10, and, when the
evaluation reasoned, the number of distinct reasoning chains (an evaluation without reasoning has the bare
marker for every sample: 1 by construction). Popularity is the reference for "the same ranking for
everyone": its lists differ only through each user's masked history. A model whose lists overlap more than
popularity's recommends nearly the same items to every user, whatever it learned.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path


def overlap(path: Path, pairs: int = 3000, seed: int = 0) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if len(rows) < 2:
        raise SystemExit(f"{path}: {len(rows)} samples; overlap needs at least 2")
    tops = [frozenset(r["top10_item_ids"]) for r in rows]
    rng = random.Random(seed)
    drawn = [rng.sample(range(len(tops)), 2) for _ in range(pairs)]
    chains = [r["reasoning"] for r in rows if "reasoning" in r]
    return {"samples": len(rows), "top10_jaccard_mean": sum(len(tops[a] & tops[b]) / len(tops[a] | tops[b])
                                                            for a, b in drawn) / pairs,
            "items_in_any_top10": len(set().union(*tops)), "distinct_chains": len(set(chains)) if chains else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", help="evaluation output folders (run.output_dir of r2ec eval / train)")
    p.add_argument("--split", default="test")
    args = p.parse_args(argv)
    print("| evaluation | samples | mean top-10 overlap (Jaccard) | items in any top-10 | distinct chains |\n"
          "| --- | --- | --- | --- | --- |")
    for folder in args.folders:
        path = Path(folder) / f"eval_{args.split}_samples.jsonl"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (expected the per-sample file of an evaluation)")
        o = overlap(path)
        chains = "-" if o["distinct_chains"] is None else f"{o['distinct_chains']} of {o['samples']}"
        print(f"| {folder} | {o['samples']} | {o['top10_jaccard_mean']:.3f} | {o['items_in_any_top10']} | {chains} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
