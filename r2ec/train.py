"""Distributed RecPO training: ``r2ec train --config X`` or ``python -m r2ec.train --config X``.

The loop (one optimiser step):
1. take ``prompts_per_step`` train samples and render their user prompts;
2. the rollout workers sample G chains per user and return each chain's h_T (``System.generate``);
3. the learner ranks, each on whole groups, score h_T with the rec_head, compute fused rewards and group
   advantages, and take the RecPO step (token term + item term, Eq. of DESIGN §2);
4. learner rank 0 broadcasts the new weights to every rollout engine (checksums verified);
5. item rows re-encoded with gradient are written back to every copy of the table; the full table is re-encoded
   every ``recpo.refresh_every`` steps and before every validation.
Validation (Hit/NDCG@K, full ranking, greedy reasoning) runs every ``eval.valid_every`` steps and at the end, always
against an item table encoded with the weights it validates (as the official code, which re-encodes at every
evaluation): a table that only had the trained targets written back would score a stale catalogue against fresh
targets. The metrics record it as ``valid/item_table_version``. The final test uses the last validation's table when
that was encoded with the final weights (it always is: the last step validates), else encodes one.

Deviation from the official code: validation uses a user-stratified subset of ``eval.valid_max_samples`` valid
samples (the official code evaluates the whole split); set it to null for the whole split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from r2ec.algo.metrics import mask_history
from r2ec.algo.recpo import cosine_scores, unit_rows
from r2ec.config import Config
from r2ec.evaluate import EvalSubset, format_metrics, history_tensor, item_prompt_ids, rank_split, user_prompt_ids
from r2ec.protocol import Rollout, TrainShard
from r2ec.run_state import compat_of, rollout_seed


def total_steps(cfg: Config, num_train: int) -> int:
    per_epoch = max(1, num_train // cfg.learner.prompts_per_step)
    return cfg.learner.max_steps or cfg.learner.epochs * per_epoch


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


def batch_inputs(rows: list[dict], prepared, builder, tokenizer, titles: list[str]
                 ) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
    """User prompts, every earlier item (B, H) -1 padded, and targets (B,) for a batch of samples."""
    prompts = [user_prompt_ids(builder, tokenizer, r, titles) for r in rows]
    earlier = history_tensor([prepared.earlier_items_of(r["user_id"], r["position"]) for r in rows])
    target = torch.as_tensor([r["target_item_idx"] for r in rows], dtype=torch.long)
    return prompts, earlier, target


def rl_step(system, cfg: Config, prompts: list[list[int]], earlier: torch.Tensor, target: torch.Tensor,
            updates: tuple[torch.Tensor, torch.Tensor], version: int) -> tuple[Rollout, list, dict]:
    """One RecPO step across the system: rollout, learner step, weight broadcast. Returns the rollout, the
    ranks' StepResults and the step's timings."""
    t = time.perf_counter()
    rollout = system.generate(prompts, cfg.recpo.group_size, seed=rollout_seed(cfg.run.seed, version))
    t_rollout = time.perf_counter() - t
    t = time.perf_counter()
    shards = make_shards(prompts, rollout, earlier, target, len(system.learners), cfg.recpo.group_size, updates)
    results = system.train_step(shards)
    t_learn = time.perf_counter() - t
    t = time.perf_counter()
    system.sync_weights(version=version)
    t_sync = time.perf_counter() - t
    return rollout, results, {"time_rollout_s": t_rollout, "time_learner_s": t_learn, "time_sync_s": t_sync}


def train(cfg: Config, log=print, resume: str = "auto") -> dict:
    """Train (or continue) a run; ``resume`` is ``auto`` (the newest complete checkpoint of ``run.output_dir``, if
    any), ``none`` (a fresh run; refused if the folder has checkpoints) or a checkpoint folder."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from r2ec.assets import resolve
    from r2ec.data.prepare import prepare_from_config
    from r2ec.data.sampler import EpochSampler
    from r2ec.driver import System
    from r2ec.model import resolve_device
    from r2ec.prompts import PromptBuilder
    from r2ec.tracking import MetricsWriter, reduce_rank_metrics

    out_dir = Path(cfg.run.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.run.seed)
    prepared = prepare_from_config(cfg.data, log=log)
    train_ds, titles = prepared.splits["train"], list(prepared.items["title"])
    tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
    builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
    item_prompts = item_prompt_ids(builder, tokenizer, prepared.items)
    G, steps = cfg.recpo.group_size, total_steps(cfg, len(train_ds))
    sampler = EpochSampler(len(train_ds), cfg.run.seed)
    device = str(resolve_device(cfg.run.device))
    train_sha = prepared.split_sha256("train")
    resumed = _find_checkpoint(cfg, out_dir, resume, prepared.item_ids(), train_sha, log)
    compat = compat_of(cfg, prepared.item_ids(), None, train_sha)
    (out_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")

    subsets = {"valid": EvalSubset.of(prepared, "valid", cfg.eval.valid_max_samples, cfg.eval),
               "test": EvalSubset.of(prepared, "test", cfg.eval.max_samples, cfg.eval)}

    def evaluate_split(system: System, run: RunState, split: str) -> dict:
        table = unit_rows(run.table)  # once per evaluation, not per batch

        def score_batch(rows, earlier, target):
            prompts = [user_prompt_ids(builder, tokenizer, r, titles) for r in rows]
            chains, h_T = system.greedy(prompts, cfg.eval.max_new_tokens)
            return (mask_history(cosine_scores(h_T, table, cfg.model.tau, items_unit=True), earlier, target),
                    [{"text": c.text, "appended_marker": c.appended_marker} for c in chains])

        batch = cfg.eval.batch_size * cfg.cluster.rollout.num_workers
        return rank_split(prepared, subsets[split], batch, cfg.eval.ks, out_dir, "r2ec", score_batch,
                          {"step": run.step, "item_table_version": run.table_version})

    def refresh_table(system: System, run: RunState) -> None:
        """Re-encode the whole catalogue with the current weights; the rows pending for the learners are in it."""
        run.table = system.encode_items(item_prompts)
        system.set_items(item_prompts, run.table)
        run.updates, run.table_version = (run.updates[0][:0], run.updates[1][:0]), run.step

    log(f"train: {len(train_ds)} samples, {steps} steps of {cfg.learner.prompts_per_step} users x G={G}")
    universal = False
    if resumed is not None:  # a ZeRO-1/2/3 checkpoint of another learner world size is re-sharded first
        from learner.universal import needs_universal

        universal = needs_universal(resumed.folder / "learner", cfg.cluster.learner.num_workers)
    with System(cfg, device, log, load_universal=universal) as system, \
            MetricsWriter(out_dir, resume_step=resumed.step if resumed else None) as metrics:
        if resumed is None:
            t0 = time.perf_counter()
            table = system.encode_items(item_prompts)
            log(f"item table: {len(item_prompts)} items encoded in {time.perf_counter() - t0:.1f}s")
            run = RunState(table=table, updates=(torch.zeros(0, dtype=torch.long), torch.zeros(0, table.shape[1])))
        else:
            run = _restore(system, cfg, resumed, sampler, log)
        system.set_items(item_prompts, run.table)
        valid = {}
        bar = tqdm(range(run.step + 1, steps + 1), desc="train", unit="step", initial=run.step, total=steps)
        for step in bar:
            t_step = time.perf_counter()
            rows = [train_ds[i] for i in sampler.next(cfg.learner.prompts_per_step)]
            prompts, earlier, target = batch_inputs(rows, prepared, builder, tokenizer, titles)
            rollout, results, timings = rl_step(system, cfg, prompts, earlier, target, run.updates, version=step)
            run.step = step
            run.updates = (torch.cat([r.table_updates_idx for r in results]),
                           torch.cat([r.table_updates for r in results]))
            run.table[run.updates[0]] = run.updates[1]

            validate = bool(cfg.eval.valid_every and step % cfg.eval.valid_every == 0) or step == steps
            if validate or step % cfg.recpo.refresh_every == 0:
                refresh_table(system, run)

            step_s = time.perf_counter() - t_step
            gen_tokens = rollout.timings.get("generated_tokens", 0.0)
            record = {
                **reduce_rank_metrics([r.metrics for r in results]),
                "reward_max_abs_diff_rollout_vs_learner": max(
                    float((r.rewards - r.rewards_learner).abs().max()) for r in results),
                "weight_version": rollout.weight_version,
                "chains_with_appended_marker": float(rollout.appended_marker.float().mean()),
                "time_generate_s": rollout.timings.get("generate", 0.0) / cfg.cluster.rollout.num_workers,
                "time_hidden_s": rollout.timings.get("hidden", 0.0) / cfg.cluster.rollout.num_workers,
                **timings, "time_step_s": step_s,
                "tokens_per_s_rollout": gen_tokens / max(timings["time_rollout_s"], 1e-9),
                "epoch": sampler.epoch,
            }
            events = system.drain_events()  # rollout workers restarted during this step (already logged)
            record["rollout_restarts"] = len(events)
            metrics.log(step, record)
            for e in events:
                metrics.log(step, {f"fault/{k}": v for k, v in e.items()})
            bar.set_postfix(reward=f"{record['reward_mean']:.4f}", loss=f"{record['loss_token']:+.4f}")
            new_best = False
            if validate:
                valid = evaluate_split(system, run, "valid")
                metrics.log(step, {f"valid/{k}": v for k, v in valid.items() if isinstance(v, float)}
                            | {"valid/item_table_version": run.table_version})
                log(f"step {step}: valid {format_metrics(valid)}")
                new_best = run.best is None or valid[_best_key(cfg)] > run.best["value"]
                if new_best:
                    run.best = {"step": step, "metric": _best_key(cfg), "value": valid[_best_key(cfg)]}
            every = cfg.run.checkpoint_every
            if every and (step % every == 0 or step == steps or new_best):
                _save(system, cfg, run, sampler, new_best, compat, log)
        bar.close()

        # The final model's own item table, as inference would precompute it.
        if run.table_version != steps:
            refresh_table(system, run)
        test = evaluate_split(system, run, "test")
        metrics.log(steps, {f"test/{k}": v for k, v in test.items() if isinstance(v, float)})
    log(f"test {format_metrics(test)}")
    return {"valid": valid, "test": test, "steps": steps, "resumed_from": resumed.step if resumed else None}


# ---------------------------------------------------------------------------------------------- checkpoints
@dataclass
class RunState:
    """The driver's side of a run between steps (the learner ranks hold the weights and optimiser)."""

    table: torch.Tensor  # (V, d) float32 item table H_V as the driver holds it
    updates: tuple[torch.Tensor, torch.Tensor]  # (U,) long rows, (U, d) float32: applied by learners next step
    step: int = 0
    table_version: int = 0  # step of the last full encoding
    best: dict | None = None  # {"step", "metric", "value"} of the best validation so far


@dataclass
class _Resumed:
    folder: Path
    state: dict
    table: torch.Tensor
    updates: tuple[torch.Tensor, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def _best_key(cfg: Config) -> str:
    return "ndcg@10" if 10 in cfg.eval.ks else f"ndcg@{max(cfg.eval.ks)}"


def _find_checkpoint(cfg: Config, out_dir: Path, resume: str, item_ids: list[str], train_sha: str,
                     log) -> _Resumed | None:
    from r2ec import checkpoint as ck
    from r2ec.run_state import check_compatible, read_driver_state

    folder = ck.find_resume(out_dir, resume, log)
    if folder is None:
        existing = ck.list_checkpoints(ck.checkpoint_root(out_dir))
        if resume == "none" and existing:
            raise ck.CheckpointError(
                f"{ck.checkpoint_root(out_dir)} already holds checkpoints ({existing[-1].name} newest): continue "
                f"with --resume auto, or give this run another run.output_dir")
        if resume == "auto" and existing:
            raise ck.CheckpointError(f"no complete checkpoint under {ck.checkpoint_root(out_dir)} verifies (see "
                                     f"above); fix or move them, or start over in another run.output_dir")
        return None
    state, table, updates = read_driver_state(folder)
    changed = check_compatible(cfg, state, item_ids, train_sha, folder)
    log(f"resume: {folder} (step {state['step']}); settings changed since: {', '.join(changed) or 'none'}")
    return _Resumed(folder, state, table, updates)


def _restore(system, cfg: Config, resumed: _Resumed, sampler, log) -> RunState:
    """Learner shards (re-sharded through DeepSpeed's universal format when the world size changed), sampler,
    RNG, item table; then the rollout engines get the loaded weights before the first rollout."""
    import shutil

    from r2ec import checkpoint as ck
    from r2ec.run_state import restore_rng

    learner_dir = resumed.folder / ck.LEARNER
    universal_dir = None
    if system.load_universal:
        from learner.universal import to_universal

        universal_dir = resumed.folder.parent / f".universal-{resumed.folder.name}"
        log(f"resume: learner world size {resumed.state['learner_world_size']} -> "
            f"{cfg.cluster.learner.num_workers}: converting to DeepSpeed's universal checkpoint")
        universal_dir = to_universal(learner_dir, universal_dir)
    system.load_checkpoint(str(learner_dir), str(universal_dir) if universal_dir else None)
    if universal_dir is not None:
        shutil.rmtree(universal_dir, ignore_errors=True)
    sampler.load_state_dict(resumed.state["sampler"])
    restore_rng(resumed.state["rng"])
    s = resumed.state
    system.sync_weights(version=resumed.step)
    return RunState(table=resumed.table.clone(), updates=resumed.updates, step=resumed.step,
                    table_version=s["item_table_version"], best=s["best"])


def _save(system, cfg: Config, run: RunState, sampler, best: bool, compat, log) -> Path:
    from r2ec import checkpoint as ck
    from r2ec.run_state import capture_rng, write_driver_state

    t0 = time.perf_counter()
    tmp = ck.stage(cfg.run.output_dir, run.step)
    system.save_checkpoint(str(tmp / ck.LEARNER))
    state = {
        "step": run.step, "sampler": sampler.state_dict(), "rng": capture_rng(),
        "rollout_seed": {"rule": "run.seed * 1000003 + step", "next": rollout_seed(cfg.run.seed, run.step + 1)},
        "item_table_version": run.table_version, "best": run.best,
        "learner_world_size": cfg.cluster.learner.num_workers, "config_hash": cfg.hash(),
        "compat": {**compat.__dict__, "hidden_size": int(run.table.shape[1])},
    }
    write_driver_state(tmp, cfg, state, run.table, run.updates)
    final = ck.commit(tmp, run.step)
    if best:
        ck.mark_best(cfg.run.output_dir, run.step)
    ck.prune(cfg.run.output_dir, cfg.run.keep_checkpoints, log)
    log(f"checkpoint: {final} ({time.perf_counter() - t0:.1f}s)")
    return final


def main(argv: list[str] | None = None) -> int:
    from r2ec.cli import _add_config_args, add_resume_arg, run_guarded

    p = argparse.ArgumentParser(prog="python -m r2ec.train", description="distributed RecPO training on Ray")
    _add_config_args(p)
    add_resume_arg(p)
    args = p.parse_args(argv)
    return run_guarded(lambda: _train_command(args.config, args.overrides, args.resume))


def _train_command(config: str, overrides: list[str], resume: str = "auto") -> int:
    from r2ec.config import load_config

    cfg = load_config(config, overrides)
    result = train(cfg, resume=resume)
    print(json.dumps({"valid": result["valid"], "test": result["test"]}, indent=2))
    print(f"wrote {cfg.run.output_dir}/metrics.jsonl, eval_valid.json and eval_test.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
