"""The moving parts of one training run around a ``System`` (``driver.loop.train`` drives them top to bottom): what
the run reads before its first step (``RunInputs``), and what it does with the System (``Session``): the initial
item table or a restore, one step with its table refresh, record, validation and checkpoint, and the final test.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from driver.pipeline import check_staleness, overlapped_step
from driver.run_state import Ahead, RunState, best_key, phase_of, restore, rollout_seed, save
from driver.steps import batch_inputs, recpo_record, rl_step, sync_rollouts, total_steps, warmup_step
from r2ec.algo.metrics import mask_history
from r2ec.algo.recpo import centred_rows, cosine_scores, unit_rows
from r2ec.config import Config
from r2ec.evaluate import EvalSubset, format_metrics, rank_split
from r2ec.item_table import ItemTable
from r2ec.prompts import PromptBuilder, item_prompt_ids, user_prompt_ids
from r2ec.protocol import StepResult
from r2ec.spans import Span, SpanRecorder

FIRST_VALID = "valid_step0"  # step 0's validation, kept beside the run's last one


def keep_first_validation(out_dir: Path) -> None:
    """Copy step 0's validation (``eval.valid_at_start``) to ``out_dir/valid_step0``: later validations overwrite
    ``eval_valid*``, and the end of the run compares the last one with it on the same samples."""
    keep = out_dir / FIRST_VALID
    keep.mkdir(exist_ok=True)
    for name in ("eval_valid.json", "eval_valid_samples.jsonl"):
        shutil.copy2(out_dir / name, keep / name)


@dataclass
class RunInputs:
    """What a run reads before its first step: the prepared data and its prompts, the sampler, the subsets."""

    prepared: Any  # r2ec.data.prepare.PreparedData
    train_ds: Any  # the train split's rows
    titles: list[str]
    tokenizer: Any
    builder: PromptBuilder
    marker_ids: list[int]  # the answer marker's tokens, as DualHeadModel.marker_ids
    item_prompts: list[list[int]]  # every item's prompt, catalogue order
    sampler: Any  # r2ec.data.sampler.EpochSampler over the train split
    subsets: dict[str, EvalSubset]  # "valid" and "test"
    steps: int  # the last global step
    device: str

    @classmethod
    def load(cls, cfg: Config, log) -> RunInputs:
        from transformers import AutoTokenizer

        from r2ec.assets import resolve
        from r2ec.data.prepare import prepare_from_config
        from r2ec.data.sampler import EpochSampler
        from r2ec.model import resolve_device

        prepared = prepare_from_config(cfg.data, log=log)
        train_ds = prepared.splits["train"]
        tokenizer = AutoTokenizer.from_pretrained(resolve(cfg.model.name_or_path))
        builder = PromptBuilder.from_config(cfg.data.prompt, cfg.model.answer_marker)
        return cls(prepared, train_ds, list(prepared.items["title"]), tokenizer, builder,
                   tokenizer.encode(cfg.model.answer_marker, add_special_tokens=False),
                   item_prompt_ids(builder, tokenizer, prepared.items), EpochSampler(len(train_ds), cfg.run.seed),
                   {"valid": EvalSubset.of(prepared, "valid", cfg.eval.valid_max_samples, cfg.eval),
                    "test": EvalSubset.of(prepared, "test", cfg.eval.max_samples, cfg.eval)},
                   total_steps(cfg, len(train_ds)), str(resolve_device(cfg.run.device)))


class Session:
    """One run's steps, table refreshes, validations and checkpoints on a started ``System``."""

    def __init__(self, cfg: Config, inputs: RunInputs, system, metrics, out_dir: Path, log):
        self.cfg, self.inputs, self.system, self.metrics, self.out_dir, self.log = (
            cfg, inputs, system, metrics, out_dir, log)
        self.trained_items = cfg.model.item_table == "trained"  # "frozen": the step-0 table, never re-encoded
        self.spans = SpanRecorder("driver")  # the driver's phases (sync, refresh, validate, checkpoint)

    def start(self, resumed) -> RunState:
        """A fresh run's initial item table (encoded once, centred with model.center_items), or the checkpoint's
        state; either way handed to the learner ranks."""
        cfg, inputs, system = self.cfg, self.inputs, self.system
        if resumed is None:
            shutil.rmtree(self.out_dir / FIRST_VALID, ignore_errors=True)  # an earlier run's, in a reused folder
            t0 = time.perf_counter()
            table = system.encode_items(inputs.item_prompts)
            self.log(f"item table: {len(inputs.item_prompts)} items encoded in {time.perf_counter() - t0:.1f}s")
            if cfg.model.center_items:  # once: the table is frozen, and checkpoints keep it centred
                table = centred_rows(table)
            run = RunState(items=ItemTable(table))
        else:
            run = restore(system, cfg, resumed, inputs.sampler, self.log)
        system.set_items(inputs.item_prompts, run.items.rows)
        return run

    def step(self, run: RunState, step: int, bar, compat) -> dict | None:
        """Global step ``step`` and what follows it: the table refresh, the record, a validation (its result, else
        None) and a checkpoint when due."""
        cfg, W = self.cfg, self.cfg.warmup.steps
        t_step = time.perf_counter()
        results, record, rollout_spans = self._train(run, step)
        run.step = step
        run.write_back(results)
        validating = bool(cfg.eval.valid_every and step % cfg.eval.valid_every == 0) or step == self.inputs.steps
        if self.trained_items and (validating or step % cfg.recpo.refresh_every == 0):
            t0 = time.perf_counter()
            t_sync, record["table_refresh_row_cos"] = self.refresh_table(run)
            record["time_sync_s"] += t_sync
            self.spans.mark("refresh", t0, time.perf_counter())
        record.update(phase=phase_of(step, W), time_step_s=time.perf_counter() - t_step,
                      epoch=self.inputs.sampler.epoch)
        events = self.system.drain_events()  # rollout workers restarted during this step (already logged)
        record["rollout_restarts"] = len(events)
        self.metrics.log(step, record)
        for e in events:
            self.metrics.log(step, {f"fault/{k}": v for k, v in e.items()})
        if step <= W:
            bar.set_postfix(phase="warmup", loss=f"{record['loss_item']:.4f}")
        else:
            bar.set_postfix(reward=f"{record['reward_mean']:.4f}", loss=f"{record['loss_token']:+.4f}")
        t0 = time.perf_counter()
        valid, new_best = self.validate(run) if validating else (None, False)
        if validating:
            self.spans.mark("validate", t0, time.perf_counter())
        every = cfg.run.checkpoint_every
        if every and (step % every == 0 or step == self.inputs.steps or new_best):
            t0 = time.perf_counter()
            save(self.system, cfg, run, self.inputs.sampler, new_best, compat, self.log)
            self.spans.mark("checkpoint", t0, time.perf_counter())
        self.metrics.log_spans(step, rollout_spans + [s for r in results for s in r.spans] + self.spans.take())
        return valid

    def _inputs(self, run: RunState, step: int) -> tuple[list[list[int]], torch.Tensor, torch.Tensor]:
        """Step ``step``'s prompts, earlier items and targets: drawn now, or one step early (``run.ahead``)."""
        cfg, inputs = self.cfg, self.inputs
        if run.ahead is not None and run.ahead.step == step:
            return run.ahead.prompts, run.ahead.earlier, run.ahead.target
        users = cfg.warmup.prompts_per_step if step <= cfg.warmup.steps else cfg.learner.prompts_per_step
        rows = [inputs.train_ds[i] for i in inputs.sampler.next(users)]
        return batch_inputs(rows, inputs.prepared, inputs.builder, inputs.tokenizer, inputs.titles)

    def _train(self, run: RunState, step: int) -> tuple[list[StepResult], dict, list[Span]]:
        """Global step ``step`` of its phase: the ranks' StepResults, the step's record and the spans of the rollout
        workers' work during the step (none in warm-up)."""
        cfg, inputs, system, W = self.cfg, self.inputs, self.system, self.cfg.warmup.steps
        prompts, earlier, target = self._inputs(run, step)
        if step <= W:
            return (*warmup_step(system, prompts, inputs.marker_ids, earlier, target, run.items.pending), [])
        t_sync = sync_rollouts(system, step - 1)  # the rollout of step k samples the weights after step k-1
        if cfg.rollout.async_:
            return self._train_overlapped(run, step, (prompts, earlier, target), t_sync)
        run.ahead = None  # an async run's rollout for this step (resumed synchronously): sampled again, on-policy
        rollout, results, timings = rl_step(system, cfg, prompts, earlier, target, run.items.pending, version=step,
                                            spans=self.spans)
        record = recpo_record(cfg, rollout, results, timings)
        record["time_sync_s"] += t_sync
        return results, record, rollout.spans

    def _train_overlapped(self, run: RunState, step: int, step_inputs: tuple, t_sync: float
                          ) -> tuple[list[StepResult], dict, list[Span]]:
        """``rollout.async`` (driver/pipeline.py): train on the rollout sampled during the previous step (or, for
        the run's first RecPO step, one sampled now) while the next step's is sampled."""
        cfg, system = self.cfg, self.system
        ahead, run.ahead = run.ahead, None
        spans: list[Span] = []
        if ahead is not None and ahead.step == step:
            rollout = ahead.rollout
        else:
            rollout = system.generate(step_inputs[0], cfg.recpo.group_size, seed=rollout_seed(cfg.run.seed, step),
                                      weight_version=step - 1)
            spans += rollout.spans
        staleness = check_staleness(step, rollout)
        next_inputs = self._inputs(run, step + 1) if step < self.inputs.steps else None
        rollout_next, results, timings = overlapped_step(
            system, cfg, rollout, step_inputs, run.items.pending, next_inputs[0] if next_inputs else None, step,
            self.spans)
        if next_inputs is not None and rollout_next is None:  # discarded: a rollout worker was replaced meanwhile
            rollout_next = system.generate(next_inputs[0], cfg.recpo.group_size,
                                           seed=rollout_seed(cfg.run.seed, step + 1), weight_version=step)
        if next_inputs is not None:
            run.ahead = Ahead(step + 1, *next_inputs, rollout_next)
            spans += rollout_next.spans
        record = recpo_record(cfg, rollout, results, timings)
        record.update(time_sync_s=record["time_sync_s"] + t_sync, weight_staleness=float(staleness))
        # the rollout's throughput is the overlapped generate's (the next step's chains); none on the last step
        overlapped = next_inputs is not None and not timings["ahead_discarded"]
        record.pop("tokens_per_s_rollout")
        if overlapped:
            record["tokens_per_s_rollout"] = (rollout_next.timings.get("generated_tokens", 0.0)
                                              / max(timings["time_rollout_s"], 1e-9))
        return results, record, spans

    def evaluate_split(self, run: RunState, split: str) -> dict:
        cfg, inputs, system = self.cfg, self.inputs, self.system
        sync_rollouts(system, run.step)  # greedy reasoning runs on the rollout engines
        table = unit_rows(run.items.rows)  # once per evaluation, not per batch

        def score_batch(rows, earlier, target):
            prompts = [user_prompt_ids(inputs.builder, inputs.tokenizer, r, inputs.titles) for r in rows]
            chains, h_T = system.greedy(prompts, cfg.eval.max_new_tokens)
            return (mask_history(cosine_scores(h_T, table, cfg.model.tau, items_unit=True), earlier, target),
                    [{"text": c.text, "appended_marker": c.appended_marker} for c in chains])

        batch = cfg.eval.batch_size * cfg.cluster.rollout.num_workers
        return rank_split(inputs.prepared, inputs.subsets[split], batch, cfg.eval.ks, self.out_dir, "r2ec",
                          score_batch, {"step": run.step, "item_table_version": run.items.version},
                          reasoned=cfg.eval.max_new_tokens > 0)

    def refresh_table(self, run: RunState) -> tuple[float, float]:
        """Re-encode the whole catalogue with the current weights (on the rollout engines, brought to them first);
        the rows pending for the learners are in it. Returns the seconds spent on the weight broadcast and the
        mean cosine of each new row with the row it replaces: how stale the table the learner trained against had
        become (rows the step re-encoded were already fresh)."""
        t_sync = sync_rollouts(self.system, run.step)
        old = run.items.rows
        run.items.refresh(self.system.encode_items(self.inputs.item_prompts), run.step)
        self.system.set_items(self.inputs.item_prompts, run.items.rows)
        return t_sync, float((unit_rows(old) * unit_rows(run.items.rows)).sum(dim=1).mean())

    def validate(self, run: RunState) -> tuple[dict, bool]:
        """Validate at ``run.step``: (the result, whether it is a new best)."""
        valid = self.evaluate_split(run, "valid")
        self.metrics.log(run.step, {f"valid/{k}": v for k, v in valid.items() if isinstance(v, float)}
                         | {"valid/item_table_version": run.items.version})
        self.log(f"step {run.step}: valid {format_metrics(valid)}")
        if run.step == 0:
            keep_first_validation(self.out_dir)
        key = best_key(self.cfg)
        new_best = run.best is None or valid[key] > run.best["value"]
        if new_best:
            run.best = {"step": run.step, "metric": key, "value": valid[key]}
        return valid, new_best

    def test(self, run: RunState) -> dict:
        """The final test, against the final model's own item table (as inference would precompute it)."""
        if self.trained_items and run.items.version != self.inputs.steps:
            self.refresh_table(run)
        test = self.evaluate_split(run, "test")
        self.metrics.log(self.inputs.steps, {f"test/{k}": v for k, v in test.items() if isinstance(v, float)})
        return test
