"""The training loop: ``train`` runs a whole run top to bottom (``r2ec train --config X`` or ``python -m driver train
--config X``); ``driver.session`` holds its moving parts and ``driver.steps`` the step primitives.

Steps are numbered globally: 1..W are warm-up steps (W = ``warmup.steps``, 0 = none, the paper's setting), W+1..W+S
RecPO steps (S = ``learner.max_steps``, else ``learner.epochs`` passes of ``learner.prompts_per_step`` users). Both
phases draw their users from one sampler, so a run is one pass through the data order.

A warm-up step (not in the paper: its "w/o reasoning" objective as a supervised start):
1. take ``warmup.prompts_per_step`` train samples; each user's sequence is the user prompt followed by the answer
   marker's tokens (no chain: h is read where R2ec reads h_T when a chain is the marker alone);
2. each learner rank gets whole users (``WarmupShard``) and takes one item-loss step at ``warmup.lr``;
3. the item rows re-encoded with gradient are written back, as in a RecPO step.
A warm-up step needs no rollout, so no weight broadcast follows it: the rollout engines receive the weights only
before they are next used (an item-table refresh, a validation, the first RecPO step, the final test).

A RecPO step:
1. take ``learner.prompts_per_step`` train samples and render their user prompts;
2. the rollout workers sample G chains per user and return each chain's h_T (``System.generate``), with the weights
   after the previous step;
3. the learner ranks, each on whole groups, score h_T with the rec_head, compute fused rewards and group
   advantages, and take the RecPO step (token term + item term, Eq. of DESIGN §2);
4. learner rank 0 broadcasts the new weights to every rollout engine (checksums verified);
5. item rows re-encoded with gradient are written back to every copy of the table (one step late on the other
   learner ranks: r2ec/item_table.py says why).
In both phases the full table is re-encoded every ``recpo.refresh_every`` steps and before every validation; with
``model.item_table: frozen`` (not in the paper) it is encoded once, with the initial weights, and never again
(``model.center_items``: minus its mean row).
Validation (Hit/NDCG@K, full ranking, greedy reasoning) runs every ``eval.valid_every`` steps and at the end, always
against an item table encoded with the weights it validates (as the official code, which re-encodes at every
evaluation): a table that only had the trained targets written back would score a stale catalogue against fresh
targets. The metrics record it as ``valid/item_table_version``. The final test uses the last validation's table when
that was encoded with the final weights (it always is: the last step validates), else encodes one. Every step's
record in ``metrics.jsonl`` carries its ``phase`` (``warmup`` or ``recpo``).

Deviation from the official code: validation uses a user-stratified subset of ``eval.valid_max_samples`` valid
samples (the official code evaluates the whole split); set it to null for the whole split.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from driver.console import library_logs, logs_dir
from driver.run_state import best_key, compat_of, find_checkpoint
from driver.session import FIRST_VALID, RunInputs, Session
from r2ec.config import Config
from r2ec.evaluate import format_metrics


def train(cfg: Config, log=print, resume: str = "auto") -> dict:
    """Train (or continue) a run; ``resume`` is ``auto`` (the newest complete checkpoint of ``run.output_dir``, if
    any), ``none`` (a fresh run; refused if the folder has checkpoints) or a checkpoint folder."""
    with library_logs(cfg):  # from the first import on: Ray and DeepSpeed log as they load (driver.console)
        return _train(cfg, log, resume)


def _train(cfg: Config, log, resume: str) -> dict:
    from tqdm import tqdm

    from driver.system import System
    from driver.tracking import MetricsWriter
    from learner.universal import needs_universal

    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    inputs = RunInputs.load(cfg, log)
    steps, train_sha, item_ids = inputs.steps, inputs.prepared.split_sha256("train"), inputs.prepared.item_ids()
    resumed = find_checkpoint(cfg, out_dir, resume, item_ids, train_sha, log)
    compat = compat_of(cfg, item_ids, None, train_sha)
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    log(f"train: {len(inputs.train_ds)} samples, {cfg.warmup.steps} warm-up steps of {cfg.warmup.prompts_per_step} "
        f"users, then {steps - cfg.warmup.steps} RecPO steps of {cfg.learner.prompts_per_step} users x "
        f"G={cfg.recpo.group_size}")
    if logs_dir(cfg) is not None:
        log(f"logs: Ray, vLLM and DeepSpeed output goes to {logs_dir(cfg)} (run.worker_logs=console shows it here)")
    # a ZeRO-1/2/3 checkpoint of another learner world size is re-sharded first
    universal = resumed is not None and needs_universal(resumed.folder / "learner", cfg.cluster.learner.num_workers)
    # the trackers first: a missing optional package fails the run before Ray and the engines start
    with MetricsWriter(out_dir, cfg.run.trackers, resume_step=resumed.step if resumed else None,
                       run_name=cfg.run.name, mlflow_tracking_uri=cfg.run.mlflow_tracking_uri,
                       wandb_project=cfg.run.wandb_project, config=cfg.model_dump(mode="json")) as metrics, \
            System(cfg, inputs.device, log, load_universal=universal) as system:
        session = Session(cfg, inputs, system, metrics, out_dir, log)
        run = session.start(resumed)
        valid = {}
        if resumed is None and cfg.eval.valid_at_start:  # the initial weights: what training starts from
            valid, _ = session.validate(run)
        bar = tqdm(range(run.step + 1, steps + 1), desc="train", unit="step", initial=run.step, total=steps)
        for step in bar:
            valid = session.step(run, step, bar, compat) or valid
        bar.close()
        test = session.test(run)
    log(f"test {format_metrics(test)}")
    gain = validation_gain(out_dir, best_key(cfg))
    if gain:
        log(gain)
    return {"valid": valid, "test": test, "steps": steps, "resumed_from": resumed.step if resumed else None,
            "valid_gain": gain}


def validation_gain(out_dir: Path, key: str) -> str | None:
    """One line: the held-out metric ``key`` at step 0 and at the last validation, and their difference with a
    paired user-bootstrap 95% interval (``r2ec compare``); None without a step-0 validation or a later one."""
    from r2ec.compare import CompareError, compare, load_evaluation

    first, last = out_dir / FIRST_VALID / "eval_valid.json", out_dir / "eval_valid.json"
    if not first.is_file() or not last.is_file():
        return None
    try:
        a, b = load_evaluation(first, "step 0"), load_evaluation(last, "last")
    except CompareError as e:
        return f"valid {key}: no comparison with step 0 ({e})"
    if not b.meta.get("step"):  # the last validation is step 0's own
        return None
    line = f"valid {key}: {a.meta[key]:.4f} at step 0 -> {b.meta[key]:.4f} at step {b.meta['step']}"
    try:
        diff = compare([a, b], [key])["differences"][0]
    except CompareError as e:  # e.g. a folder reused with another eval.valid_max_samples
        return f"{line} (no paired interval: {e})"
    lo, hi = diff[key]["ci95"]
    return (f"{line}; difference {diff[key]['mean']:+.4f}, paired user-bootstrap 95% interval [{lo:+.4f}, {hi:+.4f}] "
            f"(r2ec compare {out_dir / FIRST_VALID} {out_dir} --split valid)")
