"""The step primitives of the training loop, each one call on the ``System``: a batch's inputs, its shards, a
RecPO step (rollout, learner step, weight sync), a warm-up step, a step's metrics record, and how many steps a run
has. ``driver.session`` strings them into a run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from driver.run_state import rollout_seed
from r2ec.config import Config
from r2ec.data.sampler import history_tensor
from r2ec.prompts import user_prompt_ids
from r2ec.protocol import Rollout, StepMetrics, StepResult, TrainShard, WarmupMetrics, WarmupShard
from r2ec.spans import SpanRecorder


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
            updates: tuple[torch.Tensor, torch.Tensor], version: int, spans: SpanRecorder | None = None
            ) -> tuple[Rollout, list, dict]:
    """One RecPO step across the system: rollout, learner step, weight broadcast. Returns the rollout, the
    ranks' StepResults and the step's timings; ``spans`` (the driver's) gets the weight sync."""
    t = time.perf_counter()
    rollout = system.generate(prompts, cfg.recpo.group_size, seed=rollout_seed(cfg.run.seed, version),
                              weight_version=version - 1)  # the rollout of step k samples the weights after k-1
    t_rollout = time.perf_counter() - t
    t = time.perf_counter()
    shards = make_shards(prompts, rollout, earlier, target, len(system.learners), cfg.recpo.group_size, updates)
    results = system.train_step(shards)
    t_learn = time.perf_counter() - t
    t_sync = timed_sync(system, version, spans)
    return rollout, results, {"time_rollout_s": t_rollout, "time_learner_s": t_learn, "time_sync_s": t_sync}


def timed_sync(system, version: int, spans: SpanRecorder | None = None) -> float:
    """Broadcast the weights after step ``version`` to the rollout engines at the end of a step; returns the seconds
    it took, marked as the driver's ``sync`` phase in ``spans``."""
    t = time.perf_counter()
    system.sync_weights(version=version)
    t_sync = time.perf_counter() - t
    if spans is not None:
        spans.mark("sync", t, t + t_sync)
    return t_sync


def warmup_step(system, prompts: Sequence[Sequence[int]], marker_ids: Sequence[int], earlier: torch.Tensor,
                target: torch.Tensor, updates: tuple[torch.Tensor, torch.Tensor]) -> tuple[list[StepResult], dict]:
    """One warm-up step: each user's prompt + answer marker, whole users per learner rank, one supervised step on
    the learner ranks (no rollout, no weight broadcast). Returns the ranks' StepResults and the step's record."""
    t = time.perf_counter()
    seqs = [list(p) + list(marker_ids) for p in prompts]
    results = system.warmup_step(make_warmup_shards(seqs, earlier, target, len(system.learners), updates))
    return results, {**WarmupMetrics.reduce([r.metrics for r in results]),
                     "time_learner_s": time.perf_counter() - t, "time_sync_s": 0.0}


def recpo_record(cfg: Config, rollout: Rollout, results: list[StepResult], timings: dict) -> dict:
    """The metrics record of a RecPO step: the ranks' metrics, the rollout's diagnostics and the timings."""
    workers = cfg.cluster.rollout.num_workers
    return {
        **StepMetrics.reduce([r.metrics for r in results]),
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
