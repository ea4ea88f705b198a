"""Run the quality study method by method, keeping each finished method's small result in the repository.

    python -m study.run                 # every method not yet under study/results/, in order, then the report
    python -m study.run --only warmup   # one method (re-run it by deleting study/results/warmup/ first)
    python -m study.run --list          # what would run, and what is done

The study takes hours on a 2-core CPU, so nothing may be lost to an interruption:

* each method is its own command (``r2ec eval``, ``r2ec train``, ``study.sasrec``) writing into
  ``outputs/study/<method>/``; the training methods checkpoint and continue with ``--resume auto`` when re-run;
* when a method's command succeeds, its result is copied to ``study/results/<method>/``: ``eval_test.json`` (metrics,
  95% user-bootstrap intervals, sample fingerprint, subset rule), the per-sample ranks and ids
  (``eval_test_samples.jsonl``: sample, user and target ids and the rank; no titles, no reasoning text) and, for
  training runs, ``metrics.jsonl`` (the curves) and the resolved ``config.json``;
* a method whose ``study/results/<method>/eval_test.json`` exists is skipped.

``warmup-recpo`` continues from the ``warmup`` run's final checkpoint (``--resume`` its checkpoints folder) with the
RecPO steps of configs/study-ml100k.yaml, so "warm-up + RecPO" and "warm-up only" share their first phase exactly;
once it has checkpoints of its own, it continues from those.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "study" / "results"
OUTPUTS = Path("outputs/study")
STUDY = "configs/study-ml100k.yaml"
WARMUP = "configs/study-warmup.yaml"
R2EC = [sys.executable, "-m", "driver"]  # the `r2ec` command
KEPT_SAMPLE_KEYS = ("sample_id", "user_id", "target_item_id", "target_rank", "appended_marker")


@dataclass
class Method:
    name: str
    label: str
    command: list[str]
    evaluations: dict[str, str]  # file under study/results/<name>/ -> evaluation JSON under outputs/study/
    training: bool = False


def methods(outputs: Path = OUTPUTS) -> list[Method]:
    o = str(outputs)
    # warm-up + RecPO starts from the warm-up run's last checkpoint; once it has checkpoints of its own (an
    # interrupted run), it continues from those
    own = outputs / "warmup-recpo" / "checkpoints" / "latest"
    start = "auto" if own.is_file() else str(outputs / "warmup" / "checkpoints")
    return [
        Method("popularity", "Popularity", R2EC + ["eval", "--config", STUDY, "--baseline", "popularity", "--set",
                                                   f"run.output_dir={o}/popularity"],
               {"eval_test.json": "popularity/eval_test.json"}),
        Method("popularity-full", "Popularity (full test split)",
               R2EC + ["eval", "--config", STUDY, "--baseline", "popularity", "--set", "eval.max_samples=null",
                       "--set", f"run.output_dir={o}/popularity-full"],
               {"eval_test.json": "popularity-full/eval_test.json"}),
        Method("sasrec", "SASRec", [sys.executable, "-m", "study.sasrec", "--config", STUDY, "--out", f"{o}/sasrec"],
               {"eval_test.json": "sasrec/subset{n}/eval_test.json", "full/eval_test.json": "sasrec/eval_test.json"}),
        Method("zero-shot", "Zero-shot dual-head (SmolLM2-135M)",
               R2EC + ["eval", "--config", STUDY, "--set", "model.lora.enabled=false", "--set",
                       f"run.output_dir={o}/zero-shot"], {"eval_test.json": "zero-shot/eval_test.json"}),
        Method("warmup", "Warm-up only (= R2ec w/o reasoning)",
               R2EC + ["train", "--config", WARMUP, "--set", f"run.output_dir={o}/warmup"],
               {"eval_test.json": "warmup/eval_test.json"}, training=True),
        Method("recpo", "RecPO without warm-up",
               R2EC + ["train", "--config", STUDY, "--set", f"run.output_dir={o}/recpo"],
               {"eval_test.json": "recpo/eval_test.json"}, training=True),
        Method("warmup-recpo", "Warm-up + RecPO",
               R2EC + ["train", "--config", STUDY, *_warmup_sets(), "--set", f"run.output_dir={o}/warmup-recpo",
                       "--resume", start],
               {"eval_test.json": "warmup-recpo/eval_test.json"}, training=True),
    ]


def _warmup_sets() -> list[str]:
    """The warm-up run's warm-up settings, so the continued run reads the same phase boundary."""
    import yaml

    warm = yaml.safe_load((ROOT / WARMUP).read_text())["warmup"]
    return [a for k, v in warm.items() for a in ("--set", f"warmup.{k}={v}")]


def _subset_size() -> int:
    import yaml

    return int(yaml.safe_load((ROOT / STUDY).read_text())["eval"]["max_samples"])


def keep(method: Method, outputs: Path = OUTPUTS, results: Path = RESULTS) -> Path:
    """Copy a finished method's small result into ``results/<name>/`` (no dataset text). Returns that folder."""
    dest = results / method.name
    tmp = results / f".{method.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, source in method.evaluations.items():
        src = outputs / source.format(n=_subset_size())
        if not src.is_file():
            raise FileNotFoundError(f"{method.name}: {src} missing after the command succeeded")
        meta = json.loads(src.read_text())
        out = tmp / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(meta, indent=2) + "\n")
        samples = src.with_name(f"eval_{meta['split']}_samples.jsonl")
        with open(samples) as fin, open(out.with_name(samples.name), "w") as fout:
            for line in fin:
                rec = json.loads(line)
                fout.write(json.dumps({k: rec[k] for k in KEPT_SAMPLE_KEYS if k in rec}) + "\n")
        if method.training:
            for extra in ("metrics.jsonl", "config.json"):
                if (src.parent / extra).is_file():
                    shutil.copy2(src.parent / extra, tmp / extra)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def done(method: Method, results: Path = RESULTS) -> bool:
    return (results / method.name / "eval_test.json").is_file()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", help="run only this method (repeatable)")
    p.add_argument("--list", action="store_true", help="list the methods and whether each is done")
    p.add_argument("--no-report", action="store_true", help="skip `python -m study.report` at the end")
    args = p.parse_args(argv)
    todo = methods()
    names = [m.name for m in todo]
    for name in args.only or []:
        if name not in names:
            p.error(f"--only {name}: not a method ({', '.join(names)})")
    if args.only:
        todo = [m for m in todo if m.name in args.only]
    for m in todo:
        if args.list:
            print(f"{m.name:<16} {'done' if done(m) else 'to run'}: {' '.join(m.command)}")
            continue
        if done(m):
            print(f"study: {m.name} done ({RESULTS / m.name}); skipped", flush=True)
            continue
        print(f"study: {m.name}: {' '.join(m.command)}", flush=True)
        subprocess.run(m.command, check=True, cwd=ROOT)
        print(f"study: {m.name} kept in {keep(m)}", flush=True)
    if not (args.list or args.no_report):
        subprocess.run([sys.executable, "-m", "study.report"], check=True, cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
