"""The training loop (``train``, ``rl_step``), run by ``r2ec train --config X`` or ``python -m driver train --config X``.

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
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from driver.run_state import RunState, best_key, compat_of, find_checkpoint, phase_of, restore, rollout_seed, save
from driver.tracking import reduce_rank_metrics
from r2ec.algo.metrics import mask_history
from r2ec.algo.recpo import centred_rows, cosine_scores, unit_rows
from r2ec.config import Config
from r2ec.data.sampler import history_tensor
from r2ec.evaluate import EvalSubset, format_metrics, rank_split
from r2ec.item_table import ItemTable
from r2ec.prompts import item_prompt_ids, user_prompt_ids
from r2ec.protocol import Rollout, StepResult, TrainShard, WarmupShard

FIRST_VALID = "valid_step0"  # step 0's validation, kept beside the run's last one


def recpo_steps(cfg: Config, num_train: int) -> int:
    """RecPO steps of a run: ``learner.max_steps`` (0 = a warm-up-only run), else ``learner.epochs`` passes."""
    if cfg.learner.max_steps is not None:
        return cfg.learner.max_steps
    return cfg.learner.epochs * max(1, num_train // cfg.learner.prompts_per_step)


def total_steps(cfg: Config, num_train: int) -> int:
    """The last global step: the warm-up steps, then the RecPO steps."""
    return cfg.warmup.steps + recpo_steps(cfg, num_train)


def make_shards(prompts: list[list[int]], rollout: Rollout, earlier: torch.Tensor, target: torch.Tensor,
                ranks: int, group_size: int, updates: tuple[torch.Tensor, torch.Tensor]) -> list[TrainShard]:
    """Cut a step into whole groups per learner rank, with the step's global normalisers."""
    users = len(prompts) // ranks
    num_tokens = rollout.num_sampled_tokens
    shards = []
    for r in range(ranks):
        u = slice(r * users, (r + 1) * users)
        rows = range(r * users * group_size, (r + 1) * users * group_size)
        shards.append(TrainShard(prompts[u], rollout.select(rows), earlier[u], target[u], num_tokens,
                                 len(rollout), updates[0], updates[1]))
    return shards


def make_warmup_shards(seqs: list[list[int]], earlier: torch.Tensor, target: torch.Tensor, ranks: int,
                       updates: tuple[torch.Tensor, torch.Tensor]) -> list[WarmupShard]:
    """Cut a warm-up step into whole users per learner rank; ``num_users`` is the whole step's."""
    users = len(seqs) // ranks
    return [WarmupShard(seqs[r * users:(r + 1) * users], earlier[r * users:(r + 1) * users],
                        target[r * users:(r + 1) * users], len(seqs), updates[0], updates[1]) for r in range(ranks)]


def batch_inputs(rows: list[dict], prepared, builder, tokenizer, titles: list[str]
                 ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """User prompts, every earlier item (B, H) -1 padded, and targets (B,) for a batch of samples."""
    prompts = [user_prompt_ids(builder, tokenizer, r, titles) for r in rows]
    earlier = history_tensor([prepared.earlier_items_of(r["user_id"], r["position"]) for r in rows])
    target = torch.as_tensor([r["target_item_idx"] for r in rows], dtype=torch.long)
    return prompts, earlier, target


def sync_rollouts(system, version: int) -> float:
    """Broadcast the learner's weights (those after step ``version``) unless the rollout engines hold them already
    (``System.weight_version``; None = the initial weights, i.e. step 0's). Returns the seconds it took."""
    if (system.weight_version or 0) == version:
        return 0.0
    t = time.perf_counter()
    system.sync_weights(version=version)
    return time.perf_counter() - t


def rl_step(system, cfg: Config, prompts: list[list[int]], earlier: torch.Tensor, target: torch.Tensor,
            updates: tuple[torch.Tensor, torch.Tensor], version: int) -> tuple[Rollout, list, dict]:
    """One RecPO step across the system: rollout, learner step, weight broadcast. Returns the rollout, the
    ranks' StepResults and the step's timings."""
    t = time.perf_counter()
    rollout = system.generate(prompts, cfg.recpo.group_size, seed=rollout_seed(cfg.run.seed, version),
                              weight_version=version - 1)  # the rollout of step k samples the weights after k-1
    t_rollout = time.perf_counter() - t
    t = time.perf_counter()
    shards = make_shards(prompts, rollout, earlier, target, len(system.learners), cfg.recpo.group_size, updates)
    results = system.train_step(shards)
    t_learn = time.perf_counter() - t
    t = time.perf_counter()
    system.sync_weights(version=version)
    t_sync = time.perf_counter() - t
    return rollout, results, {"time_rollout_s": t_rollout, "time_learner_s": t_learn, "time_sync_s": t_sync}


def warmup_step(system, prompts: Sequence[Sequence[int]], marker_ids: Sequence[int], earlier: torch.Tensor,
                target: torch.Tensor, updates: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[StepResult], dict]:
    """One warm-up step: each user's prompt + answer marker, whole users per learner rank, one supervised step on
    the learner ranks (no rollout, no weight broadcast). Returns the ranks' StepResults and the step's record."""
    t = time.perf_counter()
    seqs = [list(p) + list(marker_ids) for p in prompts]
    results = system.warmup_step(make_warmup_shards(seqs, earlier, target, len(system.learners), updates))
    return results, {**reduce_rank_metrics([r.metrics for r in results]),
                     "time_learner_s": time.perf_counter() - t, "time_sync_s": 0.0}


def recpo_record(cfg: Config, rollout: Rollout, results: list[StepResult], timings: dict) -> dict:
    """The metrics record of a RecPO step: the ranks' metrics, the rollout's diagnostics and the timings."""
    workers = cfg.cluster.rollout.num_workers
    return {
        **reduce_rank_metrics([r.metrics for r in results]),
        "reward_max_abs_diff_rollout_vs_learner": max(float((r.rewards - r.rewards_learner).abs().max())
                                                      for r in results),
        "weight_version": rollout.weight_version,
        "chains_with_appended_marker": float(rollout.appended_marker.float().mean()),
        # 1.0: every chain of the step differs; 1/N: one chain for all users, so every group's advantages are 0
        "chains_distinct": len({tuple(c) for c in rollout.chain_ids}) / len(rollout),
        "time_generate_s": rollout.timings.get("generate", 0.0) / workers,
        "time_hidden_s": rollout.timings.get("hidden", 0.0) / workers,
        **timings,
        "tokens_per_s_rollout": rollout.timings.get("generated_tokens", 0.0) / max(timings["time_rollout_s"], 1e-9),
    }


def train(cfg: Config, log=print, resume: str = "auto") -> dict:
    """Train (or continue) a run; ``resume`` is ``auto`` (the newest complete checkpoint of ``run.output_dir``, if
    any), ``none`` (a fresh run; refused if the folder has checkpoints) or a checkpoint folder."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from driver.system import System
    from driver.tracking import MetricsWriter
    from r2ec.assets import resolve
    from r2ec.data.prepare import prepare_from_config
    from r2ec.data.sampler import EpochSampler
    from r2ec.model import resolve_device
    from r2ec.prompts import PromptBuilder

    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    prepared = prepare_from_config(cfg.data, log=log)
    train_ds, titles = prepared.splits["train"], list(prepared.items["title"])
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    marker_ids = tokenizer.encode(cfg.model.answer_marker, add_special_tokens=False)  # as DualHeadModel.marker_ids
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    item_prompts = item_prompt_ids(builder, tokenizer, prepared.items)
    G, W, steps = cfg.recpo.group_size, cfg.warmup.steps, total_steps(cfg, len(train_ds))
    sampler = EpochSampler(len(train_ds), cfg.run.seed)
    device = str(resolve_device(cfg.run.device))
    train_sha = prepared.split_sha256("train")
    resumed = find_checkpoint(cfg, out_dir, resume, prepared.item_ids(), train_sha, log)
    compat = compat_of(cfg, prepared.item_ids(), None, train_sha)
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")

    subsets = {"valid": EvalSubset.of(prepared, "valid", cfg.eval.valid_max_samples, cfg.eval),
               "test": EvalSubset.of(prepared, "test", cfg.eval.max_samples, cfg.eval)}

    def evaluate_split(system: System, run: RunState, split: str) -> dict:
        sync_rollouts(system, run.step)  # greedy reasoning runs on the rollout engines
        table = unit_rows(run.items.rows)  # once per evaluation, not per batch

        def score_batch(rows, earlier, target):
            prompts = [user_prompt_ids(builder, tokenizer, r, titles) for r in rows]
            chains, h_T = system.greedy(prompts, cfg.eval.max_new_tokens)
            return (mask_history(cosine_scores(h_T, table, cfg.model.tau, items_unit=True), earlier, target),
                    [{"text": c.text, "appended_marker": c.appended_marker} for c in chains])

        batch = cfg.eval.batch_size * cfg.cluster.rollout.num_workers
        return rank_split(prepared, subsets[split], batch, cfg.eval.ks, out_dir, "r2ec", score_batch,
                          {"step": run.step, "item_table_version": run.items.version},
                          reasoned=cfg.eval.max_new_tokens > 0)

    def refresh_table(system: System, run: RunState) -> tuple[float, float]:
        """Re-encode the whole catalogue with the current weights (on the rollout engines, brought to them first);
        the rows pending for the learners are in it. Returns the seconds spent on the weight broadcast and the
        mean cosine of each new row with the row it replaces: how stale the table the learner trained against had
        become (rows the step re-encoded were already fresh)."""
        t_sync = sync_rollouts(system, run.step)
        old = run.items.rows
        run.items.refresh(system.encode_items(item_prompts), run.step)
        system.set_items(item_prompts, run.items.rows)
        return t_sync, float((unit_rows(old) * unit_rows(run.items.rows)).sum(dim=1).mean())

    def validate(system: System, run: RunState, metrics) -> tuple[dict, bool]:
        """Validate at ``run.step``: (the result, whether it is a new best)."""
        valid = evaluate_split(system, run, "valid")
        metrics.log(run.step, {f"valid/{k}": v for k, v in valid.items() if isinstance(v, float)}
                    | {"valid/item_table_version": run.items.version})
        log(f"step {run.step}: valid {format_metrics(valid)}")
        if run.step == 0:
            keep_first_validation(out_dir)
        key = best_key(cfg)
        new_best = run.best is None or valid[key] > run.best["value"]
        if new_best:
            run.best = {"step": run.step, "metric": key, "value": valid[key]}
        return valid, new_best

    def step_once(system: System, run: RunState, step: int) -> tuple[list[StepResult], dict]:
        """Global step ``step`` of its phase: the ranks' StepResults and the step's record."""
        users = cfg.warmup.prompts_per_step if step <= W else cfg.learner.prompts_per_step
        rows = [train_ds[i] for i in sampler.next(users)]
        prompts, earlier, target = batch_inputs(rows, prepared, builder, tokenizer, titles)
        if step <= W:
            return warmup_step(system, prompts, marker_ids, earlier, target, run.items.pending)
        t_sync = sync_rollouts(system, step - 1)  # the rollout of step k samples the weights after step k-1
        rollout, results, timings = rl_step(system, cfg, prompts, earlier, target, run.items.pending, version=step)
        record = recpo_record(cfg, rollout, results, timings)
        record["time_sync_s"] += t_sync
        return results, record

    trained_items = cfg.model.item_table == "trained"  # "frozen": the step-0 table, never re-encoded
    log(f"train: {len(train_ds)} samples, {W} warm-up steps of {cfg.warmup.prompts_per_step} users, then "
        f"{steps - W} RecPO steps of {cfg.learner.prompts_per_step} users x G={G}")
    universal = False
    if resumed is not None:  # a ZeRO-1/2/3 checkpoint of another learner world size is re-sharded first
        from learner.universal import needs_universal

        universal = needs_universal(resumed.folder / "learner", cfg.cluster.learner.num_workers)
    with System(cfg, device, log, load_universal=universal) as system, \
            MetricsWriter(out_dir, resume_step=resumed.step if resumed else None) as metrics:
        if resumed is None:
            shutil.rmtree(out_dir / FIRST_VALID, ignore_errors=True)  # an earlier run's, in a reused folder
            t0 = time.perf_counter()
            table = system.encode_items(item_prompts)
            log(f"item table: {len(item_prompts)} items encoded in {time.perf_counter() - t0:.1f}s")
            if cfg.model.center_items:  # once: the table is frozen, and checkpoints keep it centred
                table = centred_rows(table)
            run = RunState(items=ItemTable(table))
        else:
            run = restore(system, cfg, resumed, sampler, log)
        system.set_items(item_prompts, run.items.rows)
        valid = {}
        if resumed is None and cfg.eval.valid_at_start:  # the initial weights: what training starts from
            valid, _ = validate(system, run, metrics)
        bar = tqdm(range(run.step + 1, steps + 1), desc="train", unit="step", initial=run.step, total=steps)
        for step in bar:
            t_step = time.perf_counter()
            results, record = step_once(system, run, step)
            run.step = step
            run.write_back(results)

            validating = bool(cfg.eval.valid_every and step % cfg.eval.valid_every == 0) or step == steps
            if trained_items and (validating or step % cfg.recpo.refresh_every == 0):
                t_sync, record["table_refresh_row_cos"] = refresh_table(system, run)
                record["time_sync_s"] += t_sync

            record.update(phase=phase_of(step, W), time_step_s=time.perf_counter() - t_step, epoch=sampler.epoch)
            events = system.drain_events()  # rollout workers restarted during this step (already logged)
            record["rollout_restarts"] = len(events)
            metrics.log(step, record)
            for e in events:
                metrics.log(step, {f"fault/{k}": v for k, v in e.items()})
            if step <= W:
                bar.set_postfix(phase="warmup", loss=f"{record['loss_item']:.4f}")
            else:
                bar.set_postfix(reward=f"{record['reward_mean']:.4f}", loss=f"{record['loss_token']:+.4f}")
            new_best = False
            if validating:
                valid, new_best = validate(system, run, metrics)
            every = cfg.run.checkpoint_every
            if every and (step % every == 0 or step == steps or new_best):
                save(system, cfg, run, sampler, new_best, compat, log)
        bar.close()

        # The final model's own item table, as inference would precompute it.
        if trained_items and run.items.version != steps:
            refresh_table(system, run)
        test = evaluate_split(system, run, "test")
        metrics.log(steps, {f"test/{k}": v for k, v in test.items() if isinstance(v, float)})
    log(f"test {format_metrics(test)}")
    gain = validation_gain(out_dir, best_key(cfg))
    if gain:
        log(gain)
    return {"valid": valid, "test": test, "steps": steps, "resumed_from": resumed.step if resumed else None,
            "valid_gain": gain}


def keep_first_validation(out_dir: Path) -> None:
    """Copy step 0's validation (``eval.valid_at_start``) to ``out_dir/valid_step0``: later validations overwrite
    ``eval_valid*``, and the end of the run compares the last one with it on the same samples."""
    keep = out_dir / FIRST_VALID
    keep.mkdir(exist_ok=True)
    for name in ("eval_valid.json", "eval_valid_samples.jsonl"):
        shutil.copy2(out_dir / name, keep / name)


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
